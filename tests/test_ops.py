"""Adaptation operations: shapes, values, and exact inverses."""

from __future__ import annotations

import pytest
import torch

from archalign.errors import PlanError
from archalign.ops import Op, apply_ops, derive_ops, infer_shapes, invert_ops, squeeze_shape

T = Op("transpose")

CASES = [
    # (source shapes, ops, expected destination shapes)
    ([(4, 6)], (T,), [(6, 4)]),
    ([(6, 4)], (Op("reshape", shape=(6, 4, 1, 1), from_shape=(6, 4)),), [(6, 4, 1, 1)]),
    ([(8, 1, 1)], (Op("reshape", shape=(8,), from_shape=(8, 1, 1)),), [(8,)]),
    ([(2, 4), (4, 4)], (Op("concat", sizes=(2, 4)),), [(6, 4)]),
    ([(6, 4)], (Op("split", sizes=(2, 4)),), [(2, 4), (4, 4)]),
    ([(12, 4)], (Op("regroup", groups=(3, 2)),), [(12, 4)]),
    ([(4, 12)], (T, Op("regroup", groups=(3, 2))), [(12, 4)]),
    ([(4, 2), (4, 4)], (T, Op("concat", sizes=(2, 4)), T), [(4, 6)]),
    ([(16, 6)], (Op("rope", groups=(2,)),), [(16, 6)]),
    ([(16,)], (Op("unrope", groups=(4,)),), [(16,)]),
    ([(6, 8)], (T, Op("rope", groups=(2,))), [(8, 6)]),
    ([(64, 8)], (Op("pad", sizes=(2, 0)),), [(66, 8)]),
    ([(5,)], (Op("pad", sizes=(1, 3)),), [(9,)]),
    ([(3, 4, 2), (3, 5, 2)], (Op("concat", sizes=(4, 5), axis=1),), [(3, 9, 2)]),
    ([(3, 9, 2)], (Op("split", sizes=(4, 5), axis=1),), [(3, 4, 2), (3, 5, 2)]),
    ([(4, 2)] * 6, (Op("stack", sizes=(3,)),), [(3, 4, 2), (3, 4, 2)]),
    ([(4, 2)] * 6, (Op("stack", sizes=(3,)), Op("concat", sizes=(4, 4), axis=1)), [(3, 8, 2)]),
    ([(3, 4, 2)], (Op("unstack", sizes=(3,)),), [(4, 2)] * 3),
    # flattened experts: rows of E = 3 blocks reshaped, then concatenated or last axes swapped
    ([(6, 4)] * 2, (Op("reshape", shape=(3, 2, 4), from_shape=(6, 4)),
                    Op("concat", sizes=(2, 2), axis=1)), [(3, 4, 4)]),
    ([(6, 4)], (Op("reshape", shape=(3, 2, 4), from_shape=(6, 4)), Op("transpose", axes=(1, 2))),
     [(3, 4, 2)]),
    ([(2, 3, 4)], (Op("transpose", axes=(0, 2)),), [(4, 3, 2)]),
]


@pytest.mark.parametrize(("shapes", "ops", "expected"), CASES)
def test_shapes_inferred_without_data_match_the_real_result(shapes, ops, expected) -> None:  # type: ignore[no-untyped-def]
    tensors = [torch.randn(s) for s in shapes]
    produced = apply_ops(tensors, ops)
    assert [tuple(t.shape) for t in produced] == expected
    assert infer_shapes(shapes, ops) == expected


@pytest.mark.parametrize(("shapes", "ops", "expected"), CASES)
def test_inverse_restores_the_tensors_bit_for_bit(shapes, ops, expected) -> None:  # type: ignore[no-untyped-def]
    tensors = [torch.randn(s) for s in shapes]
    back = apply_ops(apply_ops(tensors, ops), invert_ops(ops, shapes))
    assert len(back) == len(tensors)
    for a, b in zip(back, tensors):
        assert torch.equal(a, b)


def test_regroup_moves_rows_from_kind_major_to_head_major() -> None:
    # rows (q0 q1 | k0 k1 | v0 v1) with 2 heads of 1 row each -> (q0 k0 v0 | q1 k1 v1)
    t = torch.tensor([[0.0], [1.0], [10.0], [11.0], [20.0], [21.0]])
    out = apply_ops([t], (Op("regroup", groups=(3, 2)),))[0]
    assert out.flatten().tolist() == [0.0, 10.0, 20.0, 1.0, 11.0, 21.0]


def test_rope_is_the_conversion_scripts_permutation() -> None:
    """transformers' convert_llama_weights_to_hf.py: interleaved rotary pairs -> halves."""
    def permute(w, n_heads, dim1, dim2):  # as the script writes it
        return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)

    w = torch.randn(32, 12)
    for heads in (1, 2, 4):
        assert torch.equal(apply_ops([w], (Op("rope", groups=(heads,)),))[0],
                           permute(w, heads, 32, 12))
    # one head of 4 rows: pairs (r0 r1) (r2 r3) -> halves (r0 r2 | r1 r3)
    rows = torch.arange(4.0)
    assert apply_ops([rows], (Op("rope", groups=(1,)),))[0].tolist() == [0.0, 2.0, 1.0, 3.0]
    assert apply_ops([rows], (Op("unrope", groups=(1,)),))[0].tolist() == [0.0, 2.0, 1.0, 3.0]
    halves = apply_ops([torch.arange(8.0)], (Op("unrope", groups=(1,)),))[0]
    assert halves.tolist() == [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]


@pytest.mark.parametrize(("src", "dst", "kwargs", "expected"), [
    ((96, 1, 1), (96,), {}, "reshape(96,)"),
    ((10, 512), (10, 32, 4, 4), {}, "reshape(10, 32, 4, 4)"),
    ((64, 192), (192, 64), {"transpose": True}, "transpose"),
    ((64, 64), (64, 64), {"transpose": True}, "transpose"),
    ((4, 6), (6, 4), {}, None),  # a transpose only the shapes suggest needs allow_shape_transpose
    ((4, 6), (6, 4), {"allow_shape_transpose": True}, "transpose"),
    ((4, 6), (5, 5), {}, None),
    ((3, 3), (3, 3), {}, ""),
])
def test_derive_ops(src, dst, kwargs, expected) -> None:  # type: ignore[no-untyped-def]
    ops = derive_ops(src, dst, **kwargs)
    assert (None if ops is None else " ".join(map(str, ops))) == expected


def test_squeeze_shape() -> None:
    assert squeeze_shape((1, 197, 1, 768)) == (197, 768)


@pytest.mark.parametrize(("shapes", "op"), [
    ([(4,)], T),
    ([(6, 4)], Op("reshape", shape=(5, 5))),
    ([(2, 4), (4, 3)], Op("concat", sizes=(2, 4))),
    ([(6, 4)], Op("split", sizes=(2, 2))),
    ([(7, 4)], Op("regroup", groups=(3, 2))),
    ([(12, 4)], Op("rope", groups=(4,))),  # 3 rows per head: not pairs
    ([(3, 4)], Op("crop", sizes=(2, 1))),  # nothing would be left
    ([(4, 2)] * 5, Op("stack", sizes=(3,))),  # not runs of three
    ([(3, 4), (3, 5)], Op("concat", sizes=(3, 3), axis=1)),
    ([(6, 4)], Op("transpose", axes=(1, 2))),  # no axis 2
    ([(6, 4), (3, 8)], Op("reshape", shape=(3, 2, 4), from_shape=(6, 4))),  # not the recorded shape
])
def test_an_op_that_does_not_fit_names_the_shapes(shapes, op) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PlanError, match=r"\(\d"):
        infer_shapes(shapes, [op])


def test_ops_round_trip_through_dicts_and_reject_unknowns() -> None:
    for _, ops, _ in CASES:
        for op in ops:
            assert Op.from_dict(op.to_dict()) == op
    with pytest.raises(PlanError, match="unknown adaptation 'rotate'"):
        Op("rotate")
    with pytest.raises(PlanError, match="unknown fields"):
        Op.from_dict({"op": "transpose", "angle": [90]})


def test_flattened_experts_become_stacked_ones_as_the_mixtral_converter_makes_them() -> None:
    """w1, w3 [E*I, H] -> gate_up_proj [E, 2I, H]; w2 [E*I, H] (each expert's w2 transposed)
    -> down_proj [E, H, I]: the values of ``w.view(E, I, H)``, concatenated or transposed."""
    e, inner, h = 3, 2, 4
    w1, w2, w3 = (torch.arange(e * inner * h, dtype=torch.float32).reshape(e * inner, h) + k * 100
                  for k in range(3))
    reshape = Op("reshape", shape=(e, inner, h), from_shape=(e * inner, h))
    gate_up_ops = (reshape, Op("concat", sizes=(inner, inner), axis=1))
    (gate_up,) = apply_ops([w1, w3], gate_up_ops)
    assert torch.equal(gate_up, torch.cat([w1.view(e, inner, h), w3.view(e, inner, h)], 1))
    assert torch.equal(gate_up[1, inner:], w3[inner:2 * inner])  # expert 1's up rows
    down_ops = (reshape, Op("transpose", axes=(1, 2)))
    (down,) = apply_ops([w2], down_ops)
    assert torch.equal(down, w2.view(e, inner, h).transpose(1, 2))
    assert [str(o) for o in down_ops] == ["reshape(3, 2, 4)", "transpose(1, 2)"]
    assert invert_ops(down_ops, [(e * inner, h)]) == (
        Op("transpose", axes=(1, 2)), Op("reshape", shape=(e * inner, h), from_shape=(e, inner, h)))
    assert invert_ops(gate_up_ops, [(e * inner, h)] * 2) == (
        Op("split", sizes=(inner, inner), axis=1),
        Op("reshape", shape=(e * inner, h), from_shape=(e, inner, h)))
    for op in (*gate_up_ops, *down_ops):
        assert Op.from_dict(op.to_dict()) == op
    assert Op("transpose", axes=(1, 2)).to_dict() == {"op": "transpose", "axes": [1, 2]}
    assert Op("transpose").to_dict() == {"op": "transpose"}


@pytest.mark.parametrize(("data", "message"), [
    ({"op": "transpose", "axes": [1, 1]}, "two different axes"),
    ({"op": "transpose", "axes": [1]}, "two different axes"),
    ({"op": "transpose", "axes": [0, 9]}, "two different axes below 8"),
    ({"op": "transpose", "axes": [0, -1]}, "not a size"),
    ({"op": "reshape", "shape": [2], "axes": [0, 1]}, "takes no axes"),
])
def test_a_transposes_axes_are_checked(data, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PlanError, match=message):
        Op.from_dict(data)
