"""Tests for archalign.graph: units, their shape keys and names, and chain/ordered graphs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archalign.graph import (
    INPUT,
    OUTPUT,
    Tracer,
    Unit,
    UnitGraph,
    build_units,
    chain_graph,
    natural_key,
    ordered_graph,
    size_order,
)
from archalign.source import read_source


class Net(nn.Module):
    """A Linear, a BatchNorm, a bare Parameter on the root and one inside a container."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 3))
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.blk = Block()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(4))
        self.proj = nn.Linear(4, 2, bias=False)


BN_TENSORS = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked")


def unit(key: str, tensors: tuple[str, ...] = (), shapes: tuple[tuple[int, ...], ...] = (),
         type_name: str = "Linear") -> Unit:
    return Unit(key=key, tensors=tensors, shapes=shapes, type_name=type_name)


# --------------------------------------------------------------------------- build_units


def test_build_units_of_a_module():
    units = build_units(read_source(Net()))
    assert units == [
        Unit("cls_token", ("cls_token",), ((1, 3),), "Parameter"),
        Unit("fc", ("fc.weight", "fc.bias"), ((4, 3), (4,)), "Linear"),
        Unit("bn", BN_TENSORS, ((4,), (4,), (4,), (4,), ()), "BatchNorm1d"),
        Unit("blk.gamma", ("blk.gamma",), ((4,),), "Parameter"),
        Unit("blk.proj", ("blk.proj.weight",), ((2, 4),), "Linear"),
    ]


def test_build_units_of_a_state_dict_has_unknown_layer_types():
    units = build_units(read_source(Net().state_dict()))
    assert [(u.key, u.tensors, u.type_name) for u in units] == [
        ("cls_token", ("cls_token",), "Parameter"),
        ("fc", ("fc.weight", "fc.bias"), ""),
        ("bn", BN_TENSORS, ""),
        ("blk.gamma", ("blk.gamma",), "Parameter"),
        ("blk.proj", ("blk.proj.weight",), ""),
    ]


def test_build_units_skips_tied_aliases():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

    units = build_units(read_source(Tied()))
    assert units == [Unit("emb", ("emb.weight",), ((5, 3),), "Embedding")]


def test_build_units_of_a_bare_layer_uses_the_empty_key():
    units = build_units(read_source(nn.Linear(3, 2)))
    assert units == [Unit("", ("weight", "bias"), ((2, 3), (2,)), "Linear")]
    assert units[0].local_names() == ("weight", "bias")


# --------------------------------------------------------------------------- Unit


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        (((4, 3), (4,)), ((4,), (4, 3))),
        (((4,), (4, 3)), ((4,), (4, 3))),
        (((4,), (4,), (4,), (4,), ()), ((), (4,), (4,), (4,), (4,))),
        (((8, 3, 3, 3),), ((8, 3, 3, 3),)),
        ((), ()),
    ],
)
def test_shape_key_is_sorted_shapes(shapes, expected):
    assert unit("u", tuple(f"u.t{i}" for i in range(len(shapes))), shapes).shape_key == expected


def test_shape_key_ignores_registration_order_but_not_shapes():
    a = unit("a", ("a.weight", "a.bias"), ((4, 3), (4,)))
    b = unit("b", ("b.bias", "b.weight"), ((4,), (4, 3)))
    c = unit("c", ("c.weight", "c.bias"), ((3, 4), (3,)))
    assert a.shape_key == b.shape_key
    assert a.shape_key != c.shape_key


@pytest.mark.parametrize(
    ("key", "tensors", "expected"),
    [
        ("fc", ("fc.weight", "fc.bias"), ("weight", "bias")),
        ("layer1.0.bn1", ("layer1.0.bn1.weight", "layer1.0.bn1.running_var"), ("weight", "running_var")),
        ("attn", ("attn.in_proj_weight", "attn.in_proj_bias"), ("in_proj_weight", "in_proj_bias")),
        ("blk.gamma", ("blk.gamma",), ("gamma",)),  # a lone tensor: its key is its own
        ("fc", ("fc.weight",), ("weight",)),  # a one-tensor layer
        ("cls_token", ("cls_token",), ("cls_token",)),
        ("", ("weight", "bias"), ("weight", "bias")),  # the root module as a layer
    ],
)
def test_local_names(key, tensors, expected):
    assert unit(key, tensors, tuple((1,) for _ in tensors)).local_names() == expected


# --------------------------------------------------------------------------- natural_key


def test_natural_key_orders_numbers_by_value():
    keys = ["blocks.10.fc", "blocks.2.fc", "blocks.1.fc", "blocks.1.attn", "head", "blocks.0.fc"]
    assert sorted(keys, key=natural_key) == [
        "blocks.0.fc", "blocks.1.attn", "blocks.1.fc", "blocks.2.fc", "blocks.10.fc", "head",
    ]
    assert natural_key("layer12.conv3") == ((1, "layer"), (0, 12), (1, ".conv"), (0, 3))


# --------------------------------------------------------------------------- graphs


def test_chain_graph_links_each_unit_to_the_next():
    units = [unit("a"), unit("b"), unit("c")]
    g = chain_graph(units, Tracer.REGISTRATION)
    assert isinstance(g, UnitGraph)
    assert g.tracer == "registration"
    assert g.order == ["a", "b", "c"]
    assert sorted(g.graph.edges) == sorted(
        [(INPUT, "a"), ("a", "b"), ("b", "c"), ("c", OUTPUT)])
    assert g.predecessors("a") == [INPUT]
    assert g.successors("a") == ["b"]
    assert g.predecessors("c") == ["b"]
    assert g.successors("c") == [OUTPUT]
    assert g.predecessors("nope") == []
    assert g.successors("nope") == []


def test_chain_graph_keeps_the_given_order():
    g = chain_graph([unit("z"), unit("a")], Tracer.HOOKS)
    assert g.order == ["z", "a"]
    assert g.predecessors("a") == ["z"]


def test_chain_graph_of_no_units():
    g = chain_graph([], Tracer.STATE_DICT)
    assert g.order == []
    assert list(g.graph.edges) == [(INPUT, OUTPUT)]


def test_ordered_graph_puts_unreached_units_last_in_registration_order():
    units = [unit("a"), unit("b"), unit("c"), unit("d")]
    g = ordered_graph(units, ["c", "a", "c", "zzz"], [(INPUT, "c"), ("c", "a"), ("a", "a"),
                                                      ("a", OUTPUT)], Tracer.FX)
    assert g.order == ["c", "a", "b", "d"]
    assert sorted(g.graph.nodes) == sorted([INPUT, "a", "b", "c", "d", OUTPUT])
    # self-loops are dropped
    assert sorted(g.graph.edges) == sorted([(INPUT, "c"), ("c", "a"), ("a", OUTPUT)])
    assert g.predecessors("b") == []
    assert g.tracer == "fx"


def test_predecessors_are_sorted():
    units = [unit("x"), unit("b"), unit("a")]
    g = ordered_graph(units, ["x", "b", "a"], [("x", "a"), ("b", "a"), (INPUT, "a")], Tracer.FX)
    assert g.predecessors("a") == sorted([INPUT, "b", "x"])


@pytest.mark.parametrize(("shapes", "main"), [
    ([(8,), (8, 4)], (8, 4)),  # the weight, not its bias
    ([(3, 3, 3, 3), (100, 100)], (3, 3, 3, 3)),  # rank first
    ([(2, 4), (4, 4), (4, 2)], (4, 4)),  # then size; the first of equal ones
    ([(), (1,)], (1,)),
])
def test_size_order_puts_the_main_tensor_first(shapes, main):
    assert sorted(shapes, key=size_order)[0] == main
