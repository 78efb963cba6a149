"""Minimum-cost bipartite assignment where leaving a row or column unmatched is a real option.

The rectangular cost matrix is embedded in a square one (rows ``0..n-1`` are sources, columns
``0..m-1`` destinations), with one dummy column per row and one dummy row per column::

    [ C        | diag(u)  ]     C[i, j] = inf marks a forbidden pair
    [ diag(u)  | 0        ]     u = the price of leaving one side unmatched

so a pair is kept only when its cost is below ``2 u``. Row and column order are those of the
caller, and the result is deterministic for a given matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["Assignment", "solve_assignment"]


@dataclass(frozen=True)
class Assignment:
    """The solved pairs and, for each, how much worse the best local alternative is."""

    rows: np.ndarray  # row (source) index of each pair
    cols: np.ndarray  # column (destination) index of each pair, same order
    regret: np.ndarray  # cost increase of the cheapest alternative that breaks the pair (>= 0)


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
