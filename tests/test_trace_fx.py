"""Tests for archalign.trace_fx: execution order and data flow from torch.fx."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torchvision
from torch import nn

from archalign import trace_fx
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


# --------------------------------------------------------------------------- at scale


def reads_partition(g):
    """Which units read the very same tensor (the ids themselves mean nothing)."""
    groups: dict[int, list[str]] = {}
    for key, value in g.reads.items():
        groups.setdefault(value, []).append(key)
    return sorted(sorted(keys) for keys in groups.values())


def assert_same_graph(collapsed, full):
    assert collapsed.tracer == full.tracer == "fx"
    assert collapsed.order == full.order  # key for key
    assert list(collapsed.graph.nodes) == list(full.graph.nodes)
    assert edges(collapsed) == edges(full)
    assert reads_partition(collapsed) == reads_partition(full)


def raw_walk(monkeypatch):
    """Make trace_fx keep every edge of the data flow (then reduced by networkx), as before
    the one-pass reduction."""
    walk = trace_fx._walk
    monkeypatch.setattr(trace_fx, "_walk", lambda *args, reduce: walk(*args, reduce=False))


@pytest.mark.parametrize("style", ["a", "b"], ids=["mixtral-names", "deepseek-names"])
def test_fx_collapses_layers_and_experts_to_the_full_graph(style, caplog):
    from corpus.scale import MoeShape, make_moe

    with torch.device("meta"):
        model = make_moe(MoeShape(layers=5, experts=6), style, traceable=True)
    with caplog.at_level(logging.DEBUG, logger="archalign.trace_fx"):
        collapsed = trace(model)
    assert "traced MoeLM with repeated blocks cut to two; expanded" in caplog.text
    full = trace(model, collapse_repeats=False)
    assert_same_graph(collapsed, full)
    assert len(collapsed.units) == 5 * (7 + 3 * 6) + 3
    assert len(model.state_dict()) == len(collapsed.units)  # the cut containers were put back


@pytest.mark.parametrize("build", [
    lambda: torchvision.models.resnet50(weights=None),
    lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False),
    lambda: timm.create_model("convnext_atto", pretrained=False),
], ids=["torchvision-resnet50", "timm-vit", "timm-convnext"])
def test_fx_collapsed_vision_models_trace_to_the_full_graph(build):
    with torch.device("meta"):
        model = build()
    assert_same_graph(trace(model), trace(model, collapse_repeats=False))


class TwoOutputs(nn.Module):
    """A block whose second output the next block does not read."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.side = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.main(x), self.side(x)


class SkipFromFirst(nn.Module):
    """Identical blocks in a chain, and a head that also reads the first block's side output: an
    edge from the first block past the second, which the expansion cannot place."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TwoOutputs() for _ in range(5))
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        x, first = self.blocks[0](x)
        for block in self.blocks[1:]:
            x, _ = block(x)
        return self.head(x + first)


def test_fx_an_edge_past_the_second_block_traces_every_block(caplog):
    model = SkipFromFirst()
    with caplog.at_level(logging.DEBUG, logger="archalign.trace_fx"):
        collapsed = trace(model)
    assert "leaves the block blocks.0 past blocks.1); tracing every block" in caplog.text
    assert_same_graph(collapsed, trace(model, collapse_repeats=False))
    assert collapsed.predecessors("head") == ["blocks.0.side", "blocks.4.main"]


@pytest.mark.parametrize("model", [
    Residual, Branches, WithToken, Nested, Attention, Metadata, Tied, SkipFromFirst,
    lambda: torchvision.models.resnet18(weights=None),
    lambda: torchvision.models.densenet121(weights=None),
    lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False),
], ids=lambda m: getattr(m, "__name__", "model"))
def test_fx_one_pass_edges_are_the_transitive_reduction(model, monkeypatch):
    built = model()
    fast = trace(built, collapse_repeats=False)
    raw_walk(monkeypatch)
    slow = trace(built, collapse_repeats=False)
    assert_same_graph(fast, slow)
