"""The trial of a plan while aligning: load it into a copy of the destination and run both models.

Planning, not checking: the outputs decide what structure could not (the row layout of a fused
projection) and confirm the plan's matches. The user's destination is never written; the copy is
loaded by `archalign.apply` (the one writer) and compared by `archalign.verify`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator

from torch import nn

from .apply import apply_plan
from .confidence import VERIFIED_CONFIDENCE
from .ops import Op, OpKind
from .plan import Match, Plan
from .report import Verification
from .running import ExampleInputs
from .verify import verify

__all__ = ["decide_by_activations"]

logger = logging.getLogger(__name__)


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
                    matches[i] = dataclasses.replace(m, ops=(*m.ops, Op(OpKind.REGROUP, groups=groups)))
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
