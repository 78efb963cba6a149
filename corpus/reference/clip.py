"""OpenAI CLIP's vision tower, as in ``openai/CLIP`` ``clip/model.py`` (ViT variant).

What a port of it has to deal with: the patch convolution has no bias; ``class_embedding`` is a
``(width,)`` vector and ``positional_embedding`` an ``(N, width)`` Parameter (no batch axis); the
blocks use ``nn.MultiheadAttention`` (packed ``in_proj_weight`` ``(3 * width, width)`` = [q; k; v]
rows, run sequence-first); the MLP is ``c_fc`` / QuickGELU / ``c_proj``; the output projection
``proj`` is a ``(width, output_dim)`` Parameter used as ``x @ proj`` (the transpose of a Linear
weight), and is registered directly on the module, so it comes *before* ``conv1`` in the
state_dict although it runs last.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["LayerNorm", "QuickGELU", "ResidualAttentionBlock", "Transformer", "VisionTransformer"]


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm computed in float32 (CLIP's fp16 guard)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        ret = super().forward(x.type(torch.float32))
        return ret.type(orig_type)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``; x is (L, N, D)."""

    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """``resblocks``: a Sequential of `ResidualAttentionBlock`."""

    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask)
                                         for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """CLIP's image encoder: image (N, 3, R, R) -> embedding (N, output_dim)."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(in_channels=3, out_channels=width, kernel_size=patch_size,
                               stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (N, width, grid, grid)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, grid ** 2, width)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                             device=x.device)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_post(x[:, 0, :])
        return x @ self.proj
