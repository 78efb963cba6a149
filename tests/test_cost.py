"""Tests for archalign.cost: each cost term on hand-built unit features, and shape_distance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from archalign.cost import (
    COST_TERMS,
    INCOMPATIBLE,
    CostMatrices,
    CostWeights,
    compute_costs,
    shape_distance,
)
from archalign.features import UnitFeatures, layer_family
from archalign.graph import INPUT, OUTPUT, Unit

W = CostWeights()


def feat(key: str = "m", type_name: str = "Linear", *, family: str | None = None,
         known: bool | None = None, position: float = 0.0, preds: tuple[str, ...] = (),
         succs: tuple[str, ...] = (), tokens: set[str] | None = None,
         indices: tuple[int, ...] = (), shape: tuple[int, ...] = (4, 4)) -> UnitFeatures:
    unit = Unit(key, (f"{key}.weight",), (shape,), type_name)
    return UnitFeatures(
        unit=unit,
        family=family if family is not None else layer_family(type_name),
        known_type=bool(type_name) if known is None else known,
        rank=0,
        position=position,
        preds=preds,
        succs=succs,
        tokens=frozenset(tokens if tokens is not None else {key}),
        indices=indices,
    )


def one(s: UnitFeatures, d: UnitFeatures, weights: CostWeights = W) -> dict[str, float]:
    costs = compute_costs([s], [d], weights)
    return {term: float(getattr(costs, term)[0, 0]) for term in COST_TERMS}


# --------------------------------------------------------------------------- type


@pytest.mark.parametrize(
    ("src", "dst", "expected"),
    [
        (feat(type_name="Linear"), feat(type_name="Linear"), 0.0),
        (feat(type_name="NonDynamicallyQuantizableLinear"), feat(type_name="Linear"), 0.0),
        (feat(type_name="LlamaRMSNorm"), feat(type_name="MistralRMSNorm"), 0.0),  # model prefix
        (feat(type_name="T5LayerNorm"), feat(type_name="LayerNorm"), 0.0),
        (feat(type_name="Conv1D"), feat(type_name="Linear"), W.same_family),
        (feat(type_name="BatchNorm2d"), feat(type_name="LayerNorm"), W.same_family),
        (feat(type_name="LlamaRMSNorm"), feat(type_name="LayerNorm"), W.same_family),
        (feat(type_name="Conv2d"), feat(type_name="Linear"), W.other_family),
        (feat(type_name="Parameter", shape=(2, 4, 4)), feat(type_name="Linear"), W.other_family),
        (feat(type_name="Parameter", shape=(1, 4, 4)), feat(type_name="Linear"), W.unknown_type),
        # a lone matrix (CLIP's proj) may be a linear layer's or an embedding's weight
        (feat(type_name="Parameter"), feat(type_name="Linear"), W.unknown_type),
        (feat(type_name="Embedding"), feat(type_name="Parameter"), W.unknown_type),
        # a 1x1 convolution computes what a linear layer does; a 3x3 one does not
        (feat(type_name="Linear"), feat(type_name="Conv2d", shape=(4, 4, 1, 1)), W.same_family),
        (feat(type_name="", family="linear"), feat(type_name="Conv2d", shape=(4, 4, 1, 1)),
         W.unknown_type),
        (feat(type_name="Linear"), feat(type_name="Conv2d", shape=(4, 4, 3, 3)), W.other_family),
        # an unknown class (a state_dict) costs a little when the guessed families agree
        (feat(type_name="", family="linear"), feat(type_name="Linear"), W.unknown_type),
        (feat(type_name="Linear"), feat(type_name="", family="linear"), W.unknown_type),
        (feat(type_name="", family="linear"), feat(type_name="", family="linear"), W.unknown_type),
        (feat(type_name="", family="conv"), feat(type_name="Linear"), W.other_family),
    ],
)
def test_type_term(src, dst, expected):
    assert one(src, dst)["type"] == pytest.approx(expected)


# --------------------------------------------------------------------------- position


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (0.0, 0.0, 0.0),
        (2.0, 5.0, 0.5 * math.log(4.0)),
        (5.0, 2.0, 0.5 * math.log(4.0)),
        (1.5, 2.0, 0.5 * math.log(1.5)),
    ],
)
def test_position_term(a, b, expected):
    assert one(feat(position=a), feat(position=b))["position"] == pytest.approx(expected)


def test_position_term_matrix():
    src = [feat("a", position=0.0), feat("b", position=1.0)]
    dst = [feat("x", position=0.0), feat("y", position=3.0), feat("z", position=1.0)]
    position = compute_costs(src, dst, W).position
    expected = 0.5 * np.log1p(np.array([[0.0, 3.0, 1.0], [1.0, 2.0, 0.0]]))
    np.testing.assert_allclose(position, expected)


# --------------------------------------------------------------------------- context


@pytest.mark.parametrize(
    ("s_preds", "s_succs", "d_preds", "d_succs", "expected"),
    [
        (("a",), ("b",), ("a",), ("b",), 0.0),
        ((), (), (), (), 0.0),  # nothing on either side agrees perfectly
        (("a",), ("b",), ("x",), ("b",), 0.5 * (1 - 0.5 * (0 + 1))),
        (("a",), ("b",), ("x",), ("y",), 0.5),
        (("a", "a"), ("b",), ("a",), ("b",), 0.5 * (1 - 0.5 * (0.5 + 1))),  # multiset overlap
        (("a", "c"), ("b",), ("c", "a"), ("b",), 0.0),
        (("a",), (), (), (), 0.5 * (1 - 0.5 * (0 + 1))),
        # boundary: only one side reads the input
        ((INPUT,), ("b",), ("a",), ("b",), 0.5 * (1 - 0.5 * (0 + 1)) + 0.25),
        # ... and only one side feeds the output
        ((INPUT,), (OUTPUT,), ("a",), ("b",), 0.5 + 0.25 + 0.25),
        ((INPUT,), (OUTPUT,), (INPUT,), (OUTPUT,), 0.0),
        # a neighbour of the same family with other shapes (a position table two rows longer)
        # counts half; of another family, nothing
        (("linear[(4, 8)]",), ("b",), ("linear[(6, 8)]",), ("b",), 0.5 * (1 - 0.5 * (0.5 + 1))),
        (("linear[(4, 8)]",), ("b",), ("norm[(4, 8)]",), ("b",), 0.5 * (1 - 0.5 * (0 + 1))),
        # equal ones are counted first: only the rest may be near
        (("linear[(4, 8)]", "linear[(2, 8)]"), ("b",), ("linear[(4, 8)]", "norm[(2,)]"), ("b",),
         0.5 * (1 - 0.5 * (0.5 + 1))),
    ],
)
def test_context_term(s_preds, s_succs, d_preds, d_succs, expected):
    s = feat(preds=s_preds, succs=s_succs)
    d = feat(preds=d_preds, succs=d_succs)
    assert one(s, d)["context"] == pytest.approx(expected)


# --------------------------------------------------------------------------- name


@pytest.mark.parametrize(
    ("a", "b", "ia", "ib", "expected"),
    [
        ({"fc"}, {"fc"}, (), (), 0.0),
        (set(), set(), (), (), 0.0),
        ({"fc"}, {"conv"}, (), (), 0.2 * 0.5),  # no common token, equal (empty) indices
        ({"fc"}, {"conv"}, (1,), (2,), 0.2),
        ({"blocks"}, {"layers"}, (2,), (2,), 0.2 * 0.5),  # blocks.2 vs layers.2
        ({"blocks"}, {"blocks"}, (2,), (3,), 0.2 * 0.5),  # blocks.2 vs blocks.3
        ({"a", "b"}, {"b", "c"}, (0,), (0,), 0.2 * (1 - 0.5 / 3 - 0.5)),
        ({"blocks", "attn", "qkv"}, {"blocks", "attn"}, (1, 0), (1,), 0.2 * (1 - 0.5 * 2 / 3)),
        ({"fc"}, set(), (), (), 0.2 * 0.5),
    ],
)
def test_name_term(a, b, ia, ib, expected):
    got = one(feat(tokens=a, indices=ia), feat(tokens=b, indices=ib))["name"]
    assert got == pytest.approx(expected)


# --------------------------------------------------------------------------- weights & totals


def test_weights_scale_each_term():
    weights = CostWeights(same_family=1.0, position=2.0, context=3.0, boundary=5.0, name=7.0)
    s = feat(type_name="Conv1D", position=0.0, preds=(INPUT,), succs=("z",), tokens={"a"})
    d = feat(type_name="Linear", position=1.0, preds=("x",), succs=("z",), tokens={"b"})
    assert one(s, d, weights) == pytest.approx({
        "type": 1.0,
        "position": 2.0 * math.log(2.0),
        "context": 3.0 * 0.5 + 5.0,
        "name": 7.0 * 0.5,
    })


def test_total_and_structural():
    s = feat(type_name="Conv1D", position=0.0, tokens={"a"})
    d = feat(type_name="Linear", position=1.0, tokens={"b"})
    costs = compute_costs([s], [d], W)
    assert isinstance(costs, CostMatrices)
    structural = W.same_family + 0.5 * math.log(2.0)
    assert costs.structural()[0, 0] == pytest.approx(structural)
    assert costs.total()[0, 0] == pytest.approx(structural + W.name * 0.5)


def test_cost_matrix_shape_and_every_term_nonnegative():
    src = [feat("a", "Linear", position=0.0, preds=(INPUT,)),
           feat("b", "Conv2d", position=1.0, succs=(OUTPUT,))]
    dst = [feat("x", "LayerNorm", position=2.0), feat("y", "Linear", position=0.0),
           feat("z", "", family="linear", position=1.0)]
    costs = compute_costs(src, dst, W)
    for term in COST_TERMS:
        matrix = getattr(costs, term)
        assert matrix.shape == (2, 3)
        assert (matrix >= 0).all()
    assert costs.type.tolist() == [[0.6, 0.0, 0.05], [0.6, 0.6, 0.6]]


def test_empty_sides():
    costs = compute_costs([], [feat()], W)
    assert costs.total().shape == (0, 1)
    costs = compute_costs([feat()], [], W)
    assert costs.total().shape == (1, 0)


# --------------------------------------------------------------------------- shape_distance


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([(8, 4), (8,)], [(8, 4), (8,)], 0.0),
        ([(10, 4), (10,)], [(5, 4), (5,)], 0.5),  # one of two dims differs
        ([(10, 4), (10,)], [(5, 3), (5,)], 1.0),
        ([(8, 3, 3, 3)], [(8, 3, 3, 5)], 0.25),
        ([(8, 3, 3, 3)], [(16, 3, 5, 5)], 0.75),
        ([(8,), (8, 4)], [(5, 4), (5,)], 0.5),  # the main tensor decides, whatever the order
        ([(8, 4), (8,)], [(8, 4), (9,)], 0.0),  # a bias follows its weight
        ([(2,), (100,)], [(100,), (3,)], 0.0),  # the largest tensor is the main one
        ([(8, 4)], [(8, 4), (8,)], INCOMPATIBLE),  # different numbers of tensors
        ([(8, 4), (8,)], [(8, 4, 1), (8,)], INCOMPATIBLE),  # different ranks
        ([(8, 4)], [(8,)], INCOMPATIBLE),
        ([], [], INCOMPATIBLE),
        ([()], [()], 0.0),  # scalars
    ],
)
def test_shape_distance(a, b, expected):
    assert shape_distance(a, b) == pytest.approx(expected)
    assert shape_distance(b, a) == pytest.approx(expected)


def test_incompatible_is_worse_than_every_dimension_differing():
    assert INCOMPATIBLE > shape_distance([(10, 4)], [(5, 3)]) == 1.0


def test_default_weights():
    assert CostWeights() == CostWeights(same_family=0.15, other_family=0.6, unknown_type=0.05,
                                        position=0.5, context=0.5, boundary=0.25, name=0.2,
                                        shape=0.5, unmatched=1.25)


def test_costs_of_chosen_pairs_are_the_matrix_entries():
    src = [feat("a", "Linear", position=0.0, preds=(INPUT,), tokens={"a"}, indices=(0,)),
           feat("b", "Conv2d", position=1.0, succs=(OUTPUT,), tokens={"b"}, indices=(1,)),
           feat("c", "", family="linear", position=2.5, tokens={"c", "x"})]
    dst = [feat("x", "LayerNorm", position=2.0, tokens={"x"}), feat("y", "Linear", position=0.0),
           feat("z", "", family="linear", position=1.0, indices=(1,))]
    dense = compute_costs(src, dst, W)
    rows, cols = np.array([2, 0, 1, 1, 0]), np.array([0, 1, 2, 1, 0])
    sparse = compute_costs(src, dst, W, pairs=(rows, cols))
    for term in COST_TERMS:
        np.testing.assert_array_equal(getattr(sparse, term), getattr(dense, term)[rows, cols])
    assert sparse.total().shape == (5,)
