"""Tensor adaptations: small, named, invertible operations a match applies on the way.

Planning uses only the pure shape functions here (`derive_ops`, `infer_shapes`, `invert_ops`);
`apply_ops` is what `apply.py` calls to compute the tensors it writes.

=========  ==========================================  =======================================
op         effect (on the list of source tensors)      inverse
=========  ==========================================  =======================================
transpose  swap the first two axes of each tensor      transpose
           (or the two ``axes``)
reshape    reshape each tensor to ``shape``            reshape back to ``from_shape``
concat     concatenate all tensors along axis 0        split into the ``sizes`` of the inputs
split      split the single tensor along axis 0        concat
regroup    rows laid out (a, b, rest) -> (b, a, rest)  regroup with a and b swapped
rope       per head, rows on interleaved pairs ->      unrope
           rows on halves (rotary conventions)
unrope     per head, halves -> interleaved pairs       rope
pad        ``sizes`` (before, after) zero rows added   crop
           on axis 0
crop       ``sizes`` (before, after) rows removed      pad
           from axis 0
stack      each run of ``sizes[0]`` tensors stacked    unstack
           along a new axis 0
unstack    each tensor's axis 0 taken apart            stack
=========  ==========================================  =======================================

``concat`` and ``split`` work along ``axis`` (0 unless it says otherwise). Experts stored as one
3-D parameter (transformers 5's Mixtral ``gate_up_proj`` ``[E, 2I, H]``) are ``stack`` (of each
expert's gate, then of each up projection) then ``concat`` along axis 1: transformers'
``MergeModulelist`` and ``Concatenate``. Experts fused into one 2-D tensor (the first Mixtral
release's ``w1`` ``[E*I, H]``) are ``reshape`` to ``[E, I, H]``, then that ``concat`` along axis 1,
or a ``transpose`` of ``axes`` (1, 2) where the destination holds ``[E, H, I]``.

``pad`` is what OPT's learned position embedding needs against GPT-2's (two leading rows that no
position reads) and what padded vocabularies need: the rows added hold zeros, and ``crop`` takes
them away again.

``rope`` is what transformers' ``PermuteForRope`` and ``convert_llama_weights_to_hf.py``'s
``permute`` do to a query or key projection: Meta's reference rotates interleaved pairs of rows
(``x0, x1``, ``x2, x3``, ...), Hugging Face's rotates the two halves of each head. With ``heads``
heads of ``d`` rows, rows viewed as ``(heads, d / 2, 2)`` become ``(heads, 2, d / 2)``.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any, NamedTuple

import torch

from .errors import PlanError

__all__ = ["Op", "OpKind", "apply_ops", "as_shape", "derive_ops", "infer_shapes", "invert_ops",
           "squeeze_shape"]

Shape = tuple[int, ...]

MAX_DIM = 2**63 - 1  # the largest size torch can index (int64): larger sizes are refused


class OpKind(str, enum.Enum):
    """The adaptations a match can apply (`Op.kind`); what each does is in `_KINDS`."""

    TRANSPOSE = "transpose"
    RESHAPE = "reshape"
    CONCAT = "concat"
    SPLIT = "split"
    REGROUP = "regroup"
    ROPE = "rope"
    UNROPE = "unrope"
    PAD = "pad"
    CROP = "crop"
    STACK = "stack"
    UNSTACK = "unstack"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Op:
    """One adaptation step.

    Its parameters are checked when it is made (`_KINDS`: each kind says which it takes), so
    that no plan, read from a file or built by hand, carries an op that cannot run.

    Raises
    ------
    PlanError
        If the kind is unknown, a parameter is not a list of sizes, or the kind cannot use it
        (a regroup needs two group counts, each at least 2; split and concat sizes are positive).
    """

    kind: OpKind  # what it does (a plain string is accepted and checked: "transpose", ...)
    shape: Shape = ()  # reshape: the target shape
    from_shape: Shape = ()  # reshape: the shape it reshapes from (for the inverse)
    sizes: Shape = ()  # split: sizes along axis 0; concat: sizes of its inputs along axis 0
    groups: Shape = ()  # regroup: (a, b): rows laid out as (a, b, rest) become (b, a, rest);
    # rope / unrope: (heads,)
    axis: int = 0  # concat / split: the axis they work along
    axes: Shape = ()  # transpose: the two axes it swaps; () for (0, 1)

    def __post_init__(self) -> None:
        try:
            kind = OpKind(self.kind)
        except (ValueError, TypeError):
            raise PlanError(f"unknown adaptation {self.kind!r:.100}; known: "
                            f"{', '.join(k.value for k in OpKind)}") from None
        object.__setattr__(self, "kind", kind)
        for name in _FIELDS:
            object.__setattr__(self, name, as_shape(getattr(self, name), f"{kind}'s {name}"))
        if type(self.axis) is not int or not 0 <= self.axis < _MAX_AXIS:
            raise PlanError(f"an adaptation's axis is an integer in [0, {_MAX_AXIS}), got "
                            f"{self.axis!r:.50}")
        if self.axis and kind not in (OpKind.CONCAT, OpKind.SPLIT):
            raise PlanError(f"a {kind.value} adaptation takes no axis (only concat and split do)")
        _KINDS[kind].check(self)

    def __str__(self) -> str:
        return _KINDS[self.kind].text(self)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.kind.value}
        for name in _FIELDS:
            value = getattr(self, name)
            if value:
                out[name] = list(value)
        if self.axis:
            out["axis"] = self.axis
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Op:
        """Read an adaptation from its plan-file form (``{"op": "split", "sizes": [2, 4]}``).

        Raises
        ------
        PlanError
            If it is not such a mapping, names an unknown kind or field, or its parameters are
            not what the kind needs (see `Op`).
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("op"), str):
            raise PlanError(f"an adaptation is an object with a string \"op\", got {data!r:.200}")
        unknown = set(data) - {"op", "axis", *_FIELDS}
        if unknown:
            raise PlanError(f"unknown fields {sorted(map(str, unknown))} in adaptation "
                            f"{data['op']!r}")
        return cls(kind=data["op"],  # a string: checked in __post_init__
                   axis=data.get("axis", 0),
                   **{k: as_shape(data[k], f"{data['op']}'s {k}")
                      for k in _FIELDS if k in data})


_MAX_AXIS = 8  # an adaptation's axis lies below this
_FIELDS = ("shape", "from_shape", "sizes", "groups", "axes")  # the size-list parameters


def as_shape(values: Any, what: str) -> Shape:
    """``values`` as a shape: a sequence of integers in [0, 2**63) (booleans, floats and strings
    are refused, not rounded or parsed).

    Parameters
    ----------
    values : sequence of int
        E.g. a list read from a plan file.
    what : str
        What it is, for the message ("reshape's shape", "the shape of 'fc.weight'").

    Raises
    ------
    PlanError
        If ``values`` is not such a sequence.
    """
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (Sequence, tuple)):
        raise PlanError(f"{what} must be a list of sizes, got {values!r:.200}")
    dims = []
    for value in values:
        try:
            dim = -1 if isinstance(value, bool) else operator.index(value)
        except TypeError:
            dim = -1
        if not 0 <= dim <= MAX_DIM:
            raise PlanError(f"{what} holds {value!r:.50}, not a size (an integer in "
                            f"[0, 2**63)); fix the plan file or re-run align")
        dims.append(dim)
    return tuple(dims)


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
        ops.append(Op(OpKind.TRANSPOSE))
        shape = (shape[1], shape[0], *shape[2:])
    if shape == dst:
        return tuple(ops)
    if prod(shape) != prod(dst):
        return None
    if squeeze_shape(shape) == squeeze_shape(dst) or (
            len(shape) != len(dst) and shape[0] == dst[0] and len(shape) >= 2 and len(dst) >= 2):
        return (*ops, Op(OpKind.RESHAPE, shape=tuple(dst), from_shape=shape))
    if allow_shape_transpose and not transpose and len(squeeze_shape(shape)) == 2:
        core = squeeze_shape(shape)
        if (core[1], core[0]) == squeeze_shape(dst):
            out: list[Op] = []
            if len(shape) != 2:
                out.append(Op(OpKind.RESHAPE, shape=core, from_shape=shape))
            out.append(Op(OpKind.TRANSPOSE))
            if (core[1], core[0]) != dst:
                out.append(Op(OpKind.RESHAPE, shape=tuple(dst), from_shape=(core[1], core[0])))
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
        current = _KINDS[op.kind].infer(op, current)
    return current


def apply_ops(tensors: Sequence[torch.Tensor], ops: Sequence[Op]) -> list[torch.Tensor]:
    """Run the adaptations on source tensors; returns the destination tensors, in order."""
    current = list(tensors)
    for op in ops:
        current = _KINDS[op.kind].apply(op, current)
    return current


def invert_ops(ops: Sequence[Op], src_shapes: Sequence[Shape]) -> tuple[Op, ...]:
    """The operations that undo ``ops`` (applied to the tensors ``ops`` produced)."""
    shapes_before: list[list[Shape]] = []
    current = [tuple(s) for s in src_shapes]
    for op in ops:
        shapes_before.append(current)
        current = infer_shapes(current, [op])
    return tuple(_KINDS[op.kind].invert(op, before)
                 for op, before in zip(reversed(ops), reversed(shapes_before)))


# --------------------------------------------------------------------------- the kinds


class _Kind(NamedTuple):
    """What one kind of adaptation does, on shapes and on tensors."""

    check: Callable[[Op], None]  # refuses parameters the kind cannot use (PlanError)
    text: Callable[[Op], str]  # how a plan shows it
    infer: Callable[[Op, list[Shape]], list[Shape]]  # shapes out from shapes in (PlanError)
    apply: Callable[[Op, list[torch.Tensor]], list[torch.Tensor]]  # tensors out from tensors in
    invert: Callable[[Op, list[Shape]], Op]  # the op that undoes it, given its input shapes


def _takes(*fields: str, needs: str = "") -> Callable[[Op], None]:
    """A check: the op sets no field but ``fields``, and sets ``needs`` when it is given."""

    def check(op: Op) -> None:
        extra = [f for f in _FIELDS if f not in fields and getattr(op, f)]
        if extra:
            raise PlanError(f"a {op.kind.value} adaptation takes no {' or '.join(extra)} "
                            f"(it takes {', '.join(fields) or 'no parameter'})")
        if needs and not getattr(op, needs):
            raise PlanError(f"a {op.kind.value} adaptation needs its {needs}")

    return check


def _check_split(op: Op) -> None:
    _takes("sizes", needs="sizes")(op)
    if 0 in op.sizes:
        raise PlanError(f"a split's sizes must be positive, got {list(op.sizes)}")


def _check_concat(op: Op) -> None:
    _takes("sizes")(op)
    if 0 in op.sizes:
        raise PlanError(f"a concat's sizes must be positive, got {list(op.sizes)}")


def _check_regroup(op: Op) -> None:
    _takes("groups")(op)
    if len(op.groups) != 2 or min(op.groups) < 2:
        raise PlanError(f"a regroup takes two group counts (a, b), each at least 2, got "
                        f"{list(op.groups)}")


def _check_pad(op: Op) -> None:
    _takes("sizes", needs="sizes")(op)
    if len(op.sizes) != 2:
        raise PlanError(f"a {op.kind.value} takes (before, after) row counts, got "
                        f"{list(op.sizes)}")


def _infer_pad(op: Op, current: list[Shape]) -> list[Shape]:
    before, after = op.sizes
    if len(current) != 1 or not current[0]:
        raise PlanError(f"{op} needs one tensor of rank >= 1, got shapes {current}")
    rows = current[0][0] + (before + after if op.kind is OpKind.PAD else -(before + after))
    if rows < 0 or (op.kind is OpKind.CROP and rows == 0):
        raise PlanError(f"{op} does not fit shape {current}")
    return [(rows, *current[0][1:])]


def _pad(op: Op, current: list[torch.Tensor]) -> list[torch.Tensor]:
    before, after = op.sizes
    t = current[0]
    if op.kind is OpKind.CROP:
        return [t[before:t.shape[0] - after]]
    pieces = [t.new_zeros((before, *t.shape[1:])), t, t.new_zeros((after, *t.shape[1:]))]
    return [torch.cat(pieces, dim=0)]


def _check_rope(op: Op) -> None:
    _takes("groups")(op)
    if len(op.groups) != 1 or op.groups[0] < 1:
        raise PlanError(f"{op.kind.value} takes one head count, got {list(op.groups)}")


def _check_transpose(op: Op) -> None:
    _takes("axes")(op)
    if op.axes and (len(op.axes) != 2 or op.axes[0] == op.axes[1]
                    or max(op.axes) >= _MAX_AXIS):
        raise PlanError(f"a transpose takes two different axes below {_MAX_AXIS}, got "
                        f"{list(op.axes)}")


def _swapped(op: Op) -> tuple[int, int]:
    """The two axes a transpose swaps."""
    a, b = op.axes or (0, 1)
    return a, b


def _infer_transpose(op: Op, current: list[Shape]) -> list[Shape]:
    a, b = _swapped(op)
    if any(len(s) <= max(a, b) for s in current):
        raise PlanError(f"{op} needs tensors of rank >= {max(a, b) + 1}, got shapes {current}")
    out = []
    for s in current:
        swapped = list(s)
        swapped[a], swapped[b] = s[b], s[a]
        out.append(tuple(swapped))
    return out


def _transpose_text(op: Op) -> str:
    """``transpose`` for axes (0, 1), ``transpose(1, 2)`` for others."""
    return "transpose" if _swapped(op) == (0, 1) else f"transpose{_swapped(op)}"


def _infer_reshape(op: Op, current: list[Shape]) -> list[Shape]:
    """Each tensor reshaped to ``shape``: each must hold its element count (and, when the op
    records ``from_shape``, be of that shape)."""
    if not current or any(prod(s) != prod(op.shape) or (op.from_shape and s != op.from_shape)
                          for s in current):
        raise PlanError(f"{op} does not fit shapes {current}")
    return [op.shape for _ in current]


def _infer_concat(op: Op, current: list[Shape]) -> list[Shape]:
    a = op.axis
    if not current or any(len(s) <= a or _but(s, a) != _but(current[0], a) for s in current):
        raise PlanError(f"{op} needs tensors that agree beyond axis {a}, got {current}")
    if op.sizes and op.sizes != tuple(s[a] for s in current):
        raise PlanError(f"{op} records sizes {list(op.sizes)} for tensors of shapes {current}")
    first = current[0]
    return [(*first[:a], sum(s[a] for s in current), *first[a + 1:])]


def _infer_split(op: Op, current: list[Shape]) -> list[Shape]:
    a = op.axis
    if len(current) != 1 or len(current[0]) <= a or sum(op.sizes) != current[0][a]:
        raise PlanError(f"{op} does not fit shape {current}")
    shape = current[0]
    return [(*shape[:a], n, *shape[a + 1:]) for n in op.sizes]


def _but(shape: Shape, axis: int) -> Shape:
    return (*shape[:axis], *shape[axis + 1:])


def _check_stack(op: Op) -> None:
    _takes("sizes", needs="sizes")(op)
    if len(op.sizes) != 1 or op.sizes[0] < 1:
        raise PlanError(f"a {op.kind.value} takes one count, got {list(op.sizes)}")


def _infer_stack(op: Op, current: list[Shape]) -> list[Shape]:
    count = op.sizes[0]
    if op.kind is OpKind.UNSTACK:
        if not current or any(not s or s[0] != count for s in current):
            raise PlanError(f"{op} needs tensors of {count} along axis 0, got {current}")
        return [s[1:] for s in current for _ in range(count)]
    if not current or len(current) % count or any(
            len(set(current[i:i + count])) != 1 for i in range(0, len(current), count)):
        raise PlanError(f"{op} needs runs of {count} tensors of one shape, got {current}")
    return [(count, *current[i]) for i in range(0, len(current), count)]


def _stack(op: Op, current: list[torch.Tensor]) -> list[torch.Tensor]:
    count = op.sizes[0]
    if op.kind is OpKind.UNSTACK:
        return [piece for t in current for piece in t.unbind(0)]
    return [torch.stack(current[i:i + count]) for i in range(0, len(current), count)]


def _infer_regroup(op: Op, current: list[Shape]) -> list[Shape]:
    a, b = op.groups
    if len(current) != 1 or not current[0] or current[0][0] % (a * b):
        raise PlanError(f"{op} does not fit shape {current}")
    return current


def _infer_rope(op: Op, current: list[Shape]) -> list[Shape]:
    if len(op.groups) != 1 or op.groups[0] < 1:
        raise PlanError(f"{op.kind} needs one head count, got groups {list(op.groups)}")
    heads = op.groups[0]
    if len(current) != 1 or not current[0] or current[0][0] % (2 * heads):
        raise PlanError(f"{op} needs one tensor whose rows split into {heads} heads of an even "
                        f"size, got shapes {current}")
    return current


def _rope(op: Op, current: list[torch.Tensor]) -> list[torch.Tensor]:
    """Interleaved pairs -> halves (``rope``), or back (``unrope``), per head, on axis 0."""
    heads = op.groups[0]
    t = current[0]
    half = t.shape[0] // heads // 2
    inner = (half, 2) if op.kind is OpKind.ROPE else (2, half)
    return [t.reshape(heads, *inner, *t.shape[1:]).transpose(1, 2).reshape(t.shape)]


def _regroup(op: Op, current: list[torch.Tensor]) -> list[torch.Tensor]:
    a, b = op.groups
    t = current[0]
    rows = t.shape[0] // (a * b)
    return [t.reshape(a, b, rows, *t.shape[1:]).transpose(0, 1).reshape(t.shape)]


def _at(op: Op) -> str:
    """How a plan shows an axis other than 0: ``concat@1[128, 128]``."""
    return f"@{op.axis}" if op.axis else ""


_KINDS: dict[OpKind, _Kind] = {
    OpKind.TRANSPOSE: _Kind(
        check=_check_transpose, text=_transpose_text, infer=_infer_transpose,
        apply=lambda op, ts: [t.transpose(*_swapped(op)) for t in ts],
        invert=lambda op, before: op),
    OpKind.RESHAPE: _Kind(
        check=_takes("shape", "from_shape"), text=lambda op: f"reshape{op.shape}",
        infer=_infer_reshape,
        apply=lambda op, ts: [t.reshape(op.shape) for t in ts],
        invert=lambda op, before: Op(OpKind.RESHAPE, shape=op.from_shape, from_shape=op.shape)),
    OpKind.CONCAT: _Kind(
        check=_check_concat, text=lambda op: f"concat{_at(op)}{list(op.sizes)}",
        infer=_infer_concat, apply=lambda op, ts: [torch.cat(ts, dim=op.axis)],
        invert=lambda op, before: Op(OpKind.SPLIT, sizes=tuple(s[op.axis] for s in before),
                                     axis=op.axis)),
    OpKind.SPLIT: _Kind(
        check=_check_split, text=lambda op: f"split{_at(op)}{list(op.sizes)}",
        infer=_infer_split, apply=lambda op, ts: list(torch.split(ts[0], list(op.sizes),
                                                                  dim=op.axis)),
        invert=lambda op, before: Op(OpKind.CONCAT, sizes=op.sizes, axis=op.axis)),
    OpKind.STACK: _Kind(
        check=_check_stack, text=lambda op: f"stack[{op.sizes[0]}]", infer=_infer_stack,
        apply=_stack, invert=lambda op, before: Op(OpKind.UNSTACK, sizes=op.sizes)),
    OpKind.UNSTACK: _Kind(
        check=_check_stack, text=lambda op: f"unstack[{op.sizes[0]}]", infer=_infer_stack,
        apply=_stack, invert=lambda op, before: Op(OpKind.STACK, sizes=op.sizes)),
    OpKind.REGROUP: _Kind(
        check=_check_regroup, text=lambda op: f"regroup{op.groups[0]}x{op.groups[1]}",
        infer=_infer_regroup,
        apply=_regroup,
        invert=lambda op, before: Op(OpKind.REGROUP, groups=(op.groups[1], op.groups[0]))),
    OpKind.ROPE: _Kind(
        check=_check_rope, text=lambda op: f"rope{op.groups[0]}", infer=_infer_rope, apply=_rope,
        invert=lambda op, before: Op(OpKind.UNROPE, groups=op.groups)),
    OpKind.PAD: _Kind(
        check=_check_pad, text=lambda op: f"pad{list(op.sizes)}", infer=_infer_pad, apply=_pad,
        invert=lambda op, before: Op(OpKind.CROP, sizes=op.sizes)),
    OpKind.CROP: _Kind(
        check=_check_pad, text=lambda op: f"crop{list(op.sizes)}", infer=_infer_pad, apply=_pad,
        invert=lambda op, before: Op(OpKind.PAD, sizes=op.sizes)),
    OpKind.UNROPE: _Kind(
        check=_check_rope, text=lambda op: f"unrope{op.groups[0]}", infer=_infer_rope, apply=_rope,
        invert=lambda op, before: Op(OpKind.ROPE, groups=op.groups)),
}
