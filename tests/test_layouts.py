"""Tests for archalign.layouts: weights stored (in, out), found by calling their layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from archalign.source import read_source
from archalign.trace import trace_graph


def edges(g):
    return sorted(g.graph.edges)


def trace(model, example_inputs=None, **options):
    torch.manual_seed(0)
    return trace_graph(read_source(model), example_inputs, **options)


# --------------------------------------------------------------------------- weight layouts


class Conv1D(nn.Module):
    """Hugging Face GPT-2 style: weight stored (in, out), y = x @ W + b."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class MyLinear(nn.Module):
    """A custom layer stored (out, in), like nn.Linear."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i))

    def forward(self, x):
        return F.linear(x, self.weight)


class Layouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(4, 8)  # (4, 8) stored (in, out)
        self.c_sq = Conv1D(8, 8)  # square: only the values tell
        self.mine = MyLinear(8, 3)  # (3, 8) stored (out, in)
        self.mine_sq = MyLinear(3, 3)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(self.mine_sq(self.mine(self.c_sq(self.c_fc(x)))))


def test_probe_layouts_marks_weights_stored_in_out():
    torch.manual_seed(0)
    g = trace(Layouts())
    units = g.units
    assert units["c_fc"].transposed == (True, False)
    assert units["c_fc"].canonical_shapes == ((8, 4), (8,))
    assert units["c_fc"].shape_key == ((8,), (8, 4))
    assert units["c_sq"].transposed == (True, False)
    assert units["mine"].transposed == ()
    assert units["mine_sq"].transposed == ()
    assert units["lin"].transposed == ()  # torch.nn layers are never probed
    assert g.order == ["c_fc", "c_sq", "mine", "mine_sq", "lin"]


def test_probe_layouts_of_square_weights_on_the_meta_device():
    class Square(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_sq = Conv1D(8, 8)
            self.mine_sq = MyLinear(8, 8)

        def forward(self, x):
            return self.mine_sq(self.c_sq(x))

    model = Square().to("meta")
    g = trace_graph(read_source(model))
    # no values to compare and a square shape: the class name decides
    assert g.units["c_sq"].transposed == (True, False)
    assert g.units["mine_sq"].transposed == ()


def test_state_dict_units_are_not_probed():
    g = trace_graph(read_source(Layouts().state_dict()))
    assert all(u.transposed == () for u in g.units.values())


class CountingLinear(nn.Module):
    """A custom layer that updates a buffer on every training-mode call (like running stats)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.seen += 1
        return F.linear(x, self.weight)


class WithCounting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = CountingLinear()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.layer(x))


def test_tracing_changes_no_tensor():
    torch.manual_seed(0)
    model = WithCounting()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_graph(read_source(model))
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
