"""Full-size model pairs built from shapes: Llama -> Mistral configurations, a Mixture-of-Experts pair.

These are the models the speed benchmarks (``benchmarks/align_speed.py``, ``apply_speed.py``,
``memory.py``) and the tracer's tests build at scale, usually on the meta device; they are not
`Pair` entries of the accuracy corpus (their truth is a key rename, not a verified converter).

* `LlamaShape` holds the sizes that decide a Llama/Mistral tensor layout; `make_llama_pair` builds
  ``LlamaForCausalLM`` and ``MistralForCausalLM`` of one shape (the two share their key names).
* `MoeShape` and `make_moe` build a Mixture-of-Experts language model. transformers 5 stores a
  Mixtral layer's experts as two fused 3-d tensors (9 tensors per layer whatever the expert count),
  so the pair is defined here: style ``"a"`` has the module tree and names of the Hugging Face
  Mixtral checkpoints (``block_sparse_moe.experts.N.w1/w2/w3``, one ``nn.Linear`` per expert and
  projection, which is how MoE checkpoints are stored), style ``"b"`` DeepSeek-style names
  (``mlp.experts.N.gate_proj/up_proj/down_proj``). Like the Hugging Face models it is not
  fx-traceable (it checks its input's length), and it has ``dummy_inputs``; with
  ``traceable=True`` the check is left out and torch.fx traces it (archalign's fx path).
  `rename_mixtral_to_deepseek` is the pair's truth (`MOE_RENAMES`, applied in order).
* `make_vision_pair` builds a torchvision model and a timm model by name, and `fill_distinct`
  gives every tensor of a model a distinct constant, so that a wrong load shows.

torch, transformers, torchvision and timm are imported inside the builders: importing this module
costs no more than ``import corpus``.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "LLAMA_70B",
    "LLAMA_7B",
    "LLAMA_HALF_B",
    "LLAMA_SHARDED",
    "MOE_BIG",
    "MOE_FX_BIG",
    "MOE_MIXTRAL_8X7B",
    "MOE_RENAMES",
    "LlamaShape",
    "MoeShape",
    "fill_distinct",
    "make_llama_pair",
    "make_moe",
    "make_vision_pair",
    "rename_mixtral_to_deepseek",
]


@dataclass(frozen=True)
class LlamaShape:
    """A Llama/Mistral configuration (the sizes that matter for the tensor layout)."""

    hidden: int  # hidden_size
    intermediate: int  # intermediate_size of the MLP
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    vocab: int = 32000  # vocab_size

    def kwargs(self) -> dict[str, Any]:
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

    layers: int  # transformer blocks
    experts: int  # experts per block
    hidden: int = 64  # model width
    intermediate: int = 128  # width inside an expert
    vocab: int = 1000  # embedding rows


MOE_BIG = MoeShape(layers=32, experts=104)  # 10,211 tensors
MOE_FX_BIG = MoeShape(layers=64, experts=152)  # 29,635 tensors
MOE_MIXTRAL_8X7B = MoeShape(layers=32, experts=8)  # the layer/expert topology of Mixtral-8x7B


def make_llama_pair(shape: LlamaShape, device: str) -> tuple[nn.Module, nn.Module]:
    """``LlamaForCausalLM`` and ``MistralForCausalLM`` of ``shape``, built on ``device``, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    with torch.device(device):
        src = LlamaForCausalLM(LlamaConfig(**shape.kwargs()))
        dst = MistralForCausalLM(MistralConfig(**shape.kwargs()))
    return src.eval(), dst.eval()


def make_vision_pair(names: tuple[str, str]) -> tuple[nn.Module, nn.Module]:
    """The torchvision model ``names[0]`` and the timm model ``names[1]``, randomly initialised, in
    eval mode."""
    import timm
    import torchvision

    src = getattr(torchvision.models, names[0])(weights=None)
    dst = timm.create_model(names[1], pretrained=False)
    return src.eval(), dst.eval()


def fill_distinct(model: nn.Module) -> None:
    """Give every tensor of ``model`` a distinct constant (cheap, and makes wrong loads visible).

    The floating-point tensor at position ``i`` of ``model.state_dict()`` is filled with ``i + 1``.
    """
    import torch

    with torch.no_grad():
        for i, tensor in enumerate(model.state_dict().values()):
            if tensor.is_floating_point():
                tensor.fill_(float(i + 1))


def make_moe(shape: MoeShape, style: str, *, traceable: bool = False) -> nn.Module:
    """Build the MoE language model of ``shape`` with Mixtral ("a") or DeepSeek ("b") names.

    ``traceable=True`` leaves out the check on the input's length, so that torch.fx traces the
    model (archalign then takes its fx path); the module tree, names and tensors are the same.
    """
    return _moe_classes()(shape, style, traceable=traceable)


@functools.cache
def _moe_classes() -> Any:
    """Define the MoE modules (they subclass nn.Module, so torch must be imported first)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    names: dict[str, dict[str, Any]] = {
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
        """Decoder-only MoE language model, Hugging Face style (``dummy_inputs``; not
        fx-traceable unless ``traceable``)."""

        max_positions = 4096

        def __init__(self, shape: MoeShape, style: str, *, traceable: bool = False) -> None:
            super().__init__()
            n = names[style]
            self.n = n
            self.traceable = traceable
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
            if not self.traceable and input_ids.shape[-1] > self.max_positions:
                raise ValueError("sequence too long")
            n, root = self.n, getattr(self, self.n["root"])
            x = getattr(root, n["embed"])(input_ids)
            for block in getattr(root, n["layers"]):
                x = block(x)
            return self.lm_head(getattr(root, n["norm"])(x))

    return MoeLM


MOE_RENAMES = (  # Mixtral names -> DeepSeek names, applied in order
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


def rename_mixtral_to_deepseek(key: str) -> str:
    """The ``make_moe(shape, "b")`` key that holds what ``key`` of ``make_moe(shape, "a")`` holds."""
    for pattern, replacement in MOE_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key
