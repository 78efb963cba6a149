"""Tests for archalign.solve: assignment with an unmatched option, and the regret of each pair."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archalign.solve import Assignment, solve_assignment

INF = np.inf


def pairs(a: Assignment) -> list[tuple[int, int]]:
    return [(int(r), int(c)) for r, c in zip(a.rows, a.cols)]


@pytest.mark.parametrize(
    ("cost", "unmatched", "expected_pairs", "expected_regret"),
    [
        # one pair, cheaper than leaving both sides alone (2 * 1.0): regret is the margin to that
        ([[1.0]], 1.0, [(0, 0)], [1.0]),
        ([[1.99]], 1.0, [(0, 0)], [0.01]),
        # more than 2 * unmatched: leaving both unmatched is cheaper
        ([[3.0]], 1.0, [], []),
        # diagonal, margin = the cost of swapping partners
        ([[0.0, 0.4], [0.4, 0.0]], 5.0, [(0, 0), (1, 1)], [0.8, 0.8]),
        ([[1.0, 1.3], [1.3, 1.0]], 5.0, [(0, 0), (1, 1)], [0.6, 0.6]),
        # anti-diagonal; pairs come sorted by row
        ([[5.0, 0.0], [0.0, 5.0]], 10.0, [(0, 1), (1, 0)], [10.0, 10.0]),
        # an exact tie has no margin
        ([[1.0, 1.0], [1.0, 1.0]], 5.0, [(0, 0), (1, 1)], [0.0, 0.0]),
        # the row could take a free column instead
        ([[1.0, 1.3]], 5.0, [(0, 0)], [0.3]),
        # a free row could take the column instead
        ([[1.0], [1.2]], 5.0, [(0, 0)], [0.2]),
        # rectangular: row 1 has a near-tie with the free column 2
        ([[0.0, 5.0, 5.0], [5.0, 0.0, 0.1]], 10.0, [(0, 0), (1, 1)], [5.0, 0.1]),
        # forbidden pairs
        ([[INF, 1.0], [1.0, INF]], 5.0, [(0, 1), (1, 0)], [9.0, 9.0]),
        ([[1.0, INF], [INF, 1.0]], 5.0, [(0, 0), (1, 1)], [9.0, 9.0]),
        # row 1's options all cost more than 2 * unmatched: it stays unmatched, row 0 takes col 1
        ([[3.0, 0.5], [3.0, 3.0]], 1.0, [(0, 1)], [1.5]),
        # the cheap pair wins and the other row is left out
        ([[0.5], [0.7]], 1.0, [(0, 0)], [0.2]),
    ],
)
def test_solve_assignment(cost, unmatched, expected_pairs, expected_regret):
    a = solve_assignment(np.array(cost), unmatched)
    assert pairs(a) == expected_pairs
    np.testing.assert_allclose(a.regret, expected_regret, atol=1e-12)


def test_result_arrays():
    a = solve_assignment(np.array([[0.0, 1.0], [1.0, 0.0]]), 1.0)
    assert isinstance(a, Assignment)
    assert a.rows.tolist() == [0, 1]
    assert a.cols.tolist() == [0, 1]
    assert a.rows.dtype.kind == "i"
    assert a.regret.shape == (2,)


def test_accepts_nested_lists():
    assert pairs(solve_assignment([[2.0, 0.0]], 1.0)) == [(0, 1)]


@pytest.mark.parametrize(
    "cost",
    [np.zeros((0, 3)), np.zeros((3, 0)), np.zeros((0, 0)), np.full((2, 2), INF)],
    ids=["no-rows", "no-cols", "empty", "all-forbidden"],
)
def test_nothing_to_match(cost):
    a = solve_assignment(cost, 1.0)
    assert pairs(a) == []
    assert a.regret.shape == (0,)


def test_deterministic():
    rng = np.random.default_rng(0)
    cost = rng.random((6, 5))
    a, b = solve_assignment(cost, 0.7), solve_assignment(cost.copy(), 0.7)
    assert pairs(a) == pairs(b)
    np.testing.assert_array_equal(a.regret, b.regret)


def test_input_is_not_modified():
    cost = np.array([[1.0, INF], [0.5, 2.0]])
    copy = cost.copy()
    solve_assignment(cost, 1.0)
    np.testing.assert_array_equal(cost, copy)


@pytest.mark.parametrize(
    ("cost", "unmatched", "message"),
    [
        (np.zeros(3), 1.0, "2-d"),
        (np.zeros((2, 2, 2)), 1.0, "2-d"),
        (np.array([[0.0, np.nan]]), 1.0, "NaN"),
        (np.zeros((2, 2)), 0.0, "unmatched must be > 0"),
        (np.zeros((2, 2)), -1.0, "unmatched must be > 0"),
        (np.zeros((2, 2)), float("nan"), "unmatched must be > 0"),
    ],
)
def test_value_errors(cost, unmatched, message):
    with pytest.raises(ValueError, match=message):
        solve_assignment(cost, unmatched)


# --------------------------------------------------------------------------- brute force


def _brute_force(cost: np.ndarray, u: float) -> float:
    """The cheapest partial matching, each unmatched row or column costing ``u``."""
    n, m = cost.shape
    best = u * (n + m)
    for k in range(1, min(n, m) + 1):
        for rows in itertools.combinations(range(n), k):
            for cols in itertools.permutations(range(m), k):
                total = sum(cost[r, c] for r, c in zip(rows, cols)) + u * (n + m - 2 * k)
                best = min(best, total)
    return best


costs = st.integers(1, 3).flatmap(lambda n: st.integers(1, 3).flatmap(
    lambda m: st.lists(st.lists(st.one_of(st.floats(0, 4, allow_nan=False), st.just(INF)),
                                min_size=m, max_size=m), min_size=n, max_size=n)))


@settings(max_examples=60, deadline=None)
@given(cost=costs, unmatched=st.floats(0.1, 2.0))
def test_solution_is_optimal_and_regret_nonnegative(cost, unmatched):
    cost = np.array(cost)
    a = solve_assignment(cost, unmatched)
    n, m = cost.shape
    k = len(a.rows)
    total = float(cost[a.rows, a.cols].sum()) + unmatched * (n + m - 2 * k)
    assert total == pytest.approx(_brute_force(cost, unmatched))
    assert len(set(a.rows.tolist())) == k and len(set(a.cols.tolist())) == k
    assert list(a.rows) == sorted(a.rows)
    assert np.isfinite(cost[a.rows, a.cols]).all()
    assert (a.regret >= 0).all()
    # leaving both sides unmatched is always an alternative
    assert (a.regret <= 2 * unmatched - cost[a.rows, a.cols] + 1e-9).all()
