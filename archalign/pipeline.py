"""The algorithm, top to bottom: read, trace, featurise, cost, solve, plan (and apply)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from .confidence import (
    AMBIGUOUS_INSIDE,
    DEFAULT_MIN_CONFIDENCE,
    UNDECIDED_LAYOUT_CAP,
    prior_confidence,
    trust_in,
)
from .conventions import apply_conventions
from .cost import CostWeights
from .errors import AlignError, SourceError
from .features import UnitFeatures, extract_features, without_own_classes
from .functional import decide_by_activations
from .fused import match_fused
from .graph import Tracer, Unit, UnitGraph, build_units
from .hints import Hints, resolve_hints
from .inputs import BoundInputs, bind, make_inputs
from .layouts import IN_OUT_PRIOR, UNDECIDED_PRIOR
from .match import UnitMatch, match_adapted, match_near_misses, match_pinned, match_units
from .plan import Match, Mismatch, Plan
from .report import LoadReport
from .running import ExampleInputs
from .selfcheck import check_checkpoint
from .skeleton import fit_order
from .source import TensorSource, read_source
from .stacked import match_stacked
from .trace import harmonise_graphs, trace_graph
from .verify import verify as run_verification

__all__ = ["align", "align_and_load"]

logger = logging.getLogger(__name__)


def align(src: Any, dst: Any, *, example_inputs: ExampleInputs = None,
          hints: Hints | None = None, check_outputs: bool = True,
          weights: CostWeights | None = None,
          progress: Callable[[str], None] | None = None) -> Plan:
    """Propose how the source's tensors load into the destination; touches no weights.

    Parameters
    ----------
    src : nn.Module, Mapping[str, Tensor], str or os.PathLike
        The trained model, its state_dict, or a checkpoint file.
    dst : nn.Module or Mapping[str, Tensor]
        The model to load into.
    example_inputs : Tensor, tuple, list or dict, optional
        An input both models accept (a dict is passed as keyword arguments). Used to order the
        layers of models that torch.fx cannot trace, and to check the plan by running both models.
    hints : Hints, optional
        A reviewer's constraints (usually ``plan.hints`` after `Plan.pin`, `Plan.forbid`,
        `Plan.drop`): pinned pairs are matched and anchor the positions of their neighbours,
        forbidden pairs are never matched, dropped destination layers are left untouched.
    check_outputs : bool
        When both sides are modules and an input is at hand (``example_inputs``, or one made
        from the models, `archalign.inputs.make_inputs`, when both are materialised and below
        `AUTO_CHECK_LIMIT` elements), run the plan on a copy of ``dst``, layer by layer
        (`archalign.functional`): where the destination stops reproducing the source, the
        plan is repaired locally (row layouts, member orders, which source); agreement on the
        outputs makes every match that took part certain, disagreement caps every confidence
        and sinks what disagrees; ``plan.verification`` says what ran and what it showed.
        ``dst`` is never written.
    weights : CostWeights, optional
        The cost model's weights; the defaults suit most ports.
    progress : callable, optional
        Called with the name of each stage as it starts ("tracing the source", ...), e.g. to
        show a progress line; the command line uses it.

    Returns
    -------
    Plan
        With ``plan.nonfinite``: the source keys holding NaN or Inf (an in-memory source is
        scanned once, with a warning; a lazy file source is scanned when applied).

    Raises
    ------
    SourceError
        If ``src`` or ``dst`` cannot be read (wrong type, empty, non-tensor values, bad file).
    AlignError
        If a hint's pattern matches nothing, or a pin pairs different numbers of layers; or if,
        without hints, no tensor of the source matches or nearly matches any of the destination
        (another model's file, a file of something else): the error names keys of both sides.
    """
    weights = weights or CostWeights()
    step = progress or (lambda _stage: None)
    step("reading the models")
    source = read_source(src, role="source")
    target = read_source(dst, role="destination")

    inputs, why_not = _inputs(source, target, example_inputs, step, check_outputs)
    step("tracing the source")
    src_traced = trace_graph(source, inputs.src if inputs is not None else example_inputs)
    step("tracing the destination")
    dst_traced = trace_graph(target, inputs.dst if inputs is not None else example_inputs)
    if src_traced.tracer in (Tracer.STATE_DICT, Tracer.SORTED):  # a checkpoint: no classes
        dst_traced = without_own_classes(dst_traced)
        if dst_traced.tracer.executes:
            step("fitting the checkpoint's key tree to the destination's order")
            src_traced = fit_order(src_traced, dst_traced)
    src_graph, dst_graph = harmonise_graphs(
        src_traced, dst_traced, _in_registration_order(src_traced, source),
        _in_registration_order(dst_traced, target))
    trust = trust_in(src_graph.tracer, dst_graph.tracer)  # what the order is worth
    rules = resolve_hints(hints, list(src_graph.units.values()), list(dst_graph.units.values()))
    step("aligning the layer sequences")
    pinned_dst = {d for _, d in rules.pins}
    src_features, dst_features = extract_features(
        src_graph, dst_graph, anchors=rules.pins, skip=rules.dropped - pinned_dst)
    step("solving the assignment")

    found, near = match_pinned(src_features, dst_features, rules.pins)
    src_left = _left(src_features, found + near, "src")
    dst_left = [f for f in _left(dst_features, found + near, "dst")
                if f.unit.key not in rules.dropped]
    no = rules.forbidden
    exact = match_units(src_left, dst_left, weights, no, trust=trust)
    # experts stored as one 3-D tensor (either side): whole families, before any piecemeal fusing
    stacked = match_stacked(_left(src_left, exact, "src"), _left(dst_left, exact, "dst"), weights,
                            no, trust=trust)
    src_rest, dst_rest = _left(src_left, stacked, "src"), _left(dst_left, stacked, "dst")
    exact, fused = match_fused(src_rest, dst_rest, weights, exact, no, trust=trust)
    found += stacked + exact + fused
    for stage in (match_units, match_adapted):  # units displaced by fused matches, then leftovers
        found += stage(_left(src_left, found, "src"), _left(dst_left, found, "dst"), weights, no,
                       trust=trust)
    near += match_near_misses(_left(src_left, found, "src"), _left(dst_left, found + near, "dst"),
                              weights, no, trust=trust)

    plan = _build_plan(found, near, source, target, src_graph.tracer, dst_graph.tracer)
    if not plan.matches and not plan.mismatches and not hints:
        raise AlignError(_nothing_in_common(source, target))
    if source.module is None and target.module is not None:  # a checkpoint: its format's rules
        plan = apply_conventions(plan, target.module, inputs.dst if inputs is not None else None)
    step("scanning the source for NaN/Inf")
    nonfinite = source.scan_nonfinite()  # remembered: apply does not scan these tensors again
    if nonfinite:
        logger.warning("the %s holds NaN or Inf in %d tensors (applying loads them as they are): "
                       "%s", source.description, len(nonfinite), ", ".join(nonfinite))
    plan = dataclasses.replace(plan, hints=hints or Hints(), nonfinite=nonfinite)
    if check_outputs and inputs is not None and source.module is not None and target.module:
        step("checking the plan by running both models")
        plan = decide_by_activations(plan, source.module, target.module, inputs, src_traced,
                                     dst_traced, rules)
    elif check_outputs and source.module is None and target.module is not None:
        plan = _checkpoint_checks(plan, target, inputs, why_not, step)
    elif why_not:
        plan = dataclasses.replace(plan, verification=why_not)
    logger.info("aligned %s -> %s: %d matches, %d mismatches, %d destination keys unmatched",
                source.description, target.description, len(plan.matches),
                len(plan.mismatches), len(plan.unmatched_dst))
    return plan


def align_and_load(src: Any, dst: nn.Module, *, example_inputs: ExampleInputs = None,
                   min_confidence: float = DEFAULT_MIN_CONFIDENCE, strict: bool = False,
                   shape_policy: str | Mapping[str, str] | None = None,
                   verify: ExampleInputs = None,
                   weights: CostWeights | None = None) -> LoadReport:
    """`align` then `Plan.apply` in one call; returns the load report.

    The report carries the plan (``report.plan``: every match's confidence and costs). When some
    destination tensors stay at their initial values (skipped, or without a counterpart), a
    WARNING on the ``archalign`` logger says how many and names the first ones.

    Parameters
    ----------
    shape_policy : str or dict, optional
        Load shape mismatches anyway, by policy (see `Plan.apply`).
    verify : Tensor, tuple, list or dict, optional
        When given (and ``src`` is a module), both models are run on it after the load and the
        report's ``verification`` says whether the outputs agree, and where they first diverge.

    Raises
    ------
    SourceError, PlanError, ApplyError
        As `align` and `archalign.apply.apply_plan` do.
    """
    runnable = src.module if isinstance(src, TensorSource) else src  # read_source(structure=)
    if verify is not None and not isinstance(runnable, nn.Module):
        raise SourceError("verify=... needs the source as an nn.Module (a state_dict cannot run)")
    plan = align(src, dst, example_inputs=example_inputs, weights=weights)
    report = plan.apply(dst, min_confidence=min_confidence, strict=strict,
                        shape_policy=shape_policy)
    if report.missing:
        skipped = {s.dst for s in report.skipped}
        low = sum(k in skipped for k in report.missing)
        logger.warning(
            "%d of %d destination tensors stay at their initial values (%d skipped below "
            "min_confidence %.2f or by shape, %d without counterpart): %s. See report.missing, "
            "and report.plan for the confidences", len(report.missing),
            len(report.loaded) + len(report.missing), low, min_confidence,
            len(report.missing) - low, _first_keys(report.missing))
    if verify is None or not isinstance(runnable, nn.Module):  # (a module: checked above)
        return report
    check = run_verification(runnable, dst, verify, plan=plan)
    return dataclasses.replace(report, verification=check)


def _nothing_in_common(source: TensorSource, target: TensorSource) -> str:
    """Why a plan that would load nothing is refused, naming keys of both sides."""
    return (f"nothing of the {source.description} matches the {target.description}: none of its "
            f"{len(source.specs)} tensors ({_first_keys(tuple(source.specs))}) fits any of the "
            f"destination's {len(target.specs)} ({_first_keys(tuple(target.specs))}) by layer "
            f"kind and shape, nor comes near one. Is it the checkpoint of this model? A training "
            f"file holding several state dicts needs the model's picked (entry=..., --entry); "
            f"a reviewer's pin forces a pair (hints=Hints(pin=...))")


def _first_keys(keys: tuple[str, ...], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


AUTO_CHECK_LIMIT = 200_000_000  # elements: above this, outputs are checked only when asked


def _inputs(source: TensorSource, target: TensorSource, given: ExampleInputs,
            step: Callable[[str], None], check_outputs: bool) -> tuple[BoundInputs | None, str]:
    """The input both modules run on, as each takes it (the user's, or one made from the
    models), and why there is none when there is none ("" when nobody asked for one)."""
    if target.module is None:
        return None, ""
    if source.module is None:  # a checkpoint: an input traces the destination's execution order
        return _destination_input(target.module, given, step, check_outputs and
                                  _cheap_to_run(target))
    if given is not None:
        return bind(source.module, target.module, given), ""
    if not check_outputs:
        return None, ""
    if not (_cheap_to_run(source) and _cheap_to_run(target)):
        return None, (f"not checked: no input was given, and the models are too large (over "
                      f"{AUTO_CHECK_LIMIT:.0e} elements) or on the meta device to run unasked")
    step("making an input for both models")
    made, how = make_inputs(source.module, target.module)
    return made, ("" if made is not None else f"not checked: {how}")


def _destination_input(dst: nn.Module, given: ExampleInputs, step: Callable[[str], None],
                       make: bool) -> tuple[BoundInputs | None, str]:
    """The input the destination runs on to trace its order (and check the loaded plan) when the
    source is a checkpoint: the user's, or (when ``make``) one made from the destination alone;
    None when there is none, and why ("" when it was not to be made)."""
    if given is not None:
        return bind(dst, dst, given), ""
    if not make:
        return None, ""
    step("making an input for the destination")
    made, how = make_inputs(dst, dst)
    if made is None:
        logger.info("no input for the destination (%s): its order is traced without one", how)
        return None, f"no input could be made for the destination ({how})"
    return made, ""


def _checkpoint_checks(plan: Plan, target: TensorSource, inputs: BoundInputs | None,
                       why_not: str, step: Callable[[str], None]) -> Plan:
    """The plan checked on the destination alone (`archalign.selfcheck`), or saying why not."""
    if not _cheap_to_run(target):
        why = (f"the destination is too large (over {AUTO_CHECK_LIMIT:.0e} elements) or on the "
               "meta device to run unasked")
    elif inputs is None:
        why = why_not or "no input for the destination"
    else:
        assert target.module is not None  # the caller's condition
        step("checking the loaded plan on the destination alone")
        return check_checkpoint(plan, target.module, inputs)
    return dataclasses.replace(plan, verification=f"checkpoint checks not run: {why}; no source "
                                                  "model to compare outputs with")


def _cheap_to_run(side: TensorSource) -> bool:
    """Whether to run a model unasked (with an input made for it): not on the meta device (there
    is nothing to run) nor when it is large."""
    total = 0
    for spec in side.specs.values():
        if spec.device == "meta":
            return False
        total += math.prod(spec.shape)
    return total <= AUTO_CHECK_LIMIT


def _in_registration_order(graph: UnitGraph, source: TensorSource) -> list[Unit]:
    """The traced units (with their probed layouts) in registration order."""
    return [graph.units[u.key] for u in build_units(source)]


def _left(features: list[UnitFeatures], found: list[UnitMatch], side: str) -> list[UnitFeatures]:
    """The units of one side that no match has taken yet."""
    taken = {f.unit.key for m in found for f in (m.src if side == "src" else m.dst)}
    return [f for f in features if f.unit.key not in taken]


def _with_priors(conf: float, priors: Sequence[str]) -> float:
    """A tensor's confidence once the layout priors it rests on are counted
    (`archalign.layouts.infer_layouts`)."""
    if UNDECIDED_PRIOR in priors:
        return min(conf, UNDECIDED_LAYOUT_CAP)
    return prior_confidence(conf) if IN_OUT_PRIOR in priors else conf


def _build_plan(found: list[UnitMatch], near: list[UnitMatch], source: TensorSource,
                target: TensorSource, src_tracer: str, dst_tracer: str) -> Plan:
    matches: list[Match] = []
    for um in found:
        src_unit = um.src_label or "+".join(f.unit.key for f in um.src)
        dst_unit = um.dst_label or "+".join(f.unit.key for f in um.dst)
        prior_of = {k: f.unit.prior for f in um.src if f.unit.prior  # a layout: the weights'
                    for k, shape in zip(f.unit.tensors, f.unit.shapes) if len(shape) == 2}
        for pair in um.pairs:
            conf = um.confidence * (1.0 if pair.by_name else AMBIGUOUS_INSIDE)
            priors = sorted({prior_of[k] for k in pair.src if k in prior_of})
            conf = _with_priors(conf, priors)
            matches.append(Match(
                src=pair.src, dst=pair.dst,
                src_shapes=tuple(source.specs[k].shape for k in pair.src),
                dst_shapes=tuple(target.specs[k].shape for k in pair.dst),
                confidence=round(conf, 6),
                costs=(*((k, round(v, 6)) for k, v in um.terms.items()),
                       *((p, 0.0) for p in priors)),
                src_unit=src_unit, dst_unit=dst_unit, ops=pair.ops))
    mismatches: list[Mismatch] = []
    for um in near:
        pinned = "pinned" in um.terms
        for pair in um.pairs:
            s_shape, d_shape = source.specs[pair.src[0]].shape, target.specs[pair.dst[0]].shape
            if pinned and s_shape != d_shape:
                reason = f"pinned, but the shapes differ: source {s_shape} vs destination {d_shape}"
            elif s_shape == d_shape:
                reason = (f"its layer {um.dst[0].unit.key} does not fit source layer "
                          f"{um.src[0].unit.key} as a whole")
            else:
                reason = f"shape mismatch: source {s_shape} vs destination {d_shape}"
            mismatches.append(Mismatch(src=pair.src, dst=pair.dst, src_shapes=(s_shape,),
                                       dst_shapes=(d_shape,), reason=reason,
                                       confidence=round(um.confidence, 6)))
    order = {k: i for i, k in enumerate(target.specs)}
    matches.sort(key=lambda m: min(order[k] for k in m.dst))
    used_src = {k for m in matches for k in m.src}
    used_dst = {k for m in matches for k in m.dst}
    return Plan(
        matches=tuple(matches),
        mismatches=tuple(mismatches),
        unmatched_src=tuple(k for k in source.specs if k not in used_src),
        unmatched_dst=tuple(k for k in target.specs if k not in used_dst),
        tied_src=tuple(sorted(source.aliases.items())),
        tied_dst=tuple(sorted(target.aliases.items())),
        src_tracer=src_tracer,
        dst_tracer=dst_tracer,
        source=source,
    )
