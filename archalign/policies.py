"""Explicit policies for tensors whose shapes differ for real (depth or width changed).

By default a shape mismatch is reported and the destination tensor keeps its own initialisation.
A policy, chosen per call or per destination key, loads it anyway:

- ``"slice"``: take the leading sub-tensor of a larger source (centred along kernel axes), or,
  for a larger destination, write the source into the leading (centred) part and keep the
  destination's own values elsewhere ("weight selection", Xu et al., ICLR 2024).
- ``"input_channels"``: adapt a first convolution to another number of input channels, as
  timm's ``adapt_input_conv`` does (sum for 1 channel; repeat and rescale for N).
- ``"resample"``: interpolate absolute position embeddings onto the destination's grid, as
  timm's ``resample_abs_pos_embed`` does (prefix tokens kept as they are).
- ``"auto"``: ``input_channels`` or ``resample`` where the shapes say so, else ``slice``.

Nothing is ever filled with uninitialised memory: every value written comes from the source or
was already in the destination.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F

from .errors import PlanError

__all__ = ["POLICIES", "choose_policy", "resize"]

POLICIES = ("slice", "input_channels", "resample", "auto")

Shape = tuple[int, ...]


def choose_policy(policy: str | Mapping[str, str] | None, dst_key: str) -> str | None:
    """The policy for one destination key: a name for all, or the first matching glob pattern.

    Raises
    ------
    PlanError
        If a policy name is unknown.
    """
    if policy is None:
        return None
    if isinstance(policy, str):
        chosen: str | None = policy
    else:
        chosen = next((v for pattern, v in policy.items() if fnmatchcase(dst_key, pattern)), None)
    if chosen is not None and chosen not in POLICIES:
        raise PlanError(f"unknown shape policy {chosen!r} for {dst_key!r}; use one of "
                        f"{', '.join(POLICIES)}")
    return chosen


def resolve_auto(src: Shape, dst: Shape) -> str:
    """What ``"auto"`` means for this pair of shapes."""
    if len(src) == len(dst) == 4 and src[0] == dst[0] and src[2:] == dst[2:] and src[1] != dst[1]:
        return "input_channels"
    if len(src) == len(dst) == 3 and src[0] == dst[0] == 1 and src[2] == dst[2] \
            and _grid(src[1]) and _grid(dst[1]):
        return "resample"
    return "slice"


def resize(src: torch.Tensor, dst: torch.Tensor, policy: str) -> torch.Tensor:
    """A tensor of ``dst``'s shape, dtype and device built from ``src`` by ``policy``.

    Raises
    ------
    PlanError
        If the policy does not apply to the two shapes (naming them).
    """
    src_shape, dst_shape = tuple(src.shape), tuple(dst.shape)
    if policy == "auto":
        policy = resolve_auto(src_shape, dst_shape)
    if len(src_shape) != len(dst_shape):
        raise PlanError(f"policy {policy!r} needs tensors of one rank, got {src_shape} and "
                        f"{dst_shape}")
    source = src.detach().to(device=dst.device, dtype=dst.dtype)
    if policy == "slice":
        return _slice_or_pad(source, dst.detach())
    if policy == "input_channels":
        return _adapt_input_channels(source, dst_shape)
    if policy == "resample":
        return _resample_positions(source, dst_shape)
    raise PlanError(f"unknown shape policy {policy!r}; use one of {', '.join(POLICIES)}")


def _window(src: int, dst: int, axis: int, rank: int) -> tuple[slice, slice]:
    """Source and destination index ranges along one axis: leading, centred on kernel axes."""
    n = min(src, dst)
    centred = rank >= 3 and axis >= 2
    s0 = (src - n) // 2 if centred else 0
    d0 = (dst - n) // 2 if centred else 0
    return slice(s0, s0 + n), slice(d0, d0 + n)


def _slice_or_pad(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    out = dst.clone()
    windows = [_window(s, d, axis, src.dim()) for axis, (s, d) in enumerate(zip(src.shape, dst.shape))]
    out[tuple(w[1] for w in windows)] = src[tuple(w[0] for w in windows)]
    return out


def _adapt_input_channels(src: torch.Tensor, dst_shape: Shape) -> torch.Tensor:
    if src.dim() != 4 or src.shape[0] != dst_shape[0] or tuple(src.shape[2:]) != dst_shape[2:]:
        raise PlanError(f"policy 'input_channels' adapts a (out, in, kh, kw) convolution weight "
                        f"in its input channels only; got {tuple(src.shape)} -> {dst_shape}")
    channels = dst_shape[1]
    if channels == 1:
        return src.sum(dim=1, keepdim=True)
    repeat = math.ceil(channels / src.shape[1])
    return src.repeat(1, repeat, 1, 1)[:, :channels] * (src.shape[1] / channels)


def _grid(tokens: int) -> tuple[int, int] | None:
    """(prefix tokens, side) when ``tokens`` is a square grid with 0 or 1 prefix tokens."""
    for prefix in (1, 0):
        side = math.isqrt(tokens - prefix)
        if side > 0 and side * side == tokens - prefix:
            return prefix, side
    return None


def _resample_positions(src: torch.Tensor, dst_shape: Shape) -> torch.Tensor:
    src_grid, dst_grid = _grid(src.shape[1]), _grid(dst_shape[1])
    if src.dim() != 3 or src_grid is None or dst_grid is None or src_grid[0] != dst_grid[0] \
            or src.shape[2] != dst_shape[2]:
        raise PlanError(f"policy 'resample' interpolates (1, prefix + side^2, dim) position "
                        f"embeddings; got {tuple(src.shape)} -> {dst_shape}")
    prefix, side = src_grid
    new_side = dst_grid[1]
    tokens = src[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    tokens = F.interpolate(tokens, size=(new_side, new_side), mode="bicubic", antialias=True,
                           align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).reshape(1, new_side * new_side, -1).to(src.dtype)
    return torch.cat([src[:, :prefix], tokens], dim=1)
