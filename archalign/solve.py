"""Minimum-cost bipartite assignment where leaving a row or column unmatched is a real option.

The rectangular cost matrix is embedded in a square one (rows ``0..n-1`` are sources, columns
``0..m-1`` destinations), with one dummy column per row and one dummy row per column::

    [ C        | diag(u)  ]     C[i, j] = inf marks a forbidden pair
    [ diag(u)  | 0        ]     u = the price of leaving one side unmatched

so a pair is kept only when its cost is below ``2 u``. Row and column order are those of the
caller, and the result is deterministic for a given matrix.

Large problems are solved sparse (`solve_sparse_assignment`): only candidate pairs are edges, the
dummies are one edge per row and per column, and the zero block keeps just the transposed
candidate pattern (enough for every matching of candidate pairs to complete), so the work grows
with the number of candidate pairs instead of ``n * m``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_array
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

__all__ = ["Assignment", "solve_assignment", "solve_sparse_assignment"]


@dataclass(frozen=True)
class Assignment:
    """The solved pairs and, for each, how much worse the best local alternative is."""

    rows: np.ndarray  # row (source) index of each pair
    cols: np.ndarray  # column (destination) index of each pair, same order
    regret: np.ndarray  # cost increase of the cheapest alternative that breaks the pair (>= 0)
    edges: np.ndarray | None = None  # sparse problems: each pair's index among the candidates


def solve_assignment(cost: np.ndarray, unmatched: float) -> Assignment:
    """Solve the assignment with ``linear_sum_assignment`` and measure each pair's margin.

    Parameters
    ----------
    cost : ndarray of shape (n, m)
        Pair costs, ``inf`` where a pair is forbidden.
    unmatched : float
        The price of leaving one row or one column unmatched (> 0).

    Returns
    -------
    Assignment
        Pairs sorted by row. ``regret`` is the smallest cost increase among the alternatives that
        change one pair: both sides left unmatched, the row or the column taking a free partner, or
        two pairs swapping partners. A near-tie gives a regret near 0.

    Raises
    ------
    ValueError
        If ``cost`` is not two-dimensional, holds NaN, or ``unmatched`` is not positive.
    """
    cost = np.asarray(cost, dtype=float)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-d matrix, got shape {cost.shape}")
    if np.isnan(cost).any():
        raise ValueError("cost holds NaN; mark forbidden pairs with inf")
    if not unmatched > 0:
        raise ValueError(f"unmatched must be > 0, got {unmatched}")
    n, m = cost.shape
    empty = np.zeros(0, dtype=int)
    if n == 0 or m == 0 or not np.isfinite(cost).any():
        return Assignment(rows=empty, cols=empty, regret=np.zeros(0))

    big = np.inf
    square = np.zeros((n + m, m + n))
    square[:n, :m] = cost
    square[:n, m:] = big
    square[n:, :m] = big
    square[np.arange(n), m + np.arange(n)] = unmatched
    square[n + np.arange(m), np.arange(m)] = unmatched
    rows, cols = linear_sum_assignment(square)
    real = (rows < n) & (cols < m)
    rows, cols = rows[real], cols[real]
    order = np.argsort(rows, kind="stable")
    rows, cols = rows[order], cols[order]
    return Assignment(rows=rows, cols=cols, regret=_regret(cost, rows, cols, unmatched))


def _regret(cost: np.ndarray, rows: np.ndarray, cols: np.ndarray, unmatched: float) -> np.ndarray:
    if rows.size == 0:
        return np.zeros(0)
    chosen = cost[rows, cols]
    # both sides left unmatched
    regret = 2 * unmatched - chosen
    # the row takes a free column (its column is then left unmatched), or a free row takes the column
    free_cols = np.setdiff1d(np.arange(cost.shape[1]), cols)
    free_rows = np.setdiff1d(np.arange(cost.shape[0]), rows)
    if free_cols.size:
        regret = np.minimum(regret, cost[np.ix_(rows, free_cols)].min(axis=1) - chosen)
    if free_rows.size:
        regret = np.minimum(regret, cost[np.ix_(free_rows, cols)].min(axis=0) - chosen)
    # two pairs swap partners
    if rows.size > 1:
        block = cost[np.ix_(rows, cols)]
        diag = np.diag(block)
        with np.errstate(invalid="ignore"):
            swap = block + block.T - diag[:, None] - diag[None, :]
        np.fill_diagonal(swap, np.inf)
        swap = np.where(np.isnan(swap), np.inf, swap)
        regret = np.minimum(regret, swap.min(axis=1))
    return np.maximum(regret, 0.0)


def solve_sparse_assignment(rows: np.ndarray, cols: np.ndarray, cost: np.ndarray,
                            shape: tuple[int, int], unmatched: float,
                            beyond: np.ndarray | None = None) -> Assignment:
    """`solve_assignment` restricted to candidate pairs (scipy's sparse LAPJV).

    Parameters
    ----------
    rows, cols : ndarray of int
        Row and column index of each candidate pair (no duplicates).
    cost : ndarray of float
        Cost of each candidate pair, finite; leave forbidden pairs out.
    shape : (int, int)
        Number of rows and columns of the whole problem.
    unmatched : float
        The price of leaving one row or one column unmatched (> 0).
    beyond : ndarray of float, optional
        Per row, a lower bound of the cost of any pair that is not a candidate: a pair's regret
        never exceeds the price of giving its row such a partner, so that a margin is never
        claimed against alternatives that were not looked at.

    Returns
    -------
    Assignment
        Pairs sorted by row, with the regrets of `solve_assignment` computed over the candidate
        pairs (a swap counts when both of its new pairs are candidates).

    Raises
    ------
    ValueError
        If the arrays disagree in length, a cost is not finite, an index lies outside ``shape``
        or ``unmatched`` is not positive.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    cost = np.asarray(cost, dtype=float)
    n, m = shape
    if not rows.shape == cols.shape == cost.shape or rows.ndim != 1:
        raise ValueError(f"rows, cols and cost must be 1-d arrays of one length, got shapes "
                         f"{rows.shape}, {cols.shape} and {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("cost holds NaN or inf; leave forbidden pairs out of a sparse problem")
    if rows.size and (rows.min() < 0 or rows.max() >= n or cols.min() < 0 or cols.max() >= m):
        raise ValueError(f"a candidate pair lies outside the {n} x {m} problem")
    if not unmatched > 0:
        raise ValueError(f"unmatched must be > 0, got {unmatched}")
    empty = np.zeros(0, dtype=np.int64)
    if rows.size == 0:
        return Assignment(rows=empty, cols=empty, regret=np.zeros(0))
    # the solver takes no zero weights: every full matching has n + m edges, so a constant
    # added to every edge changes no choice
    shift = 1.0
    r_ids = np.arange(n)
    c_ids = np.arange(m)
    graph = coo_array(
        (np.concatenate([cost + shift, np.full(n, unmatched + shift),
                         np.full(m, unmatched + shift), np.full(rows.size, shift)]),
         (np.concatenate([rows, r_ids, n + c_ids, n + cols]),
          np.concatenate([cols, m + r_ids, c_ids, m + rows]))),
        shape=(n + m, m + n)).tocsr()
    left, right = min_weight_full_bipartite_matching(graph)
    real = (left < n) & (right < m)
    chosen_rows, chosen_cols = left[real].astype(np.int64), right[real].astype(np.int64)
    order = np.argsort(chosen_rows, kind="stable")
    chosen_rows, chosen_cols = chosen_rows[order], chosen_cols[order]
    table = _EdgeIndex(rows, cols, m)
    edges = table.find(chosen_rows, chosen_cols)
    regret = _sparse_regret(rows, cols, cost, n, m, chosen_rows, chosen_cols, cost[edges], table,
                            unmatched)
    if beyond is not None:
        regret = np.minimum(regret, np.maximum(beyond[chosen_rows] - cost[edges], 0.0))
    return Assignment(rows=chosen_rows, cols=chosen_cols, regret=regret, edges=edges)


class _EdgeIndex:
    """Where each candidate pair sits in the candidate arrays, found by bisection."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, m: int) -> None:
        code = rows * m + cols
        self.m = m  # number of columns (a pair's code is row * m + col)
        self.order = np.argsort(code, kind="stable")  # candidate positions by code
        self.codes = code[self.order]  # the codes, ascending

    def find(self, r: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Positions of the pairs (r, c), each of which must be a candidate."""
        return self.order[np.searchsorted(self.codes, r * self.m + c)]

    def cost(self, cost: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Cost of the pairs (r, c); inf where (r, c) is not a candidate."""
        code = r * self.m + c
        at = np.minimum(np.searchsorted(self.codes, code), len(self.codes) - 1)
        return np.where(self.codes[at] == code, cost[self.order[at]], np.inf)


def _sparse_regret(rows: np.ndarray, cols: np.ndarray, cost: np.ndarray, n: int, m: int,
                   chosen_rows: np.ndarray, chosen_cols: np.ndarray, chosen: np.ndarray,
                   table: _EdgeIndex, unmatched: float) -> np.ndarray:
    """`_regret` over candidate pairs only, one vectorised pass over the edges."""
    k = chosen_rows.size
    partner_of_row = np.full(n, -1, dtype=np.int64)
    partner_of_row[chosen_rows] = np.arange(k)
    partner_of_col = np.full(m, -1, dtype=np.int64)
    partner_of_col[chosen_cols] = np.arange(k)
    regret = 2 * unmatched - chosen
    pair_of_edge_row = partner_of_row[rows]  # the pair whose row this edge leaves from
    pair_of_edge_col = partner_of_col[cols]  # the pair whose column this edge enters
    # the row takes a free column / a free row takes the column
    free = (pair_of_edge_row >= 0) & (pair_of_edge_col < 0)
    np.minimum.at(regret, pair_of_edge_row[free], cost[free] - chosen[pair_of_edge_row[free]])
    free = (pair_of_edge_col >= 0) & (pair_of_edge_row < 0)
    np.minimum.at(regret, pair_of_edge_col[free], cost[free] - chosen[pair_of_edge_col[free]])
    # two pairs swap partners: edge (i, l) with i in pair a = (i, j) and l in pair b = (k, l)
    both = (pair_of_edge_row >= 0) & (pair_of_edge_col >= 0) & (
        pair_of_edge_row != pair_of_edge_col)
    a, b = pair_of_edge_row[both], pair_of_edge_col[both]
    swap = cost[both] + table.cost(cost, chosen_rows[b], chosen_cols[a]) - chosen[a] - chosen[b]
    np.minimum.at(regret, a, swap)
    return np.maximum(regret, 0.0)
