"""Tests for archalign.confidence: the formula, and the bands every review and `apply` share."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from archalign import confidence as confidence_module
from archalign.confidence import (
    DEFAULT_MIN_CONFIDENCE,
    HIGH_CONFIDENCE,
    LOW_CONFIDENCE,
    REGRET_SCALE,
    confidence,
)

# --------------------------------------------------------------------------- the formula


@pytest.mark.parametrize(
    ("structural", "regret", "expected"),
    [
        (0.0, 0.0, 0.0),  # a tie: no confidence however good the fit
        (5.0, 0.0, 0.0),
        (0.0, math.inf, 1.0),
        (0.0, REGRET_SCALE, 1 - math.exp(-1)),
        (0.0, 4 * REGRET_SCALE, 1 - math.exp(-4)),
        (1.0, math.inf, math.exp(-1)),
        (0.5, 0.5, math.exp(-0.5) * (1 - math.exp(-2))),
        (-1.0, math.inf, 1.0),  # negative costs are clamped to 0
        (0.0, -1.0, 0.0),
    ],
)
def test_confidence_values(structural, regret, expected):
    assert confidence(structural, regret) == pytest.approx(expected)


finite = st.floats(0, 50, allow_nan=False)


@given(s1=finite, s2=finite, r1=finite, r2=finite)
def test_confidence_is_monotone_and_bounded(s1, s2, r1, r2):
    c = confidence(s1, r1)
    assert 0.0 <= c <= 1.0
    lo_s, hi_s = sorted((s1, s2))
    lo_r, hi_r = sorted((r1, r2))
    # worse fit, less confidence; bigger margin, more confidence
    assert confidence(hi_s, r1) <= confidence(lo_s, r1)
    assert confidence(s1, lo_r) <= confidence(s1, hi_r)


def test_confidence_strictly_decreasing_in_structural_cost():
    values = [confidence(s, 1.0) for s in (0.0, 0.1, 0.5, 1.0, 3.0)]
    assert values == sorted(values, reverse=True)
    assert len(set(values)) == len(values)



# --------------------------------------------------------------------------- bands


def test_bands_are_ordered_and_the_default_threshold_is_the_low_band():
    assert 0.0 < LOW_CONFIDENCE == DEFAULT_MIN_CONFIDENCE < HIGH_CONFIDENCE < 1.0


def test_every_factor_keeps_a_confidence_in_the_unit_interval():
    for name in confidence_module.__all__:
        value = getattr(confidence_module, name)
        if isinstance(value, float):
            assert 0.0 < value <= 1.0, name


def test_a_prior_never_makes_a_match_certain():
    from archalign.confidence import LAYOUT_PRIOR, PRIOR_CEILING, prior_confidence

    assert prior_confidence(0.6) == pytest.approx(0.6 * LAYOUT_PRIOR)
    assert prior_confidence(1.0) == PRIOR_CEILING < HIGH_CONFIDENCE
