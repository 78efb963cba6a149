"""Tests for archalign.repair: local changes a trial asks for, kept when the models agree further."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import archalign
from archalign.functional import decide_by_activations
from archalign.inputs import bind
from archalign.source import read_source
from archalign.trace import trace_graph

HEADS, HEAD_DIM, SEQ = 2, 4, 6
WIDTH = HEADS * HEAD_DIM


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of (batch, seq, heads * head_dim) on interleaved pairs or on halves."""
    b, n, _ = x.shape
    x = x.reshape(b, n, HEADS, HEAD_DIM)
    angle = torch.arange(n, dtype=x.dtype)[:, None] * 0.5 ** torch.arange(HEAD_DIM // 2)
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    if interleaved:
        even, odd = x[..., 0::2], x[..., 1::2]
        out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    else:
        first, second = x[..., :HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
        out = torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return out.reshape(b, n, -1)


class Attention(nn.Module):
    def __init__(self, interleaved: bool) -> None:
        super().__init__()
        self.interleaved = interleaved
        self.num_heads = HEADS
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = _rotate(self.q(x), self.interleaved), _rotate(self.k(x), self.interleaved)
        scores = (q.reshape(*x.shape[:2], HEADS, HEAD_DIM).transpose(1, 2)
                  @ k.reshape(*x.shape[:2], HEADS, HEAD_DIM).permute(0, 2, 3, 1))
        v = self.v(x).reshape(*x.shape[:2], HEADS, HEAD_DIM).transpose(1, 2)
        mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        return x + self.o(mixed)


class Blocks(nn.Module):
    def __init__(self, interleaved: bool, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Attention(interleaved) for _ in range(depth))
        for i in range(depth):  # free tensors (as torchvision's ConvNeXt keeps its layer scales)
            self.register_parameter(f"scale_{i}", nn.Parameter(torch.rand(WIDTH) + 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x) * getattr(self, f"scale_{i}")
        return x


def _sharpen(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # trained-like: attention that is not uniform, so q and k matter
    return model


def test_rotary_conventions_are_found_and_carried_to_every_block() -> None:
    torch.manual_seed(0)
    src, dst = _sharpen(Blocks(interleaved=True)), Blocks(interleaved=False)
    x = torch.randn(2, SEQ, WIDTH)
    plan = archalign.align(src, dst, example_inputs=x)
    assert plan.verification.startswith("outputs agree"), plan.verification
    for name in ("q", "k"):
        for i in range(3):
            (m,) = [m for m in plan.matches if m.dst == (f"blocks.{i}.{name}.weight",)]
            assert [str(o) for o in m.ops] == [f"rope{HEADS}"]
    trials = int(plan.verification.rsplit(" trials", 1)[0].rsplit(" ", 1)[1])
    assert trials < 3 * 40  # the second and third blocks are repaired by propagation
    plan.apply(dst)
    assert torch.allclose(src(x), dst(x), atol=1e-5)


def _graphs(src: nn.Module, dst: nn.Module) -> list:
    x = torch.randn(2, SEQ, WIDTH)
    return [trace_graph(read_source(m), x) for m in (src, dst)]  # execution order, hooked


def test_scales_taken_from_the_block_before_are_moved_back() -> None:
    torch.manual_seed(0)
    src, dst = _sharpen(Blocks(interleaved=False)), Blocks(interleaved=False)
    plan = archalign.align(src, dst, check_outputs=False)
    shifted = tuple(
        dataclasses.replace(m, src=(f"scale_{(int(m.dst[0][-1]) + 2) % 3}",),
                            src_unit=f"scale_{(int(m.dst[0][-1]) + 2) % 3}")
        if m.dst[0].startswith("scale_") else m for m in plan.matches)
    wrong = dataclasses.replace(plan, matches=shifted)
    x = torch.randn(2, SEQ, WIDTH)
    fixed = decide_by_activations(wrong, src, dst, bind(src, dst, x), *_graphs(src, dst))
    assert fixed.verification.startswith("outputs agree"), fixed.verification
    assert all(fixed.mapping()[f"scale_{i}"] == f"scale_{i}" for i in range(3))


class BareProjection(nn.Module):
    """A projection kept as a bare (in, out) matrix, as CLIP's ``proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.proj = nn.Parameter(torch.randn(WIDTH, 3))

    def forward(self, x):
        return torch.tanh(self.fc(x)) @ self.proj


class LinearProjection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


def test_a_unit_left_unmatched_is_filled_from_a_spare_source() -> None:
    torch.manual_seed(0)
    src, dst = BareProjection(), LinearProjection()
    plan = archalign.align(src, dst)
    assert plan.verification.startswith("outputs agree"), plan.verification
    (m,) = [m for m in plan.matches if m.dst == ("head.weight",)]
    assert m.src == ("proj",) and [str(o) for o in m.ops] == ["transpose"]
    assert plan.unmatched_dst == () and plan.unmatched_src == ()
