"""Tests for archalign.order_alignment: the order fit's alignment of signatures."""

from __future__ import annotations

import pytest

from archalign.features import GAP
from archalign.order_alignment import (
    FUSED,
    OUTSIDE_BLOCK,
    Costs,
    Item,
    extend_rows,
    first_row,
    stacks,
)


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


@pytest.mark.parametrize("whole, parts, expected", [
    ((24, 8), [(8, 8)] * 3, True),  # q, k, v
    ((12, 8), [(8, 8), (2, 8), (2, 8)], True),  # grouped-query: k and v smaller than q
    ((8, 12), [(8, 8), (2, 8), (2, 8)], True),  # a Conv1D weight stored (in, out)
    ((16, 8), [(8, 8), (4, 8)], False),  # the rows do not add up
    ((16, 8), [(8, 8), (8, 4)], False),  # another trailing shape
])
def test_stacks(whole, parts, expected):
    sig = lambda shape: ("linear", (shape,))  # noqa: E731
    assert stacks(sig(whole), [sig(p) for p in parts]) is expected


def test_norms_never_stack():
    assert not stacks(("norm", ((16,),)), [("norm", ((8,),))] * 2)


def test_grouped_query_projections_align_with_their_fused_unit():
    q, kv, o = lin(8, 8), lin(2, 8), lin(8, 8)
    assert cost([norm(8), q, kv, kv, o], [norm(8), lin(12, 8), o]) == pytest.approx(FUSED)
    assert cost([norm(8), q, o, kv, kv], [norm(8), lin(12, 8), o]) > FUSED  # o among them: no


def test_a_lone_matrix_aligns_with_a_linear_layer():
    """CLIP's ``proj`` (a bare (width, out) parameter) against ``visual_projection``."""
    proj = Item(("param", ((8, 4),)), False)
    assert cost([proj], [Item(("linear", ((4, 8),)), False)]) == pytest.approx(0.25 * GAP)
    assert cost([Item(("param", ((1, 8, 4),)), False)],
                [Item(("linear", ((4, 8),)), False)]) == pytest.approx(2 * GAP)  # no matrix


def test_a_lone_vector_aligns_with_a_layer_holding_only_its_bias():
    """BERT's ``cls.predictions.bias`` (a bare vector) against ELECTRA's head, a Linear whose
    weight is tied to the embedding and so saved under the embedding's name only."""
    bias = Item(("param", ((8,),)), False)
    assert cost([bias], [Item(("linear", ((8,),)), False)]) == pytest.approx(0.25 * GAP)
    assert cost([bias], [Item(("norm", ((8,),)), False)]) == pytest.approx(2 * GAP)  # no vector


def test_two_unequal_parts_never_stack():
    """q + kv and kv + an output projection have the same shapes: neither is guessed."""
    sig = lambda shape: ("linear", (shape,))  # noqa: E731
    assert not stacks(sig((24, 8)), [sig((8, 8)), sig((16, 8))])
    assert not stacks(sig((24, 8)), [sig((16, 8)), sig((8, 8))])
    assert not stacks(sig((12, 8)), [sig((2, 8)), sig((8, 8)), sig((2, 8))])  # q in the middle
    assert stacks(sig((12, 8)), [sig((2, 8)), sig((2, 8)), sig((8, 8))])  # reversed: v, k, q


def test_a_linear_layer_aligns_with_a_pointwise_convolution():
    linear = Item(("linear", ((8, 4), (8,))), True)
    assert cost([linear], [Item(("conv", ((8, 4, 1, 1), (8,))), True)]) == pytest.approx(
        0.25 * GAP)
    assert cost([linear], [Item(("conv", ((8, 4, 3, 3), (8,))), True)]) == pytest.approx(2 * GAP)
