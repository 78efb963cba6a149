"""Tests for archalign.trace_fx: execution order and data flow from torch.fx."""

from __future__ import annotations

import torch
from torch import nn

from archalign.graph import INPUT, OUTPUT
from archalign.source import read_source
from archalign.trace import trace_graph

from .models import (
    Attention,
    Branches,
    Metadata,
    Nested,
    Residual,
    Reversed,
    Tied,
    WithToken,
)


def edges(g):
    return sorted(g.graph.edges)


def trace(model, example_inputs=None, **options):
    torch.manual_seed(0)
    return trace_graph(read_source(model), example_inputs, **options)


# --------------------------------------------------------------------------- fx


def test_fx_order_and_edges_of_a_chain():
    g = trace(Reversed())
    assert g.tracer == "fx"
    assert g.order == ["a", "b"]  # execution order, not registration order
    assert edges(g) == sorted([(INPUT, "a"), ("a", "b"), ("b", OUTPUT)])


def test_fx_residual_feeds_only_the_nearest_producer():
    g = trace(Residual())
    assert g.order == ["fc1", "fc2", "fc3"]
    assert g.predecessors("fc1") == [INPUT]
    assert g.predecessors("fc2") == ["fc1"]
    # without the transitive reduction fc3 would read <input>, fc1 and fc2
    assert g.predecessors("fc3") == ["fc2"]
    assert g.successors("fc3") == [OUTPUT]
    assert edges(g) == sorted([(INPUT, "fc1"), ("fc1", "fc2"), ("fc2", "fc3"), ("fc3", OUTPUT)])


def test_fx_branches():
    g = trace(Branches())
    assert g.order == ["stem", "left", "right", "head"]
    assert g.predecessors("stem") == [INPUT]
    assert g.successors("stem") == ["left", "right"]
    assert g.predecessors("left") == ["stem"]
    assert g.predecessors("right") == ["stem"]
    assert g.predecessors("head") == ["left", "right"]
    assert g.successors("head") == [OUTPUT]


def test_fx_metadata_reads_are_not_data_flow():
    g = trace(Metadata())
    assert edges(g) == sorted([(INPUT, "fc1"), (INPUT, "fc2"), ("fc1", OUTPUT), ("fc2", OUTPUT)])
    assert g.predecessors("fc2") == [INPUT]


def test_fx_bare_parameter_is_ordered_where_it_is_read():
    g = trace(WithToken())
    assert g.order == ["proj", "pos", "head"]
    assert g.predecessors("pos") == []  # a parameter reads nothing
    assert g.predecessors("head") == ["pos", "proj"]
    assert g.predecessors("proj") == [INPUT]


def test_fx_traces_through_containers_and_skips_parameter_free_layers():
    g = trace(Nested())
    assert g.order == ["body.0", "body.2.0", "norm"]
    assert edges(g) == sorted([(INPUT, "body.0"), ("body.0", "body.2.0"), ("body.2.0", "norm"),
                               ("norm", OUTPUT)])


def test_fx_layer_with_a_child_layer_is_one_leaf_chained_inside():
    g = trace(Attention())
    assert g.order == ["attn", "attn.out_proj", "fc"]
    assert edges(g) == sorted([(INPUT, "attn"), ("attn", "attn.out_proj"), ("attn.out_proj", "fc"),
                               ("fc", OUTPUT)])


def test_fx_tied_weight_resolves_to_its_primary_unit():
    g = trace(Tied())
    assert g.order == ["emb", "mid"]
    assert sorted(g.graph.nodes) == sorted([INPUT, "emb", "mid", OUTPUT])
    assert g.predecessors("emb") == [INPUT]
    assert g.predecessors("mid") == ["emb"]
    # the head reads mid's output and emb's tied weight; emb -> <output> is implied by
    # emb -> mid -> <output> and removed by the transitive reduction
    assert edges(g) == sorted([(INPUT, "emb"), ("emb", "mid"), ("mid", OUTPUT)])


def test_fx_units_not_used_by_forward_go_last():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.Linear(2, 2)
            self.used = nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    g = trace(Unused())
    assert g.order == ["used", "spare"]
    assert g.predecessors("spare") == []
    assert g.successors("spare") == []


class CachesOnItself(nn.Module):
    """A forward that caches a value on its module, as Meta's LLaMA does with ``freqs_cis``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.scale = torch.ones(3)
        self.register_buffer("offset", torch.zeros(3))

    def forward(self, x):
        self.scale = self.scale.to(x.device)
        self.offset = self.offset + 0  # a registered buffer, reassigned
        out = self.fc(x) * self.scale + self.offset
        for _ in out:  # data-dependent iteration: fx gives up after the assignments
            pass
        return out


def test_a_failed_trace_leaves_no_proxy_on_the_model():
    model = CachesOnItself()
    scale, offset = model.scale, model.offset
    g = trace(model)
    assert g.tracer != "fx"
    assert model.scale is scale and model.offset is offset
    model(torch.ones(2, 3))  # still runs
