"""The order fit's alignment: a checkpoint's unit sequence against a window of the destination.

A semi-global alignment of signatures (`archalign.features.Signature`), row by row with numpy, with
the moves a checkpoint needs besides equal units and skips: a unit of the same family with other
shapes, a transposed or singleton-axis twin, a fused unit against the 2 or 3 units it holds stacked
(either side), and a penalty for pairing a unit inside a numbered block with one outside any.
`archalign.skeleton` scores every candidate order of a module's children with it.

Planning only: pure functions of signatures, no tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .features import GAP, Signature, align_sequences, is_matrix, is_pointwise, is_vector, unit_signature
from .graph import Unit, size_order

__all__ = ["FUSED", "FUSED_COUNTS", "OUTSIDE_BLOCK", "Costs", "Item", "extend_rows", "first_row",
           "in_repeat", "item_of", "sequence_cost", "stacks", "window_of"]

OUTSIDE_BLOCK = 0.5 * GAP  # aligning a unit inside a numbered block with one outside any
FUSED = 0.25 * GAP  # aligning one unit with 2 or 3 identical units it holds stacked
FUSED_COUNTS = (2, 3)  # how many stacked units a fused one may hold (gate+up; q+k+v)


class Item(NamedTuple):
    """One unit as the order fit compares it."""

    signature: Signature  # family and shapes
    in_repeat: bool  # inside a numbered block (a ``ModuleList`` entry) of its model
    read: int | None = None  # destination only: an id of the tensor its layer read first (q, k
    # and v read one); None when unknown


def window_of(sequence: list[Unit], lo: int, hi: int, target: list[Item]) -> list[Item]:
    """The part of the destination that ``sequence[lo:hi]`` falls in, by a global alignment of
    the whole sequence: from the unit after the last one aligned before ``lo`` to the unit
    before the first one aligned from ``hi`` on."""
    pairs = align_sequences([unit_signature(u) for u in sequence], [t.signature for t in target])
    before = [j for i, j in pairs if i < lo]
    after = [j for i, j in pairs if i >= hi]
    return target[(before[-1] + 1 if before else 0):(after[0] if after else len(target))]


class Costs:
    """The alignment's move costs against one destination window, cached per source item."""

    def __init__(self, window: list[Item]) -> None:
        self.window = window
        self._sub: dict[Item, np.ndarray] = {}
        self._fused: dict[tuple[Item, int], np.ndarray] = {}
        self._split: dict[tuple[Item, ...], np.ndarray] = {}

    def substitution(self, item: Item) -> np.ndarray:
        """Per window unit: the cost of aligning ``item`` with it."""
        if item not in self._sub:
            self._sub[item] = np.array([
                _substitution(item.signature, w.signature)
                + OUTSIDE_BLOCK * (item.in_repeat != w.in_repeat) for w in self.window])
        return self._sub[item]

    def fused(self, item: Item, k: int) -> np.ndarray:
        """Per window end j: the cost of aligning ``item`` with ``window[j - k:j]``, k units it
        holds stacked (a fused qkv against q, k and v, equal or not: grouped-query k and v are
        smaller), inf where it does not."""
        key = (item, k)
        if key not in self._fused:
            out = np.full(len(self.window) + 1, np.inf)
            for j in range(k, len(self.window) + 1):
                run = self.window[j - k:j]
                if _siblings(run) and stacks(item.signature, [w.signature for w in run]):
                    out[j] = FUSED + OUTSIDE_BLOCK * (item.in_repeat != run[0].in_repeat)
            self._fused[key] = out
        return self._fused[key]

    def split(self, items: tuple[Item, ...]) -> np.ndarray:
        """Per window unit: the cost of aligning the source units ``items`` (consecutive) with
        it, one unit that holds them stacked; inf where it does not."""
        if items not in self._split:
            self._split[items] = np.array([
                FUSED + OUTSIDE_BLOCK * (items[-1].in_repeat != w.in_repeat)
                if stacks(w.signature, [i.signature for i in items]) else np.inf
                for w in self.window])
        return self._split[items]


def sequence_cost(units: Sequence[Unit], costs: Costs) -> float:
    """The cost of aligning the whole of ``units`` with the whole window."""
    return float(extend_rows(first_row(costs), [item_of(u) for u in units], costs)[-1][-1])


def first_row(costs: Costs) -> list[np.ndarray]:
    """The alignment's first row: window units skipped before anything of the source."""
    return [GAP * np.arange(len(costs.window) + 1)]


def extend_rows(rows: list[np.ndarray], seq: list[Item], costs: Costs) -> list[np.ndarray]:
    """The alignment's rows after ``seq`` more source units (the last row's entry j: the cost of
    aligning everything so far with the window's first j units), from ``rows`` (the last few
    rows so far). Equal signatures cost nothing, a unit of one family and rank
    ``GAP * (1 + d / 2)`` (a transpose ``GAP / 4``), a unit that holds 2 or 3 units of the other
    side stacked (`stacks`) `FUSED`, a skipped unit of either side ``GAP``; a unit inside a
    numbered block against one outside any costs `OUTSIDE_BLOCK` more (the final norm is not a
    block's norm). Row by row with numpy; the last row's last entry is the global cost."""
    m = len(costs.window)
    steps = GAP * np.arange(m + 1)
    rows = list(rows)
    done: list[Item] = []
    for item in seq:
        prev = rows[-1]
        row = np.empty(m + 1)
        row[0] = prev[0] + GAP
        row[1:] = np.minimum(prev[:-1] + costs.substitution(item), prev[1:] + GAP)
        for k in FUSED_COUNTS:
            fused = costs.fused(item, k)  # this unit against the k window units ending at j
            row[k:] = np.minimum(row[k:], prev[:m + 1 - k] + fused[k:])
            if len(done) + 1 >= k and len(rows) >= k:
                row[1:] = np.minimum(row[1:], rows[-k][:-1] + costs.split(
                    (*done[len(done) - k + 1:], item)))
        # skipped window units: row[j] = min over k <= j of row[k] + GAP * (j - k)
        rows.append(np.minimum.accumulate(row - steps) + steps)
        done.append(item)
        rows = rows[-(max(FUSED_COUNTS) + 1):]
    return rows


def _siblings(run: list[Item]) -> bool:
    """Whether destination units may be the parts of one fused unit: they read one tensor (when
    the tracer saw what they read)."""
    reads = {w.read for w in run}
    return None in reads or len(reads) == 1


def stacks(whole: Signature, parts: Sequence[Signature]) -> bool:
    """Whether ``whole``'s main tensor is its ``parts``' stacked along the output axis: one
    family, the same trailing shape, the leading sizes summing up, and equal parts (q, k, v;
    gate, up) or the grouped-query q, k, v (k and v equal, q no smaller; two unequal parts
    could be q + kv as well as kv + an output projection: never guessed); for a 2-d weight
    also along its second axis (a Conv1D weight stored (in, out) read as such). Parts of rank 1
    (norms) never stack."""
    if any(p[0] != whole[0] or not p[1] for p in parts) or not whole[1]:
        return False
    w = min(whole[1], key=size_order)
    mains = [min(p[1], key=size_order) for p in parts]
    if len(w) < 2 or any(len(m) != len(w) for m in mains):
        return False
    lead = [m[0] for m in mains]
    equal = len(set(lead)) == 1
    if not (equal or (len(lead) == 3 and (lead[1] == lead[2] <= lead[0]
                                          or lead[0] == lead[1] <= lead[2]))):
        return False  # unequal: only grouped-query q, k, v (k and v equal, q larger; or reversed)
    rows = sum(lead)
    if w[0] == rows and all(m[1:] == w[1:] for m in mains):
        return True
    return len(w) == 2 and w[1] == rows and all(m[1] == w[0] for m in mains)


def item_of(unit: Unit) -> Item:
    return Item(unit_signature(unit), in_repeat(unit.key))


def in_repeat(key: str) -> bool:
    """Whether a unit lies inside a numbered block (``layers.3.mlp``; not ``norm``, ``conv1``)."""
    return any(part.isdigit() for part in key.split("."))


def _substitution(a: Signature, b: Signature) -> float:
    if a == b:
        return 0.0
    if a[0] != b[0] and not ({a[0], b[0]} <= {"linear", "embedding"} or _matrices(a, b)
                             or _pointwise(a, b)):
        return np.inf
    sa = min(a[1], key=size_order) if a[1] else ()
    sb = min(b[1], key=size_order) if b[1] else ()
    if [d for d in sa if d != 1] == [d for d in sb if d != 1]:
        return GAP * 0.25  # the same values with singleton axes (a layer scale (C, 1, 1) vs (C,))
    if len(sa) != len(sb):
        return np.inf
    if sorted(sa) == sorted(sb):
        return GAP * 0.25  # a transpose (a Conv1D weight read without its module)
    differing = sum(x != y for x, y in zip(sa, sb)) / max(len(sa), 1)
    return GAP * (1.0 + 0.5 * differing)


def _matrices(a: Signature, b: Signature) -> bool:
    """A lone 2-d parameter against a linear layer or an embedding (CLIP's ``proj`` against
    ``visual_projection``): one matrix either way; a lone 1-d parameter against a layer that
    holds only its bias (`archalign.features.is_vector`): one vector."""
    return "param" in (a[0], b[0]) and ((is_matrix(a) and is_matrix(b))
                                        or (is_vector(a) and is_vector(b)))


def _pointwise(a: Signature, b: Signature) -> bool:
    """A linear layer against a convolution whose kernel is all ones (a 1x1 convolution): the
    same map (the original ConvNeXt's ``pwconv1`` against timm's ``mlp.fc1`` with conv_mlp)."""
    return {a[0], b[0]} == {"linear", "conv"} and is_pointwise(a if a[0] == "conv" else b)
