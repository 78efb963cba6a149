"""Reviewer hints: pin, forbid, drop; patterns; re-solving; plan files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import archalign
from archalign.errors import AlignError, PlanError
from archalign.graph import Unit
from archalign.hints import Hints, resolve_hints


def chain(n: int, width: int = 8) -> nn.Sequential:
    torch.manual_seed(n)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


def units(*keys: str) -> list[Unit]:
    return [Unit(key=k, tensors=(f"{k}.weight",), shapes=((2, 2),), type_name="Linear")
            for k in keys]


def test_patterns_cover_units_tensors_and_containers() -> None:
    src = units("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "head")
    dst = units("layers.0.qkv", "layers.1.qkv", "fc")
    rules = resolve_hints(Hints(pin=(("blocks.*.attn.qkv", "layers.*.qkv"),),
                                forbid=(("blocks.0.attn", "fc"),), drop=("fc.weight",)),
                          src, dst)
    assert rules.pins == (("blocks.0.attn.qkv", "layers.0.qkv"),
                          ("blocks.1.attn.qkv", "layers.1.qkv"))
    assert rules.forbidden == {("blocks.0.attn.qkv", "fc"), ("blocks.0.attn.proj", "fc")}
    assert rules.dropped == {"fc"}


@pytest.mark.parametrize(("hints", "message"), [
    (Hints(pin=(("nope*", "fc"),)), "source pattern 'nope\\*' matches no layer"),
    (Hints(pin=(("blocks.*", "fc"),)), "covers 2 layers"),
    (Hints(pin=(("a", "fc"), ("a", "fc"))), "pinned twice: a"),
    (Hints(drop=("zzz",)), "destination pattern 'zzz'"),
])
def test_bad_hints_are_refused_with_the_pattern_named(hints: Hints, message: str) -> None:
    with pytest.raises(AlignError, match=message):
        resolve_hints(hints, units("a", "blocks.0", "blocks.1"), units("fc"))


def test_pin_re_solves_and_propagates_to_the_neighbours() -> None:
    src, dst = chain(4), chain(4)
    plan = archalign.align(src, dst)
    assert plan.mapping()["0.weight"] == "0.weight"
    edited = plan.pin("2", "0")
    assert edited.matches == plan.matches  # a hint changes nothing until re-solved
    again = archalign.align(src, dst, hints=edited.hints)
    mapping = again.mapping()
    assert mapping["0.weight"] == "2.weight"
    assert mapping["2.weight"] == "0.weight"  # the displaced layer moved, not dropped
    pinned = next(m for m in again.matches if m.dst == ("0.weight",))
    assert pinned.confidence == 1.0 and pinned.cost_terms["pinned"] == 1.0


def test_forbid_and_drop() -> None:
    src, dst = chain(3), chain(3)
    plan = archalign.align(src, dst, hints=Hints(forbid=(("0", "0"),), drop=("2",)))
    mapping = plan.mapping()
    assert mapping.get("0.weight") != "0.weight"
    assert "2.weight" not in mapping and "2.weight" in plan.unmatched_dst
    before = dst[2].weight.clone()
    plan.apply(dst, min_confidence=0.0)
    assert torch.equal(dst[2].weight, before)


class Stack(nn.Module):
    """Identical blocks under renamed keys (a revised model that grew a block)."""

    def __init__(self, n: int, name: str) -> None:
        super().__init__()
        torch.manual_seed(n)
        setattr(self, name, nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
                                          for _ in range(n)))
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in getattr(self, self.name):
            x = block(x)
        return x


def test_dropping_an_added_block_makes_the_others_certain() -> None:
    # 6 identical blocks into 7: structure cannot tell which block is new, so every match of
    # the run is uncertain; dropped, the new block leaves the alignment and the rest is certain
    src, dst = Stack(6, "blocks"), Stack(7, "layers")
    truth = {f"layers.{i}.{j}.{t}": f"blocks.{i}.{j}.{t}" for i in range(6) for j in (0, 1)
             for t in ("weight", "bias")}  # plan.mapping(): destination -> source
    plan = archalign.align(src, dst, check_outputs=False)
    assert max(m.confidence for m in plan.matches) < 0.5
    plan = archalign.align(src, dst, hints=Hints(drop=("layers.6",)), check_outputs=False)
    assert plan.mapping() == truth
    # all loaded by default; all certain but the last norm, which fed the output and now feeds
    # the dropped block (its context differs)
    assert min(m.confidence for m in plan.matches) >= 0.5
    assert {m.dst[0] for m in plan.matches if m.confidence < 0.9} <= {
        "layers.5.1.weight", "layers.5.1.bias"}
    assert "layers.6.0.weight" in plan.unmatched_dst


def test_drop_edits_the_plan_at_once() -> None:
    src, dst = chain(2), chain(2)
    plan = archalign.align(src, dst).drop("1")
    assert set(plan.mapping()) == {"0.weight", "0.bias"}
    report = plan.apply(dst)
    assert set(report.missing) == {"1.weight", "1.bias"}


def test_pinned_pair_that_does_not_fit_is_reported_not_loaded() -> None:
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    dst = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    plan = archalign.align(src, dst, hints=Hints(pin=(("1", "0"),)))
    assert any("pinned, but the shapes differ" in mm.reason for mm in plan.mismatches)
    assert "0.weight" not in plan.mapping()


def test_hints_survive_the_plan_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src, dst = chain(3), chain(3)
    plan = archalign.align(src, dst).pin("0", "0").forbid("1", "2").drop("2")
    plan.save(tmp_path / "plan.json")
    loaded = archalign.load_plan(tmp_path / "plan.json")
    assert loaded.hints == plan.hints
    assert archalign.align(src, dst, hints=loaded.hints).hints == plan.hints


@pytest.mark.parametrize("data", [{"pin": [["a"]]}, {"pin": [[1, 2]]}, {"pin": [], "tie": []}])
def test_malformed_hints_in_a_plan_file(data: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(PlanError):
        Hints.from_dict(data)
