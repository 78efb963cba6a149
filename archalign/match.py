"""Matching stages that solve one-to-one assignments: pinned, exact, adapted, near misses.

0. *Pinned*: pairs a reviewer fixed (`archalign.hints`), matched whatever they cost.
1. *Exact*: units whose sorted canonical shapes agree. A forbidden pair never crosses shape
   classes, so the problem splits into one independent assignment per class (large classes are
   solved sparse, over position windows).
2. *Adapted*: leftovers whose tensors have equal element counts and can be turned into each other
   by a reshape or transpose (layer scale ``(C,1,1)`` vs ``(C,)``, Linear vs 1x1 conv).
3. *Fused* matches (one unit against a run of units) are `archalign.fused`'s.
4. *Near misses*: what is still left, paired by family and place with shapes that do not fit;
   reported, never loaded.

Each solved pair becomes a `UnitMatch` with its cost terms, its regret and its confidence
(`archalign.confidence`); its tensors are paired by `archalign.pairing`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from math import prod
from typing import NamedTuple

import numpy as np

from .confidence import FULL_TRUST, SAME_NAME_IN_TIE, SAME_NAME_MARGIN, Trust, confidence
from .cost import CostMatrices, CostWeights, compute_costs, shape_distance
from .features import UnitFeatures, is_matrix
from .graph import Unit
from .ops import OpKind
from .pairing import MatchMode, TensorPair, pair_tensors
from .solve import Assignment, solve_assignment, solve_sparse_assignment

__all__ = ["Forbidden", "UnitMatch", "match_adapted", "match_near_misses", "match_pinned",
           "match_units"]

Forbidden = frozenset[tuple[str, str]]  # (source unit key, destination unit key) pairs

SPARSE_ABOVE = 250_000  # a class with more candidate pairs than this is solved sparse,
SPARSE_WINDOW = 16  # over the pairs within this many units of each other's aligned position


class UnitMatch(NamedTuple):
    """One solved pair of units (or of a unit and a fused group) and the cost terms behind it."""

    src: tuple[UnitFeatures, ...]  # the source unit, or the members of a source group
    dst: tuple[UnitFeatures, ...]  # the destination unit, or the members of a destination group
    terms: dict[str, float]  # cost terms (type, position, context, name, ...) and the regret
    confidence: float  # in [0, 1], before the tensor-pairing factor
    pairs: tuple[TensorPair, ...]  # the tensors, paired
    src_label: str = ""  # what the plan calls the source side when it is no one unit or small
    dst_label: str = ""  # group ("layers.0.experts" for a family of experts); "" = its units


# ------------------------------------------------------------------------------------ stages


def match_units(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures], weights: CostWeights,
                forbidden: Forbidden = frozenset(), *, trust: Trust = FULL_TRUST) -> list[UnitMatch]:
    """Stage 1: units with equal sorted canonical shapes, one assignment per shape class.

    ``forbidden`` holds (source unit, destination unit) pairs that must not be matched (in every
    stage). ``trust`` says what the graphs' order is worth (`archalign.confidence.trust_in`).
    """
    return _by_class(src, dst, weights, trust, key=lambda u: u.shape_key, mode=MatchMode.EXACT,
                     forbidden=forbidden)


def match_adapted(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures], weights: CostWeights,
                  forbidden: Forbidden = frozenset(), *, trust: Trust = FULL_TRUST
                  ) -> list[UnitMatch]:
    """Stage 2: leftovers that fit after a reshape or a transpose, per element-count class."""
    return _by_class(src, dst, weights, trust, mode=MatchMode.ADAPT, forbidden=forbidden,
                     key=lambda u: tuple(sorted(prod(s) for s in u.shapes)))


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
        pairs = (pair_tensors(s.unit, d.unit, MatchMode.EXACT)
                 or pair_tensors(s.unit, d.unit, MatchMode.ADAPT))
        terms = {"pinned": 1.0, "regret": 0.0}
        if pairs is not None:
            loadable.append(UnitMatch(src=(s,), dst=(d,), terms=terms, confidence=1.0,
                                      pairs=tuple(pairs)))
        else:
            misfits.append(UnitMatch(src=(s,), dst=(d,), terms=terms, confidence=1.0,
                                     pairs=tuple(pair_tensors(s.unit, d.unit, MatchMode.NEAR) or ())))
    return loadable, misfits


def match_near_misses(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures],
                      weights: CostWeights, forbidden: Forbidden = frozenset(), *,
                      trust: Trust = FULL_TRUST) -> list[UnitMatch]:
    """Stage 4: leftovers of the same family and tensor layout whose shapes differ.

    Only pairs cheaper than leaving both unmatched are returned; they explain what a destination
    layer would have taken, and why it did not.
    """
    if not src or not dst:
        return []
    costs = compute_costs(src, dst, weights, trust=trust)
    # INCOMPATIBLE (> 1) where the tensor counts or ranks differ
    distance = np.array([[shape_distance(s.unit.canonical_shapes, d.unit.canonical_shapes)
                          for d in dst] for s in src])
    shape = weights.shape * distance
    allowed = np.array([[_same_kind(s, d) for d in dst] for s in src]) & (distance <= 1.0)
    total = _forbid(np.where(allowed, costs.total() + shape, np.inf), src, dst, forbidden)
    return _collect(src, dst, costs, total, weights, trust, mode=MatchMode.NEAR,
                    extra=("shape", shape))


# ------------------------------------------------------------------------------------ helpers


def _same_kind(s: UnitFeatures, d: UnitFeatures) -> bool:
    """Whether a near miss may pair ``s`` and ``d``: one family, or, when a side's family is a
    guess (a checkpoint), one matrix either way (a lone 2-d weight reads as a linear layer, and
    may be an embedding: GPT-2's ``wpe`` against OPT's ``embed_positions``)."""
    if s.family == d.family:
        return True
    guessed = not (s.known_type and d.known_type)
    return guessed and is_matrix((s.family, s.unit.shape_key)) and is_matrix(
        (d.family, d.unit.shape_key))



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
              trust: Trust, key: Callable[[Unit], Hashable], mode: MatchMode,
              forbidden: Forbidden) -> list[UnitMatch]:
    classes: dict[Hashable, tuple[list[UnitFeatures], list[UnitFeatures]]] = defaultdict(
        lambda: ([], []))
    for s in src:
        classes[key(s.unit)][0].append(s)
    for d in dst:
        classes[key(d.unit)][1].append(d)
    found: list[UnitMatch] = []
    for rows, cols in classes.values():
        if not (rows and cols):
            continue
        if len(rows) * len(cols) > SPARSE_ABOVE:
            found.extend(_solve_class_sparse(rows, cols, weights, trust, mode, forbidden))
            continue
        costs = compute_costs(rows, cols, weights, trust=trust)
        if mode is MatchMode.EXACT:
            total = _forbid(costs.total(), rows, cols, forbidden)
            found.extend(_collect(rows, cols, costs, total, weights, trust, mode=mode))
            continue
        adapt = np.array([[_adaptation_cost(s.unit, d.unit, mode, weights) for d in cols]
                          for s in rows])
        total = _forbid(costs.total() + adapt, rows, cols, forbidden)
        found.extend(_collect(rows, cols, costs, total, weights, trust, mode=mode,
                              extra=("adapt", np.where(np.isfinite(adapt), adapt, 0.0))))
    found.sort(key=lambda m: m.dst[0].rank)
    return found


def _adaptation_cost(src: Unit, dst: Unit, mode: MatchMode, weights: CostWeights) -> float:
    """What adapting ``src``'s tensors to ``dst``'s costs: inf when they do not pair,
    ``weights.singleton`` when every adaptation only adds or drops axes of size 1, else
    ``weights.adapt``."""
    pairs = pair_tensors(src, dst, mode)
    if pairs is None:
        return np.inf
    shapes = dict(zip(src.tensors, src.shapes)) | dict(zip(dst.tensors, dst.shapes))
    singleton = all(
        all(op.kind is OpKind.RESHAPE for op in p.ops)
        and [d for d in shapes[p.src[0]] if d != 1] == [d for d in shapes[p.dst[0]] if d != 1]
        for p in pairs if p.ops)
    return weights.singleton if singleton else weights.adapt


def _solve_class_sparse(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures],
                        weights: CostWeights, trust: Trust, mode: MatchMode,
                        forbidden: Forbidden) -> list[UnitMatch]:
    """One large class (thousands of experts' projections), solved over candidate pairs only:
    the `SPARSE_WINDOW` units on either side of each unit's position, from both sides, plus pairs
    with the very same key. A pair outside every window is far apart in the aligned order and
    costs at least the position term of the window's edge; regrets are capped by that bound."""
    rows, cols, beyond = _candidate_pairs(src, dst, weights.position * trust.order_weight)
    if forbidden:
        src_keys = [f.unit.key for f in src]
        dst_keys = [f.unit.key for f in dst]
        keep = np.array([(src_keys[i], dst_keys[j]) not in forbidden for i, j in zip(rows, cols)],
                        dtype=bool)
        rows, cols = rows[keep], cols[keep]
    costs = compute_costs(src, dst, weights, pairs=(rows, cols), trust=trust)
    total = costs.total()
    extra: tuple[str, np.ndarray] | None = None
    if mode is not MatchMode.EXACT:
        price = np.array([_adaptation_cost(src[i].unit, dst[j].unit, mode, weights)
                          for i, j in zip(rows, cols)], dtype=float)
        fits = np.isfinite(price)
        rows, cols = rows[fits], cols[fits]
        costs = CostMatrices(*(term[fits] for term in costs))
        extra = ("adapt", price[fits])
        total = costs.total() + extra[1]
    solved = solve_sparse_assignment(rows, cols, total, (len(src), len(dst)), weights.unmatched,
                                     beyond=beyond)
    assert solved.edges is not None  # a sparse solve says where its pairs sit
    return _matches(src, dst, costs, solved, [int(e) for e in solved.edges], weights, trust, mode,
                    extra)


def _candidate_pairs(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures],
                     position_weight: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate (row, column) pairs of a sparse class, sorted, and per row the lowest cost any
    other pair can have (its position term, ``position_weight * log1p(distance)``, at the
    nearest column outside the row's window)."""
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
            beyond = position_weight * np.log1p(np.minimum(below, above))
    by_key = {f.unit.key: j for j, f in enumerate(dst)}
    same = [(i, by_key[f.unit.key]) for i, f in enumerate(src) if f.unit.key in by_key]
    if same:
        found_rows.append(np.array([i for i, _ in same]))
        found_cols.append(np.array([j for _, j in same]))
    code = np.unique(np.concatenate(found_rows) * len(dst) + np.concatenate(found_cols))
    return code // len(dst), code % len(dst), beyond


def _collect(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures], costs: CostMatrices,
             total: np.ndarray, weights: CostWeights, trust: Trust, mode: MatchMode,
             extra: tuple[str, np.ndarray] | None = None) -> list[UnitMatch]:
    solved = solve_assignment(total, weights.unmatched)
    at: list[int | tuple[int, int]] = [(int(i), int(j)) for i, j in zip(solved.rows, solved.cols)]
    return _matches(src, dst, costs, solved, at, weights, trust, mode, extra)


def _matches(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures], costs: CostMatrices,
             solved: Assignment, at: Sequence[int | tuple[int, int]], weights: CostWeights,
             trust: Trust, mode: MatchMode, extra: tuple[str, np.ndarray] | None
             ) -> list[UnitMatch]:
    """The `UnitMatch` of each solved pair; ``at`` indexes the pair in the cost arrays (``(i, j)``
    in a dense matrix, a candidate's position in a sparse problem's arrays)."""
    structural = costs.structural(trust.order_in_fit) + (
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
        spread = src[i].spread if rivals and trust.order_in_fit else 0.0
        ambiguity = float(np.exp(-spread))
        margin = float(regret)
        if spread:
            terms["spread"] = float(spread)
            if src[i].unit.key == dst[j].unit.key:
                # structure cannot tell, the very same name can: moderate, never certain
                ambiguity = max(ambiguity, SAME_NAME_IN_TIE)
                margin += SAME_NAME_MARGIN
                terms["same_name"] = 1.0
        order_trust = trust.order_trust if rivals else 1.0
        out.append(UnitMatch(src=(src[i],), dst=(dst[j],), terms=terms,
                             confidence=confidence(float(structural[k]), margin)
                             * ambiguity * order_trust,
                             pairs=tuple(pairs)))
    return out
