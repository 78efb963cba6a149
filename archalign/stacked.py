"""Stacked matching: one unit whose tensors stack a family of identical modules (an MoE's experts).

transformers 5 stores an MoE layer's experts as two 3-D parameters (Mixtral's ``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``) where reference code and earlier releases keep one
module per expert (``experts.0.w1``, ``experts.0.w2``, ``experts.0.w3``, ...). A *family* is the
set of modules ``prefix.0``, ..., ``prefix.{E-1}`` whose units have the same names and shapes; a
*stacked* unit has tensors that all start with the same ``E``. The family explains the stacked unit
when each of its tensors, expert by expert, is the rows of some of the expert's tensors put one
after the other (``gate_up_proj[e] = cat(w1_e, w3_e)``), every expert tensor used once: the ops
are ``stack[E]``, then ``concat@1`` when there are several pieces (transformers'
``MergeModulelist`` and ``Concatenate``), or their inverses when the stacked side is the source.

A single unit opposite may also hold the experts *flattened* (`archalign.flattened`): each tensor's
rows ``E`` blocks one after the other, as the first Mixtral release's ``w1`` ``[E*I, H]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .confidence import FULL_TRUST, ORDER_ONLY_GROUP, UNDECIDED_LAYOUT_CAP, Trust, confidence
from .cost import CostWeights
from .features import UnitFeatures
from .flattened import explain_flattened
from .match import Forbidden, UnitMatch
from .ops import Op, OpKind, invert_ops
from .pairing import TensorPair
from .solve import solve_assignment

__all__ = ["UNDECIDED_GROUPING", "Family", "find_families", "match_stacked"]

Shape = tuple[int, ...]
UNDECIDED_GROUPING = "undecided_grouping"  # the cost term of flattened experts whose grouping
# the shapes leave open (several source tensors of one shape): capped, not loaded
_MAX_PIECES = 8  # expert tensors an explanation is searched over (2 ** 8 assignments at most)


@dataclass(frozen=True)
class Family:
    """Modules ``prefix.0`` ... ``prefix.{E-1}`` whose units agree in names and shapes."""

    prefix: str  # the container's path ("layers.0.feed_forward.experts")
    members: tuple[tuple[UnitFeatures, ...], ...]  # per expert, its units in registration order
    position: float  # mean aligned position of every unit of the family

    @property
    def count(self) -> int:
        return len(self.members)


def find_families(units: Sequence[UnitFeatures]) -> list[Family]:
    """Every family among ``units``: for each numbered segment of their keys, the units sharing
    what comes before it, numbered ``0..E-1`` without a gap, each number holding units of the same
    relative names and shapes (E >= 2)."""
    groups: dict[str, dict[int, list[UnitFeatures]]] = {}
    for f in units:
        parts = f.unit.key.split(".")
        for i, part in enumerate(parts):
            if part.isdigit() and i > 0:
                groups.setdefault(".".join(parts[:i]), {}).setdefault(int(part), []).append(f)
    families = []
    for prefix, by_index in groups.items():
        count = len(by_index)
        if count < 2 or sorted(by_index) != list(range(count)):
            continue
        layouts = {_layout(prefix, i, fs) for i, fs in by_index.items()}
        if len(layouts) != 1:
            continue
        members = tuple(tuple(by_index[i]) for i in range(count))
        position = float(np.mean([f.position for m in members for f in m]))
        families.append(Family(prefix=prefix, members=members, position=position))
    return families


def _layout(prefix: str, index: int, units: Sequence[UnitFeatures]) -> tuple[object, ...]:
    start = len(prefix) + len(str(index)) + 2
    return tuple((f.unit.key[start:], f.unit.canonical_shapes) for f in units)


def match_stacked(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures], weights: CostWeights,
                  forbidden: Forbidden = frozenset(), *, trust: Trust = FULL_TRUST
                  ) -> list[UnitMatch]:
    """Stacked units against families of modules, both ways: a stacked destination is a stack (and
    a concat), a stacked source an unstack (and a split). One assignment by position per way;
    a pair is kept when it costs less than leaving both unmatched.
    """
    found: list[UnitMatch] = []
    for stacked_is_dst in (True, False):
        singles = [f for f in (dst if stacked_is_dst else src) if _stack_count(f) is not None]
        others = src if stacked_is_dst else dst
        families = find_families(others)
        counts = {_stack_count(f) for f in singles}
        in_family = {f.unit.key for fam in families if fam.count in counts
                     for m in fam.members for f in m}
        families += _flattened_groups([f for f in others if f.unit.key not in in_family])
        if not singles or not families:
            continue
        cost = np.full((len(singles), len(families)), np.inf)
        explained: dict[tuple[int, int], list[TensorPair]] = {}
        position_weight = weights.position * trust.order_weight
        for (i, single), (j, family) in itertools.product(enumerate(singles),
                                                          enumerate(families)):
            if _forbidden(single, family, forbidden, stacked_is_dst):
                continue
            pairs = _explain_any(single, family, stacked_is_dst)
            if pairs is None:
                continue
            explained[i, j] = pairs
            cost[i, j] = weights.fused + position_weight * np.log1p(
                abs(single.position - family.position))
        solved = solve_assignment(cost, weights.unmatched)
        for i, j, regret in zip(solved.rows, solved.cols, solved.regret):
            single, family = singles[int(i)], families[int(j)]
            pairs = explained[int(i), int(j)]
            members = tuple(f for m in family.members for f in m)
            ambiguous = any(len(set(_piece_shapes(p))) < len(_piece_shapes(p)) for p in pairs)
            factor = ORDER_ONLY_GROUP if ambiguous or not family.prefix else 1.0
            structural = float(cost[int(i), int(j)])
            conf = confidence(structural, float(regret)) * factor
            terms = {"stacked": weights.fused, "position": structural - weights.fused,
                     "regret": float(regret)}
            if not family.prefix and not all(p.by_name for p in pairs):
                conf = min(conf, UNDECIDED_LAYOUT_CAP)  # shapes left the grouping open
                terms[UNDECIDED_GROUPING] = 0.0  # a named convention may decide it
                # (`archalign.conventions`)
            label = family.prefix  # "" for flattened units: the plan names them
            found.append(UnitMatch(
                src=members if stacked_is_dst else (single,),
                dst=(single,) if stacked_is_dst else members,
                terms=terms, confidence=conf, pairs=tuple(pairs),
                src_label=label if stacked_is_dst else "",
                dst_label="" if stacked_is_dst else label))
    return found


def _piece_shapes(pair: TensorPair) -> list[str]:
    """The ops' record of how many pieces a stacked tensor has: the concat sizes (equal sizes
    mean the order of the pieces rests on registration order alone)."""
    sizes = next((op.sizes for op in pair.ops if op.kind in (OpKind.CONCAT, OpKind.SPLIT)), ())
    return [str(s) for s in sizes]


def _stack_count(f: UnitFeatures) -> int | None:
    """The leading size every tensor of a stacked unit starts with (None: not stacked)."""
    shapes = f.unit.shapes
    if not shapes or any(len(s) < 3 for s in shapes):
        return None
    counts = {s[0] for s in shapes}
    return counts.pop() if len(counts) == 1 and min(counts) >= 2 else None


def _flattened_groups(units: Sequence[UnitFeatures]) -> list[Family]:
    """Candidates for experts held flattened: the units of one parent module (``layers.0.moe``
    for ``layers.0.moe.w1``, ``.w2``, ``.w3``, each a lone parameter) that are no stacked unit,
    as one pseudo-family without prefix whose single member is all of them."""
    by_parent: dict[str, list[UnitFeatures]] = {}
    for f in units:
        if _stack_count(f) is None and all(len(s) >= 2 for s in f.unit.shapes):
            by_parent.setdefault(f.unit.key.rpartition(".")[0], []).append(f)
    return [Family(prefix="", members=(tuple(fs),),
                   position=float(np.mean([f.position for f in fs])))
            for fs in by_parent.values()]


def _explain_any(single: UnitFeatures, family: Family, stacked_is_dst: bool
                 ) -> list[TensorPair] | None:
    """`_explain` for a family of ``E`` modules, `explain_flattened` for sibling units (its pairs
    turned round when the stacked unit is the source)."""
    count = _stack_count(single)
    if family.prefix:
        return _explain(single, family, stacked_is_dst) if family.count == count else None
    (units,) = family.members
    tensors = [t for f in units for t in f.unit.tensors]
    shapes = [s for f in units for s in f.unit.shapes]
    found = explain_flattened(single.unit.shapes, shapes, count or 0)
    if found is None:
        return None
    pairs = []
    for target, (pieces, ops) in enumerate(found.groups):
        keys = tuple(tensors[p] for p in pieces)
        stacked = single.unit.tensors[target]
        if stacked_is_dst:
            pairs.append(TensorPair(src=keys, dst=(stacked,), ops=ops, by_name=found.unique))
        else:
            pairs.append(TensorPair(src=(stacked,), dst=keys,
                                    ops=invert_ops(ops, [shapes[p] for p in pieces]),
                                    by_name=found.unique))
    return pairs


def _forbidden(single: UnitFeatures, family: Family, forbidden: Forbidden,
               stacked_is_dst: bool) -> bool:
    keys = [f.unit.key for m in family.members for f in m]
    s = single.unit.key
    return any(((k, s) if stacked_is_dst else (s, k)) in forbidden for k in keys)


def _explain(single: UnitFeatures, family: Family, stacked_is_dst: bool
             ) -> list[TensorPair] | None:
    """The tensor pairs when every tensor of ``single``, expert by expert, is the rows of some of
    an expert's tensors in their registration order (each used once), or one of them transposed;
    the first such explanation with the fewest transposes, None when there is none."""
    expert = [(f, t, s) for f in family.members[0] for t, s in zip(range(len(f.unit.tensors)),
                                                                   f.unit.canonical_shapes)]
    targets = [s[1:] for s in single.unit.shapes]
    if len(expert) > _MAX_PIECES or len(expert) < len(targets):
        return None
    best: tuple[int, list[list[int]], list[bool]] | None = None
    for assignment in itertools.product(range(len(targets)), repeat=len(expert)):
        groups = [[p for p, a in enumerate(assignment) if a == j] for j in range(len(targets))]
        if any(not g for g in groups):
            continue
        flips: list[bool] = []
        for target, group in zip(targets, groups):
            flip = _fits(target, [expert[p][2] for p in group])
            if flip is None:
                break
            flips.append(flip)
        else:
            if best is None or sum(flips) < best[0]:
                best = (sum(flips), groups, flips)
    if best is None:
        return None
    _, groups, flips = best
    count = family.count
    pairs = []
    for k, (group, flip) in enumerate(zip(groups, flips)):
        keys = tuple(key for p in group for key in _member_keys(family, expert, p))
        rows = tuple(expert[p][2][1 if flip else 0] for p in group)
        ops: list[Op] = [Op(OpKind.TRANSPOSE)] if flip else []
        ops.append(Op(OpKind.STACK, sizes=(count,)))
        if len(group) > 1:
            ops.append(Op(OpKind.CONCAT, sizes=rows, axis=1))
        stacked = single.unit.tensors[k]
        if stacked_is_dst:
            pairs.append(TensorPair(src=keys, dst=(stacked,), ops=tuple(ops), by_name=True))
        else:
            pairs.append(TensorPair(src=(stacked,), dst=keys, ops=_inverse(ops, rows, count),
                                    by_name=True))
    return pairs


def _member_keys(family: Family, expert: list[tuple[UnitFeatures, int, Shape]], piece: int
                 ) -> Iterator[str]:
    """The key of expert tensor ``piece`` (a tensor of expert 0) in every expert, in order."""
    unit, index, _ = expert[piece]
    relative = _relative(family.prefix, unit.unit.key)
    for member in family.members:
        (same,) = [f for f in member if _relative(family.prefix, f.unit.key) == relative]
        yield same.unit.tensors[index]


def _relative(prefix: str, key: str) -> str:
    """``key`` below its expert: ``w1`` for ``prefix.3.w1``, "" for ``prefix.3`` itself."""
    rest = key[len(prefix) + 1:]
    return rest.split(".", 1)[1] if "." in rest else ""


def _fits(target: Shape, pieces: list[Shape]) -> bool | None:
    """Whether ``pieces``, one after the other along their rows, make ``target`` (False), or
    make it transposed (True, 2-d pieces only); None when they make neither."""
    if all(p[1:] == target[1:] for p in pieces) and sum(p[0] for p in pieces) == target[0]:
        return False
    flipped = [p[::-1] for p in pieces if len(p) == 2]
    if (len(flipped) == len(pieces) and len(target) == 2
            and all(p[1:] == target[1:] for p in flipped)
            and sum(p[0] for p in flipped) == target[0]):
        return True
    return None


def _inverse(ops: list[Op], rows: tuple[int, ...], count: int) -> tuple[Op, ...]:
    """The ops that take a stacked source tensor back to the experts' tensors."""
    out: list[Op] = []
    if len(rows) > 1:
        out.append(Op(OpKind.SPLIT, sizes=rows, axis=1))
    out.append(Op(OpKind.UNSTACK, sizes=(count,)))
    if ops and ops[0].kind is OpKind.TRANSPOSE:
        out.append(Op(OpKind.TRANSPOSE))
    return tuple(out)
