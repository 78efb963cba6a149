"""Speed and memory benchmark: align time by stage, apply overhead, peak memory from a sharded checkpoint.

Three measurements, each checked against the targets of the speed issue:

1. **Align time** of ``archalign.align(src, dst, check_outputs=False)`` on real architectures
   (torchvision -> timm ResNet-50 and ViT-B/16; Hugging Face Llama -> Mistral at the 7B and 70B
   configurations, built on the meta device) and on a Mixture-of-Experts pair with more than 10^4
   tensors, in both directions. transformers 5 stores a Mixtral layer's experts as two fused 3-d
   tensors (9 tensors per layer whatever the expert count), so the MoE pair is defined here
   (`_moe_classes`): one side with the module tree and names of the Hugging Face Mixtral
   checkpoints (``block_sparse_moe.experts.N.w1/w2/w3``, one ``nn.Linear`` per expert and
   projection, which is how MoE checkpoints are stored), the other with DeepSeek-style names
   (``mlp.experts.N.gate_proj/up_proj/down_proj``). Like the Hugging Face models it is not
   fx-traceable, so archalign runs it once with forward hooks on its ``dummy_inputs``. A sweep of
   smaller Llama and MoE configurations shows how align time grows with the tensor count.

   Each case runs in a fresh worker process with a time limit (imports and model building
   included); a case that exceeds it is recorded as a timeout, with the stages it finished and a
   lower bound for the one it was killed in. Stage times come from wrapping, inside the worker, the
   functions that ``archalign.pipeline.align`` calls through its module namespace (``read_source``,
   ``trace_graph``/``build_units``/``harmonise_graphs``, ``extract_features``, ``match_*``,
   ``_build_plan``) with timers; no archalign file is changed, and time between the calls is
   "other". The slowest completed case is then run again under a sampling profiler
   (`StackSampler`, a thread reading the main thread's stack every 5 ms: per-line attribution,
   negligible overhead), and so are the first ``--profile-budget`` seconds of the largest case that
   timed out.

2. **Apply overhead**: ``plan.apply(dst)`` against ``dst.load_state_dict`` of the same tensors
   (the plan's source tensors under the destination's names), in one process, interleaved, after a
   warm-up; medians of several repeats. ``plan.apply(dst, atomic=False)`` is timed too.

3. **Peak memory from a sharded checkpoint**: a 0.9 GB Llama is written as five safetensors shards
   and a Hugging Face ``model.safetensors.index.json``. Each variant then runs in a fresh process
   that builds the destination (Mistral of the same size, on CPU) and loads the checkpoint: the
   Hugging Face way (one shard at a time into ``load_state_dict(strict=False)``), one merged
   state_dict into ``load_state_dict``, and archalign as it is today (it reads one file or one
   state_dict, not a sharded index): all shards merged into one state_dict -> ``align`` ->
   ``apply``, and ``align`` + ``apply`` once per shard file. Peak RSS is ``ru_maxrss``, counted
   above the RSS right after the imports. Every source tensor holds a distinct constant, so the
   benchmark also counts the destination tensors that received the right values.

Results: a summary on stdout, ``benchmarks/results/speed.md`` (all tables and the targets' verdicts),
``benchmarks/results/speed.png`` (align time against tensor count) and
``benchmarks/results/speed_profile.txt`` (longer profile listings).

Run: ``python benchmarks/speed.py`` (the plot needs ``pip install matplotlib``). Options:
``--timeout`` seconds per align case (default 120), ``--profile-budget`` (default 60), ``--only
align,apply,memory``, ``--cases resnet50,llama7b,...``. 8-13 minutes on 2 CPU cores (more when a
case runs into its time limit).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import hashlib
import inspect
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("read_source", "trace", "features", "matching", "plan", "other")

# the targets
TARGET_RESNET_S = 0.5
TARGET_70B_S = 3.0
TARGET_MOE_S = 30.0
TARGET_APPLY_RATIO = 1.2

# ------------------------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class LlamaShape:
    """A Llama/Mistral configuration (the sizes that matter for the tensor layout)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    def kwargs(self) -> dict[str, int]:
        """Keyword arguments shared by ``LlamaConfig`` and ``MistralConfig``."""
        return {"hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab}


LLAMA_7B = LlamaShape(4096, 11008, 32, 32, 32)
LLAMA_70B = LlamaShape(8192, 28672, 80, 64, 8)
LLAMA_HALF_B = LlamaShape(1536, 4096, 16, 12, 4)  # ~0.5B parameters (2.0 GB in fp32)
LLAMA_SHARDED = LlamaShape(1024, 4096, 10, 16, 16)  # ~0.23B parameters (0.93 GB in fp32)


@dataclass(frozen=True)
class MoeShape:
    """Size of the MoE pair: ``layers * (7 + 3 * experts) + 3`` tensors per side."""

    layers: int
    experts: int
    hidden: int = 64
    intermediate: int = 128
    vocab: int = 1000



MOE_BIG = MoeShape(layers=32, experts=104)  # 10,211 tensors
MOE_MIXTRAL_8X7B = MoeShape(layers=32, experts=8)  # the layer/expert topology of Mixtral-8x7B


@dataclass(frozen=True)
class AlignCase:
    """One source -> destination pair whose align time is measured."""

    name: str
    label: str  # what the table shows
    family: str  # series of the plot
    kind: str  # "vision", "llama" or "moe"
    spec: Any = None  # LlamaShape / MoeShape, or a (src, dst) pair of model names
    reverse: bool = False  # swap source and destination
    repeats: int = 1  # runs after the first (the first is "cold")
    target: float | None = None  # seconds, from the issue
    sweep: bool = False  # only a point of the scaling plot


ALIGN_CASES = (
    AlignCase("resnet50", "torchvision resnet50 -> timm resnet50", "torchvision -> timm", "vision",
              ("resnet50", "resnet50"), repeats=5, target=TARGET_RESNET_S),
    AlignCase("vit_b_16", "torchvision vit_b_16 -> timm vit_base_patch16_224", "torchvision -> timm",
              "vision", ("vit_b_16", "vit_base_patch16_224"), repeats=3),
    AlignCase("llama7b", "Llama-7B -> Mistral-7B (meta)", "Llama -> Mistral (meta)", "llama",
              LLAMA_7B),
    AlignCase("llama70b", "Llama-70B -> Mistral-70B (meta)", "Llama -> Mistral (meta)", "llama",
              LLAMA_70B, target=TARGET_70B_S),
    AlignCase("moe_a2b", f"MoE {MOE_BIG.layers}L x {MOE_BIG.experts}E Mixtral-names -> "
              "DeepSeek-names (meta)", "MoE (meta)", "moe", MOE_BIG, target=TARGET_MOE_S),
    AlignCase("moe_b2a", f"MoE {MOE_BIG.layers}L x {MOE_BIG.experts}E DeepSeek-names -> "
              "Mixtral-names (meta)", "MoE (meta)", "moe", MOE_BIG, reverse=True,
              target=TARGET_MOE_S),
    AlignCase("llama7b_l2", "Llama -> Mistral, 7B width, 2 layers", "Llama -> Mistral (meta)",
              "llama", dataclasses.replace(LLAMA_7B, layers=2), sweep=True),
    AlignCase("llama7b_l8", "Llama -> Mistral, 7B width, 8 layers", "Llama -> Mistral (meta)",
              "llama", dataclasses.replace(LLAMA_7B, layers=8), sweep=True),
    AlignCase("moe_l4_e8", "MoE 4L x 8E", "MoE (meta)", "moe", MoeShape(4, 8), sweep=True),
    AlignCase("moe_l4_e32", "MoE 4L x 32E", "MoE (meta)", "moe", MoeShape(4, 32), sweep=True),
    AlignCase("moe_mixtral", "MoE 32L x 8E (Mixtral-8x7B topology)", "MoE (meta)", "moe",
              MOE_MIXTRAL_8X7B, sweep=True),
    AlignCase("moe_l16_e32", "MoE 16L x 32E", "MoE (meta)", "moe", MoeShape(16, 32), sweep=True),
    AlignCase("moe_l64_e104", "MoE 64L x 104E", "MoE (meta)", "moe", MoeShape(64, 104),
              sweep=True),
    AlignCase("moe_l64_e256", "MoE 64L x 256E", "MoE (meta)", "moe", MoeShape(64, 256),
              sweep=True),
)


@dataclass(frozen=True)
class ApplyCase:
    """A pair whose ``plan.apply`` is timed against ``load_state_dict``."""

    name: str
    label: str
    repeats: int
    profile: bool = False  # also sample one apply (to see where its time goes)


APPLY_CASES = (
    ApplyCase("resnet50", "torchvision resnet50 -> timm resnet50", 11),
    ApplyCase("vit_b_16", "torchvision vit_b_16 -> timm vit_base_patch16_224", 5, profile=True),
    ApplyCase("llama_0.5b", "Llama-0.5B -> Mistral-0.5B (CPU, fp32)", 3),
)

MEMORY_VARIANTS = {  # name -> (label, is a streaming archalign load the target is about)
    "hf_streaming": ("baseline: load_file + load_state_dict(strict=False) one shard at a time "
                     "(how transformers loads)", False),
    "merged_load_state_dict": ("baseline: all shards merged into one state_dict -> "
                               "load_state_dict", False),
    "archalign_index": ("archalign: align(index.json, dst) -> apply(dst)", True),
    "archalign_index_nonatomic": ("archalign: align(index.json, dst) -> apply(dst, atomic=False)",
                                  True),
    "archalign_index_meta_dst": ("archalign: destination on meta; align(index.json, dst) -> "
                                 "apply(dst) materialises it", True),
    "archalign_merged_sorted": ("archalign: all shards merged into one state_dict, keys sorted "
                                "-> align -> apply", False),
    "archalign_merged": ("archalign: all shards merged into one state_dict in shard order -> "
                         "align -> apply", False),
}

# ------------------------------------------------------------------------------------ models


def make_moe(shape: MoeShape, style: str) -> nn.Module:
    """Build the MoE language model of ``shape`` with Mixtral ("a") or DeepSeek ("b") names."""
    return _moe_classes()(shape, style)


@functools.cache
def _moe_classes() -> Any:
    """Define the MoE modules (they subclass nn.Module, so torch must be imported first)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    names = {
        "a": {"root": "model", "embed": "embed_tokens", "layers": "layers", "norm": "norm",
              "attn": "self_attn", "proj": ("q_proj", "k_proj", "v_proj", "o_proj"),
              "ln1": "input_layernorm", "ln2": "post_attention_layernorm",
              "moe": "block_sparse_moe", "gate": "gate",
              # Mixtral registers w1 (gate), w2 (down), w3 (up)
              "expert": (("w1", "gate"), ("w2", "down"), ("w3", "up"))},
        "b": {"root": "transformer", "embed": "wte", "layers": "h", "norm": "ln_f",
              "attn": "attn", "proj": ("wq", "wk", "wv", "wo"), "ln1": "ln_1", "ln2": "ln_2",
              "moe": "mlp", "gate": "router",
              "expert": (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))},
    }

    class RMSNorm(nn.Module):
        """Root-mean-square norm with a learned scale."""

        def __init__(self, dim: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    class Expert(nn.Module):
        """A SwiGLU feed-forward expert; ``roles`` maps each projection's name to its role."""

        def __init__(self, hidden: int, inter: int, roles: tuple[tuple[str, str], ...]) -> None:
            super().__init__()
            sizes = {"gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}
            self.role_names = {role: name for name, role in roles}
            for name, role in roles:
                setattr(self, name, nn.Linear(*sizes[role], bias=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate, up, down = (getattr(self, self.role_names[r]) for r in ("gate", "up", "down"))
            return down(F.silu(gate(x)) * up(x))

    class Attention(nn.Module):
        """Single-head attention (the tensor layout is what matters here)."""

        def __init__(self, hidden: int, proj: tuple[str, ...]) -> None:
            super().__init__()
            self.proj = proj
            for name in proj:
                setattr(self, name, nn.Linear(hidden, hidden, bias=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v, o = (getattr(self, n) for n in self.proj)
            scores = q(x) @ k(x).transpose(-1, -2) / math.sqrt(x.shape[-1])
            return o(torch.softmax(scores, dim=-1) @ v(x))

    class SparseMoe(nn.Module):
        """Router plus experts; every expert runs, weighted by the router (dense, meta-friendly)."""

        def __init__(self, shape: MoeShape, n: dict[str, Any]) -> None:
            super().__init__()
            self.gate_name = n["gate"]
            setattr(self, n["gate"], nn.Linear(shape.hidden, shape.experts, bias=False))
            self.experts = nn.ModuleList(Expert(shape.hidden, shape.intermediate, n["expert"])
                                         for _ in range(shape.experts))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weights = torch.softmax(getattr(self, self.gate_name)(x), dim=-1)
            out = torch.zeros_like(x)
            for i, expert in enumerate(self.experts):
                out = out + weights[..., i:i + 1] * expert(x)
            return out

    class Block(nn.Module):
        """Pre-norm transformer block with an MoE feed-forward."""

        def __init__(self, shape: MoeShape, n: dict[str, Any]) -> None:
            super().__init__()
            self.n = n
            setattr(self, n["attn"], Attention(shape.hidden, n["proj"]))
            setattr(self, n["moe"], SparseMoe(shape, n))
            setattr(self, n["ln1"], RMSNorm(shape.hidden))
            setattr(self, n["ln2"], RMSNorm(shape.hidden))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = self.n
            x = x + getattr(self, n["attn"])(getattr(self, n["ln1"])(x))
            return x + getattr(self, n["moe"])(getattr(self, n["ln2"])(x))

    class MoeLM(nn.Module):
        """Decoder-only MoE language model, Hugging Face style (``dummy_inputs``, not fx-traceable)."""

        max_positions = 4096

        def __init__(self, shape: MoeShape, style: str) -> None:
            super().__init__()
            n = names[style]
            self.n = n
            root = nn.Module()
            setattr(root, n["embed"], nn.Embedding(shape.vocab, shape.hidden))
            setattr(root, n["layers"], nn.ModuleList(Block(shape, n) for _ in range(shape.layers)))
            setattr(root, n["norm"], RMSNorm(shape.hidden))
            setattr(self, n["root"], root)
            self.lm_head = nn.Linear(shape.hidden, shape.vocab, bias=False)

        @property
        def dummy_inputs(self) -> dict[str, torch.Tensor]:
            return {"input_ids": torch.tensor([[7, 6, 0, 0, 1], [1, 2, 3, 0, 0]])}

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            # a check on the input's size, as Hugging Face models make: torch.fx cannot trace it
            if input_ids.shape[-1] > self.max_positions:
                raise ValueError("sequence too long")
            n, root = self.n, getattr(self, self.n["root"])
            x = getattr(root, n["embed"])(input_ids)
            for block in getattr(root, n["layers"]):
                x = block(x)
            return self.lm_head(getattr(root, n["norm"])(x))

    return MoeLM


_MOE_RENAMES = (  # Mixtral names -> DeepSeek names, applied in order
    (r"^model\.embed_tokens\.", "transformer.wte."),
    (r"^model\.norm\.", "transformer.ln_f."),
    (r"^model\.layers\.(\d+)\.", r"transformer.h.\1."),
    (r"\.self_attn\.q_proj\.", ".attn.wq."),
    (r"\.self_attn\.k_proj\.", ".attn.wk."),
    (r"\.self_attn\.v_proj\.", ".attn.wv."),
    (r"\.self_attn\.o_proj\.", ".attn.wo."),
    (r"\.input_layernorm\.", ".ln_1."),
    (r"\.post_attention_layernorm\.", ".ln_2."),
    (r"\.block_sparse_moe\.gate\.", ".mlp.router."),
    (r"\.block_sparse_moe\.experts\.(\d+)\.w1\.", r".mlp.experts.\1.gate_proj."),
    (r"\.block_sparse_moe\.experts\.(\d+)\.w2\.", r".mlp.experts.\1.down_proj."),
    (r"\.block_sparse_moe\.experts\.(\d+)\.w3\.", r".mlp.experts.\1.up_proj."),
)


def truth_of(case: AlignCase, src: nn.Module, dst: nn.Module) -> dict[str, str] | None:
    """The right destination key of every source key, where this benchmark knows it.

    Llama and Mistral share their key names; the MoE pair's renames are `_MOE_RENAMES`. The vision
    pairs' truth lives in ``corpus/`` (see ``benchmarks/accuracy.py``): None here.
    """
    if case.kind == "llama":
        return {k: k for k in src.state_dict()}
    if case.kind != "moe":
        return None
    mixtral_side = dst if case.reverse else src
    renamed = {}
    for key in mixtral_side.state_dict():
        new = key
        for pattern, replacement in _MOE_RENAMES:
            new = re.sub(pattern, replacement, new)
        renamed[key] = new
    return {b: a for a, b in renamed.items()} if case.reverse else renamed


def _llama_pair(shape: LlamaShape, device: str) -> tuple[nn.Module, nn.Module]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    with torch.device(device):
        src = LlamaForCausalLM(LlamaConfig(**shape.kwargs()))
        dst = MistralForCausalLM(MistralConfig(**shape.kwargs()))
    return src.eval(), dst.eval()


def _vision_pair(names: tuple[str, str]) -> tuple[nn.Module, nn.Module]:
    import timm
    import torchvision

    src = getattr(torchvision.models, names[0])(weights=None)
    dst = timm.create_model(names[1], pretrained=False)
    return src.eval(), dst.eval()


def build_align_case(case: AlignCase) -> tuple[nn.Module, nn.Module]:
    """Build the (source, destination) modules of an align case."""
    import torch

    if case.kind == "vision":
        src, dst = _vision_pair(case.spec)
    elif case.kind == "llama":
        src, dst = _llama_pair(case.spec, "meta")
    else:
        with torch.device("meta"):
            src, dst = make_moe(case.spec, "a"), make_moe(case.spec, "b")
    return (dst, src) if case.reverse else (src, dst)


def _fill_distinct(model: nn.Module) -> None:
    """Give every tensor of ``model`` a distinct constant (cheap, and makes wrong loads visible)."""
    import torch

    with torch.no_grad():
        for i, tensor in enumerate(model.state_dict().values()):
            if tensor.is_floating_point():
                tensor.fill_(float(i + 1))


def build_apply_case(case: ApplyCase) -> tuple[nn.Module, nn.Module]:
    """Build the (source, destination) modules of an apply case, with real memory on the CPU."""
    if case.name == "llama_0.5b":
        src, dst = _llama_pair(LLAMA_HALF_B, "meta")
        src, dst = src.to_empty(device="cpu"), dst.to_empty(device="cpu")
        _fill_distinct(src)
        _fill_distinct(dst)
        return src, dst
    spec = next(c.spec for c in ALIGN_CASES if c.name == case.name)
    return _vision_pair(spec)


# ------------------------------------------------------------------------------------ worker side


class Events:
    """Progress of a worker, one JSON object per line in a file the parent reads (even after a kill)."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self.emit("hello", epoch=time.time())

    def emit(self, kind: str, **data: Any) -> None:
        """Append one event, stamped with the seconds since the worker started."""
        record = {"event": kind, "t": round(time.perf_counter() - self._start, 4), **data}
        with self._lock:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()


def stage_of(function_name: str) -> str:
    """The stage a function called by ``pipeline.align`` belongs to."""
    if function_name == "read_source":
        return "read_source"
    if function_name in ("trace_graph", "harmonise_graphs", "build_units",
                         "_in_registration_order"):
        return "trace"
    if function_name in ("extract_features", "resolve_hints"):
        return "features"
    if function_name.startswith("match_") or function_name == "_left":
        return "matching"
    if function_name in ("_build_plan", "decide_by_activations", "dummy_inputs", "_cheap_to_run"):
        return "plan"
    return "other"


class StageTimer:
    """Times the calls ``archalign.pipeline.align`` makes through its module namespace."""

    def __init__(self, events: Events | None = None) -> None:
        self.calls: list[tuple[str, float]] = []
        self._events = events
        self._depth = 0
        self._originals: dict[str, Any] = {}

    def _wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return function(*args, **kwargs)
            if self._events is not None:
                self._events.emit("start", function=name)
            self._depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                seconds = time.perf_counter() - start
                self.calls.append((name, seconds))
                if self._events is not None:
                    self._events.emit("end", function=name, seconds=round(seconds, 4))

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[StageTimer]:
        """Wrap every archalign function in ``archalign.pipeline``'s namespace while inside."""
        import archalign.pipeline as pipeline

        for name, value in vars(pipeline).items():
            if (inspect.isfunction(value) and value.__module__.startswith("archalign")
                    and name not in ("align", "align_and_load")):
                self._originals[name] = value
                setattr(pipeline, name, self._wrap(name, value))
        try:
            yield self
        finally:
            for name, value in self._originals.items():
                setattr(pipeline, name, value)
            self._originals.clear()

    def split(self, total: float) -> dict[str, float]:
        """Seconds per stage; "other" also takes what no wrapped call accounts for."""
        out = dict.fromkeys(STAGES, 0.0)
        for name, seconds in self.calls:
            out[stage_of(name)] += seconds
        out["other"] += max(total - sum(out.values()), 0.0)
        return out

    def by_function(self) -> dict[str, float]:
        """Seconds per wrapped function (summed over calls)."""
        out: dict[str, float] = {}
        for name, seconds in self.calls:
            out[name] = out.get(name, 0.0) + seconds
        return out


def _setup_torch() -> None:
    """Two intra-op threads (the machine has two cores) and a fixed seed."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)


def worker_align(case: AlignCase, events: Events) -> dict[str, Any]:
    """Time the imports, the first (cold) align and ``case.repeats`` warm ones."""
    start = time.perf_counter()
    import torch  # noqa: F401

    torch_s = time.perf_counter() - start
    import archalign

    import_s = time.perf_counter() - start
    _setup_torch()
    events.emit("imported", torch_s=torch_s, import_s=import_s)
    begin = time.perf_counter()
    src, dst = build_align_case(case)
    build_s = time.perf_counter() - begin
    n_src, n_dst = len(src.state_dict()), len(dst.state_dict())
    events.emit("built", build_s=build_s, n_src=n_src, n_dst=n_dst)
    runs = []
    plan = None
    for i in range(1 + case.repeats):
        timer = StageTimer(events if i == 0 else None)
        events.emit("align_start", run=i)
        wall, cpu = time.perf_counter(), time.process_time()
        with timer.installed():
            plan = archalign.align(src, dst, check_outputs=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        runs.append({"wall": wall, "cpu": cpu, "stages": timer.split(wall),
                     "functions": timer.by_function()})
        events.emit("align_end", run=i, wall=wall)
    assert plan is not None
    matched = {d for m in plan.matches for d in m.dst}
    truth = truth_of(case, src, dst)
    right = None if truth is None else sum(
        len(m.src) == 1 and len(m.dst) == 1 and truth.get(m.src[0]) == m.dst[0]
        for m in plan.matches)
    return {"import_s": import_s, "torch_import_s": torch_s, "build_s": build_s,
            "n_src": n_src, "n_dst": n_dst, "runs": runs,
            "tracers": [plan.src_tracer, plan.dst_tracer], "matched_dst": len(matched),
            "right": right, "matches": len(plan.matches), "archalign_file": archalign.__file__,
            "low": sum(m.confidence < 0.5 for m in plan.matches)}


class StackSampler:
    """A sampling profiler: a background thread reads the main thread's Python stack every few ms.

    Unlike cProfile it adds almost no overhead (a timed-out case runs as far as unprofiled) and it
    attributes time to source lines. For every sample it counts, once each: the archalign functions
    and the archalign lines on the stack ("inclusive": the time spent in them and below), the
    innermost archalign line (where archalign's own code was running or called out to a library),
    and the innermost frame of all ("leaf": where the CPU was).
    """

    def __init__(self, interval: float = 0.005, events: Events | None = None,
                 snapshot_every: float = 5.0) -> None:
        self.interval = interval
        self.samples = 0
        self.functions: Counter[str] = Counter()
        self.lines: Counter[str] = Counter()
        self.innermost: Counter[str] = Counter()
        self.leaves: Counter[str] = Counter()
        self._events = events
        self._snapshot_every = snapshot_every
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.perf_counter()

    def __enter__(self) -> StackSampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last_snapshot = time.perf_counter()
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self._main)
            if frame is None:
                continue
            self._record(frame)
            if self._events is not None and time.perf_counter() - last_snapshot > self._snapshot_every:
                self._events.emit("profile", profile=self.summary())
                last_snapshot = time.perf_counter()

    def _record(self, frame: Any) -> None:
        self.samples += 1
        self.leaves[_where(frame.f_code, frame.f_lineno, as_line=True)] += 1
        functions, lines = set(), set()
        innermost = None
        while frame is not None:
            code = frame.f_code
            if "/archalign/" in code.co_filename:
                functions.add(_where(code, code.co_firstlineno, as_line=False))
                here = _where(code, frame.f_lineno, as_line=True)
                lines.add(here)
                innermost = innermost or here
            frame = frame.f_back
        self.functions.update(functions)
        self.lines.update(lines)
        if innermost is not None:
            self.innermost[innermost] += 1

    def summary(self, limit: int = 40) -> dict[str, Any]:
        """The counters as shares of all samples (the top ``limit`` of each)."""
        n = max(self.samples, 1)

        def top(counter: Counter[str]) -> list[tuple[str, float]]:
            return [(k, v / n) for k, v in counter.most_common(limit)]

        return {"samples": self.samples, "interval": self.interval,
                "elapsed": time.perf_counter() - self._started,
                "functions": top(self.functions), "lines": top(self.lines),
                "innermost": top(self.innermost), "leaves": top(self.leaves)}


def _where(code: Any, lineno: int, *, as_line: bool) -> str:
    """``archalign/match.py:401 _fused_pairs`` for a line, ``archalign/match.py:382(_fused_pairs)``
    for a function (its ``def`` line); library paths are shown from their package on."""
    path = code.co_filename
    if "/archalign/" in path:
        path = "archalign/" + path.rpartition("/archalign/")[2]
    elif "site-packages/" in path:
        path = path.rpartition("site-packages/")[2]
    elif path.startswith("/"):
        path = Path(path).name
    at = "?" if lineno is None else lineno
    return f"{path}:{at} {code.co_name}" if as_line else f"{path}:{at}({code.co_name})"


def worker_profile(case: AlignCase, events: Events) -> dict[str, Any]:
    """Sample one align of ``case`` (snapshots go to the events, in case the worker is killed)."""
    import archalign

    _setup_torch()
    src, dst = build_align_case(case)
    events.emit("align_start", run=0)
    start = time.perf_counter()
    with StackSampler(events=events) as sampler:
        archalign.align(src, dst, check_outputs=False)
    return {"case": case.name, "completed": True, "wall": time.perf_counter() - start,
            "profile": sampler.summary()}


def _mapped_state(plan: Any, source: nn.Module, loaded: set[str]) -> dict[str, Any]:
    """The tensors ``plan.apply`` writes, under the destination's names (ops applied up front)."""
    import torch

    state = source.state_dict()
    out: dict[str, Any] = {}
    with torch.no_grad():
        for match in plan.matches:
            if not set(match.dst) <= loaded:
                continue
            if match.ops:  # an adaptation (none in these pairs): computed here, untimed
                from archalign.ops import apply_ops

                out.update(zip(match.dst, apply_ops([state[k] for k in match.src], match.ops)))
            else:
                out.update(zip(match.dst, (state[k] for k in match.src)))
    return out


def worker_apply(case: ApplyCase) -> dict[str, Any]:
    """Median times of ``plan.apply`` (atomic and not) and of ``load_state_dict``, interleaved."""
    import archalign

    _setup_torch()
    src, dst = build_apply_case(case)
    n_bytes = sum(t.numel() * t.element_size() for t in dst.state_dict().values())
    plan = archalign.align(src, dst, check_outputs=False)
    report = plan.apply(dst)  # warm-up
    mapped = _mapped_state(plan, src, set(report.loaded))
    strict = len(mapped) == len(dst.state_dict())
    dst.load_state_dict(mapped, strict=strict)  # warm-up
    plan.apply(dst, atomic=False)  # warm-up
    timings: dict[str, list[float]] = {"apply": [], "apply_nonatomic": [], "load_state_dict": []}
    for _ in range(case.repeats):
        for name in timings:
            gc.collect()
            start = time.perf_counter()
            if name == "load_state_dict":
                dst.load_state_dict(mapped, strict=strict)
            else:
                plan.apply(dst, atomic=name == "apply")
            timings[name].append(time.perf_counter() - start)
    profile = None
    if case.profile:
        with StackSampler(interval=0.001) as sampler:
            plan.apply(dst)
        profile = sampler.summary()
    return {"case": case.name, "tensors": len(dst.state_dict()), "loaded": len(report.loaded),
            "bytes": n_bytes, "repeats": case.repeats, "strict_baseline": strict,
            "median": {k: statistics.median(v) for k, v in timings.items()},
            "min": {k: min(v) for k, v in timings.items()},
            "all": timings, "profile": profile}


def worker_write_shards(directory: Path, n_shards: int) -> dict[str, Any]:
    """Write the Llama source as ``n_shards`` safetensors files and a Hugging Face index."""
    from safetensors.torch import save_file

    _setup_torch()
    src, _ = _llama_pair(LLAMA_SHARDED, "meta")
    src = src.to_empty(device="cpu")
    _fill_distinct(src)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    total = sum(t.numel() * t.element_size() for t in state.values())
    limit = total / n_shards
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit * 1.05:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map: dict[str, str] = {}
    sizes = []
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        sizes.append((directory / name).stat().st_size)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2),
                                                            encoding="utf-8")
    expected = {k: i + 1 for i, k in enumerate(state)}
    (directory / "expected.json").write_text(json.dumps(expected), encoding="utf-8")
    return {"total_bytes": total, "shard_bytes": sizes, "tensors": len(state)}


def _rss_kib() -> dict[str, int]:
    """Current and peak resident set size of this process (KiB), from /proc."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount, _unit = line.split()
                values[name.rstrip(":")] = int(amount)
    return values


def _merged_shards(directory: Path, files: list[str]) -> dict[str, Any]:
    """Every shard read with ``safetensors.torch.load_file`` into one dict, in shard order."""
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


def _load_by_variant(variant: str, directory: Path, files: list[str], dst: nn.Module,
                     marks: dict[str, int]) -> tuple[list[str], int] | None:
    """Load the checkpoint in ``directory`` into ``dst`` the way ``variant`` says.

    archalign applies with ``min_confidence=0`` so that every planned tensor is written (the
    memory of a full load). Returns the destination keys archalign loaded and how many of its
    matches the default ``min_confidence=0.5`` would have skipped (None for a baseline).
    """
    from safetensors.torch import load_file

    import archalign

    index = directory / "model.safetensors.index.json"
    if variant == "hf_streaming":
        for name in files:
            shard = load_file(str(directory / name))
            dst.load_state_dict(shard, strict=False)
            del shard
    elif variant == "merged_load_state_dict":
        state = _merged_shards(directory, files)
        marks["state_dict read"] = _rss_kib()["VmRSS"]
        dst.load_state_dict(state)
    elif variant.startswith("archalign_index"):
        plan = archalign.align(index, dst, check_outputs=False)
        marks["aligned"] = _rss_kib()["VmRSS"]
        report = plan.apply(dst, min_confidence=0.0, atomic=variant != "archalign_index_nonatomic")
        return list(report.loaded), sum(m.confidence < 0.5 for m in plan.matches)
    elif variant in ("archalign_merged", "archalign_merged_sorted"):
        state = _merged_shards(directory, files)
        if variant == "archalign_merged_sorted":
            state = dict(sorted(state.items()))
        marks["state_dict read"] = _rss_kib()["VmRSS"]
        plan = archalign.align(state, dst, check_outputs=False)
        marks["aligned"] = _rss_kib()["VmRSS"]
        report = plan.apply(dst, min_confidence=0.0)
        return list(report.loaded), sum(m.confidence < 0.5 for m in plan.matches)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return None


def worker_memory(variant: str, directory: Path) -> dict[str, Any]:
    """Build the destination and load the sharded checkpoint into it by ``variant``; report RSS."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    _setup_torch()
    index = json.loads((directory / "model.safetensors.index.json").read_text(encoding="utf-8"))
    files = list(dict.fromkeys(index["weight_map"].values()))
    marks = {"imports": _rss_kib()["VmRSS"]}
    start = time.perf_counter()
    device = "meta" if variant.endswith("meta_dst") else "cpu"
    with torch.device(device):
        dst = MistralForCausalLM(MistralConfig(**LLAMA_SHARDED.kwargs())).eval()
    dst_bytes = sum(t.numel() * t.element_size() for t in dst.state_dict().values())
    marks["destination built"] = _rss_kib()["VmRSS"]
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    error = ""
    outcome: tuple[list[str], int] | None = None
    try:
        outcome = _load_by_variant(variant, directory, files, dst, marks)
    except Exception as exc:  # e.g. an archalign that cannot read a sharded index
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    load_s = time.perf_counter() - start
    gc.collect()
    marks["after load"] = _rss_kib()["VmRSS"]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expected = json.loads((directory / "expected.json").read_text(encoding="utf-8"))
    state_now = dst.state_dict()
    right = {k for k, v in expected.items() if k in state_now
             and state_now[k].device.type != "meta" and bool((state_now[k] == v).all())}
    return {"variant": variant, "peak_kib": peak_kib, "marks_kib": marks, "dst_bytes": dst_bytes,
            "build_s": build_s, "load_s": load_s, "correct": len(right), "tensors": len(expected),
            "loaded": None if outcome is None else len(outcome[0]),
            "wrong": None if outcome is None else len(set(outcome[0]) - right),
            "low": None if outcome is None else outcome[1], "error": error}


def worker_main(args: argparse.Namespace) -> None:
    """Entry point of a worker process: run one measurement, write its result as JSON."""
    events = Events(Path(args.events))
    result: dict[str, Any]
    if args.worker == "align":
        result = worker_align(_align_case(args.case), events)
    elif args.worker == "profile":
        result = worker_profile(_align_case(args.case), events)
    elif args.worker == "apply":
        result = worker_apply(next(c for c in APPLY_CASES if c.name == args.case))
    elif args.worker == "write_shards":
        result = worker_write_shards(Path(args.dir), args.shards)
    elif args.worker == "memory":
        result = worker_memory(args.case, Path(args.dir))
    else:
        raise ValueError(f"unknown worker {args.worker!r}")
    events.emit("result", result=result)


def _align_case(name: str) -> AlignCase:
    """The align case called ``name``."""
    return next(c for c in ALIGN_CASES if c.name == name)


# ------------------------------------------------------------------------------------ parent side


@dataclass
class WorkerRun:
    """What a worker process left behind."""

    events: list[dict[str, Any]]
    result: dict[str, Any] | None
    seconds: float
    ended: float  # time.time() when the worker ended or was killed
    status: str  # "ok", "timeout" or "error: ..."
    stderr_tail: str = ""

    def first(self, kind: str) -> dict[str, Any] | None:
        """The first event of ``kind``, if any."""
        return next((e for e in self.events if e["event"] == kind), None)


def run_worker(worker: str, timeout: float, **options: Any) -> WorkerRun:
    """Run ``speed.py --worker ...`` in a fresh interpreter, killed after ``timeout`` seconds."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as handle:
        events_path = Path(handle.name)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker,
               "--events", str(events_path)]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONHASHSEED": "0", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    status, stderr = "ok", ""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=ROOT, check=False)
        if done.returncode != 0:
            stderr = done.stderr
            last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
            status = "error: " + (last[-1][:160] if last else f"exit code {done.returncode}")
    except subprocess.TimeoutExpired as exc:
        status = "timeout"
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (
            exc.stderr or "")
    seconds, ended = time.perf_counter() - start, time.time()
    events = [json.loads(line) for line in events_path.read_text(encoding="utf-8").splitlines()
              if line.strip()]
    events_path.unlink()
    result = next((e["result"] for e in events if e["event"] == "result"), None)
    return WorkerRun(events, result, seconds, ended, status, stderr[-2000:])


@dataclass
class AlignRow:
    """Align measurements of one case, as the tables and the plot need them."""

    case: AlignCase
    status: str
    n_src: int | None = None
    n_dst: int | None = None
    import_s: float | None = None
    build_s: float | None = None
    cold: float | None = None  # seconds of the first align after import
    cold_cpu: float | None = None
    warm: float | None = None  # median of the repeats
    stages: dict[str, float] = field(default_factory=dict)  # of the first run
    functions: dict[str, float] = field(default_factory=dict)
    killed_in: str = ""  # the function running when the time limit struck
    lower_bound: float | None = None  # for a timeout: align had run at least this long
    extrapolated: float | None = None  # for a timeout: seconds predicted from the sweep
    archalign_file: str = ""  # where the worker imported archalign from
    detail: str = ""

    @property
    def seconds(self) -> float | None:
        """The figure that is compared with a target: the cold align, or a lower bound."""
        return self.cold if self.cold is not None else self.lower_bound


def collect_align(case: AlignCase, run: WorkerRun) -> AlignRow:
    """Turn a worker's result, or the events of a killed worker, into a row."""
    row = AlignRow(case, run.status)
    built = run.first("built")
    if built:
        row.n_src, row.n_dst, row.build_s = built["n_src"], built["n_dst"], built["build_s"]
    imported = run.first("imported")
    if imported:
        row.import_s = imported["import_s"]
    if run.result is not None:
        r = run.result
        first = r["runs"][0]
        row.cold, row.cold_cpu, row.stages, row.functions = (
            first["wall"], first["cpu"], first["stages"], first["functions"])
        warm = [x["wall"] for x in r["runs"][1:]]
        row.warm = statistics.median(warm) if warm else None
        row.archalign_file = r["archalign_file"]
        row.detail = (f"tracers {r['tracers'][0]}/{r['tracers'][1]}; {r['matched_dst']}/"
                      f"{r['n_dst']} dst tensors matched" + (
                          f", {r['right']}/{r['n_src']} right" if r["right"] is not None else "")
                      + f"; {r['low']} matches below apply's min_confidence 0.5")
        return row
    # killed or failed: rebuild what the first run finished from its events
    hello, start = run.first("hello"), run.first("align_start")
    if hello is None or start is None:
        row.detail = "did not reach align"
        return row
    # seconds of the worker's own clock (0 when it created its event file) at the kill
    end_t = run.ended - hello["epoch"]
    open_calls: dict[str, float] = {}
    for event in run.events:
        if event["event"] == "start":
            open_calls[event["function"]] = event["t"]
        elif event["event"] == "end":
            open_calls.pop(event["function"], None)
            name, seconds = event["function"], event["seconds"]
            row.functions[name] = row.functions.get(name, 0.0) + seconds
            row.stages[stage_of(name)] = row.stages.get(stage_of(name), 0.0) + seconds
    row.lower_bound = max(end_t - start["t"], 0.0)
    if open_calls:
        name, since = next(iter(open_calls.items()))
        row.killed_in = name
        running = max(end_t - since, 0.0)
        row.stages[stage_of(name)] = row.stages.get(stage_of(name), 0.0) + running
        row.functions[name] = row.functions.get(name, 0.0) + running
    row.detail = f"killed in {row.killed_in}" if row.killed_in else row.status
    return row


def _fmt_s(x: float | None) -> str:
    """Seconds for a table cell: three decimals below 10 s, one above; "-" for none."""
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def align_table(rows: list[AlignRow]) -> list[str]:
    """Markdown table of align times and their split by stage."""
    lines = ["| case | tensors src/dst | status | align s (first, after import) | warm median s | "
             "cpu s | " + " | ".join(STAGES) + " | import s | build s | notes |",
             "|---|---|---|---|---|---|" + "---|" * len(STAGES) + "---|---|---|"]
    for row in rows:
        tensors = f"{row.n_src}/{row.n_dst}" if row.n_src is not None else "-"
        if row.cold is not None:
            first = _fmt_s(row.cold)
        elif row.lower_bound is not None:
            first = f"> {_fmt_s(row.lower_bound)}"
        else:
            first = "-"
        stage_cells = []
        for stage in STAGES:
            seconds = row.stages.get(stage)
            if seconds is None:
                stage_cells.append("-")
                continue
            killed = row.killed_in and stage_of(row.killed_in) == stage
            share = f" ({100 * seconds / row.seconds:.0f}%)" if row.seconds else ""
            stage_cells.append(("> " if killed else "") + _fmt_s(seconds) + share)
        status = row.status if not row.status.startswith("error") else "error"
        lines.append(f"| {row.case.label} | {tensors} | {status} | {first} | {_fmt_s(row.warm)} | "
                     f"{_fmt_s(row.cold_cpu)} | " + " | ".join(stage_cells) +
                     f" | {_fmt_s(row.import_s)} | {_fmt_s(row.build_s)} | {row.detail} |")
    return lines


def function_table(rows: list[AlignRow]) -> list[str]:
    """Markdown table: seconds per function called by ``pipeline.align`` (first run)."""
    names: list[str] = []
    for row in rows:
        names += [n for n in row.functions if n not in names]
    lines = ["| case | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        cells = []
        for n in names:
            if n not in row.functions:
                cells.append("-")
            else:
                cells.append(("> " if n == row.killed_in else "") + _fmt_s(row.functions[n]))
        lines.append(f"| {row.case.label} | " + " | ".join(cells) + " |")
    return lines


@dataclass(frozen=True)
class Growth:
    """How align time grows with the tensor count in one plot family (completed runs)."""

    fit: float  # least-squares slope of log time against log tensors, over all points
    local: float  # slope between the two largest points (fixed costs matter less there)
    n_ref: int  # tensors of the largest point
    t_ref: float  # its align time

    def predict(self, n: int) -> float:
        """Seconds for ``n`` tensors: the largest point, extrapolated with the fitted slope (rough:
        the sweep's points differ in structure as well as in size)."""
        return self.t_ref * (n / self.n_ref) ** self.fit


def growth(rows: list[AlignRow]) -> dict[str, Growth]:
    """`Growth` per plot family with at least three completed (non-vision) points."""
    out = {}
    for family in dict.fromkeys(r.case.family for r in rows):
        by_size: dict[int, list[float]] = {}  # both directions of a pair: one point, their mean
        for r in rows:
            if r.case.family == family and r.cold and r.n_src and r.case.kind != "vision":
                by_size.setdefault(r.n_src, []).append(r.cold)
        points = sorted((n, statistics.fmean(ts)) for n, ts in by_size.items())
        if len(points) < 3:
            continue
        logs = [(math.log(n), math.log(t)) for n, t in points]
        mx = statistics.fmean(x for x, _ in logs)
        my = statistics.fmean(y for _, y in logs)
        sxx = sum((x - mx) ** 2 for x, _ in logs)
        (x1, y1), (x2, y2) = logs[-2], logs[-1]
        if not sxx or x2 == x1:
            continue
        out[family] = Growth(fit=sum((x - mx) * (y - my) for x, y in logs) / sxx,
                             local=(y2 - y1) / (x2 - x1), n_ref=points[-1][0],
                             t_ref=points[-1][1])
    return out


def plot(rows: list[AlignRow], path: Path) -> str:
    """Log-log plot of align time against tensor count; returns "" or why it was not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"torchvision -> timm": "o", "Llama -> Mistral (meta)": "s", "MoE (meta)": "D"}
    for family, marker in markers.items():
        done = sorted((r.n_src, r.cold) for r in rows
                      if r.case.family == family and r.cold is not None and r.n_src)
        if done:
            xs, ys = zip(*done)
            ax.plot(xs, ys, marker=marker, linestyle="-" if family != "torchvision -> timm"
                    else "none", label=family)
        killed = [(r.n_src, r.lower_bound) for r in rows if r.case.family == family
                  and r.cold is None and r.lower_bound and r.n_src]
        if killed:
            xs, ys = zip(*killed)
            ax.scatter(xs, ys, marker="^", s=80, facecolors="none", edgecolors="red",
                       label=f"{family}: killed at time limit (lower bound)")
    labels: dict[tuple[float, float], list[str]] = {}  # points that (nearly) coincide share a label
    for row in rows:
        if row.n_src and row.seconds and not row.case.sweep:
            spot = (round(math.log10(row.n_src), 1), round(math.log10(row.seconds), 1))
            labels.setdefault(spot, []).append(row.case.name)
    for (x, y), names in labels.items():
        ax.annotate(", ".join(names), (10 ** x, 10 ** y), textcoords="offset points",
                    xytext=(6, -12), fontsize=8)
    for i, row in enumerate(r for r in rows if r.case.target and r.n_src):
        assert row.n_src is not None and row.case.target is not None
        ax.hlines(row.case.target, row.n_src / 1.35, row.n_src * 1.35, color="green",
                  linewidth=2, label="target from the issue" if i == 0 else None)
        ax.annotate(f"target {row.case.target:g} s", (row.n_src * 1.35, row.case.target),
                    textcoords="offset points", xytext=(3, -3), fontsize=7, color="green")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tensors in the source state_dict")
    ax.set_ylabel("align time, s (first call after import)")
    ax.set_title("archalign.align(src, dst, check_outputs=False)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return ""


def _mib(n_bytes: float) -> str:
    """Bytes as whole MiB with thousands separators."""
    return f"{n_bytes / 2 ** 20:,.0f}"


def _source_digest(package: Path) -> str:
    """Short hash of ``package/*.py``, so that a result names the code it measured."""
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _git(*args: str) -> str:
    """Output of a read-only git command in the checkout ("?" without git)."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT,
                              check=False).stdout.strip()
    except OSError:
        return "?"


def _versions() -> str:
    """Versions of the libraries that matter, read in a subprocess (this one stays light)."""
    code = ("import torch, transformers, timm, torchvision, numpy, scipy, networkx; "
            "print(f'torch {torch.__version__}, transformers {transformers.__version__}, "
            "timm {timm.__version__}, torchvision {torchvision.__version__}, "
            "numpy {numpy.__version__}, scipy {scipy.__version__}, networkx {networkx.__version__}')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return done.stdout.strip() or "?"


Log = Callable[[str], None]
Target = tuple[str, str, bool | None]  # what, measured, passed (None: could not be measured)


def profile_tables(case: AlignCase, run: WorkerRun, limit: int = 12) -> list[str]:
    """Markdown tables of a sampled profile (the final one, or the last snapshot of a killed run)."""
    profile = run.result["profile"] if run.result else None
    snapshots = [e["profile"] for e in run.events if e["event"] == "profile"]
    if profile is None and snapshots:
        profile = snapshots[-1]
    if profile is None:
        return [f"Profiling `{case.name}` gave no samples ({run.status}).", ""]
    state = (f"completed in {run.result['wall']:.1f} s" if run.result else
             f"killed at the time limit; snapshot of its first {profile['elapsed']:.0f} s")
    lines = [f"**{case.label}** ({state}; {profile['samples']} stack samples, one per "
             f"{1000 * profile['interval']:.0f} ms; % of samples).", ""]
    titles = {"functions": "archalign function, inclusive (`file:def line(name)`)",
              "lines": "archalign line on the stack, inclusive",
              "innermost": "innermost archalign line (its own work and the library calls it makes)",
              "leaves": "innermost frame of all (where the CPU was)"}
    for key, title in titles.items():
        lines += [f"| {title} | % |", "|---|---|"]
        lines += [f"| `{where}` | {100 * share:.1f} |" for where, share in profile[key][:limit]]
        lines.append("")
    return lines


def section_align(args: argparse.Namespace, log: Log) -> tuple[list[str], list[Target]]:
    """Align every case in its own worker, profile the slowest; returns markdown and targets."""
    wanted = set(args.cases.split(",")) if args.cases else None
    cases = [c for c in ALIGN_CASES if not wanted or c.name in wanted]
    log(f"align: {len(cases)} cases, time limit {args.timeout:.0f} s each")
    rows: list[AlignRow] = []
    for case in cases:
        run = run_worker("align", args.timeout, case=case.name)
        row = collect_align(case, run)
        rows.append(row)
        shown = _fmt_s(row.cold) if row.cold is not None else f"> {_fmt_s(row.lower_bound)}"
        log(f"  {case.name:<12} {row.status:<8} tensors {row.n_src}/{row.n_dst}  align {shown} s"
            f"  (worker {run.seconds:.0f} s) {row.detail}")
        if run.status.startswith("error") and run.stderr_tail.strip():
            log("    " + run.stderr_tail.strip().splitlines()[-1][:200])
    main_rows = [r for r in rows if not r.case.sweep]
    imported = sorted({str(Path(r.archalign_file).parent.parent) for r in rows if r.archalign_file})
    log(f"  archalign imported from {', '.join(imported) or '?'}")
    lines = ["## 1. Align time", "",
             "`archalign.align(src, dst, check_outputs=False)`: the first call after `import "
             "archalign` and building both models (what the targets are checked on), and the "
             "median of the warm repeats where there are some. Stage split of the first call, "
             "measured by timing the functions `pipeline.align` calls (read_source; trace = "
             "trace_graph + harmonise_graphs and its helpers; features = extract_features (+ "
             "resolve_hints); matching = the match_* stages (+ _left); plan = _build_plan (+ "
             "what follows it); other = the rest). `>`: the case hit the time limit "
             f"({args.timeout:.0f} s per case, imports and model building included) in that "
             "stage; the figure is a lower bound. \"right\": matches that agree with the known "
             "truth (Llama/Mistral: same key; MoE: the renames in `_MOE_RENAMES`).", ""]
    lines += align_table(main_rows)
    if any(r.case.sweep for r in rows):
        lines += ["", "### Scaling sweep (more points for the plot)", ""]
        lines += align_table([r for r in rows if r.case.sweep])
    grown = growth(rows)
    if grown:
        lines += ["", "Growth of align time with the tensor count n (completed runs; slope of log "
                  "time against log n, fitted over all points / between the two largest): " +
                  "; ".join(f"{k}: t ~ n^{g.fit:.2f} / n^{g.local:.2f}" for k, g in grown.items())
                  + "."]
        for row in rows:
            g = grown.get(row.case.family)
            if row.cold is None and row.n_src and g is not None:
                row.extrapolated = g.predict(row.n_src)
                lines.append(f"Extrapolated from the largest completed point with the fitted slope "
                             f"(rough), {row.case.name} ({row.n_src} tensors) would take about "
                             f"{row.extrapolated:.0f} s.")
    lines += ["", "### Seconds per function called by `pipeline.align` (first call)", ""]
    lines += function_table(rows)
    targets: list[Target] = []
    for row in main_rows:
        if row.case.target is None:
            continue
        ok = row.cold is not None and row.cold < row.case.target
        measured = (f"{_fmt_s(row.cold)} s" if row.cold is not None else
                    f"{row.status}: > {_fmt_s(row.lower_bound)} s")
        if row.extrapolated is not None:
            measured += f"; roughly {row.extrapolated:.0f} s extrapolated from the sweep"
        if row.warm is not None:
            measured += f" (warm median {_fmt_s(row.warm)} s)"
        targets.append((f"{row.case.label}: align < {row.case.target:g} s", measured, ok))
    note = plot(rows, RESULTS / "speed.png")
    log(note or f"saved {(RESULTS / 'speed.png').relative_to(ROOT)}")

    # sample the slowest completed case to its end, and the first seconds of the largest killed one
    to_profile: list[tuple[AlignRow, float]] = []
    done = [r for r in rows if r.cold is not None and not r.case.sweep]
    if done:
        slowest = max(done, key=lambda r: r.cold or 0.0)
        to_profile.append((slowest, 2 * (slowest.cold or 0.0) + (slowest.build_s or 0.0) + 60))
    killed = [r for r in rows if r.cold is None and r.status == "timeout"]
    if killed:
        largest = max(killed, key=lambda r: r.n_src or 0)
        to_profile.append((largest, args.profile_budget + (largest.build_s or 0.0) + 15))
    if to_profile:
        lines += ["", "### Where the time goes (sampling profiler)", ""]
    listing: list[str] = []
    for row, limit in to_profile:
        log(f"profiling {row.case.name} (up to {limit:.0f} s)")
        run = run_worker("profile", limit, case=row.case.name)
        lines += profile_tables(row.case, run)
        listing += [f"===== {row.case.label} =====", *profile_tables(row.case, run, limit=40)]
    if listing:
        (RESULTS / "speed_profile.txt").write_text("\n".join(listing) + "\n", encoding="utf-8")
    return lines, targets


def section_apply(log: Log) -> tuple[list[str], list[Target]]:
    """Time ``plan.apply`` against ``load_state_dict`` per case; returns markdown and targets."""
    log("apply vs load_state_dict")
    lines = ["## 2. Apply overhead", "",
             "`plan.apply(dst)` (default: atomic, keeps a copy of every written tensor until all "
             "writes succeeded), `plan.apply(dst, atomic=False)`, and `dst.load_state_dict` of the "
             "same tensors under the destination's names; one process per pair, one warm-up each, "
             "then interleaved repeats; medians.", "",
             "| pair | tensors loaded | MiB | repeats | apply s | apply(atomic=False) s | "
             "load_state_dict s | apply / load_state_dict | non-atomic / load_state_dict | "
             "apply / load_state_dict, best of each |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    targets: list[Target] = []
    profiles: list[tuple[str, dict[str, Any]]] = []
    for case in APPLY_CASES:
        what = f"{case.label}: apply <= {TARGET_APPLY_RATIO}x load_state_dict"
        run = run_worker("apply", 900, case=case.name)
        if run.result is None:
            lines.append(f"| {case.label} | - | - | - | {run.status} | - | - | - | - | - |")
            targets.append((what, run.status, None))
            log(f"  {case.name}: {run.status}")
            continue
        r = run.result
        med = r["median"]
        ratio = med["apply"] / med["load_state_dict"]
        ratio_na = med["apply_nonatomic"] / med["load_state_dict"]
        lines.append(f"| {case.label} | {r['loaded']}/{r['tensors']} | {_mib(r['bytes'])} | "
                     f"{r['repeats']} | {med['apply']:.4f} | {med['apply_nonatomic']:.4f} | "
                     f"{med['load_state_dict']:.4f} | {ratio:.2f}x | {ratio_na:.2f}x | "
                     f"{r['min']['apply'] / r['min']['load_state_dict']:.2f}x |")
        targets.append((what, f"{ratio:.2f}x (atomic=False: {ratio_na:.2f}x)",
                        ratio <= TARGET_APPLY_RATIO))
        log(f"  {case.name}: apply {med['apply']:.4f} s, atomic=False {med['apply_nonatomic']:.4f}"
            f" s, load_state_dict {med['load_state_dict']:.4f} s -> {ratio:.2f}x / {ratio_na:.2f}x")
        if r["profile"]:
            profiles.append((case.label, r["profile"]))
    for label, profile in profiles:
        lines += ["", f"Where one `plan.apply(dst)` of {label} spends its time "
                  f"({profile['samples']} stack samples, one per ms; % of samples):", "",
                  "| innermost archalign line | % |", "|---|---|"]
        lines += [f"| `{w}` | {100 * x:.1f} |" for w, x in profile["innermost"][:6]]
        lines += ["", "| innermost frame of all | % |", "|---|---|"]
        lines += [f"| `{w}` | {100 * x:.1f} |" for w, x in profile["leaves"][:6]]
    return lines, targets


def section_memory(log: Log) -> tuple[list[str], list[Target]]:
    """Peak RSS of loading a sharded checkpoint, per variant; returns markdown and targets."""
    log("peak memory, loading a sharded safetensors checkpoint")
    directory = Path(tempfile.mkdtemp(prefix="archalign-speed-"))
    lines: list[str] = ["## 3. Peak memory, loading a sharded safetensors checkpoint", ""]
    targets: list[Target] = []
    try:
        written = run_worker("write_shards", 600, dir=directory, shards=5)
        if written.result is None:
            log(f"  writing the shards failed: {written.status}")
            return [*lines, f"Writing the checkpoint failed: {written.status}"], targets
        w = written.result
        largest = max(w["shard_bytes"])
        lines += [f"Checkpoint: Llama {LLAMA_SHARDED.layers} layers x {LLAMA_SHARDED.hidden} "
                  f"({w['tensors']} tensors, {_mib(w['total_bytes'])} MiB fp32) in "
                  f"{len(w['shard_bytes'])} shards of "
                  f"{', '.join(_mib(b) for b in w['shard_bytes'])} MiB + "
                  "`model.safetensors.index.json` (Hugging Face format); destination: Mistral of "
                  "the same size, built on CPU (or on meta where the row says so). A fresh "
                  "process per variant; memory is counted above the process's RSS right after its "
                  "imports; peak = `ru_maxrss`. archalign applies with `min_confidence=0` so that "
                  "every planned tensor is written. \"tensors right\": destination tensors "
                  "holding their source's value afterwards (an error means this archalign cannot "
                  "do it). "
                  "The streaming rows (align on the index) are the ones the target is about; the "
                  "merged rows are the fallback for an archalign that reads no index.", "",
                  "| variant | RSS after imports MiB | destination built, + MiB | peak, + MiB | "
                  "peak / (destination + largest shard) | load s | tensors right |",
                  "|---|---|---|---|---|---|---|"]
        budget_bytes = None
        hf_ratio = "not measured"
        for variant, (label, streaming) in MEMORY_VARIANTS.items():
            run = run_worker("memory", 600, case=variant, dir=directory)
            if run.result is None:
                lines.append(f"| {label} | {run.status} | - | - | - | - | - |")
                log(f"  {variant}: {run.status}")
                if streaming:
                    targets.append((f"streaming peak memory <= destination + one shard, every tensor "
                                f"right [{label}]",
                                    run.status, None))
                continue
            r = run.result
            base = r["marks_kib"]["imports"] * 1024
            built = r["marks_kib"]["destination built"] * 1024 - base
            peak = r["peak_kib"] * 1024 - base
            budget_bytes = r["dst_bytes"] + largest
            right = f"{r['correct']}/{r['tensors']}"
            if r["loaded"] is not None:
                right += (f" (archalign loaded {r['loaded']}, {r['wrong']} of them wrong, "
                          f"{r['tensors'] - r['loaded']} untouched; {r['low']} of its matches "
                          "are below the default min_confidence 0.5)")
            if r["error"]:
                right += f" ({r['error']})"
            lines.append(f"| {label} | {_mib(base)} | {_mib(built)} | {_mib(peak)} | "
                         f"{peak / budget_bytes:.2f} | {r['load_s']:.1f} | {right} |")
            log(f"  {variant}: peak +{_mib(peak)} MiB (destination {_mib(r['dst_bytes'])} MiB + "
                f"largest shard {_mib(largest)} MiB = {_mib(budget_bytes)} MiB), {right} tensors "
                f"right, {r['load_s']:.1f} s")
            if streaming:
                ok = None if r["error"] else (peak <= budget_bytes and r["correct"] == r["tensors"])
                targets.append((f"streaming peak memory <= destination + one shard, every tensor "
                                f"right [{label}]",
                                f"+{_mib(peak)} MiB vs {_mib(budget_bytes)} MiB ({peak / budget_bytes:.2f}x; "
                                f"transformers' own loading: {hf_ratio}); {r['correct']}/"
                                f"{r['tensors']} tensors right", ok))
            if variant == "hf_streaming":
                hf_ratio = f"{peak / budget_bytes:.2f}x"
        if budget_bytes is not None:
            lines += ["", f"Budget of the target: destination ({_mib(budget_bytes - largest)} "
                      f"MiB of tensors) + largest shard ({_mib(largest)} MiB) = "
                      f"{_mib(budget_bytes)} MiB."]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return lines, targets


def main() -> None:
    """Run every measurement in worker processes, print the tables, save markdown and plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds per align case, imports and model building included")
    parser.add_argument("--profile-budget", type=float, default=60.0,
                        help="seconds of sampling on the largest case that timed out")
    parser.add_argument("--only", default="align,apply,memory",
                        help="comma-separated sections: align, apply, memory")
    parser.add_argument("--cases", default="", help="comma-separated align case names (all)")
    # worker options (internal)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--events", default="", help=argparse.SUPPRESS)
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)
    parser.add_argument("--dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return

    def log(message: str) -> None:
        print(message, flush=True)

    sections = set(args.only.split(","))
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    # every worker imports one frozen copy of archalign, even if the checkout changes meanwhile
    snapshot = Path(tempfile.mkdtemp(prefix="archalign-snapshot-"))
    shutil.copytree(ROOT / "archalign", snapshot / "archalign",
                    ignore=shutil.ignore_patterns("__pycache__"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(snapshot), os.environ.get("PYTHONPATH", "")) if p)
    digest = _source_digest(snapshot / "archalign")
    dirty = " + uncommitted changes" if _git("status", "--porcelain", "archalign") else ""
    lines = ["# Speed and memory: archalign", "",
             f"Generated by `python benchmarks/speed.py` ({os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}; {_versions()}). archalign at git "
             f"{_git('rev-parse', '--short', 'HEAD')}{dirty}, archalign/*.py digest {digest} "
             "(copied when the run started; every worker imports that copy). Every measurement "
             "runs in a fresh worker process with `torch.set_num_threads(2)`; times are "
             "wall-clock.", ""]
    targets: list[Target] = []
    try:
        for name, section in (("align", lambda: section_align(args, log)),
                              ("apply", lambda: section_apply(log)),
                              ("memory", lambda: section_memory(log))):
            if name in sections:
                more_lines, more_targets = section()
                lines += [*more_lines, ""]
                targets += more_targets
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)
    if targets:
        lines += ["## Targets (from the issue)", "", "| target | measured | verdict |",
                  "|---|---|---|"]
        for what, measured, ok in targets:
            verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
            lines.append(f"| {what} | {measured} | {verdict} |")
    load_after = os.getloadavg()
    if _source_digest(ROOT / "archalign") != digest:
        lines += ["", f"Note: archalign/*.py in the checkout changed during this run (now "
                  f"{_source_digest(ROOT / 'archalign')}); every case ran on the copy {digest}."]
    lines += ["", f"Machine load average (1 min): {load_before[0]:.2f} at the start, "
              f"{load_after[0]:.2f} at the end (other jobs share the CPUs when it exceeds 2); "
              f"the whole benchmark took {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    (RESULTS / "speed.md").write_text(text, encoding="utf-8")
    print("\n" + text)
    print(f"saved {(RESULTS / 'speed.md').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
