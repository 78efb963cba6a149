"""Tests for archalign.row_parts: the parts a model's code reads a layer's output rows as."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archalign.errors import RunError
from archalign.row_parts import (
    RowParts,
    find_position_offsets,
    find_row_parts,
    parts_of,
    position_offset,
)

D, H = 8, 2  # width, heads
HD = D // H  # head size


class Fused(nn.Module):
    """One fused projection read as q, k, v: as blocks, or per head first."""

    def __init__(self, layout: str, rows: int = 3 * D) -> None:
        super().__init__()
        self.layout = layout
        self.qkv = nn.Linear(D, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        y = self.qkv(x)
        if self.layout == "blocks":  # GPT-2: split, then heads
            q, k, v = (p.view(b, t, H, HD).transpose(1, 2) for p in y.split(D, dim=-1))
        elif self.layout == "per_head":  # GPTBigCode: heads, then split
            q, kv = y.view(b, t, H, 3 * HD).transpose(1, 2).split((HD, 2 * HD), dim=3)
            k, v = kv.split(HD, dim=-1)
        elif self.layout == "converted":  # a dtype conversion and an empty cache on the way
            y = torch.cat([torch.empty(b, t, 0), y.float()], dim=-1)
            q, k, v = (p.reshape(b, t, H, HD).permute(0, 2, 1, 3) for p in y.chunk(3, dim=-1))
        elif self.layout == "whole":
            return torch.relu(y)
        elif self.layout == "overlapping":  # pieces that share rows: not a cut into parts
            first, second = y[..., : 2 * D], y[..., D:]
            return first.sum() + second.sum()
        else:  # the gate and up halves of an MLP
            gate, up = y.chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up
        rotated = torch.cat([-q[..., HD // 2:], q[..., : HD // 2]], dim=-1)  # a rotary half
        scores = (q + rotated) @ k.transpose(-1, -2)
        return (scores.softmax(-1) @ v).sum()


def parts(layout: str, rows: int = 3 * D) -> RowParts | None:
    torch.manual_seed(0)
    model = Fused(layout, rows)
    return find_row_parts(model, ["qkv"], torch.randn(2, 3, D)).get("qkv")


def test_blocks_are_read_as_three_consecutive_runs_of_rows():
    found = parts("blocks")
    assert found == RowParts("qkv", 3 * D, (tuple(range(0, 8)), tuple(range(8, 16)),
                                            tuple(range(16, 24))))


def test_heads_first_is_read_as_interleaved_runs_in_head_order():
    found = parts("per_head")
    assert found is not None and found.rows == 3 * D
    assert found.parts == ((0, 1, 2, 3, 12, 13, 14, 15), (4, 5, 6, 7, 16, 17, 18, 19),
                           (8, 9, 10, 11, 20, 21, 22, 23))


def test_conversions_and_an_empty_cache_keep_the_rows_where_they_are():
    assert parts("converted") == parts("blocks")


def test_two_halves_of_an_mlp_projection():
    found = parts("mlp", rows=2 * D)
    assert found is not None and found.parts == (tuple(range(8)), tuple(range(8, 16)))


@pytest.mark.parametrize("layout", ["whole", "overlapping"])
def test_a_layer_read_whole_or_in_overlapping_pieces_has_no_parts(layout: str):
    assert parts(layout) is None


def test_layers_not_run_or_not_in_the_model_are_absent():
    model = Fused("blocks")
    model.unused = nn.Linear(D, D)
    assert find_row_parts(model, ["unused", "nowhere"], torch.randn(2, 3, D)) == {}


def test_the_model_is_left_as_it_was():
    model = Fused("blocks").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_row_parts(model, ["qkv"], torch.randn(2, 3, D))
    assert model.training and not model.qkv._forward_hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_model_that_fails_raises_a_run_error_and_keeps_no_hook():
    model = Fused("blocks")
    with pytest.raises(RunError, match="running Fused on the example inputs failed"):
        find_row_parts(model, ["qkv"], torch.randn(2, 3, D + 1))
    assert not model.qkv._forward_hooks


@pytest.mark.parametrize(("records", "expected"), [
    ([torch.tensor([0, 1]), torch.tensor([2, 3])], ((0, 1), (2, 3))),
    ([torch.tensor([2, 3]), torch.tensor([1, 0])], ((1, 0), (2, 3))),  # order kept, parts sorted
    ([torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1])], None),  # one part: the whole
    ([torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2, 3])], None),  # two orders
    ([torch.tensor([0, 1])], None),  # rows 2, 3 never read
    ([torch.tensor([0, 1, 0]), torch.tensor([2, 3])], None),  # a row read twice in one piece
    ([torch.tensor([[0, 1], [0, 1]]), torch.tensor([[2, 3], [2, 3]])], ((0, 1), (2, 3))),
])
def test_parts_of_index_records(records: list[torch.Tensor], expected: object):
    assert parts_of(records, 4) == expected


class Positions(nn.Module):
    """Token and position tables; the positions read from ``offset`` (OPT: 2)."""

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.offset = offset
        self.tokens = nn.Embedding(20, D)
        self.positions = nn.Embedding(10 + offset, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        where = torch.arange(ids.shape[1]).expand_as(ids) + self.offset
        return self.tokens(ids) + self.positions(where)


@pytest.mark.parametrize("offset", [0, 2])
def test_a_position_table_is_read_from_its_offset_and_token_ids_are_not_positions(offset: int):
    ids = torch.tensor([[5, 3, 9, 1], [2, 2, 7, 4]])
    found = find_position_offsets(Positions(offset), ["tokens", "positions", "nowhere"], ids)
    assert found == {"positions": offset}


@pytest.mark.parametrize(("index", "expected"), [
    (torch.tensor([[2, 3, 4], [2, 3, 4]]), 2),
    (torch.tensor([0, 1]), 0),
    (torch.tensor([[2, 3, 4], [3, 4, 5]]), None),  # not the same run in every row
    (torch.tensor([3, 1, 2]), None),  # token ids
    (torch.tensor([4]), None),  # one position says nothing
    (torch.tensor([0.0, 1.0]), None),  # not indices
])
def test_position_offset(index: torch.Tensor, expected: int | None):
    assert position_offset(index) == expected
