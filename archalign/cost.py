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
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .confidence import FULL_TRUST, Trust
from .features import TYPE_ALIASES, UnitFeatures, is_matrix, is_pointwise, is_vector
from .graph import INPUT, OUTPUT, size_order

__all__ = ["COST_TERMS", "INCOMPATIBLE", "RECORDED_COST_TERMS", "CostMatrices", "CostWeights",
           "compute_costs", "shape_distance"]

COST_TERMS = ("type", "position", "context", "name")  # the matrices of `CostMatrices`
# every term that adds to a match's cost as recorded in a plan: the stages add "adapt", "fused"
# and, for near misses, "shape" to the four matrices
RECORDED_COST_TERMS = frozenset({*COST_TERMS, "adapt", "fused", "shape"})


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
    singleton: float = 0.1  # a match whose only adaptation adds or drops axes of size 1 (a 1x1
    # convolution's weight read as a linear layer's; a layer scale (C, 1, 1) as (C,)): the same
    # values in the same order
    fused: float = 0.3  # a fused tensor matched to a group of separate ones (concat / split)
    unmatched: float = 1.25  # cost of leaving one unit unmatched (per side)


class CostMatrices(NamedTuple):
    """One matrix per cost term, rows = source units, columns = destination units (or, for a
    sparse problem, one 1-d array per term, an entry per candidate pair)."""

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
                  weights: CostWeights, pairs: tuple[np.ndarray, np.ndarray] | None = None, *,
                  trust: Trust = FULL_TRUST) -> CostMatrices:
    """Cost of matching source units with destination units (shapes are not checked here).

    Vectorised: each categorical feature (class, family, neighbour signatures, name tokens,
    indices) is turned into ids, the pairwise term is computed once per pair of *distinct* values
    (repeated blocks share them), and gathered for the pairs wanted.

    Parameters
    ----------
    pairs : (ndarray, ndarray), optional
        Row (source) and column (destination) indices of the pairs wanted, two 1-d arrays of one
        length: the matrices are then 1-d, one entry per pair (a sparse problem). By default
        every pair: n x m matrices.
    trust : Trust
        What the order is worth: its ``order_weight`` scales the position and context terms.
    """
    if pairs is None:
        rows: np.ndarray = np.arange(len(src))[:, None]
        cols: np.ndarray = np.arange(len(dst))[None, :]
    else:
        rows, cols = np.asarray(pairs[0], dtype=np.int64), np.asarray(pairs[1], dtype=np.int64)
    src_type = [_canonical_type(s.unit.type_name) for s in src]
    dst_type = [_canonical_type(d.unit.type_name) for d in dst]
    same_type = _equal(src_type, dst_type, rows, cols)
    same_family = _equal([s.family for s in src], [d.family for d in dst], rows, cols)
    # a bare 2-d "weight" read from a file may be an embedding as well as a linear layer, and a
    # lone 2-d parameter either (CLIP's ``proj``, ``positional_embedding``)
    src_2d = np.array([_matrix_like(s) for s in src], dtype=bool)
    dst_2d = np.array([_matrix_like(d) for d in dst], dtype=bool)
    # a lone vector may be the bias of a layer whose weight is tied elsewhere
    src_1d = np.array([is_vector(s.signature) for s in src], dtype=bool)
    dst_1d = np.array([is_vector(d.signature) for d in dst], dtype=bool)
    known = (np.array([s.known_type for s in src], dtype=bool)[rows]
             & np.array([d.known_type for d in dst], dtype=bool)[cols])
    # a lone matrix's or vector's class ("Parameter") says nothing of what it does: guessed, as
    # unknown
    src_param = np.array([s.family == "param" for s in src], dtype=bool)
    dst_param = np.array([d.family == "param" for d in dst], dtype=bool)
    lone = (((src_2d[rows] & dst_2d[cols]) | (src_1d[rows] & dst_1d[cols]))
            & (src_param[rows] | dst_param[cols]))
    guessable = same_family | (src_2d[rows] & dst_2d[cols]) | lone
    # a linear layer and a 1x1 convolution compute one map
    src_lin = np.array([s.family == "linear" for s in src], dtype=bool)
    dst_lin = np.array([d.family == "linear" for d in dst], dtype=bool)
    src_pw = np.array([_pointwise(s) for s in src], dtype=bool)
    dst_pw = np.array([_pointwise(d) for d in dst], dtype=bool)
    pointwise = (src_lin[rows] & dst_pw[cols]) | (src_pw[rows] & dst_lin[cols])
    same_family = same_family | pointwise
    guessable = guessable | pointwise
    type_cost = np.where(
        known,
        np.where(same_type, 0.0, np.where(same_family, weights.same_family, np.where(
            lone, weights.unknown_type, weights.other_family))),
        np.where(guessable, weights.unknown_type, weights.other_family))

    preds = _pairwise([s.preds for s in src], [d.preds for d in dst], _overlap, rows, cols)
    succs = _pairwise([s.succs for s in src], [d.succs for d in dst], _overlap, rows, cols)
    context = weights.context * trust.order_weight * (1.0 - 0.5 * (preds + succs))
    # the model's first and last layers are special: reading the input is a strong cue
    src_in = np.array([INPUT in s.preds for s in src], dtype=bool)
    dst_in = np.array([INPUT in d.preds for d in dst], dtype=bool)
    src_out = np.array([OUTPUT in s.succs for s in src], dtype=bool)
    dst_out = np.array([OUTPUT in d.succs for d in dst], dtype=bool)
    context = context + weights.boundary * (
        (src_in[rows] != dst_in[cols]).astype(float)
        + (src_out[rows] != dst_out[cols]).astype(float))

    tokens = _pairwise([s.tokens for s in src], [d.tokens for d in dst], _jaccard, rows, cols)
    indices = _equal([s.indices for s in src], [d.indices for d in dst], rows, cols)
    name = weights.name * (1.0 - 0.5 * tokens - 0.5 * indices)

    src_pos = np.array([s.position for s in src], dtype=float)
    dst_pos = np.array([d.position for d in dst], dtype=float)
    position = weights.position * trust.order_weight * np.log1p(np.abs(src_pos[rows] - dst_pos[cols]))
    return CostMatrices(type=type_cost, position=position, context=context, name=name)


_TWO_D = frozenset({"linear", "embedding"})


def _pointwise(f: UnitFeatures) -> bool:
    return is_pointwise((f.family, f.unit.shape_key))


def _matrix_like(f: UnitFeatures) -> bool:
    return is_matrix((f.family, f.unit.shape_key))


def _ids(values: Sequence[Hashable], table: dict[Hashable, int]) -> np.ndarray:
    return np.array([table.setdefault(v, len(table)) for v in values], dtype=np.int64)


def _equal(a: Sequence[Hashable], b: Sequence[Hashable], rows: np.ndarray, cols: np.ndarray
           ) -> np.ndarray:
    """``out = a[rows] == b[cols]`` through ids (rows and cols broadcast against each other)."""
    table: dict[Hashable, int] = {}
    return _ids(a, table)[rows] == _ids(b, table)[cols]


def _pairwise(a: Sequence[Any], b: Sequence[Any], fn: Callable[[Any, Any], float],
              rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``out = fn(a[rows], b[cols])``, evaluated once per pair of distinct values."""
    a_table: dict[Hashable, int] = {}
    b_table: dict[Hashable, int] = {}
    a_ids, b_ids = _ids(a, a_table), _ids(b, b_table)
    a_values, b_values = list(a_table), list(b_table)
    small = np.array([[fn(x, y) for y in b_values] for x in a_values], dtype=float)
    small = small.reshape(len(a_values), len(b_values))
    return small[a_ids[rows], b_ids[cols]]


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
    pairs = list(zip(sorted(a, key=size_order), sorted(b, key=size_order)))
    if any(len(sa) != len(sb) for sa, sb in pairs):
        return INCOMPATIBLE
    sa, sb = pairs[0]
    if not sa:
        return 0.0
    return sum(x != y for x, y in zip(sa, sb)) / len(sa)


INCOMPATIBLE = 2.0  # shape_distance of units whose tensors cannot correspond at all


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    """How far two neighbour sets agree: an equal signature counts 1, one of the same family with
    other shapes `NEAR_NEIGHBOUR` (a position table two rows longer; a fused qkv against q)."""
    if not a and not b:
        return 1.0
    equal = Counter(a) & Counter(b)
    rest_a, rest_b = Counter(a) - equal, Counter(b) - equal
    near = (Counter(t.partition("[")[0] for t in rest_a.elements())
            & Counter(t.partition("[")[0] for t in rest_b.elements()))
    return (sum(equal.values()) + NEAR_NEIGHBOUR * sum(near.values())) / max(len(a), len(b))


NEAR_NEIGHBOUR = 0.5  # context credit of a neighbour of the same family with other shapes


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)
