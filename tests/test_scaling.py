"""benchmarks/scaling.py: the growth fit of align time against tensor count."""

from __future__ import annotations

import math

import pytest

from benchmarks.scaling import Point, fit_growth


def _point(n: int | None, seconds: float | None, family: str = "MoE (meta)",
           fitted: bool = True) -> Point:
    return Point(f"case{n}", family, n, seconds, None, fitted=fitted, sweep=True, target=None)


def test_a_power_law_is_fitted_exactly_and_extrapolated() -> None:
    points = [_point(n, 0.002 * n ** 1.5) for n in (100, 400, 1600, 6400)]
    growth = fit_growth(points)["MoE (meta)"]
    assert growth.fit == pytest.approx(1.5)
    assert growth.local == pytest.approx(1.5)
    assert (growth.n_ref, growth.t_ref) == (6400, pytest.approx(0.002 * 6400 ** 1.5))
    assert growth.predict(25600) == pytest.approx(0.002 * 25600 ** 1.5)


def test_both_directions_of_a_pair_make_one_point_their_mean() -> None:
    points = [_point(10, 1.0), _point(100, 10.0), _point(1000, 50.0), _point(1000, 150.0)]
    growth = fit_growth(points)["MoE (meta)"]
    assert growth.local == pytest.approx(1.0)  # 10 s at 100, mean 100 s at 1000
    assert growth.t_ref == pytest.approx(100.0)


def test_unfitted_incomplete_and_small_families_are_left_out() -> None:
    points = [
        *(_point(n, n / 100, family="vision", fitted=False) for n in (10, 100, 1000)),
        _point(10, 1.0, family="llama"), _point(100, 2.0, family="llama"),
        _point(1000, None, family="llama"), _point(None, 3.0, family="llama"),
        *(_point(n, math.sqrt(n)) for n in (4, 16, 64)),
    ]
    grown = fit_growth(points)
    assert list(grown) == ["MoE (meta)"]
    assert grown["MoE (meta)"].fit == pytest.approx(0.5)
