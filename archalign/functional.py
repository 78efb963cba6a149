"""Functional evidence while aligning: run both models, repair the plan where they disagree, and
let what the run showed set every confidence.

Structure proposes; running decides. With both models at hand and an input (given, or made by
`archalign.inputs`), the plan is tried on a copy of the destination (`archalign.trial`), repaired
where the destination first stops reproducing the source (`archalign.repair`), and then:

- when the outputs agree on something informative, every match whose layer took part is
  certain (at least `VERIFIED_CONFIDENCE`);
- when they do not, no match but a reviewer's pin keeps a high confidence (at most
  `UNVERIFIED_CAP`); a match whose layer computes something else on the right input drops to
  `DISAGREEING` (not loaded by default); in a plan that should reproduce the source (every
  destination tensor matched), the units just before the first disagreement drop to
  `DIVERGING` (the cause must lie there, even where a layer's own output agrees: a query
  projection in the wrong rotary convention still computes its own output), and so does what
  lies after it and cannot be checked alone (given its counterpart's input).

The destination the user passed is never written; the source is run with hooks that are removed
again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import torch
from torch import nn

from .confidence import DISAGREEING, DIVERGING, UNVERIFIED_CAP, VERIFIED_CONFIDENCE
from .errors import RunError
from .graph import UnitGraph
from .hints import ResolvedHints
from .inputs import BoundInputs
from .plan import Match, Plan
from .repair import Context, repair, suspected
from .running import first_line
from .trial import Trial, TrialRunner
from .verify import output_leaves

__all__ = ["decide_by_activations"]

logger = logging.getLogger(__name__)

_HEAD_ATTRS = ("num_heads", "n_head", "num_attention_heads", "n_heads", "heads",
               "num_key_value_heads", "n_kv_heads", "num_kv_heads")


def decide_by_activations(plan: Plan, src: nn.Module, dst: nn.Module, inputs: BoundInputs,
                          src_graph: UnitGraph, dst_graph: UnitGraph,
                          rules: ResolvedHints | None = None) -> Plan:
    """Try the plan by running both models, repair it, and set its confidences by what ran.

    Parameters
    ----------
    plan : Plan
        What structure proposed (it carries its source's tensors).
    src, dst : nn.Module
        The models; ``dst`` is copied, never written.
    inputs : BoundInputs
        The input, as each model takes it, and where it came from.
    src_graph, dst_graph : UnitGraph
        The traced graphs: units and their execution order.
    rules : ResolvedHints, optional
        The reviewer's hints: pinned and dropped destination units are never changed, forbidden
        pairs never proposed.

    Returns
    -------
    Plan
        Repaired where running showed how, with ``verification`` saying what ran and what it
        showed. When the models cannot be run on a made input, the plan as it was, saying so.

    Raises
    ------
    RunError
        If a model does not run on the input the user gave.
    """
    try:
        runner = TrialRunner(src, dst, inputs, src_graph.units, dst_graph.units)
        context = Context(
            src_units=src_graph.units, dst_units=dst_graph.units,
            src_order=list(src_graph.units), dst_order=list(dst_graph.units),
            heads=head_counts(src, dst),
            src_shapes={t: s for u in src_graph.units.values() for t, s in zip(u.tensors, u.shapes)},
            dst_shapes={t: s for u in dst_graph.units.values() for t, s in zip(u.tensors, u.shapes)},
            frozen=frozenset({d for _, d in rules.pins} | rules.dropped) if rules else frozenset(),
            forbidden=rules.forbidden if rules else frozenset())
        if not _finite(runner.source.output):
            why = "not checked: the source's outputs hold NaN or Inf, so they cannot be compared"
            return dataclasses.replace(plan, verification=f"{inputs.how}; {why}"
                                       if inputs.how != "given" else why)
        repaired, trial = repair(plan, runner, context)
    except RunError:
        if inputs.how == "given":  # the user's input does not run: their mistake to hear of
            raise
        why = "not checked: the input made for the models does not run on both"
        return dataclasses.replace(plan, verification=f"{inputs.how}; {why}")
    except Exception as exc:  # a plan the destination cannot take
        why = f"not checked: running the models failed ({type(exc).__name__}: {first_line(exc)})"
        logger.warning("the plan could not be tried: %s", why)
        return dataclasses.replace(plan, verification=f"{inputs.how}; {why}")
    if repaired is not plan:
        repaired = _settled(repaired, dst)
    confirmed = _confirm(repaired, trial, runner, context)
    text = _describe(trial, runner, inputs)
    if not trial.ok:
        logger.warning("the plan does not reproduce the source's outputs: %s", text)
    return dataclasses.replace(confirmed, verification=text)


def _confirm(plan: Plan, trial: Trial, runner: TrialRunner, context: Context) -> Plan:
    """Every match's confidence, set by what the trial of ``plan`` showed (the module docstring)."""
    if trial.ok:
        return dataclasses.replace(plan, matches=tuple(
            _raised(m) if _took_part(m, trial, runner) else m for m in plan.matches))
    runner.run(plan)  # the scratch copy holds this plan: local checks ask it
    complete = _complete(plan, context)
    suspects = set(suspected(plan, trial, context)) if complete else set()
    position = {k: i for i, k in enumerate(context.dst_order)}
    diverged_at = (position.get(trial.order[trial.first_bad], len(position))
                   if trial.first_bad < len(trial.order) else len(position))
    out: list[Match] = []
    for match in plan.matches:
        if "pinned" in match.cost_terms:  # the reviewer's word stands
            out.append(match)
            continue
        cap, why = _verdict(match, trial, runner, suspects, position, diverged_at, complete)
        out.append(dataclasses.replace(match, confidence=min(match.confidence, cap),
                                       costs=(*match.costs, (why, 1.0))))
    return dataclasses.replace(plan, matches=tuple(out))


def _complete(plan: Plan, context: Context) -> bool:
    """Whether the plan claims an exact port: every destination tensor matched, and every layer
    of the source used (only free source tensors, such as cached rotary tables, may stay)."""
    if plan.mismatches or plan.unmatched_dst:
        return False
    used = {k for m in plan.matches for k in m.src}
    return all(u.type_name == "Parameter" or set(u.tensors) & used
               for u in context.src_units.values())


def _finite(output: object) -> bool:
    return all(bool(torch.isfinite(t).all()) for _, t in output_leaves(output)
               if t.is_floating_point() or t.is_complex())


def _verdict(match: Match, trial: Trial, runner: TrialRunner, suspects: set[str],
             position: dict[str, int], diverged_at: int, complete: bool) -> tuple[float, str]:
    """The ceiling of one match after a trial that did not reproduce the source, and why."""
    check = trial.checks.get(match.dst_unit)
    if check is not None and check.output_same is False and check.input_same is True:
        return DISAGREEING, "layer_disagrees"  # the right input, something else computed
    if set(match.dst_unit.split("+")) & suspects:
        return DIVERGING, "diverging_path"  # where a plan that should reproduce stops doing so
    if check is not None and check.output_same is True:
        return UNVERIFIED_CAP, "layer_agrees"
    if check is not None and _after(match, position, diverged_at):
        verdict = runner.local_check(match)  # given its counterpart's input, downstream
        if verdict is True:
            return UNVERIFIED_CAP, "layer_agrees_alone"
        if verdict is False:
            return DISAGREEING, "layer_disagrees"
    if complete and _after(match, position, diverged_at):
        return DIVERGING, "diverging_path"
    return UNVERIFIED_CAP, "unverified"


def _settled(plan: Plan, dst: nn.Module) -> Plan:
    """A repaired plan with its matches in destination order, its mismatches only where nothing
    is loaded now, and its unmatched keys recomputed."""
    aliases = dict(plan.tied_dst)
    dst_keys = [k for k in dst.state_dict(keep_vars=True) if k not in aliases]
    order = {k: i for i, k in enumerate(dst_keys)}
    matches = sorted(plan.matches, key=lambda m: min(order.get(k, len(order)) for k in m.dst))
    loaded = {k for m in matches for k in m.dst}
    used = {k for m in matches for k in m.src}
    mismatches = tuple(mm for mm in plan.mismatches if not set(mm.dst) & loaded)
    src_keys = list(plan.source.specs) if plan.source is not None else [
        *used, *plan.unmatched_src]
    return dataclasses.replace(
        plan, matches=tuple(matches), mismatches=mismatches,
        unmatched_src=tuple(k for k in dict.fromkeys(src_keys) if k not in used),
        unmatched_dst=tuple(k for k in dst_keys if k not in loaded))


def _raised(match: Match) -> Match:
    return dataclasses.replace(match, confidence=max(match.confidence, VERIFIED_CONFIDENCE),
                               costs=(*match.costs, ("verified", 1.0)))


def _took_part(match: Match, trial: Trial, runner: TrialRunner) -> bool:
    """Whether an agreeing trial vouches for a match: its destination layer ran, or the layer
    that owns it ran and uses its weights itself (``nn.MultiheadAttention`` never calls its
    ``out_proj``); a free tensor, which no hook sees, is vouched for by the outputs it feeds."""
    units = match.dst_unit.split("+")
    return all(u in trial.ran or u not in runner.dst_layers
               or u.rpartition(".")[0] in trial.ran for u in units)


def _after(match: Match, position: dict[str, int], diverged_at: int) -> bool:
    return min(position.get(u, diverged_at) for u in match.dst_unit.split("+")) >= diverged_at


def _describe(trial: Trial, runner: TrialRunner, inputs: BoundInputs) -> str:
    verdict = "outputs agree" if trial.ok else "OUTPUTS DIFFER"
    diff = "not comparable" if trial.diff == float("inf") else f"{trial.diff:.3g}"
    compared = sum(c.output_same is not None for c in trial.checks.values())
    parts = [f"{verdict}: max |src - dst| = {diff}",
             f"{trial.agreeing} of {compared} compared layers agree"]
    if trial.scope != "outputs":
        parts.append(f"judged on {trial.scope}")
    if not trial.ok and trial.first_bad < len(trial.order):
        check = trial.checks[trial.order[trial.first_bad]]
        parts.append(f"first diverging layer: {check.dst} <- {check.src}")
    parts.append(f"{runner.trials} trial{'s' if runner.trials != 1 else ''}")
    if inputs.how != "given":
        parts.append(f"input {inputs.how}")
    return "; ".join(parts)


def head_counts(*models: nn.Module) -> tuple[int, ...]:
    """Head counts the models declare (attention heads and key/value heads), smallest first."""
    counts: set[int] = set()
    for model in models:
        holders: Iterable[object] = [*model.modules(), getattr(model, "config", None)]
        for holder in holders:
            for attr in _HEAD_ATTRS:
                value = getattr(holder, attr, None)
                if isinstance(value, int) and value >= 1 and not isinstance(value, bool):
                    counts.add(value)
    return tuple(sorted(counts))
