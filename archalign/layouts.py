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

__all__ = ["IN_OUT_PRIOR", "MIN_WITNESSES", "UNDECIDED_PRIOR", "infer_layouts", "probe_layouts"]

IN_OUT_PRIOR = "prior_layout_in_out"  # a square weight stored (in, out): the checkpoint's convention
UNDECIDED_PRIOR = "prior_layout_undecided"  # a square weight whose layout the checkpoint leaves open
MIN_WITNESSES = 2  # non-square layers that must show the (in, out) convention, none the other

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


def infer_layouts(units: Sequence[Unit]) -> list[Unit]:
    """Mark a checkpoint's weights stored ``(in, out)`` from the checkpoint itself (no module).

    A layer with a 2-d ``weight`` and a 1-d ``bias`` shows its layout when it is not square: the
    bias has one entry per output, so ``len(bias) == weight.shape[1]`` means ``(in, out)`` (Hugging
    Face's ``Conv1D``), ``len(bias) == weight.shape[0]`` means ``(out, in)``. Such a layer is marked
    by its own shapes. A square one cannot show it: it follows the checkpoint's convention when at
    least `MIN_WITNESSES` non-square layers store ``(in, out)`` and none ``(out, in)`` (prior
    `IN_OUT_PRIOR`, whose matches stay below certainty: `archalign.confidence.LAYOUT_PRIOR`); when
    the non-square layers disagree, its layout is open (`UNDECIDED_PRIOR`: its matches stay below
    the default threshold, `archalign.confidence.UNDECIDED_LAYOUT_CAP`). Without evidence, the
    ``(out, in)`` of ``nn.Linear`` stands.
    """
    layouts = [_bias_layout(u) for u in units]
    in_out = sum(v == "in_out" for v in layouts)
    out_in = sum(v == "out_in" for v in layouts)
    if in_out == 0:
        return list(units)
    square_prior = IN_OUT_PRIOR if in_out >= MIN_WITNESSES and out_in == 0 else (
        UNDECIDED_PRIOR if out_in else "")
    out = []
    for unit, layout in zip(units, layouts):
        index = unit.local_names().index("weight") if layout else -1
        flags = tuple(i == index for i in range(len(unit.tensors)))
        if layout == "in_out":
            out.append(dataclasses.replace(unit, transposed=flags))
        elif layout == "square" and square_prior == IN_OUT_PRIOR:
            out.append(dataclasses.replace(unit, transposed=flags, prior=IN_OUT_PRIOR))
        elif layout == "square" and square_prior:
            out.append(dataclasses.replace(unit, prior=square_prior))
        else:
            out.append(unit)
    return out


def _bias_layout(unit: Unit) -> str:
    """"in_out", "out_in" or "square" for a unit holding a 2-d weight and a 1-d bias; "" else."""
    names = unit.local_names()
    if sorted(names) != ["bias", "weight"]:
        return ""
    weight, bias = unit.shapes[names.index("weight")], unit.shapes[names.index("bias")]
    if len(weight) != 2 or len(bias) != 1:
        return ""
    if weight[0] == weight[1]:
        return "square" if bias[0] == weight[0] else ""
    if bias[0] == weight[1]:
        return "in_out"
    return "out_in" if bias[0] == weight[0] else ""
