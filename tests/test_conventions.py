"""Tests for archalign.conventions: named conventions of released checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from archalign.confidence import HIGH_CONFIDENCE
from archalign.conventions import ROTARY_META, apply_conventions
from archalign.ops import Op, OpKind, apply_ops
from archalign.plan import Match, Plan


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
