"""Tests for archalign.stacked: experts kept as one module each against experts stacked in 3-D
(E experts, H features, INNER hidden units)."""

from __future__ import annotations

import torch
from torch import nn

import archalign
from archalign.cost import CostWeights
from archalign.features import extract_features
from archalign.graph import Tracer, build_units, chain_graph
from archalign.source import read_source
from archalign.stacked import find_families, match_stacked

E, H, INNER = 3, 4, 6


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(H, INNER, False)
        self.w2 = nn.Linear(INNER, H, False)
        self.w3 = nn.Linear(H, INNER, False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class PerExpert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(Expert() for _ in range(E))

    def forward(self, x):
        return sum(e(x) * (i + 1) for i, e in enumerate(self.experts))


class Stacked(nn.Module):
    """transformers 5's layout: gate_up_proj [E, 2I, H], down_proj [E, H, INNER]."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * INNER, H))
        self.down_proj = nn.Parameter(torch.randn(E, H, INNER))

    def forward(self, x):
        out = 0
        for i in range(E):
            gate, up = (x @ self.gate_up_proj[i].T).chunk(2, dim=-1)
            out = out + (torch.nn.functional.silu(gate) * up) @ self.down_proj[i].T * (i + 1)
        return out


class WithStacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = Stacked()

    def forward(self, x):
        return self.experts(x)


def _features(src: nn.Module, dst: nn.Module):
    graphs = [chain_graph(build_units(read_source(m)), Tracer.FX) for m in (src, dst)]
    return extract_features(*graphs)


def test_families_are_found_by_numbered_modules_of_one_layout() -> None:
    fs, _ = _features(PerExpert(), PerExpert())
    (family,) = find_families(fs)
    assert family.prefix == "experts" and family.count == E
    assert [f.unit.key for f in family.members[1]] == ["experts.1.w1", "experts.1.w2", "experts.1.w3"]


def test_a_stacked_destination_takes_every_expert_stacked_and_concatenated() -> None:
    fs, fd = _features(PerExpert(), WithStacked())
    (match,) = match_stacked(fs, fd, CostWeights())
    by_dst = {p.dst: p for p in match.pairs}
    gate_up = by_dst[("experts.gate_up_proj",)]
    assert gate_up.src == (*(f"experts.{e}.w1.weight" for e in range(E)),
                           *(f"experts.{e}.w3.weight" for e in range(E)))
    assert [str(o) for o in gate_up.ops] == [f"stack[{E}]", f"concat@1[{INNER}, {INNER}]"]
    assert [str(o) for o in by_dst[("experts.down_proj",)].ops] == [f"stack[{E}]"]
    assert match.src_label == "experts" and 0 < match.confidence < 1


def test_a_stacked_source_is_taken_apart_and_the_round_trip_is_exact() -> None:
    torch.manual_seed(0)
    src, dst = WithStacked(), PerExpert()
    plan = archalign.align(src, dst, example_inputs=torch.randn(5, H))
    assert plan.verification.startswith("outputs agree"), plan.verification
    plan.apply(dst)
    x = torch.randn(2, H)
    assert torch.allclose(src(x), dst(x), atol=1e-5)
    back = WithStacked()
    plan.inverse().apply(back, dst)
    assert torch.equal(back.experts.gate_up_proj, src.experts.gate_up_proj)
