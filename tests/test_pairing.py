"""Tests for archalign.pairing: which tensor of a matched unit goes into which, and how."""

from __future__ import annotations

import pytest

from archalign.graph import Unit
from archalign.ops import Op
from archalign.pairing import MatchMode, TensorPair, fused_pairs, pair_tensors


def linear(key: str, out: int, inp: int, type_name: str = "Linear") -> Unit:
    return Unit(key, (f"{key}.weight", f"{key}.bias"), ((out, inp), (out,)), type_name)


def unit(key: str, names: list[str], shapes: list[tuple[int, ...]], type_name: str = "") -> Unit:
    return Unit(key, tuple(f"{key}.{n}" for n in names), tuple(shapes), type_name)


# --------------------------------------------------------------------------- pair_tensors


BN_NAMES = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
BN_SHAPES = [(4,), (4,), (4,), (4,), ()]


def tp(src: str, dst: str, by_name: bool = True, ops: tuple[Op, ...] = ()) -> TensorPair:
    return TensorPair(src=(src,), dst=(dst,), ops=ops, by_name=by_name)


@pytest.mark.parametrize(
    ("src", "dst", "expected"),
    [
        pytest.param(
            unit("bn", BN_NAMES, BN_SHAPES, "BatchNorm2d"),
            unit("norm", BN_NAMES, BN_SHAPES, "BatchNorm2d"),
            [tp(f"bn.{n}", f"norm.{n}") for n in BN_NAMES],
            id="batchnorm"),
        pytest.param(
            unit("bn", BN_NAMES, BN_SHAPES, "BatchNorm2d"),
            unit("norm", ["gamma", "beta", "moving_mean", "moving_variance", "num_batches_tracked"],
                 BN_SHAPES),
            [tp("bn.weight", "norm.gamma"), tp("bn.bias", "norm.beta"),
             tp("bn.running_mean", "norm.moving_mean"), tp("bn.running_var", "norm.moving_variance"),
             tp("bn.num_batches_tracked", "norm.num_batches_tracked")],
            id="batchnorm-synonyms"),
        pytest.param(
            unit("bn", BN_NAMES, BN_SHAPES, "BatchNorm2d"),
            unit("norm", ["running_var", "num_batches_tracked", "bias", "running_mean", "weight"],
                 [(4,), (), (4,), (4,), (4,)]),
            [tp("bn.running_var", "norm.running_var"),
             tp("bn.num_batches_tracked", "norm.num_batches_tracked"),
             tp("bn.bias", "norm.bias"), tp("bn.running_mean", "norm.running_mean"),
             tp("bn.weight", "norm.weight")],
            id="batchnorm-reordered"),
        pytest.param(
            unit("attn", ["in_proj_weight", "in_proj_bias"], [(12, 4), (12,)], "MultiheadAttention"),
            linear("qkv", 12, 4),
            [tp("attn.in_proj_weight", "qkv.weight"), tp("attn.in_proj_bias", "qkv.bias")],
            id="mha-in-proj-vs-linear"),
        pytest.param(
            unit("ln", ["weight", "bias"], [(4,), (4,)], "LayerNorm"),
            unit("norm", ["bias", "weight"], [(4,), (4,)], "LayerNorm"),
            [tp("ln.bias", "norm.bias"), tp("ln.weight", "norm.weight")],
            id="equal-shapes-by-name"),
        pytest.param(
            unit("ln", ["weight", "bias"], [(4,), (4,)], "LayerNorm"),
            unit("norm", ["g", "b"], [(4,), (4,)]),
            [tp("ln.weight", "norm.g"), tp("ln.bias", "norm.b")],
            id="short-synonyms"),
        pytest.param(
            unit("x", ["alpha", "delta"], [(4,), (4,)]),
            unit("y", ["foo", "bar"], [(4,), (4,)]),
            [tp("x.alpha", "y.foo", False), tp("x.delta", "y.bar", False)],
            id="equal-shapes-unrelated-names"),
        pytest.param(
            unit("x", ["alpha", "delta"], [(4, 2), (4,)]),
            unit("y", ["foo", "bar"], [(4, 2), (4,)]),
            [tp("x.alpha", "y.foo"), tp("x.delta", "y.bar")],
            id="unique-shapes-unrelated-names"),
        pytest.param(
            Unit("c", ("c.weight", "c.bias"), ((4, 8), (8,)), "Conv1D", (True, False)),
            linear("l", 8, 4),
            [tp("c.weight", "l.weight", ops=(Op("transpose"),)), tp("c.bias", "l.bias")],
            id="transposed-layout"),
        pytest.param(
            unit("x", ["weight"], [(4, 2)]),
            unit("y", ["weight", "bias"], [(4, 2), (4,)]),
            None,
            id="extra-destination-tensor"),
        pytest.param(
            unit("x", ["weight", "bias"], [(4, 2), (4,)]),
            unit("y", ["weight", "bias"], [(5, 2), (5,)]),
            None,
            id="no-shape-agrees"),
        pytest.param(
            unit("ls", ["gamma"], [(4, 1, 1)]),
            unit("ls", ["weight"], [(4,)]),
            None,
            id="reshape-is-not-exact"),
    ],
)
def test_pair_tensors_exact(src, dst, expected):
    assert pair_tensors(src, dst) == expected


def test_pair_tensors_follow_destination_order():
    src = unit("s", ["a", "b", "c"], [(1,), (2,), (3,)])
    dst = unit("d", ["z", "y", "x"], [(3,), (1,), (2,)])
    assert [(p.src, p.dst) for p in pair_tensors(src, dst)] == [
        (("s.c",), ("d.z",)), (("s.a",), ("d.y",)), (("s.b",), ("d.x",))]


def test_pair_tensors_adapt_allows_a_reshape():
    src, dst = unit("ls", ["gamma"], [(4, 1, 1)]), unit("ls", ["weight"], [(4,)])
    assert pair_tensors(src, dst, "adapt") == [
        tp("ls.gamma", "ls.weight", ops=(Op("reshape", shape=(4,), from_shape=(4, 1, 1)),))]


def test_pair_tensors_near_pairs_by_name_across_shapes():
    src = linear("s", 10, 4)
    dst = unit("d", ["bias", "weight"], [(5,), (5, 4)], "Linear")
    assert pair_tensors(src, dst) is None
    assert pair_tensors(src, dst, "near") == [tp("s.bias", "d.bias"), tp("s.weight", "d.weight")]


def test_pair_tensors_near_leaves_extra_tensors_unpaired():
    src, dst = unit("x", ["weight"], [(4, 2)]), unit("y", ["weight", "bias"], [(4, 2), (4,)])
    assert pair_tensors(src, dst, "near") == [tp("x.weight", "y.weight")]


def test_pair_tensors_near_needs_equal_ranks():
    src = unit("s", ["weight"], [(4, 4, 1)])
    dst = unit("d", ["weight"], [(4, 4)])
    assert pair_tensors(src, dst, "near") == []




def test_modes_are_accepted_by_value_and_by_member():
    src, dst = linear("a", 4, 3), linear("b", 4, 3)
    for mode in MatchMode:
        assert pair_tensors(src, dst, mode) == pair_tensors(src, dst, mode.value)
    with pytest.raises(ValueError):
        pair_tensors(src, dst, "approximately")


def test_fused_pairs_concatenate_members_along_axis_0_in_order():
    qkv = linear("qkv", 12, 4)
    members = [linear(k, 4, 4) for k in "qkv"]
    pairs = fused_pairs(qkv, members, fused_is_dst=True)
    assert pairs == [
        TensorPair(("q.weight", "k.weight", "v.weight"), ("qkv.weight",),
                   (Op("concat", sizes=(4, 4, 4)),), True),
        TensorPair(("q.bias", "k.bias", "v.bias"), ("qkv.bias",), (Op("concat", sizes=(4, 4, 4)),),
                   True)]
    split = fused_pairs(qkv, members, fused_is_dst=False)
    assert [p.ops for p in split] == [(Op("split", sizes=(4, 4, 4)),)] * 2


@pytest.mark.parametrize("members", [
    [linear("q", 4, 4), linear("k", 4, 4)],  # rows do not add up
    [linear("q", 4, 4), linear("k", 4, 5), linear("v", 4, 4)],  # trailing sizes differ
    [linear("q", 4, 4), unit("k", ["weight"], [(4, 4)]), linear("v", 4, 4)],  # a bias is missing
])
def test_fused_pairs_refuse_members_that_are_not_pieces(members):
    assert fused_pairs(linear("qkv", 12, 4), members, fused_is_dst=True) is None
