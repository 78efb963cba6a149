"""Tests for archalign.conventions: named conventions of released checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from archalign.confidence import HIGH_CONFIDENCE, PRIOR_CEILING, UNDECIDED_LAYOUT_CAP
from archalign.conventions import (
    FUSED_BLOCKS,
    FUSED_UNDECIDED,
    POSITION_OFFSET,
    ROTARY_META,
    apply_conventions,
)
from archalign.ops import Op, OpKind, apply_ops
from archalign.plan import Match, Mismatch, Plan


def copy(src: str, dst: str, shape: tuple[int, ...], confidence: float = 0.8) -> Match:
    return Match(src=(src,), dst=(dst,), src_shapes=(shape,), dst_shapes=(shape,),
                 confidence=confidence, costs=(("type", 0.05),), src_unit=src.rsplit(".", 1)[0],
                 dst_unit=dst.rsplit(".", 1)[0])


def rotary(heads: int = 4, kv: int = 2, **config: object) -> nn.Module:
    model = nn.Module()
    model.config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv,
                                   **({"rope_theta": 10000.0} | config))  # type: ignore[assignment]
    return model


META = Plan(matches=(
    copy("layers.0.attention.wq.weight", "model.layers.0.self_attn.q_proj.weight", (16, 16)),
    copy("layers.0.attention.wk.weight", "model.layers.0.self_attn.k_proj.weight", (8, 16)),
    copy("layers.0.attention.wv.weight", "model.layers.0.self_attn.v_proj.weight", (8, 16)),
    copy("layers.0.attention.wo.weight", "model.layers.0.self_attn.o_proj.weight", (16, 16)),
))


def test_meta_query_and_key_projections_get_the_rotary_op_with_their_head_counts():
    plan = apply_conventions(META, rotary(heads=4, kv=2))
    q, k, v, o = plan.matches
    assert q.ops == (Op(OpKind.ROPE, groups=(4,)),) and k.ops == (Op(OpKind.ROPE, groups=(2,)),)
    assert v.ops == () and o.ops == ()  # values and outputs are not rotated
    for m in (q, k):
        assert ROTARY_META in m.cost_terms
        assert m.confidence < META.matches[0].confidence and m.confidence < HIGH_CONFIDENCE


def test_the_op_moves_interleaved_pairs_to_halves():
    """Meta rotates (x0, x1), (x2, x3), ... of each head; Hugging Face the two halves."""
    (q, *_) = apply_conventions(META, rotary(heads=4, kv=2)).matches
    rows = torch.arange(16.0)[:, None].expand(16, 16)
    (out,) = apply_ops([rows], q.ops)
    assert out[:4, 0].tolist() == [0.0, 2.0, 1.0, 3.0]  # head 0: x0, x2 | x1, x3


@pytest.mark.parametrize("dst", [
    rotary(rope_theta=None),  # no rotary in its config
    nn.Linear(2, 2),  # no config at all
])
def test_no_convention_without_a_rotary_destination(dst):
    assert apply_conventions(META, dst) is META


def test_only_meta_names_into_hugging_face_names():
    plan = Plan(matches=(copy("blocks.0.attn.q.weight", "model.layers.0.self_attn.q_proj.weight",
                              (16, 16)),))
    assert apply_conventions(plan, rotary()) is plan


# ----------------------------------------------------------------------------- fused rows

D, H = 8, 2


class Attention(nn.Module):
    """A fused projection ``c_attn`` read as q | k | v blocks, or per head first."""

    def __init__(self, per_head: bool) -> None:
        super().__init__()
        self.per_head = per_head
        self.c_attn = nn.Linear(D, 3 * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        y = self.c_attn(x)
        if self.per_head:
            q, k, v = y.view(b, t, H, 3 * D // H).transpose(1, 2).split(D // H, dim=-1)
        else:
            q, k, v = (p.view(b, t, H, D // H).transpose(1, 2) for p in y.split(D, dim=-1))
        return ((q @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2).reshape(b, t, D)


def fused_plan(src_layer: str, transposed: bool = False) -> Plan:
    weight = copy(f"{src_layer}.weight", "c_attn.weight", (3 * D, D), confidence=0.8)
    if transposed:  # GPT-2's Conv1D stores it (in, out)
        weight = Match(src=weight.src, dst=weight.dst, src_shapes=((D, 3 * D),),
                       dst_shapes=weight.dst_shapes, ops=(Op(OpKind.TRANSPOSE),),
                       confidence=0.8, costs=weight.costs, src_unit=src_layer, dst_unit="c_attn")
    return Plan(matches=(weight, copy(f"{src_layer}.bias", "c_attn.bias", (3 * D,))))


X = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("src_layer", "transposed", "per_head", "expected"), [
    ("attn.qkv", False, True, "regroup"),  # timm's blocks, read per head
    ("attn.c_attn", True, True, "regroup"),  # GPT-2's Conv1D blocks into GPTBigCode's c_attn
    ("attn.c_attn", False, True, "same"),  # the destination's own format
    ("attn.fused", False, True, "undecided"),  # a name no format explains
    ("attn.qkv", False, False, "same"),  # read as blocks: nothing moves
])
def test_fused_rows_follow_the_checkpoints_format_and_how_the_destination_reads_them(
        src_layer: str, transposed: bool, per_head: bool, expected: str):
    plan = fused_plan(src_layer, transposed)
    out = apply_conventions(plan, Attention(per_head), X)
    if expected == "same":
        assert out.matches == plan.matches
    elif expected == "undecided":
        assert all(m.confidence <= UNDECIDED_LAYOUT_CAP and FUSED_UNDECIDED in m.cost_terms
                   and m.ops == n.ops for m, n in zip(out.matches, plan.matches))
    else:
        weight, bias = out.matches
        assert weight.ops[-1] == bias.ops[-1] == Op(OpKind.REGROUP, groups=(3, H))
        assert weight.ops[:-1] == plan.matches[0].ops
        assert all(FUSED_BLOCKS in m.cost_terms and m.confidence <= PRIOR_CEILING
                   for m in out.matches)


def test_regrouped_blocks_make_the_per_head_destination_compute_the_source():
    torch.manual_seed(1)
    src, dst = Attention(per_head=False), Attention(per_head=True)
    weight, bias = apply_conventions(fused_plan("attn.qkv"), dst, X).matches
    with torch.no_grad():
        dst.c_attn.weight.copy_(apply_ops([src.c_attn.weight], weight.ops)[0])
        dst.c_attn.bias.copy_(apply_ops([src.c_attn.bias], bias.ops)[0])
        assert torch.allclose(dst(X), src(X), atol=1e-6)


def test_fused_rows_need_the_destinations_input():
    plan = fused_plan("attn.qkv")
    assert apply_conventions(plan, Attention(per_head=True)) == plan
    failing = apply_conventions(plan, Attention(per_head=True), torch.randn(2, 3, D + 1))
    assert failing == plan  # a destination that does not run on it: the rule is skipped


class Positions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_positions = nn.Embedding(12, D)  # read from row 2, as OPT's

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_positions(torch.arange(ids.shape[-1]).expand_as(ids) + 2)


def test_a_position_table_into_a_longer_one_read_from_an_offset_is_loaded_padded():
    near = Mismatch(src=("wpe.weight",), dst=("embed_positions.weight",),
                    src_shapes=((10, D),), dst_shapes=((12, D),), reason="shape mismatch",
                    confidence=0.74)
    plan = Plan(matches=(), mismatches=(near,), unmatched_src=("wpe.weight",),
                unmatched_dst=("embed_positions.weight",))
    out = apply_conventions(plan, Positions(), torch.zeros(2, 5, dtype=torch.long))
    (m,) = out.matches
    assert m.ops == (Op(OpKind.PAD, sizes=(2, 0)),) and POSITION_OFFSET in m.cost_terms
    assert m.confidence == pytest.approx(0.74 * 0.9) and m.confidence <= PRIOR_CEILING
    assert out.mismatches == () and out.unmatched_src == () and out.unmatched_dst == ()
    table = torch.randn(10, D)
    (padded,) = apply_ops([table], m.ops)
    assert torch.equal(padded[2:], table)  # position p of the source is row p + 2
    shorter = Plan(matches=(), mismatches=(Mismatch(src=near.src, dst=near.dst, src_shapes=((11, D),),
                                        dst_shapes=((12, D),), reason="", confidence=0.7),))
    assert apply_conventions(shorter, Positions(), torch.zeros(2, 5, dtype=torch.long)) == shorter
