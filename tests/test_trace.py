"""Tests for archalign.trace: the tracer chain (fx, hooks, registration, state_dict) and harmonising."""

from __future__ import annotations

import logging

import pytest
import torch

from archalign.graph import INPUT, OUTPUT, Tracer, Unit, build_units, chain_graph
from archalign.source import read_source
from archalign.trace import harmonise_graphs, trace_graph

from .models import (
    Branches,
    DataDependent,
    Residual,
    Reversed,
)


def edges(g):
    return sorted(g.graph.edges)


def trace(model, example_inputs=None, **options):
    torch.manual_seed(0)
    return trace_graph(read_source(model), example_inputs, **options)


# --------------------------------------------------------------------------- fallbacks


def test_state_dict_gives_a_state_dict_chain():
    g = trace_graph(read_source(Reversed().state_dict()))
    assert g.tracer == "state_dict"
    assert g.order == ["b", "a"]
    assert edges(g) == sorted([(INPUT, "b"), ("b", "a"), ("a", OUTPUT)])


def test_data_dependent_model_without_inputs_falls_back_to_registration(caplog):
    with caplog.at_level(logging.WARNING, logger="archalign.trace"):
        g = trace(DataDependent())
    assert g.tracer == "registration"
    assert g.order == ["b", "a"]
    assert "no example_inputs were given" in caplog.text


def test_failing_example_inputs_fall_back_to_registration(caplog):
    with caplog.at_level(logging.WARNING, logger="archalign.trace"):
        g = trace(DataDependent(), torch.ones(2, 7))  # wrong width: the forward raises
    assert g.tracer == "registration"
    assert g.order == ["b", "a"]
    assert "failed" in caplog.text


# --------------------------------------------------------------------------- harmonise


def _units(*keys):
    return [Unit(k, (f"{k}.weight",), ((2, 2),), "Linear") for k in keys]


REG = _units("b", "a", "c")  # registration order
RUN = [REG[1], REG[0], REG[2]]  # execution order: a, b, c


def _graph(tracer, units):
    return chain_graph(units, Tracer(tracer))


@pytest.mark.parametrize(
    ("src_tracer", "dst_tracer", "expected"),
    [
        # same kind of evidence: kept as they are (execution order for fx/hooks)
        ("fx", "fx", (("fx", "abc"), ("fx", "abc"))),
        ("hooks", "hooks", (("hooks", "abc"), ("hooks", "abc"))),
        ("registration", "registration", (("registration", "bac"), ("registration", "bac"))),
        ("registration", "state_dict", (("registration", "bac"), ("state_dict", "bac"))),
        ("state_dict", "registration", (("state_dict", "bac"), ("registration", "bac"))),
        # one side knows only registration order: both sides fall back to registration order
        ("fx", "registration", (("registration", "bac"), ("registration", "bac"))),
        ("registration", "hooks", (("registration", "bac"), ("registration", "bac"))),
        ("state_dict", "fx", (("state_dict", "bac"), ("registration", "bac"))),
        ("fx", "state_dict", (("registration", "bac"), ("state_dict", "bac"))),
        # fx against hooks: both keep their execution order, as chains
        ("fx", "hooks", (("fx", "abc"), ("hooks", "abc"))),
        ("hooks", "fx", (("hooks", "abc"), ("fx", "abc"))),
        # a sorted file: both sides in natural key order
        ("sorted", "fx", (("sorted", "abc"), ("sorted", "abc"))),
    ],
)
def test_harmonise_graphs(src_tracer, dst_tracer, expected):
    def start(tracer):
        return _graph(tracer, REG if tracer in ("registration", "state_dict", "sorted") else RUN)

    src, dst = harmonise_graphs(start(src_tracer), start(dst_tracer), REG, REG)
    got = ((src.tracer, "".join(src.order)), (dst.tracer, "".join(dst.order)))
    assert got == expected


def test_harmonise_fx_with_hooks_drops_the_fx_data_flow():
    fx_graph = trace(Branches())
    hooks_graph = _graph("hooks", build_units(read_source(Branches())))
    units = build_units(read_source(Branches()))
    src, dst = harmonise_graphs(fx_graph, hooks_graph, units, units)
    assert src.tracer == "fx"
    assert src.order == ["stem", "left", "right", "head"]
    # the branch structure is gone: a plain chain
    assert edges(src) == sorted([(INPUT, "stem"), ("stem", "left"), ("left", "right"),
                                 ("right", "head"), ("head", OUTPUT)])
    assert (dst.tracer, dst.order) == ("hooks", ["stem", "left", "right", "head"])


def test_harmonise_same_tracer_returns_the_same_graphs():
    a, b = trace(Branches()), trace(Residual())
    units_a, units_b = build_units(read_source(Branches())), build_units(read_source(Residual()))
    assert harmonise_graphs(a, b, units_a, units_b) == (a, b)


def test_harmonise_sorted_uses_natural_key_order():
    units = [Unit(k, (f"{k}.weight",), ((2, 2),), "Linear")
             for k in ["blocks.10", "blocks.2", "blocks.1", "head"]]
    src, dst = harmonise_graphs(_graph("sorted", units), _graph("fx", units), units, units)
    assert src.order == ["blocks.1", "blocks.2", "blocks.10", "head"]
    assert dst.order == ["blocks.1", "blocks.2", "blocks.10", "head"]
    assert (src.tracer, dst.tracer) == ("sorted", "sorted")
