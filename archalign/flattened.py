"""Flattened experts: one tensor whose rows are ``E`` blocks, the experts' tensors one after another.

The first Mixtral release stores each layer's experts fused into 2-D tensors: ``w1`` and ``w3``
``[E*I, H]`` (expert 0's rows, then expert 1's, ...) and ``w2`` ``[E*I, H]`` holding each expert's
down projection transposed. Against transformers' stacked experts (``gate_up_proj`` ``[E, 2I, H]``,
``down_proj`` ``[E, H, I]``) such a tensor is the stacked one flattened: ``reshape`` ``[E*I, H] ->
[E, I, H]`` explains it, alone, with a ``transpose`` of axes (1, 2) where the destination holds
``[E, H, I]``, or with other such tensors concatenated along axis 1. `explain_flattened` finds
that, from shapes alone: which tensor is which is a guess when several have one shape.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

from .ops import Op, OpKind

__all__ = ["Flattened", "explain_flattened"]

Shape = tuple[int, ...]
_MAX_TENSORS = 6  # source tensors an explanation is searched over (targets ** 6 assignments)


class Flattened(NamedTuple):
    """How flattened source tensors make a stacked unit's tensors."""

    groups: tuple[tuple[tuple[int, ...], tuple[Op, ...]], ...]  # per stacked tensor: the
    # source tensors it takes (indices, in order) and the ops that make it from them
    unique: bool  # no other grouping of the source tensors fits the shapes as well


def explain_flattened(targets: Sequence[Shape], sources: Sequence[Shape], count: int
                      ) -> Flattened | None:
    """How ``sources`` (each ``[count * r, ...]``) make the stacked ``targets`` (each
    ``[count, ...]``), every source tensor used once; None when they cannot.

    A target takes one or more source tensors of one shape: each is reshaped to ``[count, r,
    ...]``, transposed on axes (1, 2) when the target holds them so (2-D sources only), and
    concatenated along axis 1 when there are several. The explanation with the fewest transposes
    wins, the first in the sources' order among equals; it is ``unique`` when no other grouping
    has as few.

    Parameters
    ----------
    targets : sequence of shape
        The stacked unit's tensors, each of rank >= 3 starting with ``count``.
    sources : sequence of shape
        The flattened unit's tensors.
    count : int
        ``E``, the stacked unit's leading size (at least 2).
    """
    if (count < 2 or not targets or len(sources) > _MAX_TENSORS or len(sources) < len(targets)
            or any(len(s) < 2 or s[0] % count for s in sources)
            or any(len(t) < 3 or t[0] != count for t in targets)):
        return None
    found: list[tuple[int, tuple[tuple[tuple[int, ...], tuple[Op, ...]], ...]]] = []
    for assignment in itertools.product(range(len(targets)), repeat=len(sources)):
        groups = [tuple(p for p, a in enumerate(assignment) if a == j)
                  for j in range(len(targets))]
        explained = []
        for target, group in zip(targets, groups):
            ops = _ops(target, [sources[p] for p in group], count)
            if ops is None:
                break
            explained.append((group, ops))
        else:
            transposes = sum(any(op.kind is OpKind.TRANSPOSE for op in ops)
                             for _, ops in explained)
            found.append((transposes, tuple(explained)))
    if not found:
        return None
    fewest = min(t for t, _ in found)
    best = [e for t, e in found if t == fewest]
    groupings = {tuple(frozenset(g) for g, _ in e) for e in best}
    return Flattened(groups=best[0], unique=len(groupings) == 1)


def _ops(target: Shape, pieces: list[Shape], count: int) -> tuple[Op, ...] | None:
    """The ops that make ``target`` from ``pieces`` (all of one shape), or None."""
    if not pieces or len(set(pieces)) != 1:
        return None
    rows, *rest = pieces[0]
    stacked = (count, rows // count, *rest)
    ops = [Op(OpKind.RESHAPE, shape=stacked, from_shape=pieces[0])]
    whole = (count, len(pieces) * stacked[1], *stacked[2:])
    if whole != target:
        if len(stacked) != 3:
            return None
        ops.append(Op(OpKind.TRANSPOSE, axes=(1, 2)))
        whole = (count, len(pieces) * stacked[2], stacked[1])
        if whole != target:
            return None
    if len(pieces) > 1:
        sizes = (whole[1] // len(pieces),) * len(pieces)
        ops.append(Op(OpKind.CONCAT, sizes=sizes, axis=1))
    return tuple(ops)
