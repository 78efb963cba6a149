"""Tests for archalign.trial: a plan loaded into one scratch copy of dst, run layer by layer."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import archalign
from archalign.graph import build_units
from archalign.inputs import bind
from archalign.source import read_source
from archalign.trial import TrialRunner


class Chain(nn.Module):
    def __init__(self, zero_head: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        if zero_head:
            nn.init.zeros_(self.c.weight)
            nn.init.zeros_(self.c.bias)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _runner(src: nn.Module, dst: nn.Module) -> TrialRunner:
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    layers = [u.key for u in build_units(read_source(src))]
    return TrialRunner(src, dst, bind(src, dst, x), layers, layers)


def _swapped(plan: archalign.Plan, a: str, b: str) -> archalign.Plan:
    by = {m.dst[0]: m for m in plan.matches}
    out = []
    for m in plan.matches:
        unit = m.dst_unit
        if unit in (a, b):
            other = by[m.dst[0].replace(unit, b if unit == a else a, 1)]
            m = dataclasses.replace(m, src=other.src, src_unit=other.src_unit)
        out.append(m)
    return dataclasses.replace(plan, matches=tuple(out))


def test_a_right_plan_agrees_everywhere_and_dst_is_untouched() -> None:
    torch.manual_seed(0)
    src, dst = Chain(), Chain()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    plan = archalign.align(src, dst, check_outputs=False)
    trial = _runner(src, dst).run(plan)
    assert trial.ok and trial.scope == "outputs" and trial.first_bad == len(trial.order) == 3
    assert all(c.input_same is not False and c.output_same for c in trial.checks.values())
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_a_wrong_plan_names_the_first_layer_that_differs() -> None:
    torch.manual_seed(0)
    src, dst = Chain(), Chain()
    plan = _swapped(archalign.align(src, dst, check_outputs=False), "a", "b")
    runner = _runner(src, dst)
    trial = runner.run(plan)
    assert not trial.ok and trial.order[trial.first_bad] == "a"
    # a was given b's weights: its counterpart b received something else, and produced it
    assert trial.checks["a"].input_same is False and trial.checks["a"].output_same is False
    a = next(m for m in plan.matches if m.dst_unit == "a")
    assert runner.local_check(a) is True  # given b's input, b's tensors in a compute b: the
    # tensors are right for their source, the source is wrong for the layer
    c = next(m for m in plan.matches if m.dst_unit == "c")
    assert trial.checks["c"].input_same is False and runner.local_check(c) is True
    assert runner.run(archalign.align(src, dst, check_outputs=False)).ok  # the copy reloads


def test_a_zero_head_proves_nothing_so_the_layers_judge() -> None:
    torch.manual_seed(0)
    src, dst = Chain(zero_head=True), Chain()
    right = archalign.align(src, dst, check_outputs=False)
    trial = _runner(src, dst).run(right)
    assert trial.ok and "no information" in trial.scope
    wrong = _runner(src, dst).run(_swapped(right, "a", "b"))
    assert not wrong.ok  # the outputs (all zero) agree: a check that cannot fail is not used
