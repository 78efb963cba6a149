"""Verification: run both models on one input and compare, as every conversion script ends.

When the outputs differ, forward hooks on the matched layers find the first layer (in the
destination's execution order) whose output already differs, and name it with both keys. The
records it returns (`Verification`, `Divergence`) are the report's (`archalign.report`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import SourceError
from .plan import Plan
from .report import Divergence, Verification
from .running import ExampleInputs, run_in_eval

__all__ = ["compare_outputs", "output_leaves", "verify"]

logger = logging.getLogger(__name__)


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
    diff, count, scale, problem = compare_outputs(src_out, dst_out)
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


def output_leaves(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors inside an output: tensors, tuples, lists, dicts and Hugging Face ModelOutputs."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from output_leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from output_leaves(item, f"{path}[{i}]")


def compare_outputs(a: Any, b: Any) -> tuple[float, int, float, str]:
    """(max abs diff, tensors compared, max |a|, problem) over the tensors both outputs hold."""
    left, right = dict(output_leaves(a)), dict(output_leaves(b))
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
        diff, count, scale, problem = compare_outputs(captured_src[s], captured_dst[d])
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
