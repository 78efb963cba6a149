"""Checkpoint-only pairs: the source is a file or folder written the way real releases are.

A user porting one of these has the release (a tensor-parallel ``consolidated.*.pth`` set, a
training run's ``ckpt.pt``, a Lightning ``.ckpt``, a Hugging Face ``save_pretrained`` folder, ...)
and the destination module, not the source module. Each pair's `Release` writes the release from
the seeded source module (`Pair.make_src`, which also gives the reference outputs) and reads it back
with a hand-written reader; the truth and the converter name the *checkpoint's* keys (the keys of
the state dict the reader returns: shards merged, the right entry picked, wrapper prefixes kept).

Release tensors stay float32 (real releases are often bf16/fp16, which would break the 1e-4 check).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from . import language, lm_ports
from ._pair import (
    KeyTruth,
    Pair,
    Release,
    Rule,
    StateDict,
    Transform,
    Truth,
    copy_tensor,
    make_converter,
    map_keys,
    on_modules,
)
from .reference import meta_llama, mistral_moe, nanogpt

__all__ = ["PAIRS", "prefixed"]


def prefixed(key_truth: KeyTruth, prefix: str) -> KeyTruth:
    """The truth over keys that carry a wrapper ``prefix`` (``module.``, ``_orig_mod.``, ``model.``):
    ``key_truth`` applied to the stripped keys, its sources prefixed again."""
    def truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
        inner = [k[len(prefix):] for k in src_keys if k.startswith(prefix)]
        return {d: tuple(prefix + s for s in srcs) for d, srcs in key_truth(inner, dst_keys).items()}
    return truth


def _state(module: nn.Module, prefix: str = "") -> StateDict:
    """``module``'s state_dict with ``prefix`` on every key; tied tensors stay one tensor."""
    return {prefix + k: v.detach() for k, v in module.state_dict().items()}


def _optimizer_state(module: nn.Module, kind: str) -> dict[str, Any]:
    """A real optimizer state_dict after one step on a copy of ``module`` (the module is untouched):
    per-parameter tensors of the parameters' own shapes (AdamW moments, SGD momentum)."""
    clone = copy.deepcopy(module)
    params = list(clone.parameters())
    generator = torch.Generator().manual_seed(7)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer: torch.optim.Optimizer
    if kind == "adamw":
        optimizer = torch.optim.AdamW(params, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    else:
        optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=2e-5)
    optimizer.step()
    return optimizer.state_dict()


def _load(path: Path) -> Any:
    """``torch.load`` as archalign reads pickles: on the CPU, never unpickling code."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- 1. Meta TP release

TP_SHARDS = 2
# fairscale's layers: ColumnParallelLinear splits the output rows (dim 0), RowParallelLinear the
# input columns (dim 1), ParallelEmbedding (LLaMA 1/2) the embedding columns; norms are replicated
_TP_AXES: list[tuple[str, int | None]] = [
    (r"layers\.\d+\.attention\.w[qkv]\.weight|layers\.\d+\.feed_forward\.w[13]\.weight|output\.weight",
     0),
    (r"layers\.\d+\.attention\.wo\.weight|layers\.\d+\.feed_forward\.w2\.weight|tok_embeddings\.weight",
     1),
    (r".*norm\.weight|rope\.freqs", None),
]


def _tp_axis(key: str) -> int | None:
    """The axis ``key`` is split along over the ranks; None when every rank holds all of it."""
    for pattern, axis in _TP_AXES:
        if re.fullmatch(pattern, key):
            return axis
    raise KeyError(f"no tensor-parallel rule for {key!r}")


def _write_meta_tp(src: nn.Module, folder: Path) -> Path:
    """``consolidated.00.pth`` ... one per model-parallel rank, and ``params.json``.

    Like Meta's LLaMA 2 releases, each shard also holds ``rope.freqs`` (the rotary inverse
    frequencies, ``head_dim / 2`` values), which no model loads.
    """
    assert isinstance(src, meta_llama.Transformer)
    args = src.params
    head_dim = args.dim // args.n_heads
    state = _state(src)
    state["rope.freqs"] = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for rank in range(TP_SHARDS):
        shard = {}
        for key, tensor in state.items():
            axis = _tp_axis(key)
            shard[key] = (tensor.clone() if axis is None
                          else tensor.chunk(TP_SHARDS, dim=axis)[rank].clone())
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    params = {"dim": args.dim, "multiple_of": args.multiple_of, "n_heads": args.n_heads,
              "n_kv_heads": args.n_kv_heads, "n_layers": args.n_layers, "norm_eps": args.norm_eps,
              "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params), encoding="utf-8")
    return folder


def _read_meta_tp(folder: Path) -> StateDict:
    """convert_llama_weights_to_hf.py's reading: shards in name order, each tensor concatenated
    along its layer's split axis, replicated ones taken from shard 0."""
    shards = [_load(p) for p in sorted(folder.glob("consolidated.*.pth"))]
    merged: StateDict = {}
    for key in shards[0]:
        axis = _tp_axis(key)
        merged[key] = shards[0][key] if axis is None else torch.cat([s[key] for s in shards], axis)
    return merged


# --------------------------------------------------------------------------- 2. Mixtral release

MIXTRAL_FILES = 4


def _fused_moe_state(src: nn.Module) -> StateDict:
    """The first Mixtral release's layout (MegaBlocks): per layer ``block_sparse_moe.w1`` / ``w3``
    ``[E * I, H]`` (experts' rows one after the other), ``w2`` ``[E * I, H]`` holding each expert's
    ``w2`` *transposed*, and ``block_sparse_moe.gate.weight``."""
    assert isinstance(src, mistral_moe.Transformer)
    state = _state(src)
    out: StateDict = {"tok_embeddings.weight": state["tok_embeddings.weight"]}
    experts = range(lm_ports.MOE["experts"])
    for i in range(src.args.n_layers):
        block = f"layers.{i}."
        ff = f"{block}feed_forward."
        for p in "qkvo":
            out[f"{block}attention.w{p}.weight"] = state[f"{block}attention.w{p}.weight"]
        out[f"{block}block_sparse_moe.gate.weight"] = state[f"{ff}gate.weight"]
        for name in ("w1", "w2", "w3"):
            parts = [state[f"{ff}experts.{e}.{name}.weight"] for e in experts]
            out[f"{block}block_sparse_moe.{name}"] = torch.cat(
                [p.t() for p in parts] if name == "w2" else parts)
        out[f"{block}attention_norm.weight"] = state[f"{block}attention_norm.weight"]
        out[f"{block}ffn_norm.weight"] = state[f"{block}ffn_norm.weight"]
    out["norm.weight"] = state["norm.weight"]
    out["output.weight"] = state["output.weight"]
    return out


def _write_mixtral(src: nn.Module, folder: Path) -> Path:
    """``consolidated.00.pt`` ... ``.03.pt``: the fused state split by keys (each key in one file,
    contiguous runs in the order above), and mistral's ``params.json``."""
    state = _fused_moe_state(src)
    keys = list(state)
    size = -(-len(keys) // MIXTRAL_FILES)
    for n in range(MIXTRAL_FILES):
        part = {k: state[k].clone() for k in keys[n * size:(n + 1) * size]}
        torch.save(part, folder / f"consolidated.{n:02d}.pt")
    assert isinstance(src, mistral_moe.Transformer)
    args = src.args
    params = {"dim": args.dim, "n_layers": args.n_layers, "head_dim": args.head_dim,
              "hidden_dim": args.hidden_dim, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "norm_eps": args.norm_eps, "vocab_size": args.vocab_size, "rope_theta": args.rope_theta,
              "moe": {"num_experts_per_tok": args.moe.num_experts_per_tok,
                      "num_experts": args.moe.num_experts}}
    (folder / "params.json").write_text(json.dumps(params), encoding="utf-8")
    return folder


def _read_mixtral(folder: Path) -> StateDict:
    """convert_mixtral_weights_to_hf.py's reading: every file's dict merged into one."""
    merged: StateDict = {}
    for path in sorted(folder.glob("consolidated.*.pt")):
        merged.update(_load(path))
    return merged


def _mixtral_release_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    layer = r"model\.layers\.(?P<i>\d+)\."
    rules: list[Rule] = [
        (layer + r"mlp\.experts\.gate_up_proj",
         lambda m: (f"layers.{m['i']}.block_sparse_moe.w1", f"layers.{m['i']}.block_sparse_moe.w3")),
        (layer + r"mlp\.experts\.down_proj", lambda m: f"layers.{m['i']}.block_sparse_moe.w2"),
        (layer + r"mlp\.gate\.weight", lambda m: f"layers.{m['i']}.block_sparse_moe.gate.weight"),
        *lm_ports.meta_attention_rules("layers.{}."),
    ]
    return map_keys(dst_keys, rules)


def _mixtral_release_transform(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """gate_up_proj = cat(w1.view(E, I, H), w3.view(E, I, H), axis 1); down_proj =
    w2.view(E, I, H).transpose(1, 2); q/k as in Meta's LLaMA."""
    experts = lm_ports.MOE["experts"]
    if key.endswith("experts.gate_up_proj"):
        w1, w3 = (t.view(experts, -1, t.shape[-1]) for t in tensors)
        return torch.cat([w1, w3], dim=1)
    if key.endswith("experts.down_proj"):
        (w2,) = tensors
        return w2.view(experts, -1, w2.shape[-1]).transpose(1, 2)
    return lm_ports.meta_llama_transform(key, tensors)


# --------------------------------------------------------------------------- 3. nanoGPT ckpt.pt

def _write_nanogpt_ckpt(src: nn.Module, folder: Path) -> Path:
    """nanoGPT's train.py checkpoint of a ``torch.compile``d model: ``model`` (keys prefixed
    ``_orig_mod.``, as OptimizedModule.state_dict() gives them), ``optimizer`` (AdamW),
    ``model_args``, ``iter_num``, ``best_val_loss``, ``config``."""
    assert isinstance(src, nanogpt.GPT)
    config = src.config
    model_args = {"n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
                  "block_size": config.block_size, "bias": config.bias,
                  "vocab_size": config.vocab_size, "dropout": config.dropout}
    checkpoint = {"model": _state(src, "_orig_mod."), "optimizer": _optimizer_state(src, "adamw"),
                  "model_args": model_args, "iter_num": 5000, "best_val_loss": torch.tensor(1.4697),
                  "config": {**model_args, "learning_rate": 6e-4, "max_iters": 5000,
                             "dataset": "shakespeare_char", "compile": True}}
    path = folder / "ckpt.pt"
    torch.save(checkpoint, path)
    return path


def _read_entry(entry: str) -> Callable[[Path], StateDict]:
    """A reader that takes one entry of a training checkpoint (``ckpt[entry]``)."""
    def read(path: Path) -> StateDict:
        return dict(_load(path)[entry])
    return read


# --------------------------------------------------------------------------- 4. Lightning .ckpt

def _write_lightning(src: nn.Module, folder: Path) -> Path:
    """A PyTorch Lightning checkpoint of a LightningModule holding the model as ``self.model``."""
    assert isinstance(src, meta_llama.Transformer)
    checkpoint = {
        "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.4.0",
        "state_dict": _state(src, "model."),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score":
                                                                  torch.tensor(2.31)}},
        "optimizer_states": [_optimizer_state(src, "adamw")],
        "lr_schedulers": [{"T_max": 4000, "eta_min": 0.0, "base_lrs": [6e-4], "last_epoch": 1200}],
        "hparams_name": "kwargs", "hyper_parameters": {"dim": src.params.dim, "lr": 6e-4},
    }
    path = folder / "epoch=3-step=1200.ckpt"
    torch.save(checkpoint, path)
    return path


# --------------------------------------------------------------------------- 5. model + EMA file

EMA_OFFSET = 0.2  # the raw weights are the EMA weights plus this much noise (relative)


def _write_ema_checkpoint(src: nn.Module, folder: Path) -> Path:
    """torchvision's reference train.py layout: ``model`` (the unwrapped model's last weights),
    ``optimizer``, ``lr_scheduler``, ``epoch``, ``args``, and ``model_ema``, the state_dict of an
    ``AveragedModel``: ``n_averaged`` then every key prefixed ``module.``. ``src`` holds the EMA
    weights; the raw weights differ from them. (torchvision stores ``args`` as an
    argparse.Namespace, which ``torch.load(weights_only=True)`` refuses; here it is a dict.)"""
    generator = torch.Generator().manual_seed(11)
    last = copy.deepcopy(src)  # keeps the ties: the decoder is still the word embeddings
    seen: set[int] = set()
    with torch.no_grad():
        for tensor in last.state_dict(keep_vars=True).values():
            if tensor.is_floating_point() and tensor.numel() > 1 and tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                tensor.add_(torch.randn(tensor.shape, generator=generator) * EMA_OFFSET
                            * float(tensor.std()))
    raw = _state(last)
    ema = {"n_averaged": torch.tensor(6250), **_state(src, "module.")}
    checkpoint = {"model": raw, "optimizer": _optimizer_state(src, "sgd"),
                  "lr_scheduler": {"step_size": 30, "gamma": 0.1, "base_lrs": [0.5],
                                   "last_epoch": 7, "_step_count": 8},
                  "epoch": 7, "args": {"model": "bert_mlm", "lr": 0.5, "model_ema": True,
                                       "model_ema_decay": 0.99998},
                  "model_ema": ema}
    path = folder / "checkpoint.pth"
    torch.save(checkpoint, path)
    return path


# --------------------------------------------------------------------------- 6. save_pretrained

def _write_save_pretrained(src: nn.Module, folder: Path) -> Path:
    """``model.save_pretrained(folder, max_shard_size="200KB")``: sharded safetensors, an index,
    config.json; the tied lm_head.weight is left out, as Hugging Face does."""
    from transformers import PreTrainedModel
    from transformers.utils import logging as hf_logging

    assert isinstance(src, PreTrainedModel)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        src.save_pretrained(str(folder), max_shard_size="200KB")
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return folder


def _read_save_pretrained(folder: Path) -> StateDict:
    """Every shard the index names, merged (keys in the index's order, which is sorted)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
    shards = {name: load_file(str(folder / name)) for name in sorted(set(index["weight_map"].values()))}
    return {key: shards[name][key] for key, name in index["weight_map"].items()}


# --------------------------------------------------------------------------- 7. DDP state_dict

def _write_ddp(src: nn.Module, folder: Path) -> Path:
    """``torch.save(ddp_model.state_dict(), "model.pt")``: every key prefixed ``module.``."""
    path = folder / "model.pt"
    torch.save(_state(src, "module."), path)
    return path


def _read_file(path: Path) -> StateDict:
    """A file that is one flat state_dict."""
    return dict(_load(path))


# --------------------------------------------------------------------------- the pairs

def _release_pair(name: str, base: Pair, release: Release, key_truth: KeyTruth,
                  transform: Transform, note: str) -> Pair:
    """A checkpoint-only pair of ``base``'s models (same seeded builds, same inputs): its source
    released as ``release``, its truth and converter over the release's keys."""
    return dataclasses.replace(
        base, name=name, truth=on_modules(key_truth),
        convert=make_converter(key_truth, transform, base.tied_dst), note=" ".join(note.split()),
        release=release, source_module=False)


_BASE = {p.name: p for p in (*lm_ports.PAIRS, *language.PAIRS)}

PAIRS: list[Pair] = [
    _release_pair(
        "meta_llama_tp2_release->hf_llama", _BASE["meta_llama->hf_llama"],
        Release("meta-consolidated-tp2", _write_meta_tp, _read_meta_tp),
        lm_ports.meta_llama_truth, lm_ports.meta_llama_transform, note="""
        Meta's LLaMA 2 release format: a folder with consolidated.00.pth and consolidated.01.pth
        (one per model-parallel rank) and params.json (n_heads 4, n_kv_heads 2). Every weight is
        split over the two files: wq/wk/wv/w1/w3/output along axis 0 (ColumnParallelLinear), wo/
        w2/tok_embeddings along axis 1 (RowParallelLinear, ParallelEmbedding in LLaMA 1/2; LLaMA 3
        splits the embedding along axis 0); the norms are replicated, and each shard also holds
        rope.freqs, which no destination tensor reads. The truth names the merged tensors by their
        shard key (each shard holds the same keys): TP shard concat along the key's axis, then
        the renames and the rotary row permutation of meta_llama->hf_llama. Each shard alone has
        shapes that fit nothing (wq 32x64)."""),
    _release_pair(
        "mixtral_release->hf_mixtral", _BASE["mistral_moe->hf_mixtral"],
        Release("mixtral-consolidated-fused-experts", _write_mixtral, _read_mixtral),
        _mixtral_release_truth, _mixtral_release_transform, note="""
        The first Mixtral release's layout (convert_mixtral_weights_to_hf.py reads it): a folder
        of consolidated.00.pt ... .03.pt (note .pt), each holding a disjoint part of the keys, plus
        mistral's params.json. Experts are fused per layer: block_sparse_moe.w1 and w3 [E*I, H] =
        [512, 64], the experts' rows one after the other; block_sparse_moe.w2 [512, 64] holds every
        expert's w2 transposed. So gate_up_proj [4, 256, 64] = cat(w1.view(4, 128, 64),
        w3.view(4, 128, 64), axis 1): a reshape (split along axis 0) and a concat; down_proj
        [4, 64, 128] = w2.view(4, 128, 64).transpose(1, 2): the same element count, a reshape
        and a transpose. Plus the rotary row permutation of q/k (4 and 2 heads) and renames."""),
    _release_pair(
        "nanogpt_ckpt->hf_gpt2", _BASE["nanogpt->hf_gpt2"],
        Release("nanogpt-ckpt", _write_nanogpt_ckpt, _read_entry("model"), entry="model"),
        prefixed(lm_ports.nanogpt_truth, "_orig_mod."), lm_ports.transpose_conv1d, note="""
        nanoGPT's out/ckpt.pt after training with compile=True: a dict with 'model' (the compiled
        model's state_dict, every key prefixed _orig_mod.), 'optimizer' (AdamW: exp_avg and
        exp_avg_sq tensors of every parameter's shape, keyed by parameter index), 'model_args',
        'iter_num', 'best_val_loss' (a tensor) and 'config'. The truth names ckpt['model']'s keys:
        strip _orig_mod., then nanogpt->hf_gpt2 (every Conv1D weight transposed, the square
        attn.c_proj included). ckpt['model'] keeps the tie: _orig_mod.lm_head.weight is the same
        tensor as _orig_mod.transformer.wte.weight. Without a module nothing says the weights
        are nn.Linear's (out, in) rather than GPT-2's (in, out): the names are GPT-2's."""),
    _release_pair(
        "meta_llama_lightning_ckpt->hf_llama", _BASE["meta_llama->hf_llama"],
        Release("lightning-ckpt", _write_lightning, _read_entry("state_dict"), entry="state_dict"),
        prefixed(lm_ports.meta_llama_truth, "model."), lm_ports.meta_llama_transform, note="""
        A PyTorch Lightning checkpoint epoch=3-step=1200.ckpt of a LightningModule that holds
        Meta's LLaMA as self.model: 'state_dict' (keys prefixed model.), 'optimizer_states' (a
        list with one AdamW state_dict), 'lr_schedulers', 'loops', 'callbacks' (with a tensor),
        'epoch', 'global_step', 'hyper_parameters'. The truth names ckpt['state_dict']'s keys:
        prefix strip model., then meta_llama->hf_llama (renames + rotary row permutation of q/k
        with 4 and 2 heads)."""),
    _release_pair(
        "hf_bert_mlm_ema_ckpt->hf_electra_mlm", _BASE["hf_bert_mlm->hf_electra_mlm"],
        Release("torchvision-reference-ema", _write_ema_checkpoint, _read_entry("model_ema"),
                entry="model_ema"),
        prefixed(lm_ports.electra_truth, "module."), copy_tensor,
        note="""
        A training checkpoint.pth in torchvision's reference-script layout holding two complete
        state dicts of the same BERT: 'model' (the last weights, unprefixed) and 'model_ema' (an
        AveragedModel's state_dict: n_averaged, then every key prefixed module.), plus
        'optimizer' (SGD momentum buffers of every parameter's shape), 'lr_scheduler', 'epoch',
        'args'. The truth loads the EMA weights (the source module's): ckpt['model_ema'], strip
        module., then hf_bert_mlm->hf_electra_mlm. 'model' has the cleaner names and the same
        shapes but other values (EMA + noise): loading it fits everything and is wrong."""),
    _release_pair(
        "hf_gpt2_save_pretrained->hf_gpt_bigcode", _BASE["hf_gpt2->hf_gpt_bigcode"],
        Release("hf-save-pretrained-sharded", _write_save_pretrained, _read_save_pretrained),
        language.gpt_bigcode_truth, language.gpt_bigcode_transform, note="""
        GPT2LMHeadModel.save_pretrained(folder, max_shard_size='200KB'): several
        model-0000k-of-0000n.safetensors shards, model.safetensors.index.json and config.json;
        the tied lm_head.weight is not saved. Safetensors headers list keys sorted, not in
        registration order. The truth is hf_gpt2->hf_gpt_bigcode's: same names, every Conv1D
        weight transposed (square attn.c_proj too), c_attn rows and bias regrouped from [q | k | v]
        to per-head [q_h, k_h, v_h]. config.json (n_head 4) is in the folder."""),
    _release_pair(
        "qwen2_moe_v4_ddp_pt->hf_qwen2_moe", _BASE["qwen2_moe_v4->hf_qwen2_moe"],
        Release("ddp-state-dict", _write_ddp, _read_file),
        prefixed(lm_ports.qwen2_moe_truth, "module."),
        lm_ports.qwen2_moe_transform, note="""
        torch.save(ddp_model.state_dict(), 'model.pt') of a transformers 4.x Qwen2-MoE fine-tuned
        under DistributedDataParallel: one flat state_dict, every key prefixed module. The truth:
        prefix strip, then qwen2_moe_v4->hf_qwen2_moe (each layer's 8 + 4 expert Linears stacked
        into gate_up_proj [4, 64, 64] and down_proj [4, 64, 32])."""),
]
