"""Tests for archalign.match: unit matching per shape class, near misses, tensor pairing."""

from __future__ import annotations

import math

import pytest

from archalign import match as match_module
from archalign.confidence import confidence
from archalign.cost import CostWeights
from archalign.features import extract_features
from archalign.graph import Tracer, Unit, chain_graph
from archalign.match import UnitMatch, match_adapted, match_near_misses, match_units
from archalign.ops import Op
from archalign.pairing import TensorPair

W = CostWeights()


def linear(key: str, out: int, inp: int, type_name: str = "Linear") -> Unit:
    return Unit(key, (f"{key}.weight", f"{key}.bias"), ((out, inp), (out,)), type_name)


def unit(key: str, names: list[str], shapes: list[tuple[int, ...]], type_name: str = "") -> Unit:
    return Unit(key, tuple(f"{key}.{n}" for n in names), tuple(shapes), type_name)


def features(src: list[Unit], dst: list[Unit], tracer: Tracer = Tracer.FX):
    return extract_features(chain_graph(src, tracer), chain_graph(dst, tracer))


def tp(src: str, dst: str, by_name: bool = True, ops: tuple[Op, ...] = ()) -> TensorPair:
    return TensorPair(src=(src,), dst=(dst,), ops=ops, by_name=by_name)


def mapping(matches: list[UnitMatch]) -> list[tuple[str, str]]:
    out = []
    for m in matches:
        assert len(m.src) == len(m.dst) == 1
        out.append((m.src[0].unit.key, m.dst[0].unit.key))
    return out


# --------------------------------------------------------------------------- match_units


def test_match_units_identical_chains():
    src = [linear("a", 8, 4), linear("b", 8, 8), linear("c", 8, 8), linear("d", 2, 8)]
    fs, fd = features(src, src)
    matches = match_units(fs, fd, W)
    assert mapping(matches) == [("a", "a"), ("b", "b"), ("c", "c"), ("d", "d")]
    assert matches[0].pairs == (tp("a.weight", "a.weight"), tp("a.bias", "a.bias"))
    for m in matches:
        assert m.terms["type"] == 0.0
        assert m.terms["position"] == 0.0
        assert m.terms["context"] == 0.0
        assert m.terms["name"] == 0.0


def test_match_units_maps_a_shallow_model_onto_the_first_blocks_of_a_deep_one():
    src = [linear("s0", 8, 4), linear("s1", 8, 8), linear("s2", 8, 8), linear("s3", 2, 8)]
    dst = [linear("d0", 8, 4), *(linear(f"d{i}", 8, 8) for i in range(1, 5)), linear("d5", 2, 8)]
    fs, fd = features(src, dst)
    assert [f.position for f in fs] == [0.0, 1.0, 2.0, 5.0]
    matches = match_units(fs, fd, W)
    assert mapping(matches) == [("s0", "d0"), ("s1", "d1"), ("s2", "d2"), ("s3", "d5")]

    # tokens {s} vs {d} never overlap; the indices agree: half the name weight
    name = W.name * 0.5
    first = matches[0]
    assert first.terms == pytest.approx(
        {"type": 0.0, "position": 0.0, "context": 0.0, "name": name,
         "regret": 2 * W.unmatched - name})  # alone in its shape class
    assert first.confidence == pytest.approx(confidence(0.0, 2 * W.unmatched - name))

    second = matches[1]
    # the runner-up: s1 moves to the free d3, two ranks away, whose producer is a linear layer
    # of other shapes than s1's (half the credit of an equal one) and whose index differs
    runner_up = W.position * math.log1p(2) + W.context * (1 - 0.5 * (0.5 + 1)) + W.name
    # with the gaps placed first instead of last, s1 would sit at d3: structure cannot tell
    # which two of the four blocks the shallow model kept, and the confidence says so
    assert second.terms == pytest.approx(
        {"type": 0.0, "position": 0.0, "context": 0.0, "name": name, "regret": runner_up - name,
         "spread": 2.0})
    assert second.confidence == pytest.approx(confidence(0.0, runner_up - name) * math.exp(-2))


def test_match_units_never_crosses_shape_classes():
    fs, fd = features([linear("a", 4, 4)], [linear("b", 4, 3)])
    assert match_units(fs, fd, W) == []


def test_match_units_returns_destination_execution_order():
    src = [linear("x", 2, 8), linear("y", 8, 4)]
    dst = [linear("p", 8, 4), linear("q", 2, 8)]
    fs, fd = features(src, dst)
    assert mapping(match_units(fs, fd, W)) == [("y", "p"), ("x", "q")]


def test_match_units_leaves_pairs_dearer_than_unmatched():
    fs, fd = features([linear("a", 4, 4)], [linear("b", 4, 4)])
    # the only cost is the name term (0.1: no common token, equal indices) > 2 * 0.04
    assert match_units(fs, fd, CostWeights(unmatched=0.04)) == []
    assert mapping(match_units(fs, fd, CostWeights(unmatched=0.2))) == [("a", "b")]


def test_match_units_empty():
    fs, _ = features([linear("a", 4, 4)], [linear("a", 4, 4)])
    assert match_units(fs, [], W) == []
    assert match_units([], fs, W) == []


# --------------------------------------------------------------------------- adapted


def test_adapted_linear_into_a_1x1_conv():
    fs, fd = features([linear("fc", 8, 4)],
                      [Unit("conv", ("conv.weight", "conv.bias"), ((8, 4, 1, 1), (8,)), "Conv2d")])
    assert match_units(fs, fd, W) == []
    adapted = match_adapted(fs, fd, W)
    assert mapping(adapted) == [("fc", "conv")]
    m = adapted[0]
    assert m.pairs == (tp("fc.weight", "conv.weight",
                          ops=(Op("reshape", shape=(8, 4, 1, 1), from_shape=(8, 4)),)),
                       tp("fc.bias", "conv.bias"))
    # a linear is a 1x1 conv's family, and reading its weight so only adds axes of size 1
    assert m.terms["type"] == pytest.approx(W.same_family)
    assert m.terms["adapt"] == pytest.approx(W.singleton)
    total = W.same_family + W.singleton + W.name * 0.5  # "fc" vs "conv": equal (no) indices
    assert m.terms["regret"] == pytest.approx(2 * W.unmatched - total)
    assert m.confidence == pytest.approx(
        confidence(W.same_family + W.singleton, 2 * W.unmatched - total))


def test_adapting_more_than_singleton_axes_costs_the_full_price():
    fs, fd = features([unit("a", ["weight"], [(8, 4)], "Linear")],
                      [unit("b", ["weight"], [(4, 8)], "Linear")])  # a transpose, by shapes
    (m,) = match_adapted(fs, fd, W)
    assert m.terms["adapt"] == pytest.approx(W.adapt)


def test_adapted_needs_equal_element_counts():
    fs, fd = features([linear("fc", 8, 4)],
                      [Unit("conv", ("conv.weight", "conv.bias"), ((8, 4, 3, 3), (8,)), "Conv2d")])
    assert match_adapted(fs, fd, W) == []


# --------------------------------------------------------------------------- near misses


def test_near_miss_same_family_other_shape():
    fs, fd = features([linear("fc", 10, 4)], [linear("fc", 5, 4)])
    assert match_units(fs, fd, W) == []
    near = match_near_misses(fs, fd, W)
    assert mapping(near) == [("fc", "fc")]
    shape = W.shape * 0.5  # one of two dimensions differs
    assert near[0].terms == pytest.approx({"type": 0.0, "position": 0.0, "context": 0.0, "name": 0.0,
                                           "shape": shape, "regret": 2 * W.unmatched - shape})
    assert near[0].confidence == pytest.approx(confidence(shape, 2 * W.unmatched - shape))


def test_a_checkpoints_lone_matrix_is_a_near_miss_of_a_longer_embedding():
    """A checkpoint's 2-d weight reads as a linear layer, and may be a position table."""
    src = [unit("wpe", ["weight"], [(10, 4)])]  # no class: its family is a guess
    dst = [Unit("embed_positions", ("embed_positions.weight",), ((12, 4),), "Embedding")]
    fs, fd = features(src, dst, Tracer.STATE_DICT)
    assert mapping(match_near_misses(fs, fd, W)) == [("wpe", "embed_positions")]
    known = [Unit("wpe", ("wpe.weight",), ((10, 4),), "Linear")]  # both classes known: no
    assert match_near_misses(*features(known, dst), W) == []


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ([linear("fc", 10, 4)], [Unit("fc", ("fc.weight", "fc.bias"), ((5, 4), (5,)), "Embedding")]),
        ([linear("fc", 10, 4)], [Unit("fc", ("fc.weight",), ((5, 4),), "Linear")]),
        ([linear("fc", 10, 4)], [Unit("fc", ("fc.weight", "fc.bias"), ((5, 4, 1), (5,)), "Linear")]),
    ],
    ids=["other-family", "other-tensor-count", "other-rank"],
)
def test_no_near_miss(src, dst):
    fs, fd = features(src, dst)
    assert match_near_misses(fs, fd, W) == []


def test_near_miss_with_every_dimension_different():
    fs, fd = features([linear("fc", 10, 4)], [linear("fc", 5, 3)])
    near = match_near_misses(fs, fd, W)
    assert mapping(near) == [("fc", "fc")]
    assert near[0].terms["shape"] == pytest.approx(W.shape * 1.0)


def test_near_miss_empty_sides():
    fs, fd = features([linear("fc", 10, 4)], [linear("fc", 5, 4)])
    assert match_near_misses([], fd, W) == []
    assert match_near_misses(fs, [], W) == []


# --------------------------------------------------------------------------- large classes


@pytest.mark.parametrize("deleted", [None, 250])
def test_a_large_class_solved_sparse_agrees_with_the_dense_solution(monkeypatch, deleted):
    # 600 identical layers renamed (one deleted): the sparse problem over position windows finds
    # the matches and margins the dense 600 x 600 problem finds
    src = [linear(f"enc.{i}", 8, 8) for i in range(600)]
    dst = [linear(f"blocks.{i}.fc", 8, 8) for i in range(600) if i != deleted]
    s, d = features(src, dst)
    assert len(s) * len(d) > match_module.SPARSE_ABOVE
    sparse = match_units(s, d, W)
    monkeypatch.setattr(match_module, "SPARSE_ABOVE", 10**9)
    dense = match_units(s, d, W)
    assert mapping(sparse) == mapping(dense)
    # margins beyond the windows are bounded, never assumed: at most a little less confident
    for a, b in zip(sparse, dense):
        assert b.confidence - 0.01 <= a.confidence <= b.confidence + 1e-12
    if deleted is None:
        assert mapping(sparse) == [(f"enc.{i}", f"blocks.{i}.fc") for i in range(600)]


def test_a_large_class_keeps_forbidden_pairs_apart():
    src = [linear(f"enc.{i}", 8, 8) for i in range(600)]
    dst = [linear(f"blocks.{i}.fc", 8, 8) for i in range(600)]
    s, d = features(src, dst)
    found = dict(mapping(match_units(s, d, W, forbidden=frozenset({("enc.7", "blocks.7.fc")}))))
    assert found.get("enc.7") != "blocks.7.fc"
    assert found["enc.100"] == "blocks.100.fc"
