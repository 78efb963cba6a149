"""Original reference codebases -> their library ports (exact): CLIP, DINOv2, ConvNeXt.

The sources are the re-implementations in `corpus.reference` (original names, shapes, registration
order and math); the destinations are the library models the originals were ported to, and the
truths follow the libraries' conversions (transformers' ``convert_clip_original_pytorch_to_hf.py``
and ``convert_dinov2_to_hf.py``, timm's ConvNeXt ``checkpoint_filter_fn``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._pair import Pair, Rule, Truth, image_input, map_keys
from ._ports import make_port, split_qkv
from .hf_vision import CONVNEXT_DEPTHS, CONVNEXT_DIMS, timm_convnext_conv_mlp
from .reference import clip, convnext, dinov2

Rename = Callable[[re.Match[str]], str]

TINY = {"image": 32, "patch": 8, "width": 64, "heads": 4, "layers": 3}
CLIP_EMBED = 32  # CLIP's output_dim (the joint image-text embedding)
CLASSES = 10

# --------------------------------------------------------------------------- OpenAI CLIP -> HF CLIP


def _openai_clip_vit() -> nn.Module:
    """CLIP's ViT with 4 heads (CLIP itself would give width // 64 = 1 head to width 64)."""
    return clip.VisionTransformer(input_resolution=TINY["image"], patch_size=TINY["patch"],
                                  width=TINY["width"], layers=TINY["layers"], heads=TINY["heads"],
                                  output_dim=CLIP_EMBED)


def _hf_clip_vision() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=TINY["image"], patch_size=TINY["patch"], hidden_size=TINY["width"],
        intermediate_size=4 * TINY["width"], num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"], projection_dim=CLIP_EMBED, hidden_act="quick_gelu",
        layer_norm_eps=1e-5))


def _hf_clip_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    layer = r"vision_model\.encoder\.layers\.(?P<i>\d+)\."

    def block(rest: str) -> Rename:
        return lambda m: f"transformer.resblocks.{m['i']}.{rest.format(t=m.groupdict().get('t'))}"

    rules: list[Rule] = [
        (r"vision_model\.embeddings\.class_embedding", "class_embedding"),
        (r"vision_model\.embeddings\.patch_embedding\.weight", "conv1.weight"),
        (r"vision_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
        (r"vision_model\.pre_layrnorm\.(.+)", r"ln_pre.\1"),  # sic: Hugging Face's spelling
        (layer + r"self_attn\.[qkv]_proj\.(?P<t>weight|bias)", block("attn.in_proj_{t}")),
        (layer + r"self_attn\.out_proj\.(?P<t>.+)", block("attn.out_proj.{t}")),
        (layer + r"layer_norm1\.(?P<t>.+)", block("ln_1.{t}")),
        (layer + r"mlp\.fc1\.(?P<t>.+)", block("mlp.c_fc.{t}")),
        (layer + r"mlp\.fc2\.(?P<t>.+)", block("mlp.c_proj.{t}")),
        (layer + r"layer_norm2\.(?P<t>.+)", block("ln_2.{t}")),
        (r"vision_model\.post_layernorm\.(.+)", r"ln_post.\1"),
        (r"visual_projection\.weight", "proj"),
    ]
    return map_keys(dst_keys, rules)


def _clip_transform(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """in_proj rows [q; k; v] split into q/k/v_proj; ``x @ proj`` is a Linear with weight proj.T."""
    if key == "visual_projection.weight":
        (tensor,) = tensors
        return tensor.t()
    return split_qkv(key, tensors)


# --------------------------------------------------------------------------- DINOv2 -> HF Dinov2

def _dinov2_vit() -> nn.Module:
    """The hub's configuration (layer scale init 1.0, MLP FFN), tiny."""
    return dinov2.DinoVisionTransformer(img_size=TINY["image"], patch_size=TINY["patch"],
                                        embed_dim=TINY["width"], depth=TINY["layers"],
                                        num_heads=TINY["heads"], mlp_ratio=4, init_values=1.0)


def _hf_dinov2() -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(
        image_size=TINY["image"], patch_size=TINY["patch"], hidden_size=TINY["width"],
        num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"], mlp_ratio=4,
        layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu", use_swiglu_ffn=False))


def _hf_dinov2_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    layer = r"encoder\.layer\.(?P<i>\d+)\."

    def block(rest: str) -> Rename:
        return lambda m: f"blocks.{m['i']}.{rest.format(t=m.groupdict().get('t'))}"

    rules: list[Rule] = [
        (r"embeddings\.cls_token", "cls_token"),
        (r"embeddings\.mask_token", "mask_token"),
        (r"embeddings\.position_embeddings", "pos_embed"),
        (r"embeddings\.patch_embeddings\.projection\.(.+)", r"patch_embed.proj.\1"),
        (layer + r"norm1\.(?P<t>.+)", block("norm1.{t}")),
        (layer + r"attention\.[qkv]_proj\.(?P<t>weight|bias)", block("attn.qkv.{t}")),
        (layer + r"attention\.o_proj\.(?P<t>.+)", block("attn.proj.{t}")),
        (layer + r"layer_scale1\.lambda1", block("ls1.gamma")),
        (layer + r"norm2\.(?P<t>.+)", block("norm2.{t}")),
        (layer + r"mlp\.(?P<t>fc[12]\..+)", block("mlp.{t}")),
        (layer + r"layer_scale2\.lambda1", block("ls2.gamma")),
        (r"layernorm\.(.+)", r"norm.\1"),
    ]
    return map_keys(dst_keys, rules)


# --------------------------------------------------------------------------- ConvNeXt -> timm

def _fb_convnext() -> nn.Module:
    return convnext.ConvNeXt(num_classes=CLASSES, depths=CONVNEXT_DEPTHS, dims=CONVNEXT_DIMS)


def _timm_convnext_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """timm's stem and stages.i.downsample are the original's downsample_layers.0 and .i."""
    block = r"stages\.(?P<i>\d+)\.blocks\.(?P<j>\d+)\."

    def to(rest: str) -> Rename:
        return lambda m: f"stages.{m['i']}.{m['j']}.{rest.format(t=m.groupdict().get('t'))}"

    rules: list[Rule] = [
        (r"stem\.([01])\.(.+)", r"downsample_layers.0.\1.\2"),
        (r"stages\.(\d+)\.downsample\.([01])\.(.+)", r"downsample_layers.\1.\2.\3"),
        (block + r"gamma", to("gamma")),
        (block + r"conv_dw\.(?P<t>.+)", to("dwconv.{t}")),
        (block + r"norm\.(?P<t>.+)", to("norm.{t}")),
        (block + r"mlp\.fc1\.(?P<t>.+)", to("pwconv1.{t}")),
        (block + r"mlp\.fc2\.(?P<t>.+)", to("pwconv2.{t}")),
        (r"head\.norm\.(.+)", r"norm.\1"),
        (r"head\.fc\.(.+)", r"head.\1"),
    ]
    return map_keys(dst_keys, rules)


def _linear_to_conv1x1(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A Linear's (out, in) weight is a 1x1 convolution's (out, in, 1, 1) weight."""
    (tensor,) = tensors
    return tensor[:, :, None, None] if re.search(r"mlp\.fc\d\.weight$", key) else tensor


# --------------------------------------------------------------------------- the pairs

PAIRS: list[Pair] = [
    make_port("openai_clip_vit->hf_clip_vision", _openai_clip_vit, _hf_clip_vision,
              image_input(2, 3, 32, 32), _hf_clip_truth, transform=_clip_transform, note="""
              OpenAI CLIP's ViT (3 layers, width 64, 4 heads, embedding 32) into
              CLIPVisionModelWithProjection; compared output: the image embedding. Each block's
              nn.MultiheadAttention in_proj_weight (192, 64) / in_proj_bias (192,) feed three
              destination tensors each (q/k/v_proj, its row blocks), which Hugging Face registers as
              k, v, q; the projection is a (64, 32) Parameter used as x @ proj, so
              visual_projection.weight (32, 64) is its transpose, and it comes first in the source
              state_dict although it runs last; the patch convolution has no bias;
              positional_embedding (17, 64) is an nn.Embedding weight on the other side. The source
              runs sequence-first (L, N, D) through MultiheadAttention."""),
    make_port("dinov2_vit->hf_dinov2", _dinov2_vit, _hf_dinov2, image_input(2, 3, 32, 32),
              _hf_dinov2_truth, transform=split_qkv, note="""
              facebookresearch/dinov2's backbone (3 layers, width 64, 4 heads, layer scale) into
              Dinov2Model; compared output: the normalised class token (the original forward's
              output, Hugging Face's pooler_output). Fused qkv split into q/k/v_proj; LayerScale
              ls1.gamma / ls2.gamma (64,) become layer_scale1/2.lambda1, equal in shape to every
              bias and norm of the block, so only position tells them apart. mask_token (1, 64) is
              used only with masked inputs: no inference output depends on it."""),
    make_port("fb_convnext->timm_convnext_conv_mlp", _fb_convnext, timm_convnext_conv_mlp,
              image_input(2, 3, 64, 64), _timm_convnext_truth, transform=_linear_to_conv1x1, note="""
              The original ConvNeXt (depths 2, 2, 2, 2; dims 16, 32, 48, 64) into timm with
              conv_mlp=True. The original registers the stem and all three downsampling layers in
              downsample_layers before any stage, timm puts each in its stage (stem, stages.i.
              downsample): the source's state_dict order is not its execution order. pwconv1/2 are
              Linear (64, 16) on channels-last, timm's mlp.fc1/fc2 1x1 convolutions (64, 16, 1, 1):
              an added pair of trailing singleton axes. Layer scale gamma (C,) on both sides."""),
]
