"""Tests for archalign.functional: the plan tried, repaired, and its confidences set by what ran."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import archalign
from archalign.confidence import DIVERGING, HIGH_CONFIDENCE, VERIFIED_CONFIDENCE

HEADS, HEAD_DIM = 2, 4
WIDTH = HEADS * HEAD_DIM


class Separate(nn.Module):
    """Attention-like block with separate q, k, v projections."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = HEADS
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.out = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.q(x)) * self.k(x) + torch.sigmoid(self.v(x)))


class Fused(nn.Module):
    """The same block with one fused projection, its rows laid out (3, heads, head_dim) as
    GPT-2's c_attn, or (heads, 3, head_dim) as GPTBigCode's."""

    def __init__(self, per_head: bool) -> None:
        super().__init__()
        self.num_heads = HEADS
        self.per_head = per_head
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.qkv(x)
        if self.per_head:
            rows = rows.reshape(-1, HEADS, 3, HEAD_DIM).transpose(1, 2).reshape(-1, 3 * WIDTH)
        q, k, v = rows.chunk(3, dim=-1)
        return self.out(torch.tanh(q) * k + torch.sigmoid(v))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_plan_that_reproduces_the_outputs_is_certain_and_dst_is_untouched() -> None:
    torch.manual_seed(0)
    src, dst = Separate(), Separate()
    before = _state(dst)
    plan = archalign.align(src, dst, example_inputs=torch.randn(5, WIDTH))
    assert plan.verification.startswith("outputs agree")
    assert all(m.confidence >= VERIFIED_CONFIDENCE for m in plan.matches)
    assert all(m.cost_terms.get("verified") == 1.0 for m in plan.matches)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_an_input_is_made_when_none_is_given() -> None:
    torch.manual_seed(0)
    plan = archalign.align(Separate(), Separate())
    assert plan.verification.startswith("outputs agree") and "input made" in plan.verification


def test_the_outputs_choose_the_row_layout_of_a_fused_projection() -> None:
    torch.manual_seed(0)
    src, dst = Fused(per_head=False), Fused(per_head=True)
    assert all(not m.ops for m in archalign.align(src, dst, check_outputs=False).matches)
    plan = archalign.align(src, dst)
    assert plan.verification.startswith("outputs agree")
    (weight,) = [m for m in plan.matches if m.dst == ("qkv.weight",)]
    assert [o.kind.value for o in weight.ops] == ["regroup"]
    assert plan.apply(dst).complete
    x = torch.randn(3, WIDTH)
    assert torch.allclose(src(x), dst(x), atol=1e-6)


class Opaque(nn.Module):
    """A block whose projection applies a layout no op of archalign's knows (a fixed row
    shuffle): no repair can make it agree."""

    def __init__(self, shuffled: bool) -> None:
        super().__init__()
        self.shuffled = shuffled
        self.a, self.b = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.shuffled:
            h = h[..., torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])]
        return self.b(torch.tanh(h))


def test_a_plan_that_cannot_be_repaired_keeps_no_high_confidence() -> None:
    torch.manual_seed(0)
    plan = archalign.align(Opaque(False), Opaque(True))
    assert plan.verification.startswith("OUTPUTS DIFFER")
    assert all(m.confidence < HIGH_CONFIDENCE for m in plan.matches)
    # the plan matches everything with the same shapes: where it breaks is not loaded
    assert all(m.confidence <= DIVERGING for m in plan.matches)
    assert plan.apply(Opaque(True)).loaded == ()


def test_a_pin_stands_whatever_the_trial_shows() -> None:
    torch.manual_seed(0)
    src, dst = Separate(), Separate()
    plan = archalign.align(src, dst)
    pinned = archalign.align(src, dst, hints=plan.pin("q", "k").hints)
    assert pinned.mapping()["k.weight"] == "q.weight"  # not repaired away
    (match,) = [m for m in pinned.matches if m.dst == ("k.weight",)]
    assert match.confidence == 1.0
    assert pinned.verification.startswith("OUTPUTS DIFFER")


def test_repairs_undo_a_swap_structure_cannot_see() -> None:
    torch.manual_seed(0)
    src, dst = Separate(), Separate()
    plan = archalign.align(src, dst, check_outputs=False)
    q, k = (next(i for i, m in enumerate(plan.matches) if m.dst == (f"{n}.weight",)) for n in "qk")
    matches = list(plan.matches)
    matches[q], matches[k] = (dataclasses.replace(matches[q], src=matches[k].src, src_unit="k"),
                              dataclasses.replace(matches[k], src=matches[q].src, src_unit="q"))
    wrong = dataclasses.replace(plan, matches=tuple(matches))
    from archalign.functional import decide_by_activations
    from archalign.inputs import bind
    from archalign.source import read_source
    from archalign.trace import trace_graph

    graphs = [trace_graph(read_source(m)) for m in (src, dst)]
    fixed = decide_by_activations(wrong, src, dst, bind(src, dst, torch.randn(4, WIDTH)), *graphs)
    assert fixed.verification.startswith("outputs agree")
    assert fixed.mapping()["q.weight"] == "q.weight" and fixed.mapping()["k.weight"] == "k.weight"
