"""Tests for archalign.layouts: weights stored (in, out), found by calling their layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import archalign
from archalign.confidence import DEFAULT_MIN_CONFIDENCE, HIGH_CONFIDENCE
from archalign.graph import Unit
from archalign.layouts import IN_OUT_PRIOR, UNDECIDED_PRIOR, infer_layouts
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
    """Nothing runs a checkpoint: only its shapes mark a layout (a Conv1D weight whose bias has
    one entry per column), never a probe; its layers disagree (Conv1D and Linear), so its square
    weights' layouts are open."""
    g = trace_graph(read_source(Layouts().state_dict()))
    marked = {u.key for u in g.units.values() if any(u.transposed)}
    shown = {u.key for u in g.units.values()
             if sorted(u.local_names()) == ["bias", "weight"] and len(u.shapes[0]) == 2
             and u.shapes[0][0] != u.shapes[0][1] and u.shapes[1][0] == u.shapes[0][1]}
    assert marked == shown == {"c_fc"}
    assert {u.key: u.prior for u in g.units.values() if u.prior} == {"c_sq": UNDECIDED_PRIOR}


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


# --------------------------------------------------------------------------- from a checkpoint



def biased(key: str, weight: tuple[int, int], bias: int) -> Unit:
    return Unit(key, (f"{key}.weight", f"{key}.bias"), (weight, (bias,)), "")


@pytest.mark.parametrize("units, flags, priors", [
    # GPT-2: every non-square layer stores (in, out), so the square one follows
    ([biased("c_attn", (8, 24), 24), biased("c_proj", (8, 8), 8), biased("c_fc", (8, 32), 32)],
     [(True, False), (True, False), (True, False)], ["", IN_OUT_PRIOR, ""]),
    # nn.Linear everywhere: nothing to mark
    ([biased("fc1", (32, 8), 32), biased("proj", (8, 8), 8), biased("fc2", (8, 32), 8)],
     [(), (), ()], ["", "", ""]),
    # one witness is not a convention: the square layer keeps the default, unflagged
    ([biased("c_attn", (8, 24), 24), biased("c_proj", (8, 8), 8)],
     [(True, False), ()], ["", ""]),
    # the layers disagree: the square one's layout is open
    ([biased("a", (8, 24), 24), biased("b", (8, 8), 8), biased("c", (8, 32), 32),
      biased("d", (32, 8), 32)],
     [(True, False), (), (True, False), ()], ["", UNDECIDED_PRIOR, "", ""]),
])
def test_infer_layouts(units, flags, priors):
    found = infer_layouts(units)
    assert [u.transposed for u in found] == flags
    assert [u.prior for u in found] == priors


class Mlp(nn.Module):
    def __init__(self, make, dim: int = 8) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.up, self.mix, self.down = make(dim, 4 * dim), make(4 * dim, 4 * dim), make(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mix(torch.tanh(self.up(x)))))


def test_a_conv1d_checkpoint_loads_its_square_weight_transposed_with_a_named_prior():
    torch.manual_seed(0)
    src, dst = Mlp(Conv1D), Mlp(nn.Linear)
    plan = archalign.align(src.state_dict(), dst)
    report = plan.apply(dst)
    x = torch.randn(3, 8)
    assert torch.allclose(src(x), dst(x), atol=1e-5)  # the square weight too, transposed
    (square,) = [m for m in plan.matches if m.dst == ("mix.weight",)]
    assert IN_OUT_PRIOR in square.cost_terms
    assert DEFAULT_MIN_CONFIDENCE <= square.confidence < HIGH_CONFIDENCE
    assert "mix.weight" in report.loaded
    shown = next(m for m in plan.matches if m.dst == ("up.weight",))
    assert IN_OUT_PRIOR not in shown.cost_terms  # its own shapes show its layout
