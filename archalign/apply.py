"""Apply a plan: the only module that writes into a model's tensors.

Everything is checked before the first write (keys, shapes, the source's tensors), so a refused
plan leaves the destination exactly as it was.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ApplyError, PlanError, SourceError, UsageError
from .ops import apply_ops, infer_shapes
from .plan import Match, Mismatch, Plan
from .policies import choose_policy, resize
from .report import Adapted, LoadReport, Skipped
from .source import TensorSource, read_source

__all__ = ["apply_plan", "split_by_confidence"]

logger = logging.getLogger(__name__)


def apply_plan(plan: Plan, dst: nn.Module, src: Any = None, *, min_confidence: float = 0.5,
               strict: bool = False, shape_policy: str | Mapping[str, str] | None = None,
               atomic: bool = True, check_finite: bool = True) -> LoadReport:
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
        Keep a copy of every tensor written until all writes succeeded, and restore them if one
        fails, so that ``dst`` is either fully loaded or exactly as before (costs the memory of
        the written tensors while applying).
    check_finite : bool
        Scan every loaded value for NaN/Inf (warned and listed in ``report.nonfinite``); one
        more pass over the data, which ``check_finite=False`` saves.

    Returns
    -------
    LoadReport

    Raises
    ------
    PlanError
        If a key or shape in the plan no longer agrees with ``dst`` or the source.
    ApplyError
        If ``strict`` and some destination tensor would stay unloaded.
    SourceError
        If ``dst`` is not a module, or the source cannot be read.
    """
    if not isinstance(dst, nn.Module):
        raise SourceError(f"the destination must be an nn.Module, got {type(dst).__name__}")
    to_load, skipped = split_by_confidence(plan.matches, min_confidence)
    source = read_source(src, role="source") if src is not None else plan.source
    if source is None:
        raise PlanError("this plan does not carry its source (it was loaded from a file): "
                        "pass it as plan.apply(dst, src)")
    target = read_source(dst, role="destination")
    _check_plan(plan, source, target)

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
        raise ApplyError(f"strict: {len(missing)} destination tensors would stay unloaded: "
                         f"{shown}{more}. Lower min_confidence, fix the plan, or pass strict=False")

    _refuse_unwritable(to_load, by_policy, source, target)
    nonfinite = _write(_values(to_load, by_policy, source, target), target, dst, atomic=atomic,
                       check_finite=check_finite)
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
    )
    logger.info("%s", str(report).splitlines()[0])
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


def _refuse_unwritable(matches: list[Match], by_policy: list[tuple[Mismatch, str]],
                      source: TensorSource, target: TensorSource) -> None:
    """Refuse, before any write, what cannot be written: from specs alone, no tensor is read."""
    problems: list[str] = []
    for key in {k for m in matches for k in m.src} | {mm.src[0] for mm, _ in by_policy}:
        spec = source.specs[source.aliases.get(key, key)]
        if spec.device == "meta":
            problems.append(f"source tensor {key!r} is on the meta device (it has no values)")
        elif spec.dtype.startswith("torch.q"):
            problems.append(f"source tensor {key!r} is quantized ({spec.dtype}); dequantize "
                            "the checkpoint first")
    for mm, _ in by_policy:
        if target.get(mm.dst[0]).device.type == "meta":
            problems.append(f"a shape policy keeps part of {mm.dst[0]!r}, which is on the meta "
                            "device (no values to keep): materialise it first")
    for match in matches:
        for dst_key in match.dst:
            if target.get(dst_key).is_quantized:
                problems.append(f"destination tensor {dst_key!r} is quantized")
        for src_key, dst_key in zip(match.src, match.dst):
            spec, into = source.specs[source.aliases.get(src_key, src_key)], target.get(dst_key)
            floating = any(t in spec.dtype for t in ("float", "bfloat", "complex"))
            if floating and not (into.is_floating_point() or into.is_complex()):
                problems.append(f"{src_key!r} ({spec.dtype}) would be truncated into "
                                f"{dst_key!r} ({into.dtype})")
    if problems:
        raise ApplyError("refused before writing anything: " + "; ".join(sorted(problems)[:10]))


def _values(matches: list[Match], by_policy: list[tuple[Mismatch, str]], source: TensorSource,
            target: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    """(destination key, value) pairs, computed one match at a time (a lazy source is read one
    tensor at a time: no second copy of the checkpoint is ever held)."""
    for match in matches:
        yield from zip(match.dst, apply_ops([source.get(k) for k in match.src], match.ops))
    for mm, policy in by_policy:
        yield mm.dst[0], resize(source.get(mm.src[0]), target.get(mm.dst[0]), policy)


def _write(values: Iterable[tuple[str, torch.Tensor]], target: TensorSource, dst: nn.Module, *,
           atomic: bool, check_finite: bool = True) -> list[str]:
    """Write every value into its destination tensor (in place; a meta tensor is replaced by a
    materialised one, ties kept); on failure restore what was written. Returns the keys whose
    values hold NaN or Inf."""
    undo: list[Callable[[], None]] = []
    nonfinite: list[str] = []
    key = ""
    with torch.no_grad():
        try:
            for key, value in values:
                into = target.get(key)
                if check_finite and _has_nonfinite(value):
                    nonfinite.append(key)
                if into.device.type == "meta":
                    undo.append(_assign(dst, target, key, into, value))
                    continue
                if atomic:
                    undo.append(_restorer(into))
                into.copy_(value)
        except Exception as exc:
            for step in reversed(undo):
                step()
            restored = "; the destination was restored" if atomic else ""
            raise ApplyError(f"writing {key!r} failed: {exc}{restored}") from exc
    return nonfinite


def _has_nonfinite(value: torch.Tensor) -> bool:
    """NaN or Inf anywhere: one sum (NaN and Inf propagate), several times cheaper than
    ``isfinite().all()``; half-precision tensors are summed in float32 so that finite values
    do not overflow it. A float32 sum overflows only past 3e38: then a warning is too many."""
    if not value.numel():
        return False
    if value.is_complex():
        return not bool(torch.isfinite(value).all())
    if not value.is_floating_point():
        return False
    wide = value.dtype if value.element_size() >= 4 else torch.float32
    return not math.isfinite(float(value.sum(dtype=wide)))


def _restorer(into: torch.Tensor) -> Callable[[], None]:
    before = into.detach().clone()

    def undo() -> None:
        into.copy_(before)

    return undo


def _assign(dst: nn.Module, target: TensorSource, key: str, old: torch.Tensor,
            value: torch.Tensor) -> Callable[[], None]:
    """Replace the meta tensor at ``key`` (and at every key tied to it) by a materialised copy of
    ``value``; returns how to put the meta tensor back."""
    if tuple(value.shape) != tuple(old.shape):
        raise ApplyError(f"{key!r}: a value of shape {tuple(value.shape)} for a tensor of shape "
                         f"{tuple(old.shape)}")
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


def _check_plan(plan: Plan, source: TensorSource, target: TensorSource) -> None:
    problems: list[str] = []
    for match in plan.matches:
        if len(match.src) != len(match.src_shapes) or len(match.dst) != len(match.dst_shapes):
            problems.append(f"match {', '.join(match.src)} -> {', '.join(match.dst)} lists "
                            f"{len(match.src_shapes)} source and {len(match.dst_shapes)} "
                            "destination shapes for its keys")
            continue
        for key, shape in zip(match.dst, match.dst_shapes):
            _check_key(key, shape, target, "destination", problems)
        for key, shape in zip(match.src, match.src_shapes):
            _check_key(key, shape, source, "source", problems)
        try:
            produced = infer_shapes(match.src_shapes, match.ops)
        except PlanError as exc:
            problems.append(f"match {', '.join(match.src)} -> {', '.join(match.dst)}: {exc}")
            continue
        if produced != list(match.dst_shapes):
            ops = " ".join(map(str, match.ops)) or "a plain copy"
            problems.append(f"match {', '.join(match.src)} -> {', '.join(match.dst)}: {ops} "
                            f"turns {list(match.src_shapes)} into {produced}, "
                            f"not {list(match.dst_shapes)}")
    for mm in plan.mismatches:
        for key, shape in zip(mm.dst, mm.dst_shapes):
            _check_key(key, shape, target, "destination", problems)
        for key, shape in zip(mm.src, mm.src_shapes):
            _check_key(key, shape, source, "source", problems)
    dst_keys = [target.aliases.get(d, d) for m in plan.matches for d in m.dst]
    dups = sorted({k for k in dst_keys if dst_keys.count(k) > 1})
    if dups:
        problems.append(f"destination keys written twice: {', '.join(dups)}")
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise PlanError(f"the plan does not agree with the models: {shown}{more}. "
                        "Were the models changed since the plan was made? Re-run align")


def _check_key(key: str, shape: tuple[int, ...], side: TensorSource, role: str,
               problems: list[str]) -> None:
    primary = side.aliases.get(key, key)
    spec = side.specs.get(primary)
    if spec is None:
        problems.append(f"{role} has no tensor {key!r}")
    elif spec.shape != tuple(shape):
        problems.append(f"{role} tensor {key!r} has shape {spec.shape}, the plan says {tuple(shape)}")
