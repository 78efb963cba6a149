"""Per-unit features: layer family, execution position (warped onto the other model), context, names.

Positions are compared after *warping*: units whose signature occurs exactly once in each model are
certain anchors, and the ranks between two anchors are mapped piecewise linearly from one model onto
the other. A deeper model's extra blocks then spread over the shallower model's instead of shifting
every later layer.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .graph import INPUT, OUTPUT, Unit, UnitGraph

__all__ = ["UnitFeatures", "extract_features", "layer_family"]

Signature = tuple[str, tuple[tuple[int, ...], ...]]


@dataclass(frozen=True)
class UnitFeatures:
    """What the cost model sees of one unit."""

    unit: Unit  # the unit itself (key, tensors, shapes, type name)
    family: str  # coarse layer kind shared across implementations: "linear", "conv", "norm", ...
    known_type: bool  # False when the module class is unknown (a state_dict) and `family` a guess
    rank: int  # position in execution order, 0-based
    position: float  # rank in the *destination's* rank space (warped for source units)
    preds: tuple[str, ...]  # signatures of the nearest producers (sorted; sentinels by name)
    succs: tuple[str, ...]  # signatures of the nearest consumers (sorted; sentinels by name)
    tokens: frozenset[str]  # lower-case name tokens without indices ("blocks.0.qkv" -> blocks, qkv)

    @property
    def signature(self) -> Signature:
        return (self.family, self.unit.shape_key)


# classes that are another class under a different name (subclasses with no new behaviour)
TYPE_ALIASES = {"NonDynamicallyQuantizableLinear": "Linear", "LazyLinear": "Linear"}

_LINEAR_TYPES = frozenset({"Linear", "NonDynamicallyQuantizableLinear", "Conv1D", "LazyLinear",
                           "MultiheadAttention"})


def layer_family(type_name: str) -> str:
    """Map a module class name onto a family that different implementations share.

    >>> layer_family("Conv1D"), layer_family("Conv2d"), layer_family("LlamaRMSNorm")
    ('linear', 'conv', 'norm')
    """
    if type_name in _LINEAR_TYPES or type_name.endswith("Linear"):
        return "linear"
    if type_name == "Parameter":
        return "param"
    if type_name == "":
        return "unknown"
    if "Norm" in type_name:
        return "norm"
    if "Conv" in type_name:
        return "conv"
    if "Embedding" in type_name:
        return "embedding"
    return type_name


def extract_features(
    src: UnitGraph, dst: UnitGraph
) -> tuple[list[UnitFeatures], list[UnitFeatures]]:
    """Compute features of both models' units, source positions warped onto the destination.

    Returns
    -------
    (list of UnitFeatures, list of UnitFeatures)
        Source and destination features, each in execution order.
    """
    src_units, dst_units = list(src.units.values()), list(dst.units.values())
    src_sig = {u.key: _signature(u) for u in src_units}
    dst_sig = {u.key: _signature(u) for u in dst_units}
    warp = _warp(src_units, dst_units, src_sig, dst_sig)
    return (
        [_features(u, i, warp(i), src, src_sig) for i, u in enumerate(src_units)],
        [_features(u, i, float(i), dst, dst_sig) for i, u in enumerate(dst_units)],
    )


def _signature(unit: Unit) -> Signature:
    family = layer_family(unit.type_name)
    if family == "unknown":
        family = infer_family(unit)
    return (family, unit.shape_key)


def infer_family(unit: Unit) -> str:
    """Guess the family of a unit read from a bare state_dict, from its tensors' names and ranks."""
    names = unit.local_names()
    if any(n in ("running_mean", "running_var") for n in names):
        return "norm"
    weight = next((s for n, s in zip(names, unit.shapes) if n.endswith("weight")), None)
    if weight is None:
        return "param"
    if len(weight) >= 3:
        return "conv"
    if len(weight) == 2:
        return "linear"
    return "norm"


def _sig_text(sig: Signature) -> str:
    return f"{sig[0]}{list(sig[1])}"


def _features(unit: Unit, rank: int, position: float, graph: UnitGraph,
              sigs: dict[str, Signature]) -> UnitFeatures:
    def describe(keys: Sequence[str]) -> tuple[str, ...]:
        return tuple(sorted(k if k in (INPUT, OUTPUT) else _sig_text(sigs[k]) for k in keys))

    return UnitFeatures(
        unit=unit,
        family=sigs[unit.key][0],
        known_type=bool(unit.type_name),
        rank=rank,
        position=position,
        preds=describe(graph.predecessors(unit.key)),
        succs=describe(graph.successors(unit.key)),
        tokens=name_tokens(unit.key),
    )


_TOKEN_SPLIT = re.compile(r"[._\-/]+|(?<=[a-z])(?=[A-Z])")


def name_tokens(key: str) -> frozenset[str]:
    """Lower-case name tokens with the numbers dropped: ``layers.0.ln_1`` -> {layers, ln}."""
    return frozenset(
        t.lower().rstrip("0123456789") for t in _TOKEN_SPLIT.split(key)
        if t and not t.isdigit() and t.lower().rstrip("0123456789")
    )


def _warp(src_units: list[Unit], dst_units: list[Unit], src_sig: dict[str, Signature],
          dst_sig: dict[str, Signature]) -> Callable[[int], float]:
    """A monotone piecewise-linear map from source ranks to destination ranks, through anchors."""
    src_count = Counter(src_sig.values())
    dst_count = Counter(dst_sig.values())
    dst_rank = {dst_sig[u.key]: i for i, u in enumerate(dst_units) if dst_count[dst_sig[u.key]] == 1}
    pairs = [(i, dst_rank[src_sig[u.key]]) for i, u in enumerate(src_units)
             if src_count[src_sig[u.key]] == 1 and src_sig[u.key] in dst_rank]
    anchors = _longest_increasing(pairs)
    xs = np.array([-1.0, *(a for a, _ in anchors), float(len(src_units))])
    ys = np.array([-1.0, *(b for _, b in anchors), float(len(dst_units))])

    def warp(rank: int) -> float:
        return float(np.interp(rank, xs, ys))

    return warp


def _longest_increasing(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The longest subsequence of ``pairs`` (sorted by first item) whose second items increase."""
    tails: list[int] = []  # tails[k]: smallest second item ending an increasing run of length k+1
    tail_index: list[int] = []
    parent: list[int] = [-1] * len(pairs)
    for i, (_, b) in enumerate(pairs):
        k = bisect_left(tails, b)
        if k == len(tails):
            tails.append(b)
            tail_index.append(i)
        else:
            tails[k] = b
            tail_index[k] = i
        parent[i] = tail_index[k - 1] if k else -1
    out: list[tuple[int, int]] = []
    i = tail_index[-1] if tail_index else -1
    while i >= 0:
        out.append(pairs[i])
        i = parent[i]
    return out[::-1]
