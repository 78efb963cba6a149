"""Fused matching (stage 3): a unit whose tensors are the axis-0 concatenation of a run opposite.

``qkv_proj`` against ``q_proj``/``k_proj``/``v_proj`` (a concat into the destination), or the
reverse (a split). Candidates come from runs of 2-4 consecutive units of one family with the same
tensor names; a candidate is adopted where it explains its units at a lower total cost than the
one-to-one matches it breaks, the best adoption first.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np

from .confidence import FULL_TRUST, ORDER_ONLY_GROUP, Trust, confidence
from .cost import RECORDED_COST_TERMS, CostWeights
from .features import UnitFeatures
from .graph import Unit
from .match import Forbidden, UnitMatch
from .pairing import TensorPair, canonical_name, fused_pairs

__all__ = ["FUSED_NEIGHBOURS", "match_fused"]

FUSED_NEIGHBOURS = 3  # candidate groups per fused unit: the nearest ones in the aligned order


def match_fused(src: Sequence[UnitFeatures], dst: Sequence[UnitFeatures], weights: CostWeights,
                existing: Sequence[UnitMatch], forbidden: Forbidden = frozenset(), *,
                trust: Trust = FULL_TRUST) -> tuple[list[UnitMatch], list[UnitMatch]]:
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
    position_weight = weights.position * trust.order_weight
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
                # the single unit sits where its first part does (`features._align_rest`)
                offset = _offset(single, group, gaps_first=False)
                position = position_weight * np.log1p(offset)
                structural = position + weights.fused
                name = weights.name * (0.0 if single.tokens & group[0].tokens else 1.0)
                src_side, dst_side = ((tuple(group), (single,)) if fused_is_dst
                                      else ((single,), tuple(group)))
                candidates.append(_Candidate(
                    total=structural + name, structural=structural, src=src_side, dst=dst_side,
                    fused_is_dst=fused_is_dst,
                    spread=abs(_offset(single, group, gaps_first=True) - offset),
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
        single, group = (best.dst[0], best.src) if best.fused_is_dst else (best.src[0], best.dst)
        alike = len(set(shapes)) < len(shapes)
        factor = ORDER_ONLY_GROUP if alike and not _named_in_order(single.unit, group) else 1.0
        # an uncertain position matters only against a rival candidate (as in `match`)
        spread = best.spread if rivals and trust.order_in_fit else 0.0
        fused.append(UnitMatch(
            src=best.src, dst=best.dst, terms={**best.terms, "regret": float(regret)},
            confidence=confidence(best.structural, regret) * factor * float(np.exp(-spread)),
            pairs=best.pairs))
    return list(kept.matches.values()), fused


def _offset(single: UnitFeatures, group: Sequence[UnitFeatures], *, gaps_first: bool) -> float:
    """How far the single unit sits from the nearest part of the group, in destination ranks,
    with the source positions of the alignment whose gaps go last or first
    (`archalign.features.UnitFeatures.shift`): a group whose members trade places with a gap
    (q or kv opposite a fused in_proj) keeps its offset, whichever member the gap is."""
    def at(f: UnitFeatures) -> float:
        return f.position + f.shift if gaps_first else f.position

    return min(abs(at(single) - at(p)) for p in group)


def _named_in_order(single: Unit, group: Sequence[UnitFeatures]) -> bool:
    """Whether the fused unit's name spells its parts in their order: ``qkv`` for ``q_proj``,
    ``k_proj``, ``v_proj`` (or ``query``, ``key``, ``value`` by initials), ``gate_up_proj`` for
    ``gate_proj``, ``up_proj``; then the names, not execution alone, order equal-shaped parts."""
    words = [set(_WORD.findall(f.unit.key.rsplit(".", 1)[-1].lower())) for f in group]
    shared = set.intersection(*words)
    own = [sorted(w - shared) for w in words]
    if any(len(w) != 1 for w in own):
        return False
    stem = os.path.commonprefix([w[0] for w in own])  # noqa: RUF071 (by characters: "w" of wq, wk)
    letters = [w[0][len(stem):] or w[0] for w in own]
    fused = single.key.rsplit(".", 1)[-1].lower().replace("_", "")
    spelled = ["".join(letters), "".join(w[0] for w in letters)]
    return any(s in fused for s in spelled)


_WORD = re.compile(r"[a-z]+|[0-9]+")


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
    spread: float  # how far its offset moves when the alignment's gaps go first, not last
    terms: dict[str, float] = field(hash=False)  # cost terms, for the plan

    @cached_property
    def units(self) -> frozenset[tuple[str, str]]:
        return frozenset(_units_of(self.src, self.dst))

    @cached_property
    def pairs(self) -> tuple[TensorPair, ...] | None:
        """The tensors, paired; None when they do not pair (computed for the few that get
        near adoption, not for every candidate)."""
        single, group = (self.dst[0], self.src) if self.fused_is_dst else (self.src[0], self.dst)
        pairs = fused_pairs(single.unit, [p.unit for p in group], self.fused_is_dst)
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
        local = [canonical_name(n) for n in local_names]
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



def _candidate_groups(parts: Sequence[UnitFeatures]) -> list[tuple[UnitFeatures, ...]]:
    """Runs of 2-4 units, consecutive in execution order, that could be one fused tensor."""
    ordered = sorted(parts, key=lambda f: f.rank)
    names = [tuple(sorted(canonical_name(n) for n in f.unit.local_names())) for f in ordered]
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
            if not _siblings(group):  # pieces of one tensor read one input (q, k, v; gate, up)
                break
            groups.append(group)
    return groups


def _siblings(group: Sequence[UnitFeatures]) -> bool:
    """Whether the members may be pieces of one fused tensor: children of one module (the
    attention's q, k and v; the MLP's gate and up), and, by what they read, the very same tensor
    (self-attention; gate and up), or, for cross-attention, the first one thing (the query) and
    all others another (key and value). A run whose last member reads what the others produced
    (an output projection after q, k and v) is no fused tensor. Where the reads are not known
    (a checkpoint), the members must follow one another with nothing between them: a layer
    between two (a ResNet block's ``conv1``, ``bn1``, ``conv2``) runs on the first one's
    output. Two members with known reads always may."""
    if len({f.unit.key.rpartition(".")[0] for f in group}) > 1:
        return False
    reads = [f.reads for f in group]
    if None in reads:
        return group[-1].rank - group[0].rank == len(group) - 1
    return len(group) < 3 or len(set(reads)) == 1 or len(set(reads[1:])) == 1
