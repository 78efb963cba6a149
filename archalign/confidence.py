"""Confidence: every factor, band and default threshold, and the formula that combines them.

A match's confidence is ``exp(-structural cost) * (1 - exp(-regret / REGRET_SCALE))``, times the
factors below where the evidence is weaker than it looks (order alone, tensors paired by order).
It is what `apply` compares with ``min_confidence``, and what every review shows in three bands:
below `LOW_CONFIDENCE` (not loaded by default), below `HIGH_CONFIDENCE` (loaded, worth a look),
and from `HIGH_CONFIDENCE` up ("certain": a wrong match must never get there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import Tracer

__all__ = [
    "AMBIGUOUS_INSIDE",
    "CHECKPOINT_CHECK_CAP",
    "DEFAULT_MIN_CONFIDENCE",
    "DISAGREEING",
    "DIVERGING",
    "FULL_TRUST",
    "HIGH_CONFIDENCE",
    "LAYOUT_PRIOR",
    "LOW_CONFIDENCE",
    "NAMES_ONLY_ORDER_WEIGHT",
    "NORM_FIT_MARGIN",
    "NORM_ANTI_FIT",
    "ORDER_ONLY_GROUP",
    "ORDER_ONLY_TRUST",
    "PRIOR_CEILING",
    "REGRET_SCALE",
    "SAME_NAME_IN_TIE",
    "SAME_NAME_MARGIN",
    "VERIFIED_CONFIDENCE",
    "Trust",
    "UNDECIDED_LAYOUT_CAP",
    "UNVERIFIED_CAP",
    "confidence",
    "prior_confidence",
    "trust_in",
]

# ------------------------------------------------------------------------ thresholds and bands

DEFAULT_MIN_CONFIDENCE = 0.5  # `apply` loads matches at or above this unless told otherwise
LOW_CONFIDENCE = DEFAULT_MIN_CONFIDENCE  # reviews show rows below it in red: not loaded by default
HIGH_CONFIDENCE = 0.9  # reviews show rows from it up as certain; a wrong match must stay below it

# ------------------------------------------------------------------------ the formula

REGRET_SCALE = 0.25  # a regret of this size leaves ~63% of the margin factor; 4x that, ~98%

# ------------------------------------------------------------------------ factors

AMBIGUOUS_INSIDE = 0.5  # equal-shaped tensors inside a unit were paired by their order only
LAYOUT_PRIOR = 0.9  # a square weight whose layout is the checkpoint's convention (a prior,
# `archalign.layouts.infer_layouts`): with the fit's own factor below 1, it stays below
# HIGH_CONFIDENCE
PRIOR_CEILING = 0.89  # and never above this: a prior alone is not certainty
UNDECIDED_LAYOUT_CAP = 0.45  # ceiling for a match whose square weight's layout the checkpoint
# leaves open (its layers disagree): below DEFAULT_MIN_CONFIDENCE, apply does not guess
ORDER_ONLY_GROUP = 0.8  # equal-shaped members of a fused group were ordered by execution alone
ORDER_ONLY_TRUST = 0.85  # a match beat same-shaped rivals on a non-execution order (registration
# or names): such an order is a guess, so the match stays below HIGH_CONFIDENCE
SAME_NAME_IN_TIE = 0.7  # where the alignment is ambiguous, a match between identically named
SAME_NAME_MARGIN = 0.5  # layers keeps at least this fit factor, with this much extra margin
VERIFIED_CONFIDENCE = 0.95  # floor for the matches of a plan whose trial reproduced the outputs
UNVERIFIED_CAP = 0.85  # ceiling for every match of a plan whose trial did not reproduce them
DIVERGING = 0.45  # ceiling on the diverging path of a plan that should have reproduced them
DISAGREEING = 0.3  # ceiling for a match whose layer, given its counterpart's input, computes
# something else
CHECKPOINT_CHECK_CAP = 0.8  # ceiling for a match a checkpoint check implicates (a BatchNorm whose
# running statistics do not fit its input; every match when the outputs are NaN/Inf or constant)
NORM_ANTI_FIT = 0.25  # a BatchNorm whose statistics fit its input below minus this (anti-correlated
# across channels) fails the checkpoint check (`archalign.selfcheck.norm_fit`)
NORM_FIT_MARGIN = 0.15  # ... as does one whose input fits another BatchNorm's statistics better
# than its own by this much (a swapped or misplaced source)
NAMES_ONLY_ORDER_WEIGHT = 0.25  # position and context costs are scaled by this when the order
# is names only (`Tracer.SORTED`): tie-breakers, no longer evidence


# ------------------------------------------------------------------------ what the order is worth

@dataclass(frozen=True)
class Trust:
    """What the two graphs' order may count for in costs and confidences (`trust_in`)."""

    order_weight: float = 1.0  # scales the position and context cost terms
    order_in_fit: bool = True  # position and context count against a match's fit
    order_trust: float = 1.0  # factor of a match that beat same-shaped rivals on order alone


FULL_TRUST = Trust()  # execution order on both sides: the order is evidence, at full weight


def trust_in(src: Tracer, dst: Tracer) -> Trust:
    """What order is worth between two harmonised graphs: the weaker side decides.

    Execution order (`Tracer.FX`, `Tracer.HOOKS` on both sides) is evidence. Registration or
    state_dict order is a guess: matches decided by it keep `ORDER_ONLY_TRUST`. An order that is
    names only (`Tracer.SORTED`) enters no fit, and its costs are tie-breakers
    (`NAMES_ONLY_ORDER_WEIGHT`).
    """
    if not (src.ordered and dst.ordered):
        return Trust(order_weight=NAMES_ONLY_ORDER_WEIGHT, order_in_fit=False,
                     order_trust=ORDER_ONLY_TRUST)
    if not (src.executes and dst.executes):
        return Trust(order_trust=ORDER_ONLY_TRUST)
    return FULL_TRUST


def prior_confidence(conf: float) -> float:
    """A match's confidence once a named prior decided part of it (a layout the checkpoint does
    not show): times `LAYOUT_PRIOR`, never above `PRIOR_CEILING`."""
    return min(conf * LAYOUT_PRIOR, PRIOR_CEILING)


def confidence(structural: float, regret: float) -> float:
    """Confidence of a match from its structural cost and its margin to the runner-up.

    ``exp(-structural)`` falls as the pair fits worse; ``1 - exp(-regret / REGRET_SCALE)`` falls to
    0 as the best alternative comes as cheap as the pair itself (a tie).

    >>> round(confidence(0.0, 1.0), 3), confidence(0.3, 0.0)
    (0.982, 0.0)
    """
    fit = float(np.exp(-max(structural, 0.0)))
    margin = float(1.0 - np.exp(-max(regret, 0.0) / REGRET_SCALE))
    return fit * margin
