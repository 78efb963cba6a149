"""Checkpoint self-checks (`archalign.selfcheck`): what a checkpoint's plan shows on the
destination alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import archalign
from archalign.confidence import CHECKPOINT_CHECK_CAP, HIGH_CONFIDENCE
from archalign.inputs import bind
from archalign.plan import Plan
from archalign.selfcheck import check_checkpoint, norm_fit, run_checks


class Net(nn.Module):
    """conv-bn-relu twice (same widths, so the two BatchNorms can be swapped), pool, head."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.norm_a = nn.BatchNorm2d(16)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.norm_b = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm_a(self.stem(x)))
        x = torch.relu(self.norm_b(self.body(x)))
        return self.head(x.mean((2, 3)))


class Renamed(nn.Module):
    """The same network under other names (a port's destination)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                                      nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                      nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def trained_like(seed: int = 0) -> Net:
    """Weights with per-channel scales and BatchNorm statistics calibrated on a batch (running
    means and variances far from 0 and 1, different in every channel), a non-zero head."""
    gen = torch.Generator().manual_seed(seed)
    model = Net()
    with torch.no_grad():
        for conv in (model.stem, model.body):
            conv.weight.mul_(torch.rand(16, 1, 1, 1, generator=gen) * 3 + 0.2)
            conv.bias.copy_(torch.randn(16, generator=gen))
        for norm in (model.norm_a, model.norm_b):
            norm.weight.copy_(torch.rand(16, generator=gen) + 0.5)
            norm.bias.copy_(torch.randn(16, generator=gen) * 0.3)
            norm.momentum = None  # one batch: exactly its statistics
        model.train()
        model(torch.randn(8, 3, 16, 16, generator=gen))
    return model.eval()


def _plan(src: Net, dst: nn.Module) -> Plan:
    return archalign.align(src.state_dict(), dst)


def _swap_sources(plan: Plan, a: str, b: str) -> Plan:
    """The plan with the sources of two destination layers exchanged (shapes are equal)."""
    units = {m.dst_unit: m for m in plan.matches}
    src_of = {a: units[a].src_unit, b: units[b].src_unit}
    other = {a: b, b: a}
    out = []
    for m in plan.matches:
        if m.dst_unit in other:
            swapped = src_of[other[m.dst_unit]]
            out.append(dataclasses.replace(
                m, src_unit=swapped,
                src=tuple(swapped + k[len(m.src_unit):] for k in m.src)))
        else:
            out.append(m)
    return dataclasses.replace(plan, matches=tuple(out))


def _input(dst: nn.Module) -> archalign.inputs.BoundInputs:
    return bind(dst, dst, torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)))


def test_right_load_passes_every_check():
    src, dst = trained_like(), Renamed()
    plan = _plan(src, dst)
    assert plan.mapping()["features.4.running_var"] == "norm_b.running_var"
    assert "checkpoint checks on an input made for the destination" in plan.verification
    assert "outputs finite and varying" in plan.verification
    assert "2/2 BatchNorm running statistics consistent" in plan.verification
    assert not any(t in m.cost_terms for m in plan.matches
                   for t in ("norm_inconsistent", "outputs_constant", "outputs_nonfinite"))
    checked = check_checkpoint(dataclasses.replace(plan, verification=""), dst, _input(dst))
    assert [m.confidence for m in checked.matches] == [m.confidence for m in plan.matches]


def test_dst_is_never_written():
    src, dst = trained_like(), Renamed()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    archalign.align(src.state_dict(), dst)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_swapped_batch_norm_sources_fail_and_are_capped():
    src, dst = trained_like(), Renamed()
    plan = _swap_sources(_plan(src, dst), "features.1", "features.4")
    raised = dataclasses.replace(plan, matches=tuple(
        dataclasses.replace(m, confidence=0.99) for m in plan.matches))
    checked = check_checkpoint(raised, dst, _input(dst))
    assert "INCONSISTENT" in checked.verification
    assert "features.1" in checked.verification and "features.4" in checked.verification
    for m in checked.matches:
        if m.dst_unit in ("features.1", "features.4"):
            assert m.confidence <= CHECKPOINT_CHECK_CAP < HIGH_CONFIDENCE
            assert "norm_inconsistent" in m.cost_terms
        else:
            assert m.confidence == 0.99


def test_zeroed_head_is_reported_constant_and_caps_everything():
    src, dst = trained_like(), Renamed()
    with torch.no_grad():
        src.head.weight.zero_()
    plan = archalign.align(src.state_dict(), dst)
    assert "CONSTANT OUTPUTS" in plan.verification
    assert all(m.confidence <= CHECKPOINT_CHECK_CAP for m in plan.matches)
    assert all("outputs_constant" in m.cost_terms for m in plan.matches)


def test_nonfinite_outputs_cap_everything():
    src, dst = trained_like(), Renamed()
    with torch.no_grad():
        src.head.bias[0] = float("nan")
    plan = archalign.align(src.state_dict(), dst)
    assert "NaN OR Inf" in plan.verification
    assert all(m.confidence <= CHECKPOINT_CHECK_CAP for m in plan.matches)


def test_file_source_is_checked(tmp_path):
    from safetensors.torch import save_file

    src, dst = trained_like(), Renamed()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    plan = archalign.align(path, dst)
    assert "2/2 BatchNorm running statistics consistent" in plan.verification


def test_checks_not_run_say_why():
    src, dst = trained_like(), Renamed()
    plan = archalign.align(src.state_dict(), dst.to("meta"))
    assert plan.verification.startswith("checkpoint checks not run: ")
    assert archalign.align(src.state_dict(), Renamed(), check_outputs=False).verification == ""


def test_a_constant_input_judges_no_variation():
    model = trained_like()
    checks = run_checks(model, torch.ones(2, 3, 8, 8), frozenset(model.state_dict()))
    assert checks.finite and not checks.constant and not checks.varying_checked


def test_unloaded_batch_norms_are_not_checked():
    model = trained_like()
    loaded = frozenset(k for k in model.state_dict() if not k.startswith("norm_b"))
    checks = run_checks(model, torch.randn(2, 3, 8, 8), loaded)
    assert [c.layer for c in checks.norms] == ["norm_a"]


@pytest.mark.parametrize(("scale", "shift"), [(1.0, 0.0), (3.0, -2.0)])
def test_norm_fit_ignores_an_affine_shift(scale, shift):
    gen = torch.Generator().manual_seed(0)
    mean, var = torch.randn(32, generator=gen), torch.rand(32, generator=gen) + 0.1
    assert norm_fit(mean * scale + shift, var * scale, mean, var) == pytest.approx(1.0)
    assert norm_fit(-mean, 1 / var, mean, var) == pytest.approx(-1.0)
    assert norm_fit(mean, var, torch.zeros(32), torch.ones(32)) != norm_fit(mean, var, mean, var)


def test_a_destination_that_cannot_be_copied_is_not_checked():
    dst = nn.Linear(3, 4)
    dst.weight = nn.Parameter(torch.randn(4, 3).to_sparse())  # deepcopy refuses it
    plan = archalign.align({"weight": torch.randn(4, 3), "bias": torch.randn(4)}, dst)
    assert plan.verification.startswith("checkpoint checks not run: copying the destination")
