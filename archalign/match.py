"""Matching stages: exact, adapted, fused, and near misses; then tensors inside matched units.

1. *Exact*: units whose sorted canonical shapes agree. A forbidden pair never crosses shape
   classes, so the problem splits into one independent assignment per class.
2. *Adapted*: leftovers whose tensors have equal element counts and can be turned into each other
   by a reshape or transpose (layer scale ``(C,1,1)`` vs ``(C,)``, Linear vs 1x1 conv).
3. *Fused*: a leftover unit whose weight is the concatenation (axis 0) of a run of consecutive
   units on the other side (``qkv_proj`` vs ``q_proj``/``k_proj``/``v_proj``), adopted where it
   explains the units at a lower total cost than the one-to-one matches it replaces.
4. *Near misses*: what is still left, paired by family and place with shapes that do not fit;
   reported, never loaded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from math import prod
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from .confidence import ORDER_ONLY_GROUP, SAME_NAME_IN_TIE, SAME_NAME_MARGIN, confidence
from .cost import RECORDED_COST_TERMS, CostMatrices, CostWeights, compute_costs, shape_distance
from .features import UnitFeatures
from .graph import Unit
from .ops import Op, derive_ops
from .solve import Assignment, solve_assignment, solve_sparse_assignment

__all__ = ["TensorPair", "UnitMatch",
           "match_adapted", "match_fused", "match_near_misses", "match_pinned", "match_units",
           "pair_tensors"]

FUSED_NEIGHBOURS = 3  # candidate groups per fused unit: the nearest ones in the aligned order

Forbidden = frozenset[tuple[str, str]]  # (source unit key, destination unit key) pairs

SPARSE_ABOVE = 250_000  # a class with more candidate pairs than this is solved sparse,
SPARSE_WINDOW = 16  # over the pairs within this many units of each other's aligned position


class TensorPair(NamedTuple):
    """Source tensor(s) that become destination tensor(s) through ``ops``."""

    src: tuple[str, ...]  # source keys (several: concatenated into one destination tensor)
    dst: tuple[str, ...]  # destination keys (several: split from one source tensor)
    ops: tuple[Op, ...]  # adaptations, applied in order; () for a plain copy
    by_name: bool  # False when equal shapes had to be paired by order alone


class UnitMatch(NamedTuple):
    """One solved pair of units (or of a unit and a fused group) and the cost terms behind it."""

    src: tuple[UnitFeatures, ...]  # the source unit, or the members of a source group
    dst: tuple[UnitFeatures, ...]  # the destination unit, or the members of a destination group
    terms: dict[str, float]  # cost terms (type, position, context, name, ...) and the regret
    confidence: float  # in [0, 1], before the tensor-pairing factor
    pairs: tuple[TensorPair, ...]  # the tensors, paired



# ------------------------------------------------------------------------------------ stages


def match_units(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures], weights: CostWeights,
                forbidden: Forbidden = frozenset()) -> list[UnitMatch]:
    """Stage 1: units with equal sorted canonical shapes, one assignment per shape class.

    ``forbidden`` holds (source unit, destination unit) pairs that must not be matched (in every
    stage).
    """
    return _by_class(src, dst, weights, key=lambda u: u.shape_key, mode="exact",
                     forbidden=forbidden)


def match_adapted(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures], weights: CostWeights,
                  forbidden: Forbidden = frozenset()) -> list[UnitMatch]:
    """Stage 2: leftovers that fit after a reshape or a transpose, per element-count class."""
    return _by_class(src, dst, weights, mode="adapt", forbidden=forbidden,
                     key=lambda u: tuple(sorted(prod(s) for s in u.shapes)))


def match_fused(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures], weights: CostWeights,
                existing: Sequence[UnitMatch], forbidden: Forbidden = frozenset()
                ) -> tuple[list[UnitMatch], list[UnitMatch]]:
    """Stage 3: a unit whose tensors are the axis-0 concatenation of a run of units opposite.

    Both directions are searched (a fused destination is a concat, a fused source a split), over
    all units: a fused ``qkv_proj`` may well have the shape of an unrelated ``gate_proj`` and been
    paired with it by stage 1. A candidate is adopted when it explains the units at a lower total
    cost than the matches it breaks, counting ``unmatched`` for every unit left without partner;
    the best adoption goes first. Its regret is that saving (or the gap to a rival candidate).

    Returns
    -------
    (list of UnitMatch, list of UnitMatch)
        The matches of ``existing`` that survive, and the fused matches.
    """
    candidates = []
    for fused_is_dst in (True, False):
        singles, parts = (dst, src) if fused_is_dst else (src, dst)
        by_key: dict[object, list[tuple[UnitFeatures, ...]]] = defaultdict(list)
        for group in _candidate_groups(parts):
            pieces = _fused_key([g.unit for g in group])
            if pieces is not None:
                by_key[(group[0].family, pieces)].append(group)
        nearest = {k: _Nearest(np.array([sum(p.position for p in g) / len(g) for g in groups]))
                   for k, groups in by_key.items()}
        for single in singles:
            wanted = (single.family, _fused_key([single.unit]))
            if wanted not in by_key:
                continue
            near = nearest[wanted]
            for g in near.around(single.position, FUSED_NEIGHBOURS):
                group = by_key[wanted][g]
                if any(((p.unit.key, single.unit.key) if fused_is_dst
                        else (single.unit.key, p.unit.key)) in forbidden for p in group):
                    continue
                position = weights.position * np.log1p(abs(single.position - near.centres[g]))
                structural = position + weights.fused
                name = weights.name * (0.0 if single.tokens & group[0].tokens else 1.0)
                src_side, dst_side = ((tuple(group), (single,)) if fused_is_dst
                                      else ((single,), tuple(group)))
                candidates.append(_Candidate(
                    total=structural + name, structural=structural, src=src_side, dst=dst_side,
                    fused_is_dst=fused_is_dst,
                    terms={"position": float(position), "name": name, "fused": weights.fused}))
    kept = _Kept(existing)
    fused: list[UnitMatch] = []
    deltas = [_adoption_delta(c, kept, weights.unmatched) for c in candidates]
    while candidates:
        best_index = int(np.argmin(deltas))
        delta = deltas[best_index]
        if delta >= 0:
            break
        best = candidates[best_index]
        if best.pairs is None:  # its tensors do not pair after all: never a candidate
            del candidates[best_index], deltas[best_index]
            continue
        rivals = [d for c, d in zip(candidates, deltas)
                  if c is not best and c.units & best.units and c.pairs is not None]
        regret = max(min([-delta, *(r - delta for r in rivals)]), 0.0)
        affected = set(best.units)
        for unit in best.units:
            i = kept.owner.get(unit)
            if i is not None:
                affected |= _units_of_match(kept.pop(i))
        survivors = [(c, d) for c, d in zip(candidates, deltas) if not (c.units & best.units)]
        candidates = [c for c, _ in survivors]
        # only candidates touching a unit whose match changed have a new delta
        deltas = [_adoption_delta(c, kept, weights.unmatched) if c.units & affected else d
                  for c, d in survivors]
        shapes = [f.unit.shape_key for f in (best.src if len(best.src) > 1 else best.dst)]
        factor = ORDER_ONLY_GROUP if len(set(shapes)) < len(shapes) else 1.0
        fused.append(UnitMatch(
            src=best.src, dst=best.dst, terms={**best.terms, "regret": float(regret)},
            confidence=confidence(best.structural, regret) * factor
            * float(np.exp(-max(f.spread for f in best.src))), pairs=best.pairs))
    return list(kept.matches.values()), fused


class _Nearest:
    """The groups nearest to a position, by their centres (sorted once, then bisected)."""

    def __init__(self, centres: np.ndarray) -> None:
        self.centres = centres  # each group's mean position, in the groups' order
        self.order = np.argsort(centres, kind="stable")  # groups by centre
        self.ranked = centres[self.order]  # the centres, ascending

    def around(self, position: float, k: int) -> list[int]:
        """The ``k`` groups nearest to ``position``, nearest first (ties: the earlier group)."""
        at = int(np.searchsorted(self.ranked, position))
        window = self.order[max(at - 2 * k, 0):at + 2 * k]
        distance = np.abs(self.centres[window] - position)
        return [int(g) for _, g in sorted(zip(distance.tolist(), window.tolist()))[:k]]


@dataclass(frozen=True)
class _Candidate:
    """A fused match that stage 3 may adopt."""

    total: float  # its cost, names included
    structural: float  # its cost without names (what its confidence rests on)
    src: tuple[UnitFeatures, ...]  # source side (a group when the destination is fused)
    dst: tuple[UnitFeatures, ...]  # destination side
    fused_is_dst: bool  # True: the destination is the fused unit (a concat), else a split
    terms: dict[str, float] = field(hash=False)  # cost terms, for the plan

    @cached_property
    def units(self) -> frozenset[tuple[str, str]]:
        return frozenset(_units_of(self.src, self.dst))

    @cached_property
    def pairs(self) -> tuple[TensorPair, ...] | None:
        """The tensors, paired; None when they do not pair (computed for the few that get
        near adoption, not for every candidate)."""
        single, group = (self.dst[0], self.src) if self.fused_is_dst else (self.src[0], self.dst)
        pairs = _fused_pairs(single.unit, [p.unit for p in group], self.fused_is_dst)
        return None if pairs is None else tuple(pairs)


def _units_of(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures]) -> set[tuple[str, str]]:
    """The units of a match or candidate, tagged with their side."""
    return {("src", f.unit.key) for f in src} | {("dst", f.unit.key) for f in dst}


def _units_of_match(match: UnitMatch) -> set[tuple[str, str]]:
    return _units_of(match.src, match.dst)


class _Kept:
    """The matches stage 3 may still break, with what `_adoption_delta` needs of each."""

    def __init__(self, matches: Sequence[UnitMatch]) -> None:
        self.matches = dict(enumerate(matches))  # index -> a surviving match
        self.units = {i: _units_of_match(m) for i, m in self.matches.items()}  # its units
        self.cost = {i: sum(v for k, v in m.terms.items() if k in RECORDED_COST_TERMS)
                     for i, m in self.matches.items()}  # what it costs, as the plan records it
        self.owner = {u: i for i, units in self.units.items() for u in units}  # unit -> match

    def pop(self, i: int) -> UnitMatch:
        """Break match ``i``: its units are unmatched from now on."""
        for unit in self.units.pop(i):
            self.owner.pop(unit, None)
        del self.cost[i]
        return self.matches.pop(i)


def _adoption_delta(candidate: _Candidate, kept: _Kept, unmatched: float) -> float:
    """Change of the total cost if ``candidate`` replaced the matches it overlaps."""
    units = candidate.units
    delta = candidate.total
    broken = {kept.owner[u] for u in units if u in kept.owner}
    covered = 0
    for i in broken:
        mine = kept.units[i]
        inside = len(mine & units)
        delta += unmatched * (len(mine) - inside) - kept.cost[i]  # partners left without a match
        covered += inside
    delta -= unmatched * (len(units) - covered)  # units that were unmatched and now are not
    return delta


def _fused_key(units: Sequence[Unit]) -> tuple[tuple[str, tuple[tuple[int, ...], int]], ...] | None:
    """Per tensor name: the trailing dimensions and the summed leading one, when the units could
    be the axis-0 pieces of one tensor (None otherwise). A fused unit has the key of its pieces."""
    return _fused_key_of(tuple((u.local_names(), u.canonical_shapes) for u in units))


@lru_cache(maxsize=4096)
def _fused_key_of(layouts: tuple[tuple[tuple[str, ...], tuple[tuple[int, ...], ...]], ...]
                  ) -> tuple[tuple[str, tuple[tuple[int, ...], int]], ...] | None:
    """`_fused_key` of units given by their (local names, canonical shapes): the key depends on
    nothing else, and a model's thousands of layers share a few layouts."""
    names: list[str] | None = None
    entries: dict[str, tuple[tuple[int, ...], int]] = {}
    for local_names, shapes in layouts:
        local = [_canonical(n) for n in local_names]
        if len(set(local)) != len(local) or (names is not None and sorted(local) != names):
            return None
        names = sorted(local)
        for name, shape in zip(local, shapes):
            if not shape:
                return None
            trailing, rows = entries.get(name, (shape[1:], 0))
            if trailing != shape[1:]:
                return None
            entries[name] = (trailing, rows + shape[0])
    return tuple(sorted(entries.items()))


def match_pinned(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures],
                 pins: Sequence[tuple[str, str]]) -> tuple[list[UnitMatch], list[UnitMatch]]:
    """Pairs a reviewer pinned: matched whatever the cost (confidence 1), loaded when the tensors
    fit (exactly or after an adaptation), reported as near misses when they do not.

    Returns
    -------
    (list of UnitMatch, list of UnitMatch)
        Loadable pinned matches, and pinned pairs whose shapes do not fit.
    """
    by_src = {f.unit.key: f for f in src}
    by_dst = {f.unit.key: f for f in dst}
    loadable, misfits = [], []
    for s_key, d_key in pins:
        s, d = by_src[s_key], by_dst[d_key]
        pairs = pair_tensors(s.unit, d.unit, "exact") or pair_tensors(s.unit, d.unit, "adapt")
        terms = {"pinned": 1.0, "regret": 0.0}
        if pairs is not None:
            loadable.append(UnitMatch(src=(s,), dst=(d,), terms=terms, confidence=1.0,
                                      pairs=tuple(pairs)))
        else:
            misfits.append(UnitMatch(src=(s,), dst=(d,), terms=terms, confidence=1.0,
                                     pairs=tuple(pair_tensors(s.unit, d.unit, "near") or ())))
    return loadable, misfits


def match_near_misses(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures],
                      weights: CostWeights, forbidden: Forbidden = frozenset()) -> list[UnitMatch]:
    """Stage 4: leftovers of the same family and tensor layout whose shapes differ.

    Only pairs cheaper than leaving both unmatched are returned; they explain what a destination
    layer would have taken, and why it did not.
    """
    if not src or not dst:
        return []
    costs = compute_costs(src, dst, weights)
    # INCOMPATIBLE (> 1) where the tensor counts or ranks differ
    distance = np.array([[shape_distance(s.unit.canonical_shapes, d.unit.canonical_shapes)
                          for d in dst] for s in src])
    shape = weights.shape * distance
    allowed = np.array([[s.family == d.family for d in dst] for s in src]) & (distance <= 1.0)
    total = _forbid(np.where(allowed, costs.total() + shape, np.inf), src, dst, forbidden)
    return _collect(src, dst, costs, total, weights, mode="near", extra=("shape", shape))


# ------------------------------------------------------------------------------------ helpers


def _forbid(total: np.ndarray, src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures],
            forbidden: Forbidden) -> np.ndarray:
    """``total`` with the forbidden pairs set to ``inf``."""
    if forbidden:
        rows = {f.unit.key: i for i, f in enumerate(src)}
        cols = {f.unit.key: j for j, f in enumerate(dst)}
        for s_key, d_key in forbidden:
            if s_key in rows and d_key in cols:
                total[rows[s_key], cols[d_key]] = np.inf
    return total


def _by_class(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures], weights: CostWeights,
              key: object, mode: str, forbidden: Forbidden) -> list[UnitMatch]:
    classes: dict[object, tuple[list[UnitFeatures], list[UnitFeatures]]] = defaultdict(
        lambda: ([], []))
    for s in src:
        classes[key(s.unit)][0].append(s)  # type: ignore[operator]
    for d in dst:
        classes[key(d.unit)][1].append(d)  # type: ignore[operator]
    found: list[UnitMatch] = []
    for rows, cols in classes.values():
        if not (rows and cols):
            continue
        if len(rows) * len(cols) > SPARSE_ABOVE:
            found.extend(_solve_class_sparse(rows, cols, weights, mode, forbidden))
            continue
        costs = compute_costs(rows, cols, weights)
        if mode == "exact":
            total = _forbid(costs.total(), rows, cols, forbidden)
            found.extend(_collect(rows, cols, costs, total, weights, mode=mode))
            continue
        adapt = np.array([[weights.adapt if pair_tensors(s.unit, d.unit, mode) is not None
                           else np.inf for d in cols] for s in rows])
        total = _forbid(costs.total() + adapt, rows, cols, forbidden)
        found.extend(_collect(rows, cols, costs, total, weights, mode=mode,
                              extra=("adapt", np.where(np.isfinite(adapt), adapt, 0.0))))
    found.sort(key=lambda m: m.dst[0].rank)
    return found


def _solve_class_sparse(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures],
                        weights: CostWeights, mode: str, forbidden: Forbidden) -> list[UnitMatch]:
    """One large class (thousands of experts' projections), solved over candidate pairs only:
    the `SPARSE_WINDOW` units on either side of each unit's position, from both sides, plus pairs
    with the very same key. A pair outside every window is far apart in the aligned order and
    costs at least the position term of the window's edge; regrets are capped by that bound."""
    rows, cols, beyond = _candidate_pairs(src, dst, weights)
    if forbidden:
        src_keys = [f.unit.key for f in src]
        dst_keys = [f.unit.key for f in dst]
        keep = np.array([(src_keys[i], dst_keys[j]) not in forbidden for i, j in zip(rows, cols)],
                        dtype=bool)
        rows, cols = rows[keep], cols[keep]
    costs = compute_costs(src, dst, weights, pairs=(rows, cols))
    total = costs.total()
    extra: tuple[str, np.ndarray] | None = None
    if mode != "exact":
        fits = np.array([pair_tensors(src[i].unit, dst[j].unit, mode) is not None
                         for i, j in zip(rows, cols)], dtype=bool)
        rows, cols = rows[fits], cols[fits]
        costs = CostMatrices(*(term[fits] for term in costs))
        extra = ("adapt", np.full(rows.size, weights.adapt))
        total = costs.total() + extra[1]
    solved = solve_sparse_assignment(rows, cols, total, (len(src), len(dst)), weights.unmatched,
                                     beyond=beyond)
    assert solved.edges is not None  # a sparse solve says where its pairs sit
    return _matches(src, dst, costs, solved, [int(e) for e in solved.edges], weights, mode, extra)


def _candidate_pairs(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures],
                     weights: CostWeights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate (row, column) pairs of a sparse class, sorted, and per row the lowest cost any
    other pair can have (its position term at the nearest column outside the row's window)."""
    src_pos = np.array([f.position for f in src], dtype=float)
    dst_pos = np.array([f.position for f in dst], dtype=float)
    found_rows, found_cols = [], []
    beyond = np.full(len(src), np.inf)
    for side, (mine, theirs) in enumerate(((src_pos, dst_pos), (dst_pos, src_pos))):
        order = np.argsort(theirs, kind="stable")
        ranked = theirs[order]
        at = np.searchsorted(ranked, mine)
        lo = np.clip(at - SPARSE_WINDOW, 0, len(theirs))
        hi = np.clip(at + SPARSE_WINDOW, 0, len(theirs))
        spots = lo[:, None] + np.arange(2 * SPARSE_WINDOW)[None, :]
        inside = spots < hi[:, None]
        own = np.broadcast_to(np.arange(len(mine))[:, None], spots.shape)[inside]
        other = order[spots[inside]]
        found_rows.append(own if side == 0 else other)
        found_cols.append(other if side == 0 else own)
        if side == 0:
            below = np.where(lo > 0, mine - ranked[np.maximum(lo - 1, 0)], np.inf)
            above = np.where(hi < len(theirs), ranked[np.minimum(hi, len(theirs) - 1)] - mine,
                             np.inf)
            beyond = weights.position * np.log1p(np.minimum(below, above))
    by_key = {f.unit.key: j for j, f in enumerate(dst)}
    same = [(i, by_key[f.unit.key]) for i, f in enumerate(src) if f.unit.key in by_key]
    if same:
        found_rows.append(np.array([i for i, _ in same]))
        found_cols.append(np.array([j for _, j in same]))
    code = np.unique(np.concatenate(found_rows) * len(dst) + np.concatenate(found_cols))
    return code // len(dst), code % len(dst), beyond


def _collect(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures], costs: CostMatrices,
             total: np.ndarray, weights: CostWeights, mode: str,
             extra: tuple[str, np.ndarray] | None = None) -> list[UnitMatch]:
    solved = solve_assignment(total, weights.unmatched)
    at: list[int | tuple[int, int]] = [(int(i), int(j)) for i, j in zip(solved.rows, solved.cols)]
    return _matches(src, dst, costs, solved, at, weights, mode, extra)


def _matches(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures], costs: CostMatrices,
             solved: Assignment, at: Sequence[int | tuple[int, int]], weights: CostWeights,
             mode: str, extra: tuple[str, np.ndarray] | None) -> list[UnitMatch]:
    """The `UnitMatch` of each solved pair; ``at`` indexes the pair in the cost arrays (``(i, j)``
    in a dense matrix, a candidate's position in a sparse problem's arrays)."""
    structural = costs.structural(weights.order_in_fit) + (
        extra[1] if extra is not None else 0.0)
    out = []
    for i, j, regret, k in zip(solved.rows, solved.cols, solved.regret, at):
        pairs = pair_tensors(src[i].unit, dst[j].unit, mode)
        if pairs is None:
            continue
        terms = {"type": float(costs.type[k]), "position": float(costs.position[k]),
                 "context": float(costs.context[k]), "name": float(costs.name[k])}
        if extra is not None:
            terms[extra[0]] = float(extra[1][k])
        terms["regret"] = float(regret)
        # an uncertain position matters only against rivals of the same kind
        rivals = len(src) > 1 or len(dst) > 1
        spread = src[i].spread if rivals and weights.order_in_fit else 0.0
        ambiguity = float(np.exp(-spread))
        margin = float(regret)
        if spread:
            terms["spread"] = float(spread)
            if src[i].unit.key == dst[j].unit.key:
                # structure cannot tell, the very same name can: moderate, never certain
                ambiguity = max(ambiguity, SAME_NAME_IN_TIE)
                margin += SAME_NAME_MARGIN
                terms["same_name"] = 1.0
        trust = weights.order_trust if rivals else 1.0
        out.append(UnitMatch(src=(src[i],), dst=(dst[j],), terms=terms,
                             confidence=confidence(float(structural[k]), margin)
                             * ambiguity * trust,
                             pairs=tuple(pairs)))
    return out


_SYNONYMS = {"gamma": "weight", "beta": "bias", "scale": "weight", "g": "weight", "b": "bias",
             "moving_mean": "running_mean", "moving_variance": "running_var",
             "moving_var": "running_var"}


def pair_tensors(src: Unit, dst: Unit, mode: str = "exact") -> list[TensorPair] | None:
    """Pair the tensors of two matched units; names decide among tensors that fit alike.

    Parameters
    ----------
    mode : {"exact", "adapt", "near"}
        "exact": canonical shapes must agree (a known layout difference is a transpose);
        "adapt": a reshape or a transpose that the shapes suggest is allowed too;
        "near": tensors of equal rank pair whatever their shapes (for reporting mismatches).

    Returns
    -------
    list of TensorPair or None
        In the destination's tensor order; None when ("exact"/"adapt") not every tensor pairs.
    """
    src_names = [_canonical(n) for n in src.local_names()]
    dst_names = [_canonical(n) for n in dst.local_names()]
    n, m = len(src.tensors), len(dst.tensors)
    if mode != "near" and n != m:
        return None
    cost = np.full((n, m), 1e6)
    ops: dict[tuple[int, int], tuple[Op, ...]] = {}
    for i in range(n):
        for j in range(m):
            flip = src.is_transposed(i) != dst.is_transposed(j)
            if mode == "near":
                if len(src.shapes[i]) != len(dst.shapes[j]):
                    continue
                found: tuple[Op, ...] | None = ()
                penalty = 0.0 if src.canonical_shapes[i] == dst.canonical_shapes[j] else 0.05
            else:
                found = derive_ops(src.shapes[i], dst.shapes[j], transpose=flip,
                                   allow_shape_transpose=mode == "adapt")
                if found is None or (mode == "exact" and any(o.kind != "transpose" for o in found)):
                    continue
                penalty = 0.05 * sum(o.kind != "transpose" or not flip for o in found)
            assert found is not None
            ops[i, j] = found
            if src_names[i] == dst_names[j]:
                cost[i, j] = penalty
            elif src_names[i].endswith(dst_names[j]) or dst_names[j].endswith(src_names[i]):
                cost[i, j] = 0.1 + penalty  # in_proj_weight ~ weight
            else:
                cost[i, j] = 1.0 + penalty + 0.001 * abs(i - j)
    rows, cols = linear_sum_assignment(cost)
    pairs = []
    for i, j in zip(rows, cols):
        if cost[i, j] >= 1e6:
            continue
        rivals = sum((i2, j) in ops for i2 in range(n))
        by_name = bool(cost[i, j] < 1.0 or rivals == 1)
        pairs.append((j, TensorPair(src=(src.tensors[i],), dst=(dst.tensors[j],), ops=ops[i, j],
                                    by_name=by_name)))
    if mode != "near" and len(pairs) != n:
        return None
    return [p for _, p in sorted(pairs)]


def _canonical(name: str) -> str:
    name = name.lower()
    return _SYNONYMS.get(name, name)


def _candidate_groups(parts: Sequence[UnitFeatures]) -> list[tuple[UnitFeatures, ...]]:
    """Runs of 2-4 units, consecutive in execution order, that could be one fused tensor."""
    ordered = sorted(parts, key=lambda f: f.rank)
    names = [tuple(sorted(_canonical(n) for n in f.unit.local_names())) for f in ordered]
    groups = []
    for start in range(len(ordered)):
        first = ordered[start]
        if first.family not in ("linear", "conv"):
            continue
        for length in (2, 3, 4):
            group = tuple(ordered[start:start + length])
            if len(group) < length or group[-1].rank - first.rank > length + 1:
                break
            last = start + length - 1
            if ordered[last].family != first.family or names[last] != names[start]:
                break
            groups.append(group)
    return groups


def _fused_pairs(single: Unit, members: Sequence[Unit], fused_is_dst: bool
                 ) -> list[TensorPair] | None:
    """Tensor pairs when ``single`` holds the members' tensors concatenated along axis 0."""
    single_names = [_canonical(n) for n in single.local_names()]
    if len(set(single_names)) != len(single_names):
        return None
    pairs = []
    for k, name in enumerate(single_names):
        keys, sizes, flips = [], [], []
        for member in members:
            member_names = [_canonical(n) for n in member.local_names()]
            if name not in member_names:
                return None
            idx = member_names.index(name)
            keys.append(member.tensors[idx])
            sizes.append(member.canonical_shapes[idx])
            flips.append(member.is_transposed(idx))
        whole = single.canonical_shapes[k]
        if (len(set(flips)) != 1 or any(s[1:] != whole[1:] for s in sizes)
                or sum(s[0] for s in sizes) != whole[0]):
            return None
        member_t = [Op("transpose")] if flips[0] else []
        single_t = [Op("transpose")] if single.is_transposed(k) else []
        counts = tuple(s[0] for s in sizes)
        if fused_is_dst:
            ops = (*member_t, Op("concat", sizes=counts), *single_t)
            pairs.append(TensorPair(src=tuple(keys), dst=(single.tensors[k],), ops=ops,
                                    by_name=True))
        else:
            ops = (*single_t, Op("split", sizes=counts), *member_t)
            pairs.append(TensorPair(src=(single.tensors[k],), dst=tuple(keys), ops=ops,
                                    by_name=True))
    return pairs
