"""The cost model: how unlike two units are, term by term.

Every term is >= 0 and 0 for a perfect fit. Shapes are not a term: units whose shapes differ are
*forbidden* pairs (``inf``) for an exact match, decided before any cost is computed. The terms:

- ``type``: 0 for the same module class, a little for the same family (``Conv1D`` vs ``Linear``),
  more for different families.
- ``position``: ``log1p`` of how many units apart the two are in execution order, after warping.
- ``context``: how much the signatures of the nearest producers and consumers disagree.
- ``name``: token overlap of the two keys and whether their indices agree (``blocks.2`` vs
  ``layers.2``); a tie-breaker only: it enters a confidence only through the margin it opens
  between otherwise tied candidates, at most ``2 * name``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .features import TYPE_ALIASES, UnitFeatures
from .graph import INPUT, OUTPUT

__all__ = ["COST_TERMS", "INCOMPATIBLE", "CostMatrices", "CostWeights", "compute_costs",
           "shape_distance"]

COST_TERMS = ("type", "position", "context", "name")


@dataclass(frozen=True)
class CostWeights:
    """Weights of the cost terms and the price of leaving a unit unmatched."""

    same_family: float = 0.15  # type cost of two classes of one family (Conv1D vs Linear)
    other_family: float = 0.6  # type cost of two different families
    unknown_type: float = 0.05  # type cost when one class is unknown (state_dict) but families agree
    position: float = 0.5  # times log1p(units apart)
    context: float = 0.5  # times the fraction of neighbour signatures that disagree
    boundary: float = 0.25  # context cost when only one of the two reads the input (or feeds the output)
    name: float = 0.2  # times 1 - (Jaccard overlap of name tokens + equal indices) / 2
    shape: float = 0.5  # near misses only: times the fraction of differing dimensions
    adapt: float = 0.3  # a match that needs a reshape, or a transpose only the shapes suggest
    fused: float = 0.3  # a fused tensor matched to a group of separate ones (concat / split)
    unmatched: float = 1.25  # cost of leaving one unit unmatched (per side)
    order_in_fit: bool = True  # position and context count against a match's fit (False when the
    # order is no evidence: a .safetensors file stores its keys sorted)


class CostMatrices(NamedTuple):
    """One matrix per cost term, rows = source units, columns = destination units."""

    type: np.ndarray  # module class / family disagreement
    position: np.ndarray  # warped execution-order distance
    context: np.ndarray  # producer/consumer signature disagreement
    name: np.ndarray  # name-token disagreement (tie-breaker)

    def total(self) -> np.ndarray:
        return self.type + self.position + self.context + self.name

    def structural(self, order: bool = True) -> np.ndarray:
        """The terms a confidence may rest on: everything but names (and, with ``order=False``,
        but position and context, when the order they come from carries no structure)."""
        if not order:
            return self.type.copy()
        return self.type + self.position + self.context


def compute_costs(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures],
                  weights: CostWeights) -> CostMatrices:
    """Cost of matching each source unit with each destination unit (shapes are not checked here)."""
    n, m = len(src), len(dst)
    type_cost = np.empty((n, m))
    context = np.empty((n, m))
    name = np.empty((n, m))
    for i, s in enumerate(src):
        for j, d in enumerate(dst):
            if not (s.known_type and d.known_type):
                type_cost[i, j] = (weights.unknown_type if s.family == d.family
                                   else weights.other_family)
            elif _canonical_type(s.unit.type_name) == _canonical_type(d.unit.type_name):
                type_cost[i, j] = 0.0
            elif s.family == d.family:
                type_cost[i, j] = weights.same_family
            else:
                type_cost[i, j] = weights.other_family
            context[i, j] = weights.context * (
                1.0 - 0.5 * (_overlap(s.preds, d.preds) + _overlap(s.succs, d.succs)))
            # the model's first and last layers are special: reading the input is a strong cue
            context[i, j] += weights.boundary * (
                ((INPUT in s.preds) != (INPUT in d.preds)) + ((OUTPUT in s.succs) != (OUTPUT in d.succs)))
            name[i, j] = weights.name * (
                1.0 - 0.5 * _jaccard(s.tokens, d.tokens) - 0.5 * (s.indices == d.indices))
    src_pos = np.array([s.position for s in src])
    dst_pos = np.array([d.position for d in dst])
    position = weights.position * np.log1p(np.abs(src_pos[:, None] - dst_pos[None, :]))
    return CostMatrices(type=type_cost, position=position, context=context, name=name)


def _canonical_type(name: str) -> str:
    """Class name without a model prefix: ``LlamaRMSNorm`` and ``MistralRMSNorm`` are one layer."""
    name = TYPE_ALIASES.get(name, name)
    words = _CAMEL.findall(name)
    return "".join(words[1:]) if len(words) >= 3 else name


_CAMEL = re.compile(r"[A-Z]+[0-9]*(?![a-z])|[A-Z][a-z0-9]*|[a-z0-9]+")


def shape_distance(a: Sequence[tuple[int, ...]], b: Sequence[tuple[int, ...]]) -> float:
    """Fraction of dimensions that differ between two units' main (largest) tensors, in [0, 1].

    The main tensor decides (a bias follows its weight). Returns ``INCOMPATIBLE`` (> 1) when the
    units have different numbers of tensors or their tensors have different ranks.
    """
    if len(a) != len(b) or not a:
        return INCOMPATIBLE
    pairs = list(zip(sorted(a, key=_size_rank), sorted(b, key=_size_rank)))
    if any(len(sa) != len(sb) for sa, sb in pairs):
        return INCOMPATIBLE
    sa, sb = pairs[0]
    if not sa:
        return 0.0
    return sum(x != y for x, y in zip(sa, sb)) / len(sa)


INCOMPATIBLE = 2.0  # shape_distance of units whose tensors cannot correspond at all


def _size_rank(shape: tuple[int, ...]) -> tuple[int, int]:
    return (-len(shape), -int(np.prod(shape)) if shape else 0)


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    return common / max(len(a), len(b))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)
