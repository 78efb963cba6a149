"""torchvision -> timm vision pairs (exact), and two partial ones (depth and width changes)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from ._pair import (
    BN_CALIBRATION,
    Pair,
    Rule,
    Truth,
    identity_truth,
    image_input,
    make_pair,
    map_keys,
)

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
    return map_keys(dst_keys, rules)


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
    return map_keys(dst_keys, rules)


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
    return map_keys(dst_keys, rules)


# --------------------------------------------------------------------------- 8. ResNet-34 -> 18

def _tv_resnet34() -> nn.Module:
    from torchvision.models import resnet34

    return resnet34(weights=None)


def _deeper_resnet_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """Stem, fc and, in each stage, block j <- block j of the deeper model (its first N blocks).

    ResNet-18's blocks keep their names in ResNet-34, so the truth is the identity on names; the
    deeper model's trailing blocks (layer1.2, layer2.2-3, layer3.2-5, layer4.2) feed nothing.
    """
    return identity_truth(src_keys, dst_keys)


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
    return map_keys(dst_keys, [(r"layer1\.0\.downsample\..+", lambda m: ()), (r"(.+)", r"\1")])



# --------------------------------------------------------------------------- the pairs

EXACT: list[Pair] = [
    make_pair("tv_resnet18->timm_resnet18", _tv_resnet18, _timm_resnet18,
          image_input(2, 3, 64, 64), identity_truth, exact=True, calibration=BN_CALIBRATION,
          note="""The small sibling of the ResNet-50 pair (122 keys, same names): fast enough
          for the test suite."""),
    make_pair("tv_resnet50->timm_resnet50", _tv_resnet50, _timm_resnet50, image_input(2, 3, 64, 64),
          identity_truth, exact=True, calibration=BN_CALIBRATION, note="""
          Same state_dict key names (320 keys, BatchNorm buffers included), different module
          classes (timm's Bottleneck has extra act/drop/aa modules). The truth is the identity on
          names: a matcher must not be fooled into anything cleverer."""),
    make_pair("tv_mobilenet_v2->timm_mobilenetv2_100", _tv_mobilenet_v2, _timm_mobilenetv2_100,
          image_input(2, 3, 64, 64), _mobilenet_truth, exact=True, calibration=BN_CALIBRATION, note="""
          Flat torchvision `features.N.conv.*` vs timm `blocks.stage.block.*` with named convs
          (conv_pw/conv_dw/conv_pwl). The first block has no expansion conv, so its depthwise conv
          is `features.1.conv.0.0` but `blocks.0.0.conv_dw`. Every layer is renamed; shapes repeat
          heavily (17 inverted residuals). Both use ReLU6 and BatchNorm eps 1e-5."""),
    make_pair("tv_convnext_tiny->timm_convnext_tiny", _tv_convnext, _timm_convnext, image_input(2, 3, 64, 64),
          _convnext_truth, exact=True, transform=_convnext_transform, note="""
          ConvNeXt-T depths (3, 3, 9, 3) at a quarter of the width (24, 48, 96, 192), 10 classes.
          Layer scale is `layer_scale` (C, 1, 1) in torchvision and `gamma` (C,) in timm: a reshape.
          Both run the MLP as nn.Linear on channels-last activations (torchvision permutes inside
          `block`, timm with conv_mlp=False), so fc1/fc2 weights copy unchanged. torchvision's
          downsample is features.2i (LayerNorm2d + 2x2 conv), timm's stages.i.downsample."""),
    make_pair("tv_vit->timm_vit", _tv_vit, _timm_vit, image_input(2, 3, 32, 32), _vit_truth, exact=True,
          note="""
          Tiny ViT (32px, patch 8, 4 layers, width 64, 4 heads, MLP 128, 10 classes). timm needs
          global_pool='token', class_token=True, qkv_bias=True, LayerNorm eps 1e-6 (torchvision's
          value; timm's default LayerNorm also uses 1e-6) and exact GELU. MultiheadAttention's
          packed in_proj_weight (3C, C) is [q; k; v], the same layout as timm's attn.qkv, and
          class_token / encoder.pos_embedding become cls_token / pos_embed."""),
]

PARTIAL: list[Pair] = [
    make_pair("tv_resnet34->tv_resnet18", _tv_resnet34, _tv_resnet18, image_input(2, 3, 64, 64),
          _deeper_resnet_truth, exact=False, calibration=BN_CALIBRATION, note="""
          Partial: ResNet-34 (3, 4, 6, 3 blocks) into ResNet-18 (2, 2, 2, 2). Convention: stem, fc,
          and in every stage the deeper model's first N blocks onto the shallower model's N blocks
          (including each stage's downsample in block 0); the remaining source blocks feed nothing.
          Every destination key has a shape-compatible source. Other conventions (e.g. first and
          last block) are defensible; this truth encodes 'first N'."""),
    make_pair("timm_resnet18->timm_resnet18_narrow", _timm_resnet18, _timm_resnet18_narrow,
          image_input(2, 3, 64, 64), _narrow_truth, exact=False, calibration=BN_CALIBRATION, note="""
          Partial width change: timm ResNet-18 into the same architecture with 3/4 of the stage
          channels (48, 96, 192, 384). Truth = the same-position (same-name) layer for every key,
          although most do not fit shape-wise. The stem keeps 64 channels (timm ignores
          stem_width for non-deep stems), so conv1/bn1 fit, as do fc.bias (1000,) and the scalar
          num_batches_tracked buffers; everything else is a shape mismatch that should be reported,
          not loaded. The narrow model gains a 64->48 projection shortcut layer1.0.downsample.*
          that has no source and is absent from the truth."""),
]
