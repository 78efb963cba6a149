"""Tests for archalign.stacked: experts kept as one module each against experts stacked in 3-D
(E experts, H features, INNER hidden units)."""

from __future__ import annotations

import torch
from torch import nn

import archalign
from archalign.confidence import DEFAULT_MIN_CONFIDENCE, HIGH_CONFIDENCE
from archalign.conventions import FFN_META
from archalign.cost import CostWeights
from archalign.features import extract_features
from archalign.flattened import explain_flattened
from archalign.graph import Tracer, build_units, chain_graph
from archalign.plan import Plan
from archalign.source import read_source
from archalign.stacked import UNDECIDED_GROUPING, find_families, match_stacked

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


class Fused(nn.Module):
    """The first Mixtral release's layout: w1, w3 [E*INNER, H] (experts' rows one after the
    other), w2 [E*INNER, H] holding each expert's w2 transposed."""

    def __init__(self, names: tuple[str, str, str] = ("w1", "w2", "w3")) -> None:
        super().__init__()
        self.names = names
        for name in names:
            self.register_parameter(name, nn.Parameter(torch.randn(E * INNER, H)))


class WithFused(nn.Module):
    def __init__(self, names: tuple[str, str, str] = ("w1", "w2", "w3")) -> None:
        super().__init__()
        self.moe = Fused(names)


def _explained(plan: Plan) -> dict[str, tuple[tuple[str, ...], list[str], float]]:
    return {m.dst[0]: (m.src, [str(o) for o in m.ops], m.confidence) for m in plan.matches}


def test_flattened_tensors_explain_stacked_ones_by_shapes_and_say_when_that_is_a_guess() -> None:
    stacked = [(E, 2 * INNER, H), (E, H, INNER)]
    ambiguous = explain_flattened(stacked, [(E * INNER, H)] * 3, E)
    assert ambiguous is not None and not ambiguous.unique  # any two of the three could be gate/up
    (gate_up, gate_up_ops), (down, down_ops) = ambiguous.groups
    assert (gate_up, down) == ((0, 1), (2,))  # the first in the sources' order
    assert [str(o) for o in gate_up_ops] == [f"reshape({E}, {INNER}, {H})",
                                             f"concat@1[{INNER}, {INNER}]"]
    assert [str(o) for o in down_ops] == [f"reshape({E}, {INNER}, {H})", "transpose(1, 2)"]
    # w2 stored as the experts' own [H, INNER] rows: only one grouping needs no transpose
    plain = explain_flattened(stacked, [(E * INNER, H), (E * H, INNER), (E * INNER, H)], E)
    assert plain is not None and plain.unique
    assert [g for g, _ in plain.groups] == [(0, 2), (1,)]
    assert [str(o) for o in plain.groups[1][1]] == [f"reshape({E}, {H}, {INNER})"]
    assert explain_flattened(stacked, [(E * INNER + 1, H)] * 3, E) is None  # rows not E blocks
    assert explain_flattened(stacked, [(E * INNER, H)] * 2, E) is None  # every tensor used once


def test_a_guessed_grouping_is_proposed_but_not_loaded() -> None:
    fs, fd = _features(WithFused(("a", "b", "c")), WithStacked())
    (match,) = match_stacked(fs, fd, CostWeights())
    assert UNDECIDED_GROUPING in match.terms and match.confidence < DEFAULT_MIN_CONFIDENCE
    plan = archalign.align(WithFused(("a", "b", "c")).state_dict(), WithStacked())
    assert all(m.confidence < DEFAULT_MIN_CONFIDENCE for m in plan.matches)


def test_meta_names_decide_flattened_experts_and_the_round_trip_is_exact() -> None:
    torch.manual_seed(0)
    src, dst = WithFused(), WithStacked()
    plan = archalign.align(src.state_dict(), dst)
    found = _explained(plan)
    gate_up_src, gate_up_ops, gate_up_conf = found["experts.gate_up_proj"]
    down_src, down_ops, down_conf = found["experts.down_proj"]
    assert gate_up_src == ("moe.w1", "moe.w3") and down_src == ("moe.w2",)
    assert gate_up_ops == [f"reshape({E}, {INNER}, {H})", f"concat@1[{INNER}, {INNER}]"]
    assert down_ops == [f"reshape({E}, {INNER}, {H})", "transpose(1, 2)"]
    for conf in (gate_up_conf, down_conf):  # a named prior over a shape-only guess
        assert DEFAULT_MIN_CONFIDENCE <= conf < HIGH_CONFIDENCE
    assert all(FFN_META in m.cost_terms for m in plan.matches)
    assert Plan.from_json(plan.to_json()).matches == plan.matches
    plan.apply(dst)
    moe = src.moe
    assert torch.equal(dst.experts.gate_up_proj, torch.cat(
        [moe.w1.view(E, INNER, H), moe.w3.view(E, INNER, H)], 1))
    assert torch.equal(dst.experts.down_proj, moe.w2.view(E, INNER, H).transpose(1, 2))
    back = WithFused()
    plan.inverse().apply(back, dst)
    for name in ("w1", "w2", "w3"):
        assert torch.equal(getattr(back.moe, name), getattr(moe, name))
