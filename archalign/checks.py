"""Checks before writing: does a plan agree with both sides, and can every value be written?

Planning-time checks, on specs alone (keys, shapes, dtypes, what each adaptation produces), and
the one check of a computed value against the tensor it goes into. `archalign.apply` runs them
all before its first write, `archalign.convert` before it writes a file, and
`archalign.distributed` before it hands a plan's tensors to apply: a plan they refuse writes
nothing anywhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from .errors import ApplyError, PlanError
from .ops import infer_shapes
from .plan import Match, Mismatch, Plan
from .source import TensorSource

__all__ = ["check_plan", "check_value", "gains_nonfinite", "refuse_unwritable",
           "unplanned_keys"]


_QUANTIZED = frozenset(d for d in (getattr(torch, n, None) for n in (
    "qint8", "quint8", "qint32", "quint4x2", "quint2x4")) if isinstance(d, torch.dtype))


def check_plan(plan: Plan, source: TensorSource, target: TensorSource | None) -> None:
    """Check every key and shape of ``plan`` against both sides, and what each adaptation makes.

    Parameters
    ----------
    source : TensorSource
        What the plan reads from.
    target : TensorSource or None
        What it writes into; None when there is no destination model (a converted file): the
        plan's own destination keys and shapes are then checked against its adaptations only.

    Raises
    ------
    PlanError
        Naming up to ten problems: a key a side does not hold, a shape that differs, an
        adaptation that does not turn the source shapes into the destination's, a destination
        key written twice.
    """
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
    aliases = target.aliases if target is not None else {}
    written = Counter(aliases.get(d, d) for m in plan.matches for d in m.dst)
    dups = sorted(k for k, n in written.items() if n > 1)
    if dups:
        problems.append(f"destination keys written twice: {', '.join(dups)}")
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        hint = _wrapper_hint(plan, source) or ("Were the models changed since the plan was "
                                               "made? Re-run align")
        raise PlanError(f"the plan does not agree with the models: {shown}{more}. {hint}")


def _wrapper_hint(plan: Plan, source: TensorSource) -> str:
    """When the plan's source keys are the checkpoint's without its wrapper prefix, the plan
    was made on the checkpoint attached to its module (`archalign.structure`): say so."""
    keys = [k for m in plan.matches for k in m.src if k not in source.specs]
    if not (keys and source.wrapper and all(source.wrapper + k in source.specs for k in keys)):
        return ""
    return (f"The source's keys are the plan's under the wrapper prefix {source.wrapper!r}: the "
            "plan was made on the checkpoint attached to its module; read it the same way "
            "(read_source(path, structure=module), or --source-structure FACTORY)")


def _check_key(key: str, shape: tuple[int, ...], side: TensorSource | None, role: str,
               problems: list[str]) -> None:
    if side is None:
        return
    primary = side.aliases.get(key, key)
    spec = side.specs.get(primary)
    if spec is None:
        problems.append(f"{role} has no tensor {key!r}")
    elif spec.shape != tuple(shape):
        problems.append(f"{role} tensor {key!r} has shape {spec.shape}, the plan says {tuple(shape)}")


def refuse_unwritable(matches: Sequence[Match], by_policy: Sequence[tuple[Mismatch, str]],
                      source: TensorSource, target: TensorSource | None) -> None:
    """Refuse, before any write, what cannot be written: from specs alone, no tensor is read.

    A source tensor on the meta device, quantized or not dense (sparse, mkldnn), a shape policy
    that would keep part of a meta destination tensor, a quantized or sparse destination, floats
    into integers, complex values into real ones (the imaginary part would be dropped). With
    ``target`` None (a converted file keeps the source's dtypes) only the source side is checked.

    Raises
    ------
    ApplyError
        Naming up to ten such tensors.
    """
    problems: list[str] = []
    for key in {k for m in matches for k in m.src} | {mm.src[0] for mm, _ in by_policy}:
        spec = source.specs[source.aliases.get(key, key)]
        if spec.device == "meta":
            problems.append(f"source tensor {key!r} is on the meta device (it has no values)")
        elif spec.dtype in _QUANTIZED:
            problems.append(f"source tensor {key!r} is quantized ({spec.dtype}); dequantize "
                            "the checkpoint first")
        elif not source.lazy and source.get(key).layout != torch.strided:  # files: dense
            problems.append(f"source tensor {key!r} is not dense ({source.get(key).layout}): "
                            "store it dense (tensor.to_dense()) first")
    if target is None:
        _raise_problems(problems)
        return
    for mm, _ in by_policy:
        if target.get(mm.dst[0]).device.type == "meta":
            problems.append(f"a shape policy keeps part of {mm.dst[0]!r}, which is on the meta "
                            "device (no values to keep): materialise it first")
    pairs = [(s, d) for m in matches for d in m.dst for s in m.src]
    pairs += [(mm.src[0], mm.dst[0]) for mm, _ in by_policy]
    for dst_key in dict.fromkeys(d for _, d in pairs):
        into = target.get(dst_key)
        if into.is_quantized:
            problems.append(f"destination tensor {dst_key!r} is quantized")
        elif into.layout != torch.strided:
            problems.append(f"destination tensor {dst_key!r} is not dense ({into.layout}): "
                            "archalign writes dense tensors only")
    for src_key, dst_key in dict.fromkeys(pairs):
        spec, into = source.specs[source.aliases.get(src_key, src_key)], target.get(dst_key)
        floating = spec.dtype.is_floating_point or spec.dtype.is_complex
        if floating and not (into.is_floating_point() or into.is_complex()):
            problems.append(f"{src_key!r} ({spec.dtype}) would be truncated into "
                            f"{dst_key!r} ({into.dtype})")
        elif spec.dtype.is_complex and not into.is_complex():
            problems.append(f"{src_key!r} ({spec.dtype}) is complex and {dst_key!r} "
                            f"({into.dtype}) is not: its imaginary part would be dropped. Store "
                            "the real part (or torch.view_as_real) in the source, or make the "
                            "destination complex")
    _raise_problems(problems)


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise ApplyError("refused before writing anything: " + "; ".join(sorted(problems)[:10]))




def check_value(key: str, into: torch.Tensor, value: torch.Tensor) -> None:
    """Refuse what ``into.copy_(value)`` would refuse, or would write as other numbers, before
    anything is written.

    Raises
    ------
    ApplyError
        If the shapes differ, the destination tensor cannot be written in place, or it holds
        integers (or booleans) and ``value`` holds integers outside its range (they would wrap).
    """
    if value.shape != into.shape:
        raise ApplyError(f"{key!r}: a value of shape {tuple(value.shape)} for a destination "
                         f"tensor of shape {tuple(into.shape)}; re-run align, or fix this match")
    _refuse_wrapping(key, into.dtype, value)
    if into.device.type == "meta" or into.layout != torch.strided:
        return
    strides = into.stride()
    if 0 in strides and any(st == 0 and n > 1 for n, st in zip(into.shape, strides)):
        raise ApplyError(f"destination tensor {key!r} is expanded (its elements share memory, "
                         f"strides {tuple(into.stride())}): give it its own memory, e.g. "
                         ".contiguous(), before loading")
    if into.is_inference() and not torch.is_inference_mode_enabled():
        raise ApplyError(f"destination tensor {key!r} was made under torch.inference_mode and "
                         "can only be written inside it: apply within torch.inference_mode()")



def _refuse_wrapping(key: str, dtype: torch.dtype, value: torch.Tensor) -> None:
    """Integers cast to a narrower integer type (or to bool) wrap around silently: refuse."""
    if (dtype.is_floating_point or dtype.is_complex or value.is_floating_point()
            or value.is_complex() or not value.numel() or value.device.type == "meta"):
        return  # floats into integers: refused from the dtypes (`refuse_unwritable`)
    low, high = _range(dtype)
    have_low, have_high = _range(value.dtype)
    if low <= have_low and have_high <= high:
        return  # every value fits: nothing to read
    seen_low, seen_high = int(value.min()), int(value.max())
    if seen_low < low or seen_high > high:
        raise ApplyError(f"{key!r}: the source holds integers in [{seen_low}, {seen_high}], "
                         f"outside the range of the destination's {dtype} [{low}, {high}]; they "
                         "would wrap around. Give the destination a wider dtype")


def _range(dtype: torch.dtype) -> tuple[int, int]:
    if dtype == torch.bool:
        return 0, 1
    info = torch.iinfo(dtype)
    return int(info.min), int(info.max)


def gains_nonfinite(into: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether writing ``value`` into ``into`` (cast to its dtype) turns finite values into
    Inf (or NaN, for float8 types without Inf): values beyond the destination dtype's range,
    e.g. 1e5 into float16 (largest 65504). Reads ``value`` only when the destination dtype's
    range is narrower than the value's: one ``amax``, then, only if that exceeds the range, the
    exact answer from the cast itself (values just past the largest one round down to it).
    """
    dtype = into.dtype
    if (not dtype.is_floating_point or value.is_complex() or value.dtype == torch.bool
            or not value.numel() or value.device.type == "meta"):
        return False
    limit = float(torch.finfo(dtype).max)
    if value.is_floating_point():
        if float(torch.finfo(value.dtype).max) <= limit:
            return False
        wide = value.detach() if value.element_size() > 1 else value.detach().to(torch.float16)
        biggest = float(wide.abs().amax())  # float8 has no amax kernel; float16 holds it
    else:
        biggest = float(max(abs(int(value.min())), abs(int(value.max()))))
    if not biggest > limit:  # also NaN: the source itself is not finite there
        return False
    return bool((~torch.isfinite(value.detach().to(dtype)) & torch.isfinite(value)).any())


def unplanned_keys(plan: Plan, source: TensorSource, target: TensorSource
                   ) -> tuple[list[str], list[str]]:
    """The keys of each side that ``plan`` never mentions (in no match, mismatch, unmatched
    list or tie): a plan made for a resnet50 applied to a resnet101 leaves the extra blocks
    there. Applying still works, but it was made for other models.

    Returns
    -------
    (list of str, list of str)
        The source's, then the destination's such keys, in their state_dict order.
    """
    entries: list[Match | Mismatch] = [*plan.matches, *plan.mismatches]
    known_src = {k for m in entries for k in m.src}
    known_src.update(plan.unmatched_src, *plan.tied_src)
    known_dst = {k for m in entries for k in m.dst}
    known_dst.update(plan.unmatched_dst, *plan.tied_dst)
    return ([k for k in source.specs if k not in known_src],
            [k for k in target.specs if k not in known_dst])
