"""Tensor adaptations: small, named, invertible operations a match applies on the way.

Planning uses only the pure shape functions here (`derive_ops`, `infer_shapes`, `invert_ops`);
`apply_ops` is what `apply.py` calls to compute the tensors it writes.

=========  ==========================================  =======================================
op         effect (on the list of source tensors)      inverse
=========  ==========================================  =======================================
transpose  swap the first two axes of each tensor      transpose
reshape    reshape the single tensor to ``shape``      reshape back to ``from_shape``
concat     concatenate all tensors along axis 0        split into the ``sizes`` of the inputs
split      split the single tensor along axis 0        concat
regroup    rows laid out (a, b, rest) -> (b, a, rest)  regroup with a and b swapped
=========  ==========================================  =======================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import torch

from .errors import PlanError

__all__ = ["Op", "apply_ops", "derive_ops", "infer_shapes", "invert_ops", "squeeze_shape"]

Shape = tuple[int, ...]

_KINDS = ("transpose", "reshape", "concat", "split", "regroup")


@dataclass(frozen=True)
class Op:
    """One adaptation step."""

    kind: str  # one of "transpose", "reshape", "concat", "split", "regroup"
    shape: Shape = ()  # reshape: the target shape
    from_shape: Shape = ()  # reshape: the shape it reshapes from (for the inverse)
    sizes: Shape = ()  # split: sizes along axis 0; concat: sizes of its inputs along axis 0
    groups: Shape = ()  # regroup: (a, b): rows laid out as (a, b, rest) become (b, a, rest)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise PlanError(f"unknown adaptation {self.kind!r}; known: {', '.join(_KINDS)}")

    def __str__(self) -> str:
        if self.kind == "reshape":
            return f"reshape{self.shape}"
        if self.kind in ("split", "concat"):
            return f"{self.kind}{list(self.sizes)}"
        if self.kind == "regroup":
            return f"regroup{self.groups[0]}x{self.groups[1]}"
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.kind}
        for name in ("shape", "from_shape", "sizes", "groups"):
            value = getattr(self, name)
            if value:
                out[name] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Op:
        unknown = set(data) - {"op", "shape", "from_shape", "sizes", "groups"}
        if unknown:
            raise PlanError(f"unknown fields {sorted(unknown)} in adaptation {dict(data)!r}")
        return cls(kind=str(data["op"]),
                   **{k: tuple(int(v) for v in data[k])
                      for k in ("shape", "from_shape", "sizes", "groups") if k in data})


def squeeze_shape(shape: Sequence[int]) -> Shape:
    """The shape without its size-1 axes: ``(C, 1, 1)`` and ``(C,)`` are one layout."""
    return tuple(d for d in shape if d != 1)


def derive_ops(src: Shape, dst: Shape, *, transpose: bool = False,
               allow_shape_transpose: bool = False) -> tuple[Op, ...] | None:
    """The adaptation that turns one source tensor of shape ``src`` into ``dst``, or None.

    Parameters
    ----------
    transpose : bool
        The two layers store this weight in opposite layouts, ``(in, out)`` vs ``(out, in)``
        (known from the modules, e.g. Hugging Face ``Conv1D`` vs ``nn.Linear``).
    allow_shape_transpose : bool
        Also accept a 2-d transpose that only the shapes suggest.
    """
    ops: list[Op] = []
    shape = tuple(src)
    if transpose and len(shape) >= 2:
        ops.append(Op("transpose"))
        shape = (shape[1], shape[0], *shape[2:])
    if shape == dst:
        return tuple(ops)
    if prod(shape) != prod(dst):
        return None
    if squeeze_shape(shape) == squeeze_shape(dst) or (
            len(shape) != len(dst) and shape[0] == dst[0] and len(shape) >= 2 and len(dst) >= 2):
        return (*ops, Op("reshape", shape=tuple(dst), from_shape=shape))
    if allow_shape_transpose and not transpose and len(squeeze_shape(shape)) == 2:
        core = squeeze_shape(shape)
        if (core[1], core[0]) == squeeze_shape(dst):
            out: list[Op] = []
            if len(shape) != 2:
                out.append(Op("reshape", shape=core, from_shape=shape))
            out.append(Op("transpose"))
            if (core[1], core[0]) != dst:
                out.append(Op("reshape", shape=tuple(dst), from_shape=(core[1], core[0])))
            return tuple(out)
    return None


def infer_shapes(shapes: Sequence[Shape], ops: Sequence[Op]) -> list[Shape]:
    """The shapes ``apply_ops`` produces from tensors of ``shapes``, without touching data.

    Raises
    ------
    PlanError
        If an operation does not fit the shapes it is given (naming the op and the shapes).
    """
    current = [tuple(s) for s in shapes]
    for op in ops:
        if op.kind == "transpose":
            if any(len(s) < 2 for s in current):
                raise PlanError(f"{op} needs tensors of rank >= 2, got shapes {current}")
            current = [(s[1], s[0], *s[2:]) for s in current]
        elif op.kind == "reshape":
            if len(current) != 1 or prod(current[0]) != prod(op.shape):
                raise PlanError(f"{op} does not fit shapes {current}")
            current = [op.shape]
        elif op.kind == "concat":
            if not current or any(s[1:] != current[0][1:] for s in current):
                raise PlanError(f"{op} needs tensors that agree beyond axis 0, got {current}")
            current = [(sum(s[0] for s in current), *current[0][1:])]
        elif op.kind == "split":
            if len(current) != 1 or sum(op.sizes) != current[0][0]:
                raise PlanError(f"{op} does not fit shape {current}")
            current = [(n, *current[0][1:]) for n in op.sizes]
        elif op.kind == "regroup":
            a, b = op.groups
            if len(current) != 1 or current[0][0] % (a * b):
                raise PlanError(f"{op} does not fit shape {current}")
    return current


def apply_ops(tensors: Sequence[torch.Tensor], ops: Sequence[Op]) -> list[torch.Tensor]:
    """Run the adaptations on source tensors; returns the destination tensors, in order."""
    current = list(tensors)
    for op in ops:
        if op.kind == "transpose":
            current = [t.transpose(0, 1) for t in current]
        elif op.kind == "reshape":
            current = [current[0].reshape(op.shape)]
        elif op.kind == "concat":
            current = [torch.cat(current, dim=0)]
        elif op.kind == "split":
            current = list(torch.split(current[0], list(op.sizes), dim=0))
        elif op.kind == "regroup":
            a, b = op.groups
            t = current[0]
            rows = t.shape[0] // (a * b)
            current = [t.reshape(a, b, rows, *t.shape[1:]).transpose(0, 1).reshape(t.shape)]
    return current


def invert_ops(ops: Sequence[Op], src_shapes: Sequence[Shape]) -> tuple[Op, ...]:
    """The operations that undo ``ops`` (applied to the tensors ``ops`` produced)."""
    shapes_before: list[list[Shape]] = []
    current = [tuple(s) for s in src_shapes]
    for op in ops:
        shapes_before.append(current)
        current = infer_shapes(current, [op])
    inverse: list[Op] = []
    for op, before in zip(reversed(ops), reversed(shapes_before)):
        if op.kind == "transpose":
            inverse.append(op)
        elif op.kind == "reshape":
            inverse.append(Op("reshape", shape=op.from_shape, from_shape=op.shape))
        elif op.kind == "concat":
            inverse.append(Op("split", sizes=tuple(s[0] for s in before)))
        elif op.kind == "split":
            inverse.append(Op("concat", sizes=op.sizes))
        elif op.kind == "regroup":
            inverse.append(Op("regroup", groups=(op.groups[1], op.groups[0])))
    return tuple(inverse)
