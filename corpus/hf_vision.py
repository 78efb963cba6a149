"""timm <-> Hugging Face vision ports (exact): ViT, DeiT, SigLIP, ConvNeXt, Swin, ResNet.

Every configuration is tiny (32-64 px images, width 16-64, 2-3 layers, 10 classes) and chosen so
that both sides compute the same function: same LayerNorm eps, same GELU flavour, same pooling.
The truths follow the conversions the libraries ship (transformers' ``convert_*_timm_to_pytorch.py``
scripts, timm's ``checkpoint_filter_fn``), written by hand against transformers 5.x names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._pair import BN_CALIBRATION, Pair, Rule, Truth, image_input, map_keys
from ._ports import QKV, make_port, split_qkv

Rename = Callable[[re.Match[str]], str]

TINY_VIT = {"image": 32, "patch": 8, "width": 64, "heads": 4, "layers": 3, "mlp": 128}
CLASSES = 10


def _vit_kwargs() -> dict[str, Any]:
    """timm VisionTransformer arguments of `TINY_VIT`."""
    return {"img_size": TINY_VIT["image"], "patch_size": TINY_VIT["patch"], "embed_dim": TINY_VIT["width"],
            "depth": TINY_VIT["layers"], "num_heads": TINY_VIT["heads"],
            "mlp_ratio": TINY_VIT["mlp"] / TINY_VIT["width"]}


def _hf_vit_config() -> dict[str, Any]:
    """Hugging Face ViT-family config of `TINY_VIT`; LayerNorm eps 1e-6 as timm (HF default 1e-12)."""
    return {"image_size": TINY_VIT["image"], "patch_size": TINY_VIT["patch"],
            "hidden_size": TINY_VIT["width"], "num_hidden_layers": TINY_VIT["layers"],
            "num_attention_heads": TINY_VIT["heads"], "intermediate_size": TINY_VIT["mlp"],
            "layer_norm_eps": 1e-6, "hidden_act": "gelu"}


def _timm_block_rules(dst_layer: str, src_layer: str, names: dict[str, str]) -> list[Rule]:
    """Rules for one pre-norm transformer block whose timm side is ``blocks.<i>`` with fused qkv.

    ``names`` gives the destination's names of timm's norm1, attention output, norm2, fc1 and fc2,
    and (a regex with ``{p}``) of its q, k and v projections, all three fed by timm's fused
    ``attn.qkv``.
    """
    def to(rest: str) -> Rename:
        return lambda m: f"{src_layer.format(i=m['i'])}.{rest.format(t=m['t'])}"

    layer = dst_layer + r"\."
    return [
        (layer + re.escape(names["norm1"]) + r"\.(?P<t>weight|bias)", to("norm1.{t}")),
        (layer + names["qkv"].format(p="(?:q|k|v)") + r"\.(?P<t>weight|bias)", to("attn.qkv.{t}")),
        (layer + re.escape(names["out"]) + r"\.(?P<t>weight|bias)", to("attn.proj.{t}")),
        (layer + re.escape(names["norm2"]) + r"\.(?P<t>weight|bias)", to("norm2.{t}")),
        (layer + re.escape(names["fc1"]) + r"\.(?P<t>weight|bias)", to("mlp.fc1.{t}")),
        (layer + re.escape(names["fc2"]) + r"\.(?P<t>weight|bias)", to("mlp.fc2.{t}")),
    ]


# --------------------------------------------------------------------------- timm ViT -> HF ViT

HF_VIT_BLOCK = {"norm1": "layernorm_before", "qkv": r"attention\.{p}_proj", "out": "attention.o_proj",
                "norm2": "layernorm_after", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def _timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**_vit_kwargs(), num_classes=CLASSES, global_pool="token",
                             class_token=True, qkv_bias=True)


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(**_hf_vit_config(), num_labels=CLASSES))


def _hf_vit_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    rules: list[Rule] = [
        (r"vit\.embeddings\.cls_token", "cls_token"),
        (r"vit\.embeddings\.position_embeddings", "pos_embed"),
        (r"vit\.embeddings\.patch_embeddings\.projection\.(.+)", r"patch_embed.proj.\1"),
        *_timm_block_rules(r"vit\.layers\.(?P<i>\d+)", "blocks.{i}", HF_VIT_BLOCK),
        (r"vit\.layernorm\.(.+)", r"norm.\1"),
        (r"classifier\.(.+)", r"head.\1"),
    ]
    return map_keys(dst_keys, rules)


# --------------------------------------------------------------------------- timm DeiT -> HF DeiT

def _timm_deit_distilled() -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(**_vit_kwargs(), num_classes=CLASSES, qkv_bias=True)


def _hf_deit_with_teacher() -> nn.Module:
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    return DeiTForImageClassificationWithTeacher(DeiTConfig(**_hf_vit_config(), num_labels=CLASSES))


def _hf_deit_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    rules: list[Rule] = [
        (r"deit\.embeddings\.cls_token", "cls_token"),
        (r"deit\.embeddings\.distillation_token", "dist_token"),
        (r"deit\.embeddings\.position_embeddings", "pos_embed"),
        (r"deit\.embeddings\.patch_embeddings\.projection\.(.+)", r"patch_embed.proj.\1"),
        *_timm_block_rules(r"deit\.layers\.(?P<i>\d+)", "blocks.{i}", HF_VIT_BLOCK),
        (r"deit\.layernorm\.(.+)", r"norm.\1"),
        (r"cls_classifier\.(.+)", r"head.\1"),
        (r"distillation_classifier\.(.+)", r"head_dist.\1"),
    ]
    return map_keys(dst_keys, rules)


# --------------------------------------------------------------------------- timm SigLIP -> HF SigLIP

HF_SIGLIP_BLOCK = {"norm1": "layer_norm1", "qkv": r"self_attn\.{p}_proj", "out": "self_attn.out_proj",
                   "norm2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def _timm_vit_siglip() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**_vit_kwargs(), num_classes=0, class_token=False,
                             global_pool="map", act_layer="gelu_tanh")


def _hf_siglip_vision() -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = {k: v for k, v in _hf_vit_config().items() if k != "hidden_act"}
    return SiglipVisionModel(SiglipVisionConfig(**config, hidden_act="gelu_pytorch_tanh"))


def _hf_siglip_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """timm's attention-pool head has ``q`` and a fused ``kv``; HF's is an nn.MultiheadAttention."""
    rules: list[Rule] = [
        (r"embeddings\.patch_embedding\.(.+)", r"patch_embed.proj.\1"),
        (r"embeddings\.position_embedding\.weight", "pos_embed"),
        *_timm_block_rules(r"encoder\.layers\.(?P<i>\d+)", "blocks.{i}", HF_SIGLIP_BLOCK),
        (r"post_layernorm\.(.+)", r"norm.\1"),
        (r"head\.probe", "attn_pool.latent"),
        (r"head\.attention\.in_proj_(weight|bias)",
         lambda m: (f"attn_pool.q.{m[1]}", f"attn_pool.kv.{m[1]}")),
        (r"head\.attention\.out_proj\.(.+)", r"attn_pool.proj.\1"),
        (r"head\.layernorm\.(.+)", r"attn_pool.norm.\1"),
        (r"head\.mlp\.(fc1|fc2)\.(.+)", r"attn_pool.mlp.\1.\2"),
    ]
    return map_keys(dst_keys, rules)


def _siglip_transform(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Split the trunk's qkv; drop pos_embed's batch axis; in_proj = cat(q, kv) (rows [q; k; v])."""
    if key.startswith("head.attention.in_proj_"):
        return torch.cat(list(tensors), dim=0)
    (tensor,) = tensors
    if key == "embeddings.position_embedding.weight":
        return tensor.squeeze(0)  # (1, N, C) -> (N, C)
    return split_qkv(key, tensors)


# --------------------------------------------------------------------------- timm ConvNeXt -> HF

CONVNEXT_DEPTHS = (2, 2, 2, 2)
CONVNEXT_DIMS = (16, 32, 48, 64)


def timm_convnext_conv_mlp() -> nn.Module:
    """timm ConvNeXt with 1x1-convolution MLPs (also the destination of the original ConvNeXt)."""
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=CONVNEXT_DEPTHS, dims=CONVNEXT_DIMS, conv_mlp=True, num_classes=CLASSES)


def _hf_convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(ConvNextConfig(
        depths=list(CONVNEXT_DEPTHS), hidden_sizes=list(CONVNEXT_DIMS), num_labels=CLASSES,
        layer_norm_eps=1e-6, drop_path_rate=0.0))


def _hf_convnext_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    block = r"convnext\.encoder\.stages\.(?P<i>\d+)\.layers\.(?P<j>\d+)\."

    def to(rest: str) -> Rename:
        return lambda m: f"stages.{m['i']}.blocks.{m['j']}.{rest.format(t=m.groupdict().get('t'))}"

    rules: list[Rule] = [
        (r"convnext\.embeddings\.patch_embeddings\.(.+)", r"stem.0.\1"),
        (r"convnext\.embeddings\.layernorm\.(.+)", r"stem.1.\1"),
        (r"convnext\.encoder\.stages\.(\d+)\.downsampling_layer\.([01])\.(.+)",
         r"stages.\1.downsample.\2.\3"),
        (block + r"layer_scale_parameter", to("gamma")),
        (block + r"dwconv\.(?P<t>.+)", to("conv_dw.{t}")),
        (block + r"layernorm\.(?P<t>.+)", to("norm.{t}")),
        (block + r"pwconv1\.(?P<t>.+)", to("mlp.fc1.{t}")),
        (block + r"pwconv2\.(?P<t>.+)", to("mlp.fc2.{t}")),
        (r"convnext\.layernorm\.(.+)", r"head.norm.\1"),
        (r"classifier\.(.+)", r"head.fc.\1"),
    ]
    return map_keys(dst_keys, rules)


def _conv1x1_to_linear(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 1x1 convolution's (out, in, 1, 1) weight is a Linear's (out, in) weight."""
    (tensor,) = tensors
    return tensor.flatten(1) if re.search(r"pwconv\d\.weight$", key) else tensor


# --------------------------------------------------------------------------- HF Swin -> timm Swin

SWIN: dict[str, Any] = {"image": 64, "patch": 4, "window": 4, "width": 32, "depths": (2, 2, 2),
                        "heads": (2, 4, 8)}


def _hf_swin() -> nn.Module:
    from transformers import SwinConfig, SwinForImageClassification

    return SwinForImageClassification(SwinConfig(
        image_size=SWIN["image"], patch_size=SWIN["patch"], window_size=SWIN["window"],
        embed_dim=SWIN["width"], depths=list(SWIN["depths"]), num_heads=list(SWIN["heads"]),
        num_labels=CLASSES, drop_path_rate=0.0))


def _timm_swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=SWIN["image"], patch_size=SWIN["patch"], window_size=SWIN["window"],
                           embed_dim=SWIN["width"], depths=SWIN["depths"], num_heads=SWIN["heads"],
                           num_classes=CLASSES)


def _timm_swin_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """timm merges patches at the start of stage s; Hugging Face at the end of stage s - 1."""
    block = r"layers\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\."

    def to(rest: str) -> Callable[[re.Match[str]], str | tuple[str, ...]]:
        def name(m: re.Match[str]) -> str | tuple[str, ...]:
            prefix = f"swin.encoder.layers.{m['s']}.blocks.{m['b']}."
            if rest == "qkv":
                return tuple(f"{prefix}attention.{p}_proj.{m['t']}" for p in QKV)
            return prefix + rest.format(t=m.groupdict().get("t"))
        return name

    rules: list[Rule] = [
        (r"patch_embed\.proj\.(.+)", r"swin.embeddings.patch_embeddings.projection.\1"),
        (r"patch_embed\.norm\.(.+)", r"swin.embeddings.norm.\1"),
        (block + r"norm1\.(?P<t>.+)", to("layernorm_before.{t}")),
        (block + r"attn\.relative_position_bias_table",
         to("attention.relative_position_bias.relative_position_bias_table")),
        (block + r"attn\.qkv\.(?P<t>weight|bias)", to("qkv")),
        (block + r"attn\.proj\.(?P<t>.+)", to("attention.o_proj.{t}")),
        (block + r"norm2\.(?P<t>.+)", to("layernorm_after.{t}")),
        (block + r"mlp\.(?P<t>fc[12]\..+)", to("mlp.{t}")),
        (r"layers\.(?P<s>\d+)\.downsample\.(?P<t>.+)",
         lambda m: f"swin.encoder.layers.{int(m['s']) - 1}.downsample.{m['t']}"),
        (r"norm\.(.+)", r"swin.layernorm.\1"),
        (r"head\.fc\.(.+)", r"classifier.\1"),
    ]
    return map_keys(dst_keys, rules)


def _concat_qkv(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """timm's fused qkv is the row concatenation [q; k; v] of Hugging Face's projections."""
    return torch.cat(list(tensors), dim=0)


# --------------------------------------------------------------------------- timm ResNet -> HF

RESNET_LAYERS = (2, 1, 1, 1)
RESNET_CHANNELS = (8, 16, 32, 64)  # bottleneck widths; blocks output 4x (timm ignores stem_width: 64)


def _timm_resnet() -> nn.Module:
    from timm.models.resnet import Bottleneck, ResNet

    return ResNet(block=Bottleneck, layers=RESNET_LAYERS, channels=RESNET_CHANNELS, num_classes=CLASSES)


def _hf_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(
        embedding_size=64, hidden_sizes=[4 * c for c in RESNET_CHANNELS], depths=list(RESNET_LAYERS),
        layer_type="bottleneck", num_labels=CLASSES))


def _hf_resnet_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """HF registers a block's shortcut before its body; timm registers downsample after conv3."""
    layer = r"resnet\.encoder\.stages\.(?P<s>\d+)\.layers\.(?P<b>\d+)\."

    def block(m: re.Match[str]) -> str:
        return f"layer{int(m['s']) + 1}.{m['b']}"

    rules: list[Rule] = [
        (r"resnet\.embedder\.embedder\.convolution\.weight", "conv1.weight"),
        (r"resnet\.embedder\.embedder\.normalization\.(.+)", r"bn1.\1"),
        (layer + r"shortcut\.convolution\.weight", lambda m: f"{block(m)}.downsample.0.weight"),
        (layer + r"shortcut\.normalization\.(?P<t>.+)", lambda m: f"{block(m)}.downsample.1.{m['t']}"),
        (layer + r"layer\.(?P<k>\d)\.convolution\.weight",
         lambda m: f"{block(m)}.conv{int(m['k']) + 1}.weight"),
        (layer + r"layer\.(?P<k>\d)\.normalization\.(?P<t>.+)",
         lambda m: f"{block(m)}.bn{int(m['k']) + 1}.{m['t']}"),
        (r"classifier\.1\.(.+)", r"fc.\1"),
    ]
    return map_keys(dst_keys, rules)


# --------------------------------------------------------------------------- the pairs

PAIRS: list[Pair] = [
    make_port("timm_vit->hf_vit", _timm_vit, _hf_vit, image_input(2, 3, 32, 32), _hf_vit_truth,
              transform=split_qkv, note="""
              Tiny ViT (32 px, patch 8, 3 layers, width 64, 4 heads, MLP 128, 10 classes) with CLS
              pooling; HF needs layer_norm_eps=1e-6 (its default is 1e-12). timm's fused attn.qkv
              (3C, C) feeds three destination tensors q_proj/k_proj/v_proj (its row blocks [q; k; v]),
              a one-to-many split that no renaming expresses. HF registers a layer's attention before
              both its LayerNorms (layernorm_before runs first, layernorm_after after the attention),
              so its state_dict order is not its execution order; q/k/v/o are four 64x64 tensors per
              layer."""),
    make_port("timm_deit_distilled->hf_deit_with_teacher", _timm_deit_distilled, _hf_deit_with_teacher,
              image_input(2, 3, 32, 32), _hf_deit_truth, transform=split_qkv, note="""
              Distilled DeiT: a class and a distillation token (both (1, 1, 64)), position embeddings
              for N + 2 tokens, and two equal-shaped heads whose logits are averaged (timm head /
              head_dist, HF cls_classifier / distillation_classifier). Swapping the tokens or the
              heads fits every shape; only the positions they read (token 0 vs 1) tell them apart.
              Fused qkv split as in timm_vit->hf_vit."""),
    make_port("timm_vit_siglip->hf_siglip_vision", _timm_vit_siglip, _hf_siglip_vision,
              image_input(2, 3, 32, 32), _hf_siglip_truth, transform=_siglip_transform, note="""
              SigLIP-style ViT (no class token, attention-pool 'map' head, tanh GELU). The trunk's
              fused qkv is split into q/k/v; pos_embed (1, 16, 64) becomes the nn.Embedding weight
              (16, 64) (a leading singleton axis dropped); timm's pool head has a latent query, q
              (64x64) and a fused kv (128x64), Hugging Face's an nn.MultiheadAttention whose packed
              in_proj (192x64) is the concatenation of two source tensors, q then kv. Hugging Face
              registers k_proj, v_proj before q_proj. Compared output: the pooled embedding."""),
    make_port("timm_convnext_conv_mlp->hf_convnext", timm_convnext_conv_mlp, _hf_convnext,
              image_input(2, 3, 64, 64), _hf_convnext_truth, transform=_conv1x1_to_linear, note="""
              ConvNeXt with depths (2, 2, 2, 2), dims (16, 32, 48, 64). timm with conv_mlp=True runs
              the MLP as 1x1 convolutions on NCHW (fc1 (64, 16, 1, 1)), Hugging Face as Linear on
              channels-last (pwconv1 (64, 16)): same numbers, different rank. HF's final LayerNorm
              needs layer_norm_eps=1e-6 (its default is 1e-12). Layer scale (C,) on both sides,
              registered first in each block; the stage-0 downsampler is Identity on both sides."""),
    make_port("hf_swin->timm_swin", _hf_swin, _timm_swin, image_input(2, 3, 64, 64), _timm_swin_truth,
              transform=_concat_qkv, note="""
              Swin with 3 stages (depths 2, 2, 2; width 32; heads 2, 4, 8; window 4 on 16x16 tokens,
              shifted in the first two stages). Hugging Face -> timm: q/k/v are concatenated into
              timm's fused qkv (many-to-one). Patch merging sits at the end of stage s in Hugging Face
              (layers.s.downsample) and at the start of stage s + 1 in timm: names disagree about the
              stage while both orders agree. Within a block HF registers q/k/v/o, the bias table, then
              both LayerNorms; timm norm1, table, qkv, proj, norm2. relative_position_bias_table
              (49, heads) per block (equal shapes within a stage); relative_position_index is a
              non-persistent buffer on both sides."""),
    make_port("timm_resnet->hf_resnet", _timm_resnet, _hf_resnet, image_input(2, 3, 64, 64),
              _hf_resnet_truth, calibration=BN_CALIBRATION, note="""
              Bottleneck ResNet with layers (2, 1, 1, 1), stem 64, widths (32, 64, 128, 256).
              Hugging Face's embedder/encoder.stages.s.layers.b.{shortcut, layer.k}.{convolution,
              normalization} registers each block's shortcut before its body, timm registers
              downsample after conv3/bn3: state_dict orders disagree, and layer1.0.downsample.0
              (32, 64, 1, 1) and layer1.0.conv1 (8, 64, 1, 1) both read the stem. BatchNorm buffers
              (running statistics, num_batches_tracked) are part of the truth."""),
]
