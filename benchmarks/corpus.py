"""A corpus of real model pairs with a hand-written, verified ground-truth mapping.

Each `Pair` names a source model and a destination model written by different people (torchvision,
timm, Hugging Face transformers, or small modules defined here), an input both accept, and the
ground truth: for every destination ``state_dict`` key, the source key(s) that feed it. The truth is
written by hand as rename rules per pair, never derived from archalign, and for *exact* pairs it is
proved by a hand-written converter (renames plus any transpose, reshape, concatenation or row
permutation): `verify_truth` loads the converted weights with ``strict=True`` and measures how far
the two models' outputs are apart. An accuracy benchmark can then score ``archalign.align(src, dst)``
against ``pair.truth(src, dst)``.

Conventions
-----------
* No weights are ever downloaded: every model is randomly initialised (``pretrained=False``, Hugging
  Face configs), seeded (`SRC_SEED` for sources, `DST_SEED` for destinations) and in eval mode.
* Sources are *decorrelated*: after the seeded initialisation, every floating-point tensor whose
  elements are all equal (norm weights and biases, BatchNorm statistics, zero-initialised biases,
  layer scales, class tokens) is redrawn, so no two source tensors of one shape hold the same values
  and any wrong mapping changes the output. Sources with BatchNorm then get their running statistics
  from one forward pass on a seeded calibration batch, so activations stay normalised and the output
  depends on every tensor (at raw init MobileNetV2 saturates its ReLU6 and ignores its weights).
  Destinations keep their library initialisation.
* The truth covers ``state_dict`` keys, so BatchNorm buffers (``running_mean``, ``running_var``,
  ``num_batches_tracked``) are part of it.
* Tied weights: truth names only the primary key (``transformer.wte.weight``). Destination aliases
  (``lm_head.weight`` when it is the embedding) are listed in `Pair.tied_dst` and are *not* truth keys;
  source aliases never appear among truth values. Converters fill the aliases so that strict loading
  succeeds.
* For partial pairs (``exact=False``) the truth is a documented convention, some destination keys
  may have no source at all (absent from the truth), and ``convert`` is None.

Run ``python benchmarks/corpus.py`` to rebuild and verify every exact pair.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "CALIBRATION_SEED",
    "DST_SEED",
    "INPUT_SEED",
    "PAIRS",
    "SRC_SEED",
    "Pair",
    "get_pair",
    "norm_eps_profile",
    "run_model",
    "tied_aliases",
    "validate_truth",
    "verify_truth",
]

SRC_SEED = 0  # torch seed used to build every source model
CALIBRATION_SEED = 3  # seed of the batch that sets the sources' BatchNorm statistics
DST_SEED = 1  # torch seed used to build every destination model
INPUT_SEED = 2  # seed of the example inputs

Truth = dict[str, tuple[str, ...]]
StateDict = dict[str, torch.Tensor]
KeyTruth = Callable[[Sequence[str], Sequence[str]], Truth]
Transform = Callable[[str, Sequence[torch.Tensor]], torch.Tensor]
Rule = tuple[str, str | Callable[[re.Match[str]], str | tuple[str, ...]]]


@dataclass(frozen=True)
class Pair:
    """A source/destination model pair and its ground-truth parameter mapping.

    Attributes
    ----------
    name : str
        ``"<source>-><destination>"``, unique in `PAIRS`.
    make_src, make_dst : callable
        Build the (seeded, eval-mode, randomly initialised) source / destination model.
    make_inputs : callable
        An input both models accept: a Tensor, or a dict of keyword arguments (Hugging Face).
    exact : bool
        True when an exact port exists: the destination can compute the source's function.
    truth : callable
        ``truth(src, dst)`` -> ``{dst state_dict key: source key(s) feeding it}``; several source keys
        (in concatenation order) for fused tensors.
    convert : callable or None
        ``convert(src_state_dict, dst)`` -> a destination state_dict implementing `truth`; None for
        partial pairs.
    note : str
        What is special about the pair.
    tied_dst : tuple of (alias, primary)
        Destination keys that are the same tensor as another destination key. Aliases are left out
        of the truth; converters fill them.
    """

    name: str
    make_src: Callable[[], nn.Module]
    make_dst: Callable[[], nn.Module]
    make_inputs: Callable[[], Any]
    exact: bool
    truth: Callable[[nn.Module, nn.Module], Truth]
    convert: Callable[[Mapping[str, torch.Tensor], nn.Module], StateDict] | None
    note: str
    tied_dst: tuple[tuple[str, str], ...] = ()


# --------------------------------------------------------------------------- building blocks

def _build(factory: Callable[[], nn.Module], seed: int, *, decorrelate: bool,
           calibration: Callable[[], Any] | None = None) -> nn.Module:
    """Build ``factory()`` under ``seed`` without touching the global RNG; return it in eval mode.

    With ``decorrelate``, constant tensors are redrawn (`_redraw_constant_tensors`); with a
    ``calibration`` input, BatchNorm statistics are then set from one forward pass on it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
        if decorrelate:
            _redraw_constant_tensors(model, seed)
        if calibration is not None:
            _calibrate_batch_norm(model, calibration())
    return model.eval()


def _redraw_constant_tensors(model: nn.Module, seed: int) -> None:
    """Redraw every floating-point state tensor whose elements are all equal.

    Near-zero constants (biases, BatchNorm means, class tokens, ConvNeXt's 1e-6 layer scale) become
    ``0.1 * N(0, 1)``; other constants ``c`` (norm weights, BatchNorm variances) become
    ``c * U(0.8, 1.2)``, which keeps their sign. Tied tensors are redrawn once.
    """
    generator = torch.Generator().manual_seed(10_000 + seed)
    seen: set[int] = set()
    with torch.no_grad():
        for tensor in model.state_dict(keep_vars=True).values():
            if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            flat = tensor.detach().reshape(-1)
            if bool(flat[-1] != flat[0]) or not bool((flat == flat[0]).all()):  # cheap test first
                continue
            value = float(flat[0])
            if abs(value) < 1e-3:
                new = 0.1 * torch.randn(tensor.shape, generator=generator)
            else:
                new = value * (0.8 + 0.4 * torch.rand(tensor.shape, generator=generator))
            tensor.copy_(new.to(tensor.dtype))


def _calibrate_batch_norm(model: nn.Module, inputs: Any) -> None:
    """Set every BatchNorm's running statistics from one training-mode pass over ``inputs``.

    At random init the running statistics (mean 0, variance 1) do not match the activations, which
    then grow layer after layer; MobileNetV2's ReLU6 saturates and its output stops depending on the
    weights at all. Calibrated statistics keep every layer's activations normalised, so outputs stay
    sensitive to every tensor (and differ from layer to layer: the statistics are decorrelated too).
    """
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    model.train()
    run_model(model, inputs)
    for module, momentum in zip(norms, momenta):
        module.momentum = momentum
    model.eval()


def _image(*shape: int, seed: int = INPUT_SEED) -> Callable[[], torch.Tensor]:
    """An input factory for a seeded ``randn`` tensor of ``shape``."""
    def make() -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return make


def _tokens(vocab: int, batch: int = 2, length: int = 16) -> Callable[[], dict[str, torch.Tensor]]:
    """An input factory for seeded ``input_ids`` (Hugging Face keyword arguments)."""
    def make() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (batch, length),
                            generator=torch.Generator().manual_seed(INPUT_SEED))
        return {"input_ids": ids}
    return make


def _map_keys(dst_keys: Iterable[str], rules: Sequence[Rule], *, skip: Iterable[str] = ()) -> Truth:
    """Apply the first matching rule to each destination key.

    A rule is ``(regex, replacement)``; the regex must match the whole key and the replacement is a
    `re.Match.expand` template or a callable returning one source key or a tuple of them. An empty
    tuple means "no source": the key is left out of the truth.

    Raises
    ------
    KeyError
        If no rule matches a destination key (every key must be accounted for explicitly).
    """
    skipped = set(skip)
    truth: Truth = {}
    for key in dst_keys:
        if key in skipped:
            continue
        for pattern, repl in rules:
            found = re.fullmatch(pattern, key)
            if found is None:
                continue
            out = repl(found) if callable(repl) else found.expand(repl)
            sources = (out,) if isinstance(out, str) else tuple(out)
            if sources:
                truth[key] = sources
            break
        else:
            raise KeyError(f"no rule maps destination key {key!r}")
    return truth


def _on_modules(key_truth: KeyTruth) -> Callable[[nn.Module, nn.Module], Truth]:
    """Lift a truth over key lists to the public ``truth(src, dst)`` form."""
    def truth(src: nn.Module, dst: nn.Module) -> Truth:
        return key_truth(list(src.state_dict()), list(dst.state_dict()))
    return truth


def _copy(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The default transform: one source tensor, copied as is."""
    if len(tensors) != 1:
        raise ValueError(f"{key}: expected one source tensor, got {len(tensors)}")
    return tensors[0]


def _converter(key_truth: KeyTruth, transform: Transform = _copy,
               tied_dst: Sequence[tuple[str, str]] = ()
               ) -> Callable[[Mapping[str, torch.Tensor], nn.Module], StateDict]:
    """Build ``convert(src_state_dict, dst)`` from a truth and a per-key tensor transform."""
    def convert(src_state: Mapping[str, torch.Tensor], dst: nn.Module) -> StateDict:
        dst_keys = list(dst.state_dict())
        aliases = dict(tied_dst)
        truth = key_truth(list(src_state), dst_keys)
        out: StateDict = {}
        for key in dst_keys:
            if key in aliases:
                continue
            tensors = [src_state[k].detach().clone() for k in truth[key]]
            out[key] = transform(key, tensors).contiguous()
        for alias, primary in tied_dst:
            out[alias] = out[primary]
        return out
    return convert


def _identity_truth(src_keys: Sequence[str], dst_keys: Sequence[str],
                    skip: Iterable[str] = ()) -> Truth:
    """Every destination key is fed by the source key of the same name."""
    return _map_keys(dst_keys, [(r"(.+)", r"\1")], skip=skip)


# --------------------------------------------------------------------------- 1. ResNet-50

def _tv_resnet50() -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None)


def _timm_resnet50() -> nn.Module:
    import timm

    return timm.create_model("resnet50", pretrained=False)


def _tv_resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None)


def _timm_resnet18() -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False)


# --------------------------------------------------------------------------- 2. MobileNetV2

def _tv_mobilenet_v2() -> nn.Module:
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None)


def _timm_mobilenetv2_100() -> nn.Module:
    import timm

    return timm.create_model("mobilenetv2_100", pretrained=False)


def _mobilenet_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """timm ``blocks.<stage>.<block>`` is torchvision ``features.<1 + blocks before it>``."""
    stage_sizes: dict[int, int] = {}
    for key in dst_keys:
        found = re.match(r"blocks\.(\d+)\.(\d+)\.", key)
        if found:
            stage, block = int(found[1]), int(found[2])
            stage_sizes[stage] = max(stage_sizes.get(stage, 0), block + 1)
    offsets = {s: sum(stage_sizes[t] for t in range(s)) for s in sorted(stage_sizes)}
    head = 1 + sum(stage_sizes.values())  # features.<head> is the last 1x1 conv + BN

    def feature(m: re.Match[str]) -> int:
        return 1 + offsets[int(m["s"])] + int(m["b"])

    in_block = r"blocks\.(?P<s>\d+)\.(?P<b>\d+)\."
    rules: list[Rule] = [
        (r"conv_stem\.weight", "features.0.0.weight"),
        (r"bn1\.(.+)", r"features.0.1.\1"),
        # the first block has no expansion: depthwise 3x3 + BN + ReLU6, then pointwise + BN
        (r"blocks\.0\.0\.conv_dw\.weight", "features.1.conv.0.0.weight"),
        (r"blocks\.0\.0\.bn1\.(.+)", r"features.1.conv.0.1.\1"),
        (r"blocks\.0\.0\.conv_pw\.weight", "features.1.conv.1.weight"),
        (r"blocks\.0\.0\.bn2\.(.+)", r"features.1.conv.2.\1"),
        # inverted residuals: expand (conv_pw) / depthwise (conv_dw) / project (conv_pwl)
        (in_block + r"conv_pw\.weight", lambda m: f"features.{feature(m)}.conv.0.0.weight"),
        (in_block + r"bn1\.(?P<t>.+)", lambda m: f"features.{feature(m)}.conv.0.1.{m['t']}"),
        (in_block + r"conv_dw\.weight", lambda m: f"features.{feature(m)}.conv.1.0.weight"),
        (in_block + r"bn2\.(?P<t>.+)", lambda m: f"features.{feature(m)}.conv.1.1.{m['t']}"),
        (in_block + r"conv_pwl\.weight", lambda m: f"features.{feature(m)}.conv.2.weight"),
        (in_block + r"bn3\.(?P<t>.+)", lambda m: f"features.{feature(m)}.conv.3.{m['t']}"),
        (r"conv_head\.weight", f"features.{head}.0.weight"),
        (r"bn2\.(.+)", rf"features.{head}.1.\1"),
        (r"classifier\.(.+)", r"classifier.1.\1"),
    ]
    return _map_keys(dst_keys, rules)


# --------------------------------------------------------------------------- 3. ConvNeXt

CONVNEXT_DEPTHS = (3, 3, 9, 3)  # convnext_tiny's depths
CONVNEXT_DIMS = (24, 48, 96, 192)  # convnext_tiny's (96, 192, 384, 768) / 4, to build fast
CONVNEXT_CLASSES = 10


def _tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    dims = (*CONVNEXT_DIMS, None)
    setting = [CNBlockConfig(dims[i], dims[i + 1], CONVNEXT_DEPTHS[i]) for i in range(4)]
    return ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=CONVNEXT_CLASSES)


def _timm_convnext() -> nn.Module:
    import timm

    return timm.create_model("convnext_tiny", pretrained=False, depths=CONVNEXT_DEPTHS,
                             dims=CONVNEXT_DIMS, num_classes=CONVNEXT_CLASSES, drop_path_rate=0.1)


def _convnext_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """timm ``stages.i`` is torchvision ``features.2i`` (downsample) + ``features.2i+1`` (blocks)."""
    def blocks(m: re.Match[str]) -> str:
        return f"features.{2 * int(m['i']) + 1}.{m['j']}"

    stage = r"stages\.(?P<i>\d+)\.blocks\.(?P<j>\d+)\."
    rules: list[Rule] = [
        (r"stem\.0\.(.+)", r"features.0.0.\1"),
        (r"stem\.1\.(.+)", r"features.0.1.\1"),  # LayerNorm2d
        (r"stages\.(?P<i>\d+)\.downsample\.(?P<k>[01])\.(?P<t>.+)",
         lambda m: f"features.{2 * int(m['i'])}.{m['k']}.{m['t']}"),
        (stage + r"gamma", lambda m: f"{blocks(m)}.layer_scale"),  # (C,) <- (C, 1, 1)
        (stage + r"conv_dw\.(?P<t>.+)", lambda m: f"{blocks(m)}.block.0.{m['t']}"),
        (stage + r"norm\.(?P<t>.+)", lambda m: f"{blocks(m)}.block.2.{m['t']}"),
        (stage + r"mlp\.fc1\.(?P<t>.+)", lambda m: f"{blocks(m)}.block.3.{m['t']}"),
        (stage + r"mlp\.fc2\.(?P<t>.+)", lambda m: f"{blocks(m)}.block.5.{m['t']}"),
        (r"head\.norm\.(.+)", r"classifier.0.\1"),
        (r"head\.fc\.(.+)", r"classifier.2.\1"),
    ]
    return _map_keys(dst_keys, rules)


def _convnext_transform(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Layer scale: torchvision keeps it as (C, 1, 1), timm as (C,)."""
    (tensor,) = tensors
    return tensor.reshape(-1) if key.endswith(".gamma") else tensor


# --------------------------------------------------------------------------- 4. ViT

VIT = {"image": 32, "patch": 8, "layers": 4, "heads": 4, "hidden": 64, "mlp": 128, "classes": 10}


def _tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=VIT["image"], patch_size=VIT["patch"], num_layers=VIT["layers"],
                             num_heads=VIT["heads"], hidden_dim=VIT["hidden"], mlp_dim=VIT["mlp"],
                             num_classes=VIT["classes"])


def _timm_vit() -> nn.Module:
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=VIT["image"], patch_size=VIT["patch"], depth=VIT["layers"],
                             num_heads=VIT["heads"], embed_dim=VIT["hidden"],
                             mlp_ratio=VIT["mlp"] / VIT["hidden"], num_classes=VIT["classes"],
                             global_pool="token", class_token=True, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU)


def _vit_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """MultiheadAttention's packed in_proj is [q; k; v] rows, the same layout as timm's qkv."""
    layer = r"blocks\.(?P<i>\d+)\."

    def enc(m: re.Match[str], rest: str) -> str:
        return f"encoder.layers.encoder_layer_{m['i']}.{rest}"

    rules: list[Rule] = [
        (r"cls_token", "class_token"),
        (r"pos_embed", "encoder.pos_embedding"),
        (r"patch_embed\.proj\.(.+)", r"conv_proj.\1"),
        (layer + r"norm1\.(?P<t>.+)", lambda m: enc(m, f"ln_1.{m['t']}")),
        (layer + r"attn\.qkv\.weight", lambda m: enc(m, "self_attention.in_proj_weight")),
        (layer + r"attn\.qkv\.bias", lambda m: enc(m, "self_attention.in_proj_bias")),
        (layer + r"attn\.proj\.(?P<t>.+)", lambda m: enc(m, f"self_attention.out_proj.{m['t']}")),
        (layer + r"norm2\.(?P<t>.+)", lambda m: enc(m, f"ln_2.{m['t']}")),
        (layer + r"mlp\.fc1\.(?P<t>.+)", lambda m: enc(m, f"mlp.0.{m['t']}")),
        (layer + r"mlp\.fc2\.(?P<t>.+)", lambda m: enc(m, f"mlp.3.{m['t']}")),
        (r"norm\.(.+)", r"encoder.ln.\1"),
        (r"head\.(.+)", r"heads.head.\1"),
    ]
    return _map_keys(dst_keys, rules)


# --------------------------------------------------------------------------- 5./7. Llama family

LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "use_cache": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": None,
}


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE, attention_bias=False, mlp_bias=False))


def _mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**LLAMA_LIKE, sliding_window=None))


def _phi3() -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    config = {k: v for k, v in LLAMA_LIKE.items() if k != "head_dim"}  # Phi3: hidden / heads
    config["rope_parameters"] = {**LLAMA_LIKE["rope_parameters"], "partial_rotary_factor": 1.0}
    return Phi3ForCausalLM(Phi3Config(**config, original_max_position_embeddings=64,
                                      sliding_window=None, resid_pdrop=0.0, embd_pdrop=0.0))


def _phi3_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (row concatenation)."""
    layer = r"model\.layers\.(?P<i>\d+)\."
    rules: list[Rule] = [
        (layer + r"self_attn\.qkv_proj\.weight",
         lambda m: tuple(f"model.layers.{m['i']}.self_attn.{p}_proj.weight" for p in "qkv")),
        (layer + r"mlp\.gate_up_proj\.weight",
         lambda m: tuple(f"model.layers.{m['i']}.mlp.{p}_proj.weight" for p in ("gate", "up"))),
        (r"(.+)", r"\1"),
    ]
    return _map_keys(dst_keys, rules)


def _concat_rows(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fused projections are the row-wise concatenation of their parts, in truth order."""
    return torch.cat(list(tensors), dim=0)


# --------------------------------------------------------------------------- 6. GPT-2 -> GPTBigCode

GPT = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64}
GPT_SHARED: dict[str, Any] = {
    **GPT,
    "activation_function": "gelu_new",  # GPTBigCode defaults to gelu_pytorch_tanh
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "tie_word_embeddings": True,
    "use_cache": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
GPT_TIED = (("lm_head.weight", "transformer.wte.weight"),)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**GPT_SHARED, scale_attn_by_inverse_layer_idx=False,
                                      reorder_and_upcast_attn=False))


def _gpt_bigcode() -> nn.Module:
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM(GPTBigCodeConfig(**GPT_SHARED, multi_query=False))


def _gpt_bigcode_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """Same names; ``lm_head.weight`` is an alias of ``transformer.wte.weight`` on both sides."""
    return _identity_truth(src_keys, dst_keys, skip=[alias for alias, _ in GPT_TIED])


def _gpt_bigcode_transform(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """GPT-2 Conv1D (in, out) -> nn.Linear (out, in); c_attn rows regrouped per head.

    GPT-2 splits c_attn's output as [q | k | v], each ``n_head * head_dim`` wide. GPTBigCode with
    ``multi_query=False`` views it as ``(n_head, 3 * head_dim)``: [q_h, k_h, v_h] per head.
    """
    (tensor,) = tensors
    heads = GPT["n_head"]
    head_dim = GPT["n_embd"] // heads
    if key.endswith("attn.c_attn.weight"):
        weight = tensor.t()  # (3 * embd, embd) as [q; k; v]
        return weight.reshape(3, heads, head_dim, -1).permute(1, 0, 2, 3).reshape(weight.shape)
    if key.endswith("attn.c_attn.bias"):
        return tensor.reshape(3, heads, head_dim).permute(1, 0, 2).reshape(-1)
    if re.search(r"\.(attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$", key):
        return tensor.t()
    return tensor


# --------------------------------------------------------------------------- 8. ResNet-34 -> 18

def _tv_resnet34() -> nn.Module:
    from torchvision.models import resnet34

    return resnet34(weights=None)


def _deeper_resnet_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """Stem, fc and, in each stage, block j <- block j of the deeper model (its first N blocks).

    ResNet-18's blocks keep their names in ResNet-34, so the truth is the identity on names; the
    deeper model's trailing blocks (layer1.2, layer2.2-3, layer3.2-5, layer4.2) feed nothing.
    """
    return _identity_truth(src_keys, dst_keys)


# --------------------------------------------------------------------------- 9. width change

NARROW_CHANNELS = (48, 96, 192, 384)  # 3/4 of resnet18's (64, 128, 256, 512)


def _timm_resnet18_narrow() -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, channels=NARROW_CHANNELS)


def _narrow_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """Same-position (same-name) layers; the narrow model's new layer1.0.downsample has no source.

    timm keeps a 64-channel stem for non-deep stems whatever ``channels`` says, so the narrow model
    needs a 64 -> 48 projection shortcut in layer1.0 that resnet18 does not have.
    """
    return _map_keys(dst_keys, [(r"layer1\.0\.downsample\..+", lambda m: ()), (r"(.+)", r"\1")])


# --------------------------------------------------------------------------- 10-12. seed MLPs

class MLP(nn.Module):
    """``fc1 -> ReLU -> fc2 -> ... -> fcN`` over the given widths (the seed scenarios' models)."""

    def __init__(self, *widths: int) -> None:
        super().__init__()
        self.depth = len(widths) - 1
        for i, (a, b) in enumerate(itertools.pairwise(widths), start=1):
            self.add_module(f"fc{i}", nn.Linear(a, b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.depth + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.depth:
                x = torch.relu(x)
        return x


class RenamedMLP(nn.Module):
    """Seed scenario 2's destination: ``fc1`` renamed ``first_layer``, a new ``fc3`` (5 -> 3) added."""

    def __init__(self) -> None:
        super().__init__()
        self.first_layer = nn.Linear(10, 8)
        self.fc2 = nn.Linear(8, 5)
        self.fc3 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.first_layer(x)))))


def _rename_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    return _map_keys(dst_keys, [(r"first_layer\.(.+)", r"fc1.\1"), (r"fc2\.(.+)", r"fc2.\1"),
                                (r"fc3\..+", lambda m: ())])


def _deeper_mlp_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    return _map_keys(dst_keys, [(r"fc2\.(.+)", r"fc3.\1"), (r"fc1\.(.+)", r"fc1.\1")])


# --------------------------------------------------------------------------- the corpus

def _pair(name: str, src: Callable[[], nn.Module], dst: Callable[[], nn.Module],
          inputs: Callable[[], Any], key_truth: KeyTruth, note: str, *, exact: bool,
          transform: Transform = _copy, tied_dst: tuple[tuple[str, str], ...] = (),
          calibration: Callable[[], Any] | None = None) -> Pair:
    return Pair(
        name=name,
        make_src=lambda: _build(src, SRC_SEED, decorrelate=True, calibration=calibration),
        make_dst=lambda: _build(dst, DST_SEED, decorrelate=False),
        make_inputs=inputs,
        exact=exact,
        truth=_on_modules(key_truth),
        convert=_converter(key_truth, transform, tied_dst) if exact else None,
        note=" ".join(note.split()),
        tied_dst=tied_dst,
    )


_BN_CALIBRATION = _image(8, 3, 64, 64, seed=CALIBRATION_SEED)

PAIRS: list[Pair] = [
    _pair("tv_resnet18->timm_resnet18", _tv_resnet18, _timm_resnet18,
          _image(2, 3, 64, 64), _identity_truth, exact=True, calibration=_BN_CALIBRATION,
          note="""The small sibling of the ResNet-50 pair (122 keys, same names): fast enough
          for the test suite."""),
    _pair("tv_resnet50->timm_resnet50", _tv_resnet50, _timm_resnet50, _image(2, 3, 64, 64),
          _identity_truth, exact=True, calibration=_BN_CALIBRATION, note="""
          Same state_dict key names (320 keys, BatchNorm buffers included), different module
          classes (timm's Bottleneck has extra act/drop/aa modules). The truth is the identity on
          names: a matcher must not be fooled into anything cleverer."""),
    _pair("tv_mobilenet_v2->timm_mobilenetv2_100", _tv_mobilenet_v2, _timm_mobilenetv2_100,
          _image(2, 3, 64, 64), _mobilenet_truth, exact=True, calibration=_BN_CALIBRATION, note="""
          Flat torchvision `features.N.conv.*` vs timm `blocks.stage.block.*` with named convs
          (conv_pw/conv_dw/conv_pwl). The first block has no expansion conv, so its depthwise conv
          is `features.1.conv.0.0` but `blocks.0.0.conv_dw`. Every layer is renamed; shapes repeat
          heavily (17 inverted residuals). Both use ReLU6 and BatchNorm eps 1e-5."""),
    _pair("tv_convnext_tiny->timm_convnext_tiny", _tv_convnext, _timm_convnext, _image(2, 3, 64, 64),
          _convnext_truth, exact=True, transform=_convnext_transform, note="""
          ConvNeXt-T depths (3, 3, 9, 3) at a quarter of the width (24, 48, 96, 192), 10 classes.
          Layer scale is `layer_scale` (C, 1, 1) in torchvision and `gamma` (C,) in timm: a reshape.
          Both run the MLP as nn.Linear on channels-last activations (torchvision permutes inside
          `block`, timm with conv_mlp=False), so fc1/fc2 weights copy unchanged. torchvision's
          downsample is features.2i (LayerNorm2d + 2x2 conv), timm's stages.i.downsample."""),
    _pair("tv_vit->timm_vit", _tv_vit, _timm_vit, _image(2, 3, 32, 32), _vit_truth, exact=True,
          note="""
          Tiny ViT (32px, patch 8, 4 layers, width 64, 4 heads, MLP 128, 10 classes). timm needs
          global_pool='token', class_token=True, qkv_bias=True, LayerNorm eps 1e-6 (torchvision's
          value; timm's default LayerNorm also uses 1e-6) and exact GELU. MultiheadAttention's
          packed in_proj_weight (3C, C) is [q; k; v], the same layout as timm's attn.qkv, and
          class_token / encoder.pos_embedding become cls_token / pos_embed."""),
    _pair("hf_llama->hf_mistral", _llama, _mistral, _tokens(LLAMA_LIKE["vocab_size"]),
          _identity_truth, exact=True, note="""
          Tiny Llama and Mistral (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 128, untied
          lm_head) with identical key names; Mistral needs sliding_window=None (default 4096) and
          the same rope_theta / rms_norm_eps. Tests that a matcher keeps q/k/v/o and gate/up/down
          apart although k/v and gate/up have equal shapes."""),
    _pair("hf_gpt2->hf_gpt_bigcode", _gpt2, _gpt_bigcode, _tokens(GPT["vocab_size"]),
          _gpt_bigcode_truth, exact=True, transform=_gpt_bigcode_transform, tied_dst=GPT_TIED,
          note="""
          Same key names, but GPT-2's Conv1D stores weights (in, out): every attention and MLP
          weight is transposed (attn.c_proj is 64x64, so a missing transpose still fits the shape).
          GPTBigCode with multi_query=False reads c_attn's output per head as [q_h, k_h, v_h], so the
          fused c_attn rows (and bias) are also regrouped from [q | k | v] to per-head order - same
          keys, permuted contents. Both use activation gelu_new (GPTBigCode's default is
          gelu_pytorch_tanh), scale_attn_weights=True. lm_head.weight is tied to
          transformer.wte.weight in both: it is left out of the truth (see tied_dst)."""),
    _pair("hf_llama->hf_phi3", _llama, _phi3, _tokens(LLAMA_LIKE["vocab_size"]), _phi3_truth,
          exact=True, transform=_concat_rows, note="""
          Phi-3 fuses attention and MLP inputs: qkv_proj = cat(q_proj, k_proj, v_proj) (rows
          64 + 32 + 32) and gate_up_proj = cat(gate_proj, up_proj); truth lists those source keys in
          concatenation order. Phi-3 needs partial_rotary_factor=1.0, rope_type default,
          rms_norm_eps=1e-6 (its default is 1e-5), sliding_window=None, pad_token_id=None."""),
    _pair("tv_resnet34->tv_resnet18", _tv_resnet34, _tv_resnet18, _image(2, 3, 64, 64),
          _deeper_resnet_truth, exact=False, calibration=_BN_CALIBRATION, note="""
          Partial: ResNet-34 (3, 4, 6, 3 blocks) into ResNet-18 (2, 2, 2, 2). Convention: stem, fc,
          and in every stage the deeper model's first N blocks onto the shallower model's N blocks
          (including each stage's downsample in block 0); the remaining source blocks feed nothing.
          Every destination key has a shape-compatible source. Other conventions (e.g. first and
          last block) are defensible; this truth encodes 'first N'."""),
    _pair("timm_resnet18->timm_resnet18_narrow", _timm_resnet18, _timm_resnet18_narrow,
          _image(2, 3, 64, 64), _narrow_truth, exact=False, calibration=_BN_CALIBRATION, note="""
          Partial width change: timm ResNet-18 into the same architecture with 3/4 of the stage
          channels (48, 96, 192, 384). Truth = the same-position (same-name) layer for every key,
          although most do not fit shape-wise. The stem keeps 64 channels (timm ignores
          stem_width for non-deep stems), so conv1/bn1 fit, as do fc.bias (1000,) and the scalar
          num_batches_tracked buffers; everything else is a shape mismatch that should be reported,
          not loaded. The narrow model gains a 64->48 projection shortcut layer1.0.downsample.*
          that has no source and is absent from the truth."""),
    _pair("mlp->mlp_identical", lambda: MLP(10, 8, 5, 2), lambda: MLP(10, 8, 5, 2), _image(4, 10),
          _identity_truth, exact=True, note="""
          Seed scenario 1: identical 10->8->5->2 MLPs; the truth is the identity mapping."""),
    _pair("mlp->mlp_renamed_plus_fc3", lambda: MLP(10, 8, 5), RenamedMLP, _image(4, 10),
          _rename_truth, exact=False, note="""
          Seed scenario 2: fc1 renamed first_layer and a new fc3 (5->3) appended. Truth:
          first_layer <- fc1, fc2 <- fc2; fc3 has no source and is absent from the truth. Not exact
          (the destination has an extra layer and 3 outputs)."""),
    _pair("mlp3->mlp2", lambda: MLP(10, 8, 5, 2), lambda: MLP(10, 5, 2), _image(4, 10),
          _deeper_mlp_truth, exact=False, note="""
          Seed scenario 3: 3-layer 10->8->5->2 into 2-layer 10->5->2. Truth: dst fc2 (5->2) <- src
          fc3 (5->2), which fits; dst fc1 (10->5) <- src fc1 (10->8), its counterpart (it reads the
          input), which does not fit: the issue asks for it to be reported as a shape mismatch
          and left unloaded."""),
]


def get_pair(name: str) -> Pair:
    """The pair called ``name``.

    Raises
    ------
    KeyError
        If no pair has that name; the message lists the known names.
    """
    for pair in PAIRS:
        if pair.name == name:
            return pair
    raise KeyError(f"no pair {name!r}; known pairs: {', '.join(p.name for p in PAIRS)}")


# --------------------------------------------------------------------------- checking

def run_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call ``model`` on ``inputs`` (a dict is passed as keyword arguments) and return one tensor.

    Hugging Face outputs give their ``logits``; tuples their first element.
    """
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``alias -> primary`` for state_dict keys that share storage with an earlier key."""
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() == 0:
            continue
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


def validate_truth(pair: Pair, src: nn.Module | None = None,
                   dst: nn.Module | None = None) -> list[str]:
    """Consistency problems of ``pair.truth`` (an empty list when there are none).

    Checks that truth keys exist on their side, that tied aliases are neither truth keys nor truth
    sources, that `Pair.tied_dst` matches the destination's actual aliases, and, for exact pairs,
    that the truth covers every destination key but the aliases.
    """
    src = src if src is not None else pair.make_src()
    dst = dst if dst is not None else pair.make_dst()
    src_keys, dst_keys = set(src.state_dict()), set(dst.state_dict())
    src_aliases, dst_aliases = tied_aliases(src), tied_aliases(dst)
    truth = pair.truth(src, dst)
    problems: list[str] = []
    if dict(pair.tied_dst) != dst_aliases:
        problems.append(f"tied_dst {dict(pair.tied_dst)} != actual destination aliases {dst_aliases}")
    for key, sources in truth.items():
        if key not in dst_keys:
            problems.append(f"truth key {key!r} is not a destination key")
        if key in dst_aliases:
            problems.append(f"truth key {key!r} is a tied alias of {dst_aliases[key]!r}")
        if not sources:
            problems.append(f"truth key {key!r} has no source keys")
        if len(set(sources)) != len(sources):
            problems.append(f"truth key {key!r} repeats a source key: {sources}")
        for source in sources:
            if source not in src_keys:
                problems.append(f"{key!r} <- {source!r}: not a source key")
            elif source in src_aliases:
                problems.append(f"{key!r} <- {source!r}: a tied alias of {src_aliases[source]!r}")
    if pair.exact:
        uncovered = sorted(dst_keys - set(truth) - set(dst_aliases))
        if uncovered:
            problems.append(f"exact pair, but the truth misses {len(uncovered)} destination keys: "
                            f"{uncovered[:5]}")
    return problems


def verify_truth(pair: Pair) -> float:
    """Build both models, convert with ``pair.convert``, load strictly, return max |output diff|.

    Raises
    ------
    ValueError
        If the pair is not exact (it has no converter), or the converter's keys are not exactly
        the truth's keys plus the tied aliases.
    RuntimeError
        From ``load_state_dict(strict=True)`` if the converted state_dict does not fit.
    """
    if not pair.exact or pair.convert is None:
        raise ValueError(f"{pair.name} is a partial pair: it has no exact converter to verify")
    src, dst = pair.make_src(), pair.make_dst()
    converted = pair.convert(src.state_dict(), dst)
    expected = set(pair.truth(src, dst)) | {alias for alias, _ in pair.tied_dst}
    if set(converted) != expected:
        raise ValueError(f"{pair.name}: converter keys differ from truth keys + aliases: "
                         f"{sorted(set(converted) ^ expected)[:5]}")
    dst.load_state_dict(converted, strict=True)
    inputs = pair.make_inputs()
    return float((run_model(src, inputs) - run_model(dst, inputs)).abs().max())


def norm_eps_profile(model: nn.Module) -> list[float]:
    """Sorted epsilons of every normalisation layer (``eps`` or ``variance_epsilon``).

    Differences of eps (1e-5 vs 1e-6) barely move outputs, so exact pairs are also checked to have
    the same profile on both sides.
    """
    values: list[float] = []
    for module in model.modules():
        for attr in ("eps", "variance_epsilon"):
            value = getattr(module, attr, None)
            if isinstance(value, float) and "norm" in type(module).__name__.lower():
                values.append(value)
    return sorted(values)


def _main() -> None:
    """Verify every exact pair; print one row per pair."""
    import logging
    import warnings

    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import timm  # noqa: F401  # import the libraries up front so that build times are the models'
    import torchvision  # noqa: F401
    import transformers  # noqa: F401

    print(f"{'pair':40} {'exact':5} {'truth':>5} {'dst':>4} {'fits':>4} {'build s':>7} {'|out|':>7} "
          f"{'max diff':>8}")
    for pair in PAIRS:
        start = time.perf_counter()
        src, dst = pair.make_src(), pair.make_dst()
        build = time.perf_counter() - start
        problems = validate_truth(pair, src, dst)
        truth = pair.truth(src, dst)
        src_state, dst_state = src.state_dict(), dst.state_dict()
        fits = sum(len(s) == 1 and src_state[s[0]].shape == dst_state[k].shape for k, s in truth.items())
        scale = float(run_model(src, pair.make_inputs()).abs().max())
        diff = f"{verify_truth(pair):8.1e}" if pair.exact else f"{'-':>8}"
        print(f"{pair.name:40} {pair.exact!s:5} {len(truth):5d} {len(dst_state):4d} {fits:4d} "
              f"{build:7.2f} {scale:7.2f} {diff}")
        for problem in problems:
            print(f"    PROBLEM: {problem}")

if __name__ == "__main__":
    _main()
