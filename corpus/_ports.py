"""What the port pairs (`hf_vision`, `reference_vision`) share: sources without vanishing tensors,
and the tensor operations their converters are made of.

Real conversion scripts (transformers' ``convert_*_to_hf.py``, timm's ``checkpoint_filter_fn``) are
renames plus a few operations on the tensors; each converter here is written from these.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._pair import SRC_SEED, KeyTruth, Pair, Transform, copy_tensor, make_pair

__all__ = ["QKV", "make_port", "qkv_index", "redraw_vanishing_tensors", "split_qkv", "split_rows",
           "strengthen_weights"]

QKV = ("q", "k", "v")  # the order of the row blocks of every fused or packed projection here


def redraw_vanishing_tensors(model: nn.Module, seed: int) -> nn.Module:
    """Redraw as ``0.1 * N(0, 1)`` every non-constant floating tensor whose values are all < 1e-4.

    timm and DINOv2 initialise class tokens with std 1e-6: a port that drops or misplaces them
    still reproduces the outputs within 1e-4, so their truth would be unchecked. (Constant
    tensors are left to `corpus._pair.build_model`'s decorrelation.)
    """
    generator = torch.Generator().manual_seed(20_000 + seed)
    with torch.no_grad():
        for tensor in model.state_dict(keep_vars=True).values():
            if not tensor.is_floating_point() or tensor.numel() < 2:
                continue
            flat = tensor.detach().reshape(-1)
            if bool((flat == flat[0]).all()) or float(flat.abs().max()) >= 1e-4:
                continue
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model


def strengthen_weights(model: nn.Module) -> nn.Module:
    """Scale Linear, convolution and attention weights drawn far below ``fan_in ** -0.5`` up to it.

    Vision transformers initialise them with std 0.02: attention is then nearly uniform and
    residual branches are small beside the residual stream, so a wrong query bias or a swapped
    early norm moves the output by less than the tolerance. Trained weights are not that small.
    Scaling (not redrawing) keeps each tensor's seeded pattern.
    """
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)):
                continue
            for name in ("weight", "in_proj_weight"):
                weight = getattr(module, name, None)
                if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
                    continue
                target = weight[0].numel() ** -0.5
                std = float(weight.std())
                if 0 < std < 0.5 * target:
                    weight.mul_(target / std)
    return model


def make_port(name: str, src: Callable[[], nn.Module], dst: Callable[[], nn.Module],
              inputs: Callable[[], Any], key_truth: KeyTruth, note: str, *,
              transform: Transform = copy_tensor,
              calibration: Callable[[], Any] | None = None) -> Pair:
    """An exact pair (`corpus._pair.make_pair`) whose source is also rid of vanishing tensors
    (`redraw_vanishing_tensors`) and of std-0.02 weights (`strengthen_weights`)."""
    def source() -> nn.Module:
        return strengthen_weights(redraw_vanishing_tensors(src(), seed=SRC_SEED))

    return make_pair(name, source, dst, inputs, key_truth, note, exact=True, transform=transform,
                     calibration=calibration)


def qkv_index(key: str) -> int:
    """0, 1 or 2 for a key naming a q, k or v projection (``q_proj``, ``query``, ``.k.``...).

    Raises
    ------
    ValueError
        If the key names none of them.
    """
    found = re.search(r"(?:^|\.)(q|k|v|query|key|value)(?:_proj)?\.", key)
    if found is None:
        raise ValueError(f"{key!r} names no q, k or v projection")
    return QKV.index(found[1][0])


def split_rows(tensor: torch.Tensor, index: int, parts: int = 3) -> torch.Tensor:
    """Row block ``index`` of ``parts`` equal blocks (one projection of a fused one)."""
    if tensor.shape[0] % parts:
        raise ValueError(f"cannot split {tuple(tensor.shape)} into {parts} equal row blocks")
    return tensor.chunk(parts, dim=0)[index]


def split_qkv(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Transform: a destination ``q_proj`` / ``k_proj`` / ``v_proj`` is one row block of its fused
    source ([q; k; v] rows: timm's ``qkv``, nn.MultiheadAttention's ``in_proj_*``); other keys copy.
    """
    (tensor,) = tensors
    if re.search(r"\.[qkv]_proj\.(weight|bias)$", key):
        return split_rows(tensor, qkv_index(key))
    return tensor
