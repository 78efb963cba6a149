"""Tests for archalign.solve: assignment with an unmatched option, and the regret of each pair."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archalign.solve import Assignment, solve_assignment, solve_sparse_assignment

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


# --------------------------------------------------------------------------- sparse


def _as_sparse(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(np.isfinite(cost))
    return rows, cols, cost[rows, cols]


@settings(max_examples=200, deadline=None)
@given(cost=costs, unmatched=st.floats(0.1, 2.0))
def test_sparse_solves_the_same_problem(cost, unmatched):
    # the dense matrix with its forbidden pairs left out: same optimum; where the same pairs are
    # chosen, the same regrets (every alternative is a candidate)
    cost = np.array(cost)
    dense = solve_assignment(cost, unmatched)
    rows, cols, values = _as_sparse(cost)
    sparse = solve_sparse_assignment(rows, cols, values, cost.shape, unmatched)
    n, m = cost.shape

    def total(a: Assignment) -> float:
        return float(cost[a.rows, a.cols].sum()) + unmatched * (n + m - 2 * len(a.rows))

    assert total(sparse) == pytest.approx(total(dense))
    assert list(sparse.rows) == sorted(sparse.rows)
    if pairs(sparse) == pairs(dense):
        np.testing.assert_allclose(sparse.regret, dense.regret, atol=1e-9)


@pytest.mark.parametrize(("cost", "unmatched"), [c[:2] for c in [
    ([[0.0, 0.4], [0.4, 0.0]], 5.0),
    ([[INF, 1.0], [1.0, INF]], 5.0),
    ([[0.0, 5.0, 5.0], [5.0, 0.0, 0.1]], 10.0),
    ([[3.0, 0.5], [3.0, 3.0]], 1.0),
    ([[0.5], [0.7]], 1.0),
]])
def test_sparse_matches_the_dense_table(cost, unmatched):
    cost = np.array(cost)
    dense = solve_assignment(cost, unmatched)
    sparse = solve_sparse_assignment(*_as_sparse(cost), cost.shape, unmatched)
    assert pairs(sparse) == pairs(dense)
    np.testing.assert_allclose(sparse.regret, dense.regret, atol=1e-12)


def test_sparse_regret_is_capped_by_what_lies_beyond_the_candidates():
    # row 0's only candidate is column 0; any other pair would cost at least 0.3 more
    a = solve_sparse_assignment(np.array([0, 1]), np.array([0, 1]), np.array([0.0, 0.0]),
                                (2, 2), 5.0, beyond=np.array([0.3, 7.0]))
    assert pairs(a) == [(0, 0), (1, 1)]
    np.testing.assert_allclose(a.regret, [0.3, 7.0])


def test_sparse_large_band_is_the_identity():
    n = 5000
    rows = np.repeat(np.arange(n), 3)
    cols = np.clip(rows + np.tile([-1, 0, 1], n), 0, n - 1)
    keep = np.unique(rows * n + cols)
    rows, cols = keep // n, keep % n
    a = solve_sparse_assignment(rows, cols, np.abs(rows - cols) * 0.5, (n, n), 1.25)
    assert a.rows.tolist() == list(range(n)) and a.cols.tolist() == list(range(n))
    np.testing.assert_allclose(a.regret, 1.0)  # swapping with a neighbour: 0.5 + 0.5


@pytest.mark.parametrize(("args", "message"), [
    ((np.array([0]), np.array([0, 1]), np.array([1.0]), (2, 2), 1.0), "one length"),
    ((np.array([0]), np.array([0]), np.array([np.inf]), (1, 1), 1.0), "leave forbidden"),
    ((np.array([0]), np.array([3]), np.array([1.0]), (1, 2), 1.0), "outside the 1 x 2"),
    ((np.array([0]), np.array([0]), np.array([1.0]), (1, 1), 0.0), "unmatched must be > 0"),
])
def test_sparse_value_errors(args, message):
    with pytest.raises(ValueError, match=message):
        solve_sparse_assignment(*args)


def test_sparse_nothing_to_match():
    a = solve_sparse_assignment(np.zeros(0), np.zeros(0), np.zeros(0), (3, 2), 1.0)
    assert pairs(a) == [] and a.regret.size == 0
