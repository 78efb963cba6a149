"""Tests for archalign.trace_hooks: the order recorded by forward pre-hooks while running."""

from __future__ import annotations

import pytest
import torch

from archalign.graph import INPUT, OUTPUT, Unit
from archalign.source import read_source
from archalign.trace import trace_graph
from archalign.trace_hooks import place_unreached

from .models import (
    DataDependent,
    DataDependentKwargs,
    WithDummy,
    WithToken,
)


def edges(g):
    return sorted(g.graph.edges)


def trace(model, example_inputs=None, **options):
    torch.manual_seed(0)
    return trace_graph(read_source(model), example_inputs, **options)


@pytest.mark.parametrize("positive", [True, False])
def test_data_dependent_model_with_inputs_uses_hooks(positive):
    x = torch.ones(2, 3) if positive else -torch.ones(2, 3)
    g = trace(DataDependent(), x)
    assert g.tracer == "hooks"
    assert g.order == ["a", "b"]  # execution order recovered
    assert edges(g) == sorted([(INPUT, "a"), ("a", "b"), ("b", OUTPUT)])


@pytest.mark.parametrize(
    "inputs", [(torch.ones(2, 3),), [torch.ones(2, 3)]], ids=["tuple", "list"])
def test_hooks_accept_positional_sequences(inputs):
    assert trace(DataDependent(), inputs).order == ["a", "b"]


def test_hooks_pass_a_dict_as_keyword_arguments():
    g = trace(DataDependentKwargs(), {"x": torch.ones(2, 3)})
    assert (g.tracer, g.order) == ("hooks", ["a", "b"])


def test_hooks_use_dummy_inputs_when_none_are_given():
    g = trace(WithDummy())
    assert (g.tracer, g.order) == ("hooks", ["a", "b"])


def test_hooks_restore_training_flags_and_remove_hooks():
    model = DataDependent()
    model.train()
    model.a.eval()
    x = torch.ones(2, 3)
    before = model(x).detach()
    trace_graph(read_source(model), x)
    assert model.training is True
    assert model.b.training is True
    assert model.a.training is False
    for m in model.modules():
        assert len(m._forward_pre_hooks) == 0
    assert torch.equal(model(x), before)


def test_hooks_put_parameters_of_the_root_first():
    class TokenFirst(WithToken):
        def forward(self, x):
            h = self.proj(x)
            if h.sum() > 0:
                h = h + self.pos
            return self.head(h)

    g = trace(TokenFirst(), torch.ones(2, 3))
    assert g.tracer == "hooks"
    # a root parameter is recorded when the root starts, before any layer
    assert g.order == ["pos", "proj", "head"]


class _PoolThenHead(torch.nn.Module):
    """An attention pool (nn.MultiheadAttention reads its out_proj's weight itself, never
    calling it) before a norm and a head, behind data-dependent control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(4, 1, batch_first=True)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        h = self.attention(x, x, x)[0]
        if h.sum() > 0:
            h = -h
        return self.head(self.norm(h))


def test_a_layer_its_parent_reads_without_calling_runs_with_the_parent():
    g = trace(_PoolThenHead(), torch.randn(2, 3, 4))
    assert g.tracer == "hooks"
    assert g.order == ["attention", "attention.out_proj", "norm", "head"]


def test_place_unreached_keeps_the_others_last():
    units = [Unit(k, (f"{k}.weight",), ((2, 2),), "Linear")
             for k in ("a", "a.inner", "b", "spare", "b.x.inner")]
    assert place_unreached(["b", "a"], units) == ["b", "b.x.inner", "a", "a.inner", "spare"]
