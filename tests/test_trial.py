"""Tests for archalign.trial: a plan tried on a copy of the destination while aligning."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import archalign
from archalign.confidence import VERIFIED_CONFIDENCE
from archalign.ops import Op
from archalign.trial import decide_by_activations

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


def test_a_plan_that_reproduces_the_outputs_is_confirmed_and_dst_is_untouched() -> None:
    torch.manual_seed(0)
    src, dst = Separate(), Separate()
    plan = archalign.align(src, dst, check_outputs=False)
    before = _state(dst)
    tried = decide_by_activations(plan, src, dst, torch.randn(5, WIDTH))
    assert tried.verification.startswith("outputs agree")
    assert all(m.confidence >= VERIFIED_CONFIDENCE for m in tried.matches)
    assert all(m.cost_terms.get("verified") == 1.0 for m in tried.matches)
    assert [m.dst for m in tried.matches] == [m.dst for m in plan.matches]
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_the_outputs_choose_the_row_layout_of_a_fused_projection() -> None:
    torch.manual_seed(0)
    src, dst = Fused(per_head=False), Fused(per_head=True)
    plan = archalign.align(src, dst, check_outputs=False)
    assert all(not m.ops for m in plan.matches)  # by structure: plain copies
    tried = decide_by_activations(plan, src, dst, torch.randn(5, WIDTH))
    assert tried.verification.startswith("outputs agree")
    (weight,) = [m for m in tried.matches if m.dst == ("qkv.weight",)]
    assert weight.ops[-1] == Op("regroup", groups=(3, HEADS))
    report = tried.apply(dst)
    assert report.complete
    x = torch.randn(3, WIDTH)
    assert torch.allclose(src(x), dst(x), atol=1e-6)


def test_a_plan_that_fails_is_reported_and_no_confidence_is_raised() -> None:
    torch.manual_seed(0)
    src, dst = Separate(), Separate()
    plan = archalign.align(src, dst, check_outputs=False)
    # swap two equal-shaped projections by hand: a wrong plan
    q, k = (next(i for i, m in enumerate(plan.matches) if m.dst == (f"{n}.weight",)) for n in "qk")
    matches = list(plan.matches)
    matches[q], matches[k] = (dataclasses.replace(matches[q], src=matches[k].src),
                              dataclasses.replace(matches[k], src=matches[q].src))
    wrong = dataclasses.replace(plan, matches=tuple(matches))
    tried = decide_by_activations(wrong, src, dst, torch.randn(5, WIDTH))
    assert tried.verification.startswith("OUTPUTS DIFFER")
    assert [m.confidence for m in tried.matches] == [m.confidence for m in wrong.matches]
