"""Weight layouts: which 2-d weights a layer stores ``(in, out)`` where ``nn.Linear`` stores ``(out, in)``.

A square matrix has the same shape either way; only how the layer uses it tells. Planning marks
such weights on their units (`Unit.transposed`), so that a match between the two conventions gets
a transpose.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from .graph import Unit

__all__ = ["probe_layouts"]

# classes known to store their weight as (in, out), for when probing cannot tell (meta, square)
_TRANSPOSED_TYPES = frozenset({"Conv1D"})


def probe_layouts(module: nn.Module, units: Sequence[Unit]) -> list[Unit]:
    """Mark weights stored ``(in, out)`` (Hugging Face ``Conv1D``) by calling their layer once.

    A square matrix has the same shape either way; only how the layer uses it tells. Each custom
    layer class with a 2-d ``weight`` is run on a small random input and compared with
    ``F.linear``; on the meta device (no values), shapes decide, then the class name.
    """
    modules = dict(module.named_modules())
    cache: dict[tuple[str, tuple[int, ...]], bool] = {}
    out = []
    for unit in units:
        layer = modules.get(unit.key) if unit.type_name not in ("", "Parameter") else None
        names = unit.local_names()
        if layer is None or "weight" not in names or type(layer).__module__.startswith("torch."):
            out.append(unit)
            continue
        index = names.index("weight")
        shape = unit.shapes[index]
        if len(shape) != 2:
            out.append(unit)
            continue
        key = (unit.type_name, shape)
        if key not in cache:
            # a copy in eval mode: a probe must not update buffers, and dropout must not decide
            probe = copy.deepcopy(layer).eval()
            cache[key] = _stores_in_out(probe, unit.type_name)
        flags = tuple(i == index and cache[key] for i in range(len(unit.tensors)))
        out.append(dataclasses.replace(unit, transposed=flags) if any(flags) else unit)
    return out


def _stores_in_out(layer: nn.Module, type_name: str) -> bool:
    weight = layer.weight
    bias = getattr(layer, "bias", None)
    if not isinstance(weight, torch.Tensor):
        return False
    rows, cols = weight.shape
    try:
        with torch.no_grad():
            if weight.device.type == "meta" or rows == cols:
                if weight.device.type == "meta" and rows != cols:
                    x = torch.zeros(2, rows, device="meta", dtype=weight.dtype)
                    return tuple(layer(x).shape) == (2, cols)
                if weight.device.type == "meta":
                    return type_name in _TRANSPOSED_TYPES
            gen = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(2, rows, generator=gen).to(weight)
            y = layer(x)
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != (2, cols):
                return False
            expected = x @ weight + (bias if isinstance(bias, torch.Tensor) else 0)
            return bool(torch.allclose(y, expected, rtol=1e-3, atol=1e-4)) and not (
                rows == cols and torch.allclose(y, torch.nn.functional.linear(x, weight, bias),
                                                rtol=1e-3, atol=1e-4))
    except Exception:  # a layer that does not take one (batch, features) tensor
        return type_name in _TRANSPOSED_TYPES
