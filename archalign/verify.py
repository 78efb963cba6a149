"""Verification: run both models on one input and compare, as every conversion script ends.

When the outputs differ, forward hooks on the matched layers find the first layer (in the
destination's execution order) whose output already differs, and name it with both keys.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .confidence import VERIFIED_CONFIDENCE
from .errors import SourceError
from .ops import Op
from .plan import Match, Plan
from .trace import ExampleInputs, run_in_eval

__all__ = ["Divergence", "Verification", "decide_by_activations", "verify"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Divergence:
    """The first matched layer whose outputs differ."""

    src: str  # source module path
    dst: str  # destination module path
    max_abs_diff: float  # largest absolute difference of the two layers' outputs


@dataclass(frozen=True)
class Verification:
    """The result of running both models on the same input."""

    ok: bool  # True when every compared output agrees within tolerance
    max_abs_diff: float  # largest absolute difference over all compared outputs (inf: not comparable)
    outputs_compared: int  # how many output tensors were compared
    tolerance: float  # the absolute tolerance used (atol + rtol * max |source output|)
    first_divergence: Divergence | None  # the first matched layer that differs, when found
    problem: str = ""  # why outputs could not be compared, if they could not

    def __str__(self) -> str:
        verdict = "outputs agree" if self.ok else "OUTPUTS DIFFER"
        text = (f"{verdict}: max |src - dst| = {self.max_abs_diff:.3g} over "
                f"{self.outputs_compared} output tensors (tolerance {self.tolerance:.3g})")
        if self.problem:
            text += f"; {self.problem}"
        if self.first_divergence is not None:
            d = self.first_divergence
            text += (f"; first diverging layer: {d.dst} <- {d.src} "
                     f"(max diff {d.max_abs_diff:.3g})")
        return text


def verify(src: nn.Module, dst: nn.Module, example_inputs: ExampleInputs, *,
           plan: Plan | None = None, atol: float = 1e-5, rtol: float = 1e-4) -> Verification:
    """Run ``src`` and ``dst`` in eval mode on ``example_inputs`` and compare their outputs.

    Parameters
    ----------
    src, dst : nn.Module
        The source model and the loaded destination.
    example_inputs : Tensor, tuple, list or dict
        One input both accept (a dict is passed as keyword arguments).
    plan : Plan, optional
        When given and the outputs differ, its matched layers are hooked to find the first one
        whose output differs.
    atol, rtol : float
        Outputs agree when ``max |src - dst| <= atol + rtol * max |src|``.

    Returns
    -------
    Verification

    Raises
    ------
    SourceError
        If ``src`` or ``dst`` is not a module, or ``example_inputs`` is None.
    """
    for role, model in (("source", src), ("destination", dst)):
        if not isinstance(model, nn.Module):
            raise SourceError(f"verify needs the {role} as an nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise SourceError("verify needs example_inputs: an input both models accept")
    src_out = run_in_eval(src, example_inputs)
    dst_out = run_in_eval(dst, example_inputs)
    diff, count, scale, problem = _compare(src_out, dst_out)
    tolerance = atol + rtol * scale
    ok = not problem and count > 0 and diff <= tolerance
    divergence = None
    if not ok and plan is not None:
        divergence = _first_divergence(src, dst, example_inputs, plan, atol, rtol)
    result = Verification(ok=ok, max_abs_diff=diff, outputs_compared=count, tolerance=tolerance,
                          first_divergence=divergence,
                          problem=problem or ("" if count else "no tensor outputs to compare"))
    logger.info("%s", result)
    return result


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors inside an output: tensors, tuples, lists, dicts and Hugging Face ModelOutputs."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")


def _compare(a: Any, b: Any) -> tuple[float, int, float, str]:
    """(max abs diff, tensors compared, max |a|, problem) over the tensors both outputs hold."""
    left, right = dict(_leaves(a)), dict(_leaves(b))
    common = [k for k in left if k in right]
    if not common and left and right and len(left) == len(right):
        common_pairs = list(zip(left.values(), right.values()))  # differently named: by order
    else:
        common_pairs = [(left[k], right[k]) for k in common]
    diff = scale = 0.0
    count = 0
    for x, y in common_pairs:
        if not (x.is_floating_point() or x.is_complex()):
            if x.shape == y.shape and not torch.equal(x, y.to(x.device)):
                return float("inf"), count, scale, "integer outputs differ"
            continue
        if x.shape != y.shape:
            return (float("inf"), count, scale,
                    f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        x64, y64 = x.detach().double().cpu(), y.detach().double().cpu()
        if x64.numel():
            diff = max(diff, float((x64 - y64).abs().max()))
            scale = max(scale, float(x64.abs().max()))
        count += 1
    return diff, count, scale, ""


def _first_divergence(src: nn.Module, dst: nn.Module, inputs: Any, plan: Plan,
                      atol: float, rtol: float) -> Divergence | None:
    src_modules = dict(src.named_modules())
    dst_modules = dict(dst.named_modules())
    pairs = list(dict.fromkeys(
        (m.src_unit, m.dst_unit) for m in plan.matches
        if m.src_unit in src_modules and m.dst_unit in dst_modules))
    captured_src: dict[str, Any] = {}
    captured_dst: dict[str, Any] = {}
    order: list[str] = []
    handles = []
    for s, d in pairs:
        handles.append(src_modules[s].register_forward_hook(_capture(captured_src, s, None)))
        handles.append(dst_modules[d].register_forward_hook(_capture(captured_dst, d, order)))
    try:
        run_in_eval(src, inputs)
        run_in_eval(dst, inputs)
    finally:
        for h in handles:
            h.remove()
    src_of = dict((d, s) for s, d in pairs)
    for d in order:
        s = src_of[d]
        if s not in captured_src:
            continue
        diff, count, scale, problem = _compare(captured_src[s], captured_dst[d])
        if problem or not count:
            continue  # a layer whose output has another form (MHA vs Linear): not comparable
        if diff > atol + rtol * scale:
            return Divergence(src=s, dst=d, max_abs_diff=diff)
    return None


def _capture(store: dict[str, Any], key: str, order: list[str] | None) -> Any:
    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        if key not in store:
            store[key] = output
            if order is not None:
                order.append(key)

    return hook


def decide_by_activations(plan: Plan, src: nn.Module, dst: nn.Module, inputs: ExampleInputs,
                          *, atol: float = 1e-5, rtol: float = 1e-4) -> Plan:
    """Run the plan on a copy of ``dst`` and let the outputs decide what structure could not.

    If the copy reproduces the source's outputs, every loaded match is confirmed (its confidence
    is raised to at least `VERIFIED_CONFIDENCE`). If not, the row layouts of fused projections
    are tried (``(3, heads, d)`` vs ``(heads, 3, d)``, head counts read from the models) and the
    first layout that reproduces the outputs is kept. ``dst`` itself is never written.

    Returns
    -------
    Plan
        The plan with ``verification`` filled in, and adjusted as described.
    """
    from .apply import apply_plan

    def trial(candidate: Plan, *, locate: bool) -> Verification:
        """Outputs of ``dst`` loaded by ``candidate``; with ``locate``, where a failure starts
        (only the plan's own failure is reported: the layouts tried after it need just ok)."""
        copy_of_dst = copy.deepcopy(dst)
        apply_plan(candidate, copy_of_dst, min_confidence=0.0)
        return verify(src, copy_of_dst, inputs, plan=candidate if locate else None, atol=atol,
                      rtol=rtol)

    result = trial(plan, locate=True)
    chosen = plan
    if not result.ok:
        for candidate in _layout_candidates(plan, src, dst):
            attempt = trial(candidate, locate=False)
            if attempt.ok:
                chosen, result = candidate, attempt
                break
    if not result.ok:
        logger.warning("the plan does not reproduce the source's outputs: %s", result)
        return dataclasses.replace(chosen, verification=str(result))
    confirmed = tuple(
        dataclasses.replace(m, confidence=max(m.confidence, VERIFIED_CONFIDENCE),
                            costs=(*m.costs, ("verified", 1.0)))
        for m in chosen.matches)
    return dataclasses.replace(chosen, matches=confirmed, verification=str(result))


_HEAD_ATTRS = ("num_heads", "n_head", "num_attention_heads", "n_heads", "heads")


def _head_counts(*models: nn.Module) -> list[int]:
    counts: set[int] = set()
    for model in models:
        holders = [*model.modules(), getattr(model, "config", None)]
        for holder in holders:
            for attr in _HEAD_ATTRS:
                value = getattr(holder, attr, None)
                if isinstance(value, int) and value >= 2:
                    counts.add(value)
    return sorted(counts)


def _layout_candidates(plan: Plan, src: nn.Module, dst: nn.Module) -> Iterator[Plan]:
    """Plans whose fused projections (rows = k x hidden, k in 2, 3) use another row layout."""
    fused = [i for i, m in enumerate(plan.matches) if _looks_fused(m)]
    if not fused:
        return
    head_counts = _head_counts(src, dst)
    for k in (3, 2):
        for heads in head_counts:
            for groups in ((k, heads), (heads, k)):
                matches = list(plan.matches)
                changed = False
                for i in fused:
                    m = matches[i]
                    rows = m.dst_shapes[0][0]
                    if rows % (k * heads) or rows // k != _hidden(m, plan):
                        continue
                    matches[i] = dataclasses.replace(m, ops=(*m.ops, Op("regroup", groups=groups)))
                    changed = True
                if changed:
                    yield dataclasses.replace(plan, matches=tuple(matches))


def _looks_fused(match: Match) -> bool:
    return len(match.src) == len(match.dst) == 1 and len(match.dst_shapes[0]) in (1, 2)


def _hidden(match: Match, plan: Plan) -> int:
    """The width the fused rows are a multiple of: the weight's input size (for a bias, its unit's)."""
    shape = match.dst_shapes[0]
    if len(shape) == 2:
        return shape[1]
    for other in plan.matches:
        if other.dst_unit == match.dst_unit and len(other.dst_shapes[0]) == 2:
            return other.dst_shapes[0][1]
    return -1
