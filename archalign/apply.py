"""Apply a plan: the only module that writes into a model's tensors.

Everything is checked before the first write (keys, shapes, the source's tensors, then every
value), so a refused plan leaves the destination exactly as it was; see `apply_plan`'s ``atomic``
for how a load is all or nothing without copying the destination.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .checks import check_plan, check_value, gains_nonfinite, refuse_unwritable
from .confidence import DEFAULT_MIN_CONFIDENCE
from .errors import ApplyError, PlanError, StrictError, UsageError
from .interrupts import interrupts_kept, sigint_deferred
from .ops import apply_ops
from .plan import Match, Mismatch, Plan
from .policies import choose_policy, resize
from .report import Adapted, LoadReport, Skipped
from .source import TensorSource, has_nonfinite, read_destination, read_source, storage_start

__all__ = ["apply_plan", "split_by_confidence"]

logger = logging.getLogger(__name__)


def apply_plan(plan: Plan, dst: nn.Module, src: Any = None, *, min_confidence: float = DEFAULT_MIN_CONFIDENCE,
               strict: bool = False, shape_policy: str | Mapping[str, str] | None = None,
               atomic: bool = True, check_finite: bool = True,
               progress: Callable[[int, int], None] | None = None) -> LoadReport:
    """Copy the planned source tensors into ``dst`` (parameters and buffers, in place).

    Dtype and device follow ``dst``; ties in ``dst`` are kept (a tied tensor is written once).

    Parameters
    ----------
    plan : Plan
        What `archalign.align` proposed (possibly edited or loaded from a file).
    dst : nn.Module
        The model to load into.
    src : nn.Module, state_dict, path or None
        The source; ``None`` uses the one the plan was made from.
    min_confidence : float
        Matches below this confidence are skipped and reported.
    strict : bool
        Refuse (and write nothing) unless every destination tensor would be loaded.
    shape_policy : str or dict, optional
        Load the plan's shape mismatches anyway: a policy name for all of them ("slice",
        "input_channels", "resample", "auto"; see `archalign.policies`), or a dict of destination
        key glob patterns to policy names. By default mismatches stay untouched.
    atomic : bool
        All or nothing: ``dst`` ends fully loaded or exactly as before, without keeping copies
        of its tensors. Every value is computed and checked (shape, writability) before the
        first write, after which only in-place copies remain, which cannot fail on checked
        values.

        - In-memory source (module, state_dict, ``.pt`` file): the values are computed up
          front (views of the source for plain copies, transposes and reshapes; the tensors that
          concatenations, regroupings and shape policies build are held until written), then
          copied. Costs nothing beyond those built tensors.
        - Lazy source (``.safetensors`` file or sharded checkpoint) into a materialised
          destination: two passes, one tensor in memory at a time: the first reads, adapts and
          checks every value, the second reads it again and writes it (twice the reading).
          Only a failure in the second pass (the files changed, a disk or memory error) can
          leave ``dst`` partially written; the `ApplyError` then says so and names the tensors
          written.
        - Destination tensors on the meta device are replaced, not overwritten: a failure
          puts the meta tensors back, so a lazy source into a meta destination takes one pass.

        A Ctrl-C (SIGINT) arriving while writing is held back until the writes end, then
        raised (on the main thread; a second Ctrl-C interrupts at once). With ``atomic=False``
        each value is checked and written in one pass, and a failure leaves the tensors
        written so far (the `ApplyError` names them).
    check_finite : bool
        Report source values holding NaN/Inf (warned, and listed in ``report.nonfinite``; they
        are loaded as they are). Each source tensor is summed once per state: an in-memory
        tensor already scanned (by `archalign.align`, or a previous apply, through the source
        the plan carries; an explicit ``src`` is read afresh) and not written since is not
        scanned again (see `TensorSource.nonfinite`: writes through ``.data`` escape this); a
        lazy source is scanned while it is read. ``check_finite=False`` skips the scan.

    progress : callable, optional
        Called as ``progress(written, total)`` after each destination tensor is written (a
        progress bar; the command line draws one). With ``atomic=True`` the writes come after
        every value was computed and checked.

    Returns
    -------
    LoadReport
        With ``report.plan``: this plan (without the source it carries).

    Raises
    ------
    PlanError
        If a key or shape in the plan no longer agrees with ``dst`` or the source.
    StrictError
        If ``strict`` and some destination tensor would stay unloaded (nothing is written).
    ApplyError
        If a value cannot be computed or written (the message says whether ``dst`` is
        unchanged or which tensors were written).
    SourceError
        If ``dst`` is not a module, or the source cannot be read.
    KeyboardInterrupt
        On Ctrl-C, also when a reader swallowed it and failed otherwise (`archalign.interrupts`).
    """
    with interrupts_kept():
        return _apply_plan(plan, dst, src, min_confidence=min_confidence, strict=strict,
                           shape_policy=shape_policy, atomic=atomic, check_finite=check_finite,
                           progress=progress)


def _apply_plan(plan: Plan, dst: nn.Module, src: Any, *, min_confidence: float, strict: bool,
                shape_policy: str | Mapping[str, str] | None, atomic: bool, check_finite: bool,
                progress: Callable[[int, int], None] | None) -> LoadReport:
    target = read_destination(dst)  # refuses what is not a module
    to_load, skipped = split_by_confidence(plan.matches, min_confidence)
    source = read_source(src, role="source") if src is not None else plan.source
    if source is None:
        raise PlanError("this plan does not carry its source (it was loaded from a file): "
                        "pass it as plan.apply(dst, src)")
    check_plan(plan, source, target)

    by_policy: list[tuple[Mismatch, str]] = []
    for mm in plan.mismatches:
        policy = choose_policy(shape_policy, mm.dst[0])
        if policy is not None and mm.confidence < min_confidence:
            skipped.extend(Skipped(d, ", ".join(mm.src), f"{mm.reason}; and its confidence "
                                   f"{mm.confidence:.2f} < min_confidence {min_confidence:.2f}")
                           for d in mm.dst)
        elif policy is None:
            skipped.extend(Skipped(d, ", ".join(mm.src), mm.reason) for d in mm.dst)
        else:
            by_policy.append((mm, policy))

    loaded_keys = [d for m in to_load for d in m.dst] + [mm.dst[0] for mm, _ in by_policy]
    loaded_set = {target.aliases.get(k, k) for k in loaded_keys}
    missing = tuple(k for k in target.specs if k not in loaded_set)
    if strict and missing:
        why = {s.dst: s.reason for s in skipped}
        shown = "; ".join(f"{k} ({why.get(k, 'no counterpart')})" for k in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise StrictError(f"strict: {len(missing)} destination tensors would stay unloaded: "
                          f"{shown}{more}. Lower min_confidence, fix the plan, or pass strict=False")

    refuse_unwritable(to_load, by_policy, source, target)

    def values(scan: bool) -> Iterator[tuple[str, torch.Tensor, bool]]:
        return _values(to_load, by_policy, source, target, check_finite=scan)

    tick = _ticker(progress, len(loaded_keys))
    with torch.no_grad(), source.reading():
        if not atomic or (source.lazy and all(target.get(k).device.type == "meta"
                                              for k in loaded_keys)):
            nonfinite = _commit(values(check_finite), target, dst, tick)  # meta: free rollback
        elif not source.lazy:
            nonfinite = _prepare_then_commit(values(check_finite), target, dst, tick)
        else:
            nonfinite = _two_passes(values, target, dst, tick, check_finite=check_finite)
    if nonfinite:
        logger.warning("the source holds NaN or Inf in the tensors loaded into: %s",
                       ", ".join(nonfinite))
    used = {source.aliases.get(s, s) for m in to_load for s in m.src} | {
        source.aliases.get(mm.src[0], mm.src[0]) for mm, _ in by_policy}
    adapted = [Adapted(d, ", ".join(m.src), " ".join(map(str, m.ops)))
               for m in to_load if m.ops for d in m.dst]
    adapted += [Adapted(mm.dst[0], mm.src[0],
                        f"policy {policy}: {mm.src_shapes[0]} -> {mm.dst_shapes[0]}")
                for mm, policy in by_policy]
    report = LoadReport(
        loaded=tuple(loaded_keys),
        skipped=tuple(skipped),
        missing=missing,
        unexpected=tuple(k for k in source.specs if k not in used),
        tied=tuple(sorted(target.aliases.items())),
        adapted=tuple(adapted),
        nonfinite=tuple(nonfinite),
        plan=dataclasses.replace(plan, source=None),
    )
    logger.debug("%s", str(report).splitlines()[0])
    return report


def split_by_confidence(matches: Sequence[Match], min_confidence: float
                        ) -> tuple[list[Match], list[Skipped]]:
    """The matches to load, and a `Skipped` for every destination key of the others.

    Raises
    ------
    UsageError
        If ``min_confidence`` lies outside [0, 1].
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise UsageError(f"min_confidence must lie in [0, 1], got {min_confidence}")
    to_load: list[Match] = []
    skipped: list[Skipped] = []
    for match in matches:
        if match.confidence < min_confidence:
            reason = f"confidence {match.confidence:.2f} < min_confidence {min_confidence:.2f}"
            skipped.extend(Skipped(d, ", ".join(match.src), reason) for d in match.dst)
        else:
            to_load.append(match)
    return to_load, skipped


def _values(matches: list[Match], by_policy: list[tuple[Mismatch, str]], source: TensorSource,
            target: TensorSource, *, check_finite: bool) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(destination key, value, whether the value holds NaN/Inf), one match at a time (a lazy
    source is read one tensor at a time: no second copy of the checkpoint is ever held).

    The NaN/Inf answer comes from the source tensors (`TensorSource.nonfinite`, remembered for
    in-memory tensors that did not change): the adaptations only rearrange elements, so a single
    value made from finite tensors is finite and one made from a non-finite tensor is not; the
    pieces of a split, and what a shape policy builds, are scanned themselves."""
    for match in matches:
        try:
            tensors = [source.get(k) for k in match.src]
            values = apply_ops(tensors, match.ops)
            if not check_finite or not any(source.nonfinite(k, t)
                                           for k, t in zip(match.src, tensors)):
                flags = [False] * len(values)
            elif len(values) == 1:
                flags = [True]
            else:
                flags = [has_nonfinite(v) for v in values]
            if check_finite:
                flags = [bad or _overflows(d, target.get(d), v)
                         for d, v, bad in zip(match.dst, values, flags)]
        except Exception as exc:
            raise ApplyError(f"computing {', '.join(map(repr, match.dst))} from "
                             f"{', '.join(map(repr, match.src))} failed: {exc}") from exc
        yield from zip(match.dst, values, flags)
    for mm, policy in by_policy:
        try:
            value = resize(source.get(mm.src[0]), target.get(mm.dst[0]), policy)
            bad = check_finite and (has_nonfinite(value)
                                    or _overflows(mm.dst[0], target.get(mm.dst[0]), value))
        except Exception as exc:
            raise ApplyError(f"computing {mm.dst[0]!r} from {mm.src[0]!r} by policy {policy!r} "
                             f"failed: {exc}") from exc
        yield mm.dst[0], value, bad


def _overflows(key: str, into: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``value`` gains Inf when cast to ``into``'s dtype (`gains_nonfinite`); warned."""
    if not gains_nonfinite(into, value):
        return False
    logger.warning("%r: the source holds values beyond the range of the destination's %s "
                   "(largest %g); they load as Inf (see report.nonfinite). Give the destination "
                   "a wider dtype to keep them", key, into.dtype, torch.finfo(into.dtype).max)
    return True


def _failed(doing: str, key: str, exc: Exception) -> str:
    """What failed: an `ApplyError` names its tensor already; anything else is named here."""
    return str(exc) if isinstance(exc, ApplyError) else f"{doing} {key!r} failed: {exc}"


_UNCHANGED = "the destination is exactly as before (nothing was written, or it was restored)"


def _ticker(progress: Callable[[int, int], None] | None, total: int) -> Callable[[], None]:
    """A function to call after each write: it reports ``(written, total)`` to ``progress``."""
    if progress is None:
        return lambda: None
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        progress(done, total)

    return tick


def _prepare_then_commit(values: Iterable[tuple[str, torch.Tensor, bool]], target: TensorSource,
                         dst: nn.Module, tick: Callable[[], None]) -> list[str]:
    """All or nothing for in-memory sources, without copies of the destination: compute and
    check every value first (views, for plain copies and most adaptations), then only write."""
    prepared: list[tuple[str, torch.Tensor, bool]] = []
    shared = {storage_start(t) for t in map(target.get, target.specs)} - {None}
    key = ""
    try:
        for key, value, bad in values:
            check_value(key, target.get(key), value)
            if storage_start(value) in shared:  # it views a destination tensor, which may be
                value = value.clone()  # overwritten before this value is written
            prepared.append((key, value, bad))
    except Exception as exc:
        raise ApplyError(f"{_failed('computing', key, exc)}; {_UNCHANGED}") from exc
    with sigint_deferred():
        return _commit(prepared, target, dst, tick, checked=True)


def _two_passes(values: Callable[[bool], Iterable[tuple[str, torch.Tensor, bool]]],
                target: TensorSource, dst: nn.Module, tick: Callable[[], None], *,
                check_finite: bool) -> list[str]:
    """All or nothing for lazy sources into a materialised destination, in the memory of one
    tensor: read, adapt and check every value (shape, NaN/Inf) and drop it; then read again and
    write. Only a failure between the passes (the file changed, a disk or memory error) can
    leave the destination partially written, and the error says so."""
    nonfinite: list[str] = []
    key = ""
    try:
        for key, value, bad in values(check_finite):
            check_value(key, target.get(key), value)
            if bad:
                nonfinite.append(key)
            del value
    except Exception as exc:
        raise ApplyError(f"{_failed('reading', key, exc)}; {_UNCHANGED}") from exc
    with sigint_deferred():
        _commit(values(False), target, dst, tick)
    return nonfinite


def _commit(values: Iterable[tuple[str, torch.Tensor, bool]], target: TensorSource,
            dst: nn.Module, tick: Callable[[], None], *, checked: bool = False) -> list[str]:
    """Check (unless ``checked``: `check_value` passed already) and write each value in turn (in
    place; a meta tensor is replaced by a materialised one, ties kept). Returns the keys whose
    values hold NaN or Inf.

    Raises
    ------
    ApplyError
        If a value cannot be computed or written: the meta tensors already replaced are put
        back, and the message names the tensors already overwritten in place, if any.
    """
    undo: list[Callable[[], None]] = []
    written: list[str] = []  # overwritten in place, in order
    copying: str | None = None  # the key inside copy_ (interrupted there: perhaps partly written)
    nonfinite: list[str] = []
    key = ""
    try:
        for key, value, bad in values:
            into = target.get(key)
            if not checked:
                check_value(key, into, value)
            if bad:
                nonfinite.append(key)
            if into.device.type == "meta":
                undo.append(_assign(dst, target, key, into, value))
            else:
                copying = key
                into.copy_(value)
                written.append(key)
                copying = None
            tick()
    except BaseException as exc:
        for step in reversed(undo):
            step()
        touched = [*written, copying] if copying is not None else written
        if not touched:
            if isinstance(exc, Exception):
                raise ApplyError(f"{_failed('writing', key, exc)}; {_UNCHANGED}") from exc
            raise
        shown = ", ".join(touched[:10]) + (f" and {len(touched) - 10} more"
                                           if len(touched) > 10 else "")
        partly = f"; {copying!r} perhaps only partly" if copying is not None else ""
        partial = (f"the destination is partially written: {len(touched)} tensors were "
                   f"overwritten ({shown}{partly}), the others (meta tensors included) are as "
                   "before. Apply again, or reload the destination")
        if isinstance(exc, Exception):
            raise ApplyError(f"{_failed('writing', key, exc)}; {partial}") from exc
        logger.error("interrupted while writing %r: %s", key, partial)
        raise
    return nonfinite


def _assign(dst: nn.Module, target: TensorSource, key: str, old: torch.Tensor,
            value: torch.Tensor) -> Callable[[], None]:
    """Replace the meta tensor at ``key`` (and at every key tied to it) by a materialised copy of
    ``value`` (whose shape `check_value` checked); returns how to put the meta tensor back."""
    data = value.detach().to(dtype=old.dtype, copy=True)
    new: torch.Tensor = (nn.Parameter(data, requires_grad=old.requires_grad)
                         if isinstance(old, nn.Parameter) else data)
    primary = target.aliases.get(key, key)
    keys = [primary, *(a for a, p in target.aliases.items() if p == primary)]
    placed: list[tuple[dict[str, Any], str, Any]] = []
    for k in keys:
        owner_path, _, name = k.rpartition(".")
        owner = dst.get_submodule(owner_path)
        table: dict[str, Any] = (owner._parameters if name in owner._parameters
                                 else owner._buffers)
        placed.append((table, name, table[name]))
        table[name] = new

    def undo() -> None:
        for table, name, before in placed:
            table[name] = before

    return undo


