"""Matching stages: exact unit matching per signature class, tensors inside units, near misses.

Units can only be matched exactly when their sorted shapes agree, so the problem splits into one
independent assignment per shape class (a forbidden pair never crosses classes). What is left over
afterwards is searched once more for *near misses*: same kind of layer, same place, other shape.
Those are reported, never loaded by default.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from .cost import CostMatrices, CostWeights, compute_costs, shape_distance
from .features import UnitFeatures
from .graph import Unit
from .solve import solve_assignment

__all__ = ["REGRET_SCALE", "TensorPair", "UnitMatch", "confidence", "match_near_misses",
           "match_units", "pair_tensors"]

REGRET_SCALE = 0.25  # a regret of this size leaves ~63% of the margin factor; 4x that, ~98%
AMBIGUOUS_INSIDE = 0.5  # confidence factor when tensors of equal shape inside a unit are paired by order


class UnitMatch(NamedTuple):
    """One solved pair of units with the cost terms behind it."""

    src: UnitFeatures  # the source unit
    dst: UnitFeatures  # the destination unit
    terms: dict[str, float]  # cost terms (type, position, context, name) and the regret
    confidence: float  # in [0, 1], before the tensor-pairing factor


class TensorPair(NamedTuple):
    """One tensor of a source unit paired with one of a destination unit."""

    src: str  # source state_dict key
    dst: str  # destination state_dict key
    by_name: bool  # False when equal shapes had to be paired by registration order


def confidence(structural: float, regret: float) -> float:
    """Confidence of a match from its structural cost and its margin to the runner-up.

    ``exp(-structural)`` falls as the pair fits worse; ``1 - exp(-regret / REGRET_SCALE)`` falls to
    0 as the best alternative comes as cheap as the pair itself (a tie).
    """
    fit = float(np.exp(-max(structural, 0.0)))
    margin = float(1.0 - np.exp(-max(regret, 0.0) / REGRET_SCALE))
    return fit * margin


def match_units(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures],
                weights: CostWeights) -> list[UnitMatch]:
    """Match units with equal sorted shapes, one assignment per shape class.

    Returns
    -------
    list of UnitMatch
        In destination execution order.
    """
    classes: dict[tuple, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for i, s in enumerate(src):
        classes[s.unit.shape_key][0].append(i)
    for j, d in enumerate(dst):
        classes[d.unit.shape_key][1].append(j)
    found: list[UnitMatch] = []
    for rows, cols in classes.values():
        if rows and cols:
            found.extend(_solve_class([src[i] for i in rows], [dst[j] for j in cols], weights))
    found.sort(key=lambda m: m.dst.rank)
    return found


def match_near_misses(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures],
                      weights: CostWeights) -> list[UnitMatch]:
    """Pair leftover units of the same family and tensor layout whose shapes differ.

    Only pairs cheaper than leaving both unmatched are returned; they explain what a destination
    layer would have taken, and why it did not.
    """
    if not src or not dst:
        return []
    costs = compute_costs(src, dst, weights)
    shape = np.array([[weights.shape * shape_distance(s.unit.shapes, d.unit.shapes) for d in dst]
                      for s in src])
    allowed = np.array([[s.family == d.family and len(s.unit.shapes) == len(d.unit.shapes)
                         and shape_distance(s.unit.shapes, d.unit.shapes) < 1.0 for d in dst]
                        for s in src])
    total = np.where(allowed, costs.total() + shape, np.inf)
    return _collect(src, dst, costs, total, weights, extra=shape)


def _solve_class(src: list[UnitFeatures], dst: list[UnitFeatures],
                 weights: CostWeights) -> list[UnitMatch]:
    costs = compute_costs(src, dst, weights)
    return _collect(src, dst, costs, costs.total(), weights)


def _collect(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures], costs: CostMatrices,
             total: np.ndarray, weights: CostWeights,
             extra: np.ndarray | None = None) -> list[UnitMatch]:
    solved = solve_assignment(total, weights.unmatched)
    structural = costs.structural() if extra is None else costs.structural() + extra
    out = []
    for i, j, regret in zip(solved.rows, solved.cols, solved.regret):
        terms = {"type": float(costs.type[i, j]), "position": float(costs.position[i, j]),
                 "context": float(costs.context[i, j]), "name": float(costs.name[i, j])}
        if extra is not None:
            terms["shape"] = float(extra[i, j])
        terms["regret"] = float(regret)
        out.append(UnitMatch(src=src[i], dst=dst[j], terms=terms,
                             confidence=confidence(float(structural[i, j]), float(regret))))
    return out


_SYNONYMS = {"gamma": "weight", "beta": "bias", "scale": "weight", "g": "weight", "b": "bias",
             "moving_mean": "running_mean", "moving_variance": "running_var",
             "moving_var": "running_var"}


def pair_tensors(src: Unit, dst: Unit, *, same_shape: bool = True) -> list[TensorPair]:
    """Pair the tensors of two matched units: shapes must agree, names decide among equal shapes.

    With ``same_shape=False`` (near misses), tensors of equal rank may pair too, by name first.
    Pairs follow the destination's tensor order; a tensor without a partner is not paired.
    """
    src_names = [_canonical(n) for n in src.local_names()]
    dst_names = [_canonical(n) for n in dst.local_names()]
    n, m = len(src.tensors), len(dst.tensors)
    cost = np.full((n, m), 1e6)
    for i in range(n):
        for j in range(m):
            penalty = 0.0
            if src.shapes[i] != dst.shapes[j]:
                if same_shape or len(src.shapes[i]) != len(dst.shapes[j]):
                    continue
                penalty = 0.05
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
        rivals = sum(s == dst.shapes[j] for s in src.shapes)
        by_name = bool(cost[i, j] < 1.0 or rivals == 1)
        pairs.append((j, TensorPair(src=src.tensors[i], dst=dst.tensors[j], by_name=by_name)))
    return [p for _, p in sorted(pairs)]


def _canonical(name: str) -> str:
    name = name.lower()
    return _SYNONYMS.get(name, name)
