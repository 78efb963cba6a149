"""Repairing a plan by its trial: where the destination first stops agreeing, try the few changes
that structure could not rule out, and keep the one that makes it agree further.

A trial (`archalign.trial`) names the first destination layer whose input or output differs from
its counterpart's. What can have caused it lies at that layer or just before it, so the changes
tried are local, each a small edit of the plan:

- another row layout for the layer's tensors: the transpose of a square weight (``(in, out)``
  against ``(out, in)``), a fused projection's rows regrouped ``(k, heads) <-> (heads, k)``, a
  rotary projection's rows on interleaved pairs or on halves (`archalign.ops`), with the head
  counts the models declare;
- another member order for a fused group (``q, k, v`` inside one ``qkv``);
- another source for the layer: one that received the very input the layer receives, or the next
  or previous of its kind (a block's layer scale taken from the block before);
- two layers of one shape just before it trading their sources (``q`` and ``k``, ``gate`` and
  ``up``), free tensors (tokens, position embeddings, layer scales) included.

Each is tried; the first that lets the destination agree further is kept, and the search goes on
from there until the outputs agree or its budget (`SEARCH_TRIALS`, `SEARCH_SECONDS`) is spent.
A search that finds nothing leaves the plan as it was.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from .activations import same
from .graph import Unit
from .ops import Op, OpKind
from .pairing import MatchMode, fused_pairs, pair_tensors
from .plan import Match, Mismatch, Plan
from .trial import Trial, TrialRunner

__all__ = ["SEARCH_SECONDS", "SEARCH_TRIALS", "Context", "repair", "suspected"]

logger = logging.getLogger(__name__)

SEARCH_TRIALS = 300  # trials one search may run, the plan's own included
SEARCH_SECONDS = 30.0  # and the time it may take
WINDOW = 12  # layers before the first disagreement whose sources may trade places
NEIGHBOURS = 3  # sources of one kind on either side of a layer's own, tried in its place
MAX_FREE = 64  # free tensors are suspects wherever they stand, when there are at most this many

_PERMUTING = frozenset({OpKind.REGROUP, OpKind.ROPE, OpKind.UNROPE})


@dataclass(frozen=True)
class Context:
    """What the search knows of the two models besides the plan."""

    src_units: Mapping[str, Unit]  # source unit key -> unit
    dst_units: Mapping[str, Unit]  # destination unit key -> unit
    src_order: Sequence[str]  # source unit keys in execution order
    dst_order: Sequence[str]  # destination unit keys in execution order
    heads: tuple[int, ...]  # head counts the models declare (attention and key/value heads)
    src_shapes: Mapping[str, tuple[int, ...]]  # source tensor key -> shape
    dst_shapes: Mapping[str, tuple[int, ...]]  # destination tensor key -> shape
    frozen: frozenset[str] = frozenset()  # destination units a reviewer pinned or dropped:
    # never changed, never filled
    forbidden: frozenset[tuple[str, str]] = frozenset()  # (source unit, destination unit) pairs
    # a reviewer forbade: never proposed


def repair(plan: Plan, runner: TrialRunner, context: Context) -> tuple[Plan, Trial]:
    """The plan after a local search led by its trials, and the last trial of it.

    Raises
    ------
    Exception
        Whatever the trial of ``plan`` itself raises; alternatives that cannot be loaded or run
        are skipped.
    """
    trial = runner.run(plan)
    started = time.perf_counter()
    learned: list[Plan] = []  # the last repair, carried to every unit of its kind
    while not trial.ok and runner.trials < SEARCH_TRIALS:
        improved = None
        for candidate in itertools.chain(learned, _alternatives(plan, trial, context, runner)):
            if not _allowed(plan, candidate, context):
                continue
            if runner.trials >= SEARCH_TRIALS or time.perf_counter() - started > SEARCH_SECONDS:
                break
            try:
                attempt = runner.run(candidate)
            except Exception as exc:  # a change the destination cannot take
                logger.debug("an alternative could not be tried: %s", exc)
                continue
            if attempt.score > trial.score and (attempt.ok or not _pads(plan, candidate)):
                improved = (candidate, attempt)  # (rows added or cut must reproduce the source:
                break  # otherwise it is a width change, a shape policy's decision, not a repair)
        if improved is None:
            break
        learned = [p for p in [_propagated(plan, improved[0], context)] if p is not None]
        plan, trial = improved
        logger.debug("repair: now agreeing up to layer %d of %d (%d trials)", trial.first_bad,
                     len(trial.order), runner.trials)
    return plan, trial


# --------------------------------------------------------------------------- alternatives


def _pads(before: Plan, after: Plan) -> bool:
    """Whether ``after`` loads a near miss of ``before`` by adding or cutting rows."""
    old = {m.dst for m in before.matches}
    return any(m.dst not in old and any(o.kind in (OpKind.PAD, OpKind.CROP) for o in m.ops)
               for m in after.matches)


def _allowed(before: Plan, after: Plan, context: Context) -> bool:
    """Whether a change keeps the reviewer's hints: pinned and dropped destination units as they
    were, no forbidden pair."""
    if not (context.frozen or context.forbidden):
        return True
    old = {m.dst: m for m in before.matches}
    for match in after.matches:
        if old.get(match.dst) == match:
            continue
        units = set(match.dst_unit.split("+"))
        if units & context.frozen:
            return False
        if any((s, d) in context.forbidden for s in match.src_unit.split("+") for d in units):
            return False
    kept = {m.dst for m in after.matches}
    return not any(m.dst not in kept and set(m.dst_unit.split("+")) & context.frozen
                   for m in before.matches)


def _propagated(before: Plan, after: Plan, context: Context) -> Plan | None:
    """``after``'s repair done again in every block: each unit whose key differs from a changed
    unit's only in its numbers (``layers.3.attention.wq`` for ``layers.0.attention.wq``) gets the
    same change: the same layouts, or a source in the same relation to it (``scale_1`` from
    ``scale_1`` where ``scale_0`` now comes from ``scale_0``)."""
    old = {m.dst: m for m in before.matches}
    new = {m.dst: m for m in after.matches}
    changed = {m.dst_unit for k, m in new.items() if old.get(k) != m} | {
        m.dst_unit for k, m in old.items() if k not in new}
    if not changed or any("+" in u for u in changed):
        return None
    layouts: dict[str, tuple[tuple[Op, ...], ...]] = {}  # name -> the ops of each tensor
    moves: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> source name, number offsets
    origin: dict[str, str] = {}  # name -> the unit whose change is the rule
    position = {k: i for i, k in enumerate(context.dst_order)}
    # per name, the earliest change decides: the repaired layer, not what it displaced
    for unit in sorted(changed, key=lambda u: position.get(u, len(position)), reverse=True):
        was, now = _matches_of(before, unit), _matches_of(after, unit)
        if not now or "+" in now[0].src_unit:
            return None
        name = _template(unit)
        origin[name] = unit
        layouts.pop(name, None)
        moves.pop(name, None)
        if was and now[0].src_unit == was[0].src_unit:
            if len(was) != len(now):
                return None
            layouts[name] = tuple(m.ops for m in now)
            continue
        theirs, mine = _numbers(now[0].src_unit), _numbers(unit)
        if len(theirs) != len(mine):
            return None
        moves[name] = (_template(now[0].src_unit), tuple(a - b for a, b in zip(theirs, mine)))
    drop: set[str] = set()
    add: list[Match] = []
    for unit in context.dst_order:
        name = _template(unit)
        current = _matches_of(after, unit)
        if name not in origin or unit == origin[name] or not current or "+" in current[
                0].src_unit:
            continue
        if name in moves:  # a source in the same relation to its destination
            template, offset = moves[name]
            moved = _filled_template(template, [n + d for n, d in zip(_numbers(unit), offset)])
            made = (_unit_matches(moved, unit, context, current[0])
                    if moved in context.src_units else None)
            if made is None or moved == current[0].src_unit:
                continue
            add += made
        else:
            ops = layouts[name]
            if len(ops) != len(current) or all(m.ops == o for m, o in zip(current, ops)):
                continue
            add += [dataclasses.replace(m, ops=o) for m, o in zip(current, ops)]
        drop.add(unit)
    return _with(after, drop, add) if drop else None


def _filled_template(template: str, numbers: Sequence[int]) -> str:
    parts = iter(str(n) for n in numbers)
    return re.sub("#", lambda _m: next(parts), template)


def _template(key: str) -> str:
    return re.sub(r"\d+", "#", key)


def _numbers(key: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", key))



def _alternatives(plan: Plan, trial: Trial, context: Context, runner: TrialRunner
                  ) -> Iterator[Plan]:
    """Plans that differ from ``plan`` by one local change, most likely first."""
    focus = _focus(plan, trial, context)
    if focus is None:
        return
    bad, window = focus
    if bad is None:  # every layer agrees: what is left unmatched may be what is missing
        yield from _filled(plan, context)
        yield from _padded(plan, context)
    if bad is not None:
        yield from _layouts(plan, bad, context)
        yield from _member_orders(plan, bad, context)
        yield from _other_sources(plan, bad, trial, context, runner)
    for a in reversed(window):  # nearest first
        if a != bad:
            yield from _layouts(plan, a, context)
            yield from _member_orders(plan, a, context)
    for a, b in itertools.combinations(reversed(window), 2):
        yield from _rotary_pair(plan, a, b, context)
    for a, b in itertools.combinations(reversed(window), 2):
        yield from _swapped(plan, a, b, context)
    for a in reversed(window):
        if a != bad:
            yield from _other_sources(plan, a, trial, context, runner)
    if bad is not None:
        yield from _filled(plan, context)
        yield from _padded(plan, context)


MAX_PAD = 16  # near misses whose leading axes differ by at most this many rows are tried padded


def _padded(plan: Plan, context: Context) -> Iterator[Plan]:
    """A near miss whose tensors differ only in their number of rows, by a few, loaded with rows
    added (``pad``) or taken away (``crop``) at each offset: OPT's position table keeps two
    leading rows GPT-2's does not have; vocabularies are padded to a multiple."""
    units = {t: k for k, u in context.dst_units.items() for t in u.tensors}
    groups: dict[tuple[str, ...], list[Mismatch]] = {}
    for mm in plan.mismatches:
        if len(mm.src) == len(mm.dst) == 1 and mm.dst[0] in units:
            groups.setdefault((units[mm.dst[0]],), []).append(mm)
    for (dst_unit,), misses in groups.items():
        if dst_unit in context.frozen:
            continue
        rows = {_row_difference(mm.src_shapes[0], mm.dst_shapes[0]) for mm in misses}
        if len(rows) != 1 or None in rows:
            continue
        (d,) = rows
        assert d is not None
        src_unit = misses[0].src[0].rpartition(".")[0] or misses[0].src[0]
        for k in range(abs(d) + 1):
            op = Op(OpKind.PAD if d > 0 else OpKind.CROP, sizes=(k, abs(d) - k))
            new = [Match(src=mm.src, dst=mm.dst, src_shapes=mm.src_shapes,
                         dst_shapes=mm.dst_shapes, confidence=mm.confidence,
                         costs=(("repaired", 1.0),), src_unit=src_unit, dst_unit=dst_unit,
                         ops=(op,)) for mm in misses]
            keys = {k2 for mm in misses for k2 in mm.dst}
            yield dataclasses.replace(
                plan, matches=(*plan.matches, *new),
                mismatches=tuple(mm for mm in plan.mismatches if not set(mm.dst) & keys))


def _row_difference(src: tuple[int, ...], dst: tuple[int, ...]) -> int | None:
    """How many rows ``dst`` has more than ``src`` (negative: fewer), when that is all they
    differ in, by at most `MAX_PAD`; None otherwise."""
    if len(src) != len(dst) or not src or src[1:] != dst[1:] or src[0] == dst[0]:
        return None
    d = dst[0] - src[0]
    return d if abs(d) <= MAX_PAD else None


def _filled(plan: Plan, context: Context) -> Iterator[Plan]:
    """A destination unit left without a source, from a source unit nothing uses whose tensors
    fit it (after a reshape or a transpose): a projection kept as a bare ``(in, out)`` matrix
    against a Linear, a layer scale against a parameter of another shape."""
    used_src = {u for m in plan.matches for u in m.src_unit.split("+")}
    used_dst = {u for m in plan.matches for u in m.dst_unit.split("+")}
    spare = [k for k in context.src_order if k in context.src_units and k not in used_src]
    for dst_unit in context.dst_order:
        if dst_unit in used_dst or dst_unit not in context.dst_units:
            continue
        for src_unit in spare:
            new = _unit_matches(src_unit, dst_unit, context, None)
            if new is not None:
                yield dataclasses.replace(plan, matches=(*plan.matches, *new))


def suspected(plan: Plan, trial: Trial, context: Context) -> list[str]:
    """The destination units where the cause of the first disagreement must lie: the layer
    itself and the units just before it (free tensors included), in execution order."""
    focus = _focus(plan, trial, context)
    if focus is None:
        return []
    bad, window = focus
    return [*window, *([bad] if bad is not None and bad not in window else [])]


def _focus(plan: Plan, trial: Trial, context: Context
           ) -> tuple[str | None, list[str]] | None:
    """The first disagreeing layer (None when only the outputs disagree) and the destination
    units just before it (free tensors included), in execution order."""
    position = {k: i for i, k in enumerate(context.dst_order)}
    matched = {m.dst_unit for m in plan.matches}
    if trial.first_bad < len(trial.order):
        bad: str | None = trial.order[trial.first_bad]
        start = trial.order[max(trial.first_bad - WINDOW, 0)]
        lo, hi = position.get(start, 0), position.get(bad or "", len(context.dst_order))
    else:  # every compared layer agrees, the outputs do not: the end of the model
        bad = None
        lo, hi = max(len(context.dst_order) - WINDOW, 0), len(context.dst_order)
    window = [k for k in context.dst_order[lo:hi + 1] if k in matched]
    # free tensors (tokens, position embeddings, layer scales) run inside no layer: a hooked
    # run cannot place them, so they are suspects wherever they stand
    free = [k for k in context.dst_order if k in matched and k not in window
            and context.dst_units[k].type_name == "Parameter"]
    if len(free) <= MAX_FREE:
        window = [*window, *free]  # tried first (the window is walked from its end)
    return (bad if bad in matched else None), window


def _matches_of(plan: Plan, dst_unit: str) -> list[Match]:
    return [m for m in plan.matches if m.dst_unit == dst_unit]


def _with(plan: Plan, drop: set[str], add: Sequence[Match]) -> Plan:
    """``plan`` without the matches of the destination units ``drop``, with ``add``."""
    kept = [m for m in plan.matches if m.dst_unit not in drop]
    return dataclasses.replace(plan, matches=(*kept, *add))


def _layouts(plan: Plan, dst_unit: str, context: Context) -> Iterator[Plan]:
    """Other row layouts of one destination unit's tensors: a square weight transposed or not;
    rows regrouped, or moved between rotary conventions, by the models' head counts."""
    matches = _matches_of(plan, dst_unit)
    if not matches or any(len(m.dst) != 1 for m in matches):
        return
    square = [m for m in matches if len(m.dst_shapes[0]) == 2
              and m.dst_shapes[0][0] == m.dst_shapes[0][1] and len(m.src) == 1]
    if square:
        flipped = [_toggle_transpose(m) if m in square else m for m in matches]
        yield _with(plan, {dst_unit}, flipped)
    rows = {m.dst_shapes[0][0] for m in matches if m.dst_shapes[0]}
    if len(rows) != 1:
        return
    (n,) = rows
    stripped = [dataclasses.replace(m, ops=tuple(o for o in m.ops if o.kind not in _PERMUTING))
                for m in matches]
    if stripped != matches:
        yield _with(plan, {dst_unit}, stripped)
    for op in _row_layouts(n, context.heads):
        yield _with(plan, {dst_unit}, [dataclasses.replace(m, ops=(*m.ops, op))
                                       for m in stripped])


def _row_layouts(rows: int, heads: Sequence[int]) -> Iterator[Op]:
    for h in heads:
        if rows % (2 * h) == 0 and rows // h >= 2:
            yield Op(OpKind.ROPE, groups=(h,))
            yield Op(OpKind.UNROPE, groups=(h,))
    for k in (3, 2):
        for h in heads:
            if h >= 2 and rows % (k * h) == 0 and h != k:
                yield Op(OpKind.REGROUP, groups=(k, h))
                yield Op(OpKind.REGROUP, groups=(h, k))


def _rotary_pair(plan: Plan, a: str, b: str, context: Context) -> Iterator[Plan]:
    """Two projections moved between rotary conventions together, with one head size (a query
    and a key projection rotate alike; with grouped-query attention the key has fewer heads)."""
    ma, mb = _matches_of(plan, a), _matches_of(plan, b)
    rows_a, rows_b = _rows(ma), _rows(mb)
    if rows_a is None or rows_b is None:
        return
    for kind in (OpKind.ROPE, OpKind.UNROPE):
        for ha in context.heads:
            if rows_a % (2 * ha):
                continue
            size = rows_a // ha
            if rows_b % size or (rows_b // size) not in context.heads:
                continue
            hb = rows_b // size
            yield _with(plan, {a, b}, [
                *_permuted(ma, Op(kind, groups=(ha,))), *_permuted(mb, Op(kind, groups=(hb,)))])


def _rows(matches: list[Match]) -> int | None:
    rows = {m.dst_shapes[0][0] for m in matches if len(m.dst) == 1 and m.dst_shapes[0]}
    return rows.pop() if len(rows) == 1 and all(len(m.dst) == 1 for m in matches) else None


def _permuted(matches: list[Match], op: Op) -> list[Match]:
    return [dataclasses.replace(m, ops=(*(o for o in m.ops if o.kind not in _PERMUTING), op))
            for m in matches]


def _toggle_transpose(match: Match) -> Match:
    if match.ops and match.ops[0].kind is OpKind.TRANSPOSE:
        return dataclasses.replace(match, ops=match.ops[1:])
    return dataclasses.replace(match, ops=(Op(OpKind.TRANSPOSE), *match.ops))


def _member_orders(plan: Plan, dst_unit: str, context: Context) -> Iterator[Plan]:
    """A fused group's members in another order (a concat's sources, or a split's pieces)."""
    matches = _matches_of(plan, dst_unit)
    if not matches:
        return
    src_unit = matches[0].src_unit
    fused_src = "+" in src_unit
    group = src_unit.split("+") if fused_src else dst_unit.split("+")
    single = dst_unit if fused_src else src_unit
    if len(group) < 2 or len(group) > 4:
        return
    units = context.src_units if fused_src else context.dst_units
    other = context.dst_units if fused_src else context.src_units
    if single not in other or any(u not in units for u in group):
        return
    for order in itertools.permutations(group):
        if list(order) == group:
            continue
        pairs = fused_pairs(other[single], [units[u] for u in order], fused_is_dst=fused_src)
        if pairs is None:
            continue
        base = matches[0]
        new = [Match(src=p.src, dst=p.dst, src_shapes=tuple(context.src_shapes[k] for k in p.src),
                     dst_shapes=tuple(context.dst_shapes[k] for k in p.dst), confidence=base.confidence,
                     costs=base.costs, ops=p.ops,
                     src_unit="+".join(order) if fused_src else single,
                     dst_unit=dst_unit if fused_src else "+".join(order)) for p in pairs]
        if fused_src:
            yield _with(plan, {dst_unit}, new)
        else:
            yield dataclasses.replace(plan, matches=(
                *(m for m in plan.matches if m.src_unit != src_unit), *new))


def _other_sources(plan: Plan, dst_unit: str, trial: Trial, context: Context,
                   runner: TrialRunner) -> Iterator[Plan]:
    """The unit from another source of its kind: first those that received the input the
    destination layer receives, then its source's neighbours of the same kind."""
    matches = _matches_of(plan, dst_unit)
    target = context.dst_units.get(dst_unit)
    if not matches or target is None or "+" in matches[0].src_unit:
        return
    current = matches[0].src_unit
    kind = [k for k in context.src_order if k in context.src_units and k != current
            and context.src_units[k].shape_key == target.shape_key]
    received = runner.received(dst_unit)
    first = [k for k in kind if received is not None
             and same(runner.source.layers[k].input if k in runner.source.layers else None,
                      received)] if received is not None else []
    position = {k: i for i, k in enumerate(context.src_order)}
    here = position.get(current, 0)
    near = sorted(kind, key=lambda k: abs(position.get(k, 0) - here))[:2 * NEIGHBOURS]
    for src_unit in dict.fromkeys([*first, *near]):
        yield from _repartnered(plan, dst_unit, src_unit, context)


def _repartnered(plan: Plan, dst_unit: str, src_unit: str, context: Context) -> Iterator[Plan]:
    """``dst_unit`` from ``src_unit``; the destination that had it takes ``dst_unit``'s old source
    when that fits, or goes without."""
    old = _matches_of(plan, dst_unit)
    holders = {m.dst_unit for m in plan.matches if m.src_unit == src_unit}
    new = _unit_matches(src_unit, dst_unit, context, old[0] if old else None)
    if new is None:
        return
    add = list(new)
    for holder in holders:
        if old and "+" not in holder:
            back = _unit_matches(old[0].src_unit, holder, context, old[0])
            if back is not None:
                add.extend(back)
    yield _with(plan, {dst_unit, *holders}, add)


def _swapped(plan: Plan, a: str, b: str, context: Context) -> Iterator[Plan]:
    """Destination units ``a`` and ``b`` trading their (single) sources."""
    ma, mb = _matches_of(plan, a), _matches_of(plan, b)
    if not ma or not mb or "+" in ma[0].src_unit or "+" in mb[0].src_unit:
        return
    ua, ub = context.dst_units.get(a), context.dst_units.get(b)
    if ua is None or ub is None or ua.shape_key != ub.shape_key:
        return
    new_a = _unit_matches(mb[0].src_unit, a, context, ma[0])
    new_b = _unit_matches(ma[0].src_unit, b, context, mb[0])
    if new_a is not None and new_b is not None:
        yield _with(plan, {a, b}, [*new_a, *new_b])


def _unit_matches(src_unit: str, dst_unit: str, context: Context, like: Match | None
                  ) -> list[Match] | None:
    """The tensor matches of a pair of single units (None when their tensors do not pair),
    keeping the row layout ``like`` had (a permuted projection stays permuted)."""
    s, d = context.src_units.get(src_unit), context.dst_units.get(dst_unit)
    if s is None or d is None:
        return None
    pairs = pair_tensors(s, d, MatchMode.EXACT) or pair_tensors(s, d, MatchMode.ADAPT)
    if pairs is None:
        return None
    extra = tuple(o for o in like.ops if o.kind in _PERMUTING) if like is not None else ()
    confidence = like.confidence if like is not None else 0.0
    return [Match(src=p.src, dst=p.dst, src_shapes=tuple(context.src_shapes[k] for k in p.src),
                  dst_shapes=tuple(context.dst_shapes[k] for k in p.dst), confidence=confidence,
                  costs=(("repaired", 1.0),), src_unit=src_unit, dst_unit=dst_unit,
                  ops=(*p.ops, *extra)) for p in pairs]
