"""Tests for archalign.order_alignment: the order fit's alignment of signatures."""

from __future__ import annotations

import pytest

from archalign.features import GAP
from archalign.order_alignment import FUSED, OUTSIDE_BLOCK, Costs, Item, extend_rows, first_row


def lin(rows: int, cols: int, block: bool = True, read: int | None = None) -> Item:
    return Item(("linear", ((rows, cols), (rows,))), block, read)


def norm(width: int, block: bool = True) -> Item:
    return Item(("norm", ((width,), (width,))), block)


def cost(src: list[Item], window: list[Item]) -> float:
    costs = Costs(window)
    return float(extend_rows(first_row(costs), src, costs)[-1][-1])


@pytest.mark.parametrize("src, window, expected", [
    ([norm(8), lin(8, 8)], [norm(8), lin(8, 8)], 0.0),  # the same sequence
    ([norm(8), lin(8, 8)], [lin(8, 8), norm(8)], 2 * GAP),  # a swap: one unit skipped per side
    ([norm(8)], [norm(8), lin(8, 8)], GAP),  # a destination unit skipped
    ([lin(24, 8)], [lin(8, 8), lin(8, 8), lin(8, 8)], FUSED),  # fused qkv against q, k, v
    ([lin(8, 8)] * 3, [lin(24, 8)], FUSED),  # q, k, v against a fused qkv
    ([lin(16, 8)], [lin(8, 8), lin(8, 8)], FUSED),  # gate_up against gate and up
    ([Item(("linear", ((8, 4), (4,))), True)], [lin(4, 8)], 0.25 * GAP),  # a transpose
    ([norm(8, block=False)], [norm(8)], OUTSIDE_BLOCK),  # a final norm against a block's
])
def test_alignment_costs(src, window, expected):
    assert cost(src, window) == pytest.approx(expected)


def test_parts_that_read_different_tensors_are_not_one_fused_unit():
    """q, k and v read one tensor; an output projection after them reads another."""
    together = [lin(8, 8, read=1), lin(8, 8, read=1), lin(8, 8, read=1)]
    apart = [lin(8, 8, read=1), lin(8, 8, read=1), lin(8, 8, read=2)]
    assert cost([lin(24, 8)], together) == pytest.approx(FUSED)
    assert cost([lin(24, 8)], apart) > FUSED


def test_rows_extend_piecewise():
    """Extending the rows unit by unit gives the alignment of the whole sequence."""
    src, window = [norm(8), lin(8, 8), lin(16, 8)], [norm(8), lin(8, 8), lin(8, 8), lin(8, 8)]
    costs = Costs(window)
    rows = first_row(costs)
    for item in src:
        rows = extend_rows(rows, [item], costs)
    assert float(rows[-1][-1]) == pytest.approx(cost(src, window))
