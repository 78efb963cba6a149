"""End-to-end invariants of `align` / `align_and_load`, and the seed's three scenarios."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import archalign
from corpus import MLP, RenamedMLP
from tests.models import SpecNet, make_layers, randomise_buffers

# ---------------------------------------------------------------- the seed's three scenarios


def Old() -> nn.Module:  # seed scenario 2's source: fc1 (10 -> 8), fc2 (8 -> 5)
    return MLP(10, 8, 5)


Renamed = RenamedMLP


def mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_identical_architectures_give_identity_with_high_confidence() -> None:
    torch.manual_seed(0)
    src, dst = mlp(10, 8, 5, 2), mlp(10, 8, 5, 2)
    plan = archalign.align(src, dst)
    assert plan.mapping() == {k: k for k in src.state_dict()}
    assert min(m.confidence for m in plan.matches) >= 0.95
    report = plan.apply(dst)
    assert report.complete and not report.skipped and not report.unexpected
    x = torch.randn(4, 10)
    assert torch.equal(src(x), dst(x))


def test_renamed_layer_and_new_layer() -> None:
    torch.manual_seed(0)
    src, dst = Old(), Renamed()
    fc3_before = {k: v.clone() for k, v in dst.fc3.state_dict().items()}
    plan = archalign.align(src, dst)
    assert plan.mapping() == {
        "first_layer.weight": "fc1.weight", "first_layer.bias": "fc1.bias",
        "fc2.weight": "fc2.weight", "fc2.bias": "fc2.bias",
    }
    assert set(plan.unmatched_dst) == {"fc3.weight", "fc3.bias"}
    report = plan.apply(dst)
    assert set(report.missing) == {"fc3.weight", "fc3.bias"}
    assert not report.skipped
    for k, v in dst.fc3.state_dict().items():
        assert torch.equal(v, fc3_before[k])  # left at its initialisation
    assert torch.equal(dst.first_layer.weight, src.fc1.weight)


def test_deeper_into_shallower_reports_the_mismatch_and_loads_the_fit() -> None:
    torch.manual_seed(0)
    src, dst = mlp(10, 8, 5, 2), mlp(10, 5, 2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        copy.deepcopy(dst).load_state_dict(src.state_dict())
    plan = archalign.align(src, dst)
    assert plan.mapping() == {"2.weight": "4.weight", "2.bias": "4.bias"}
    mismatched = {(mm.dst[0], mm.src[0]) for mm in plan.mismatches}
    assert mismatched == {("0.weight", "0.weight"), ("0.bias", "0.bias")}
    assert all("shape mismatch" in mm.reason for mm in plan.mismatches)
    before = dst[0].weight.clone()
    report = plan.apply(dst)
    assert report.loaded == ("2.weight", "2.bias")
    assert {s.dst for s in report.skipped} == {"0.weight", "0.bias"}
    assert all("shape mismatch" in s.reason for s in report.skipped)
    assert torch.equal(dst[0].weight, before)
    assert torch.equal(dst[2].weight, src[4].weight)


# ---------------------------------------------------------------- invariants, as a table


def _cnn() -> nn.Module:
    torch.manual_seed(3)
    model = SpecNet(make_layers("cnn", [3, 8, 8, 8, 4], [True, False, True, True]),
                    ["a", "b", "c", "d", "e", "f", "g"])
    randomise_buffers(model, 0)
    return model


def _mlp() -> nn.Module:
    torch.manual_seed(4)
    return SpecNet(make_layers("mlp", [6, 8, 8, 8, 8, 3], [False] * 5),
                   ["l0", "l1", "l2", "l3", "l4"])



INVARIANT_MODELS = {"mlp": _mlp, "cnn": _cnn}


@pytest.mark.parametrize("name", sorted(INVARIANT_MODELS))
def test_self_alignment_is_identity(name: str) -> None:
    model = INVARIANT_MODELS[name]()
    plan = archalign.align(model, model)
    assert plan.mapping() == {k: k for k in model.state_dict()}
    assert min(m.confidence for m in plan.matches) >= 0.9
    assert not plan.unmatched_src and not plan.unmatched_dst


@pytest.mark.parametrize("name", sorted(INVARIANT_MODELS))
def test_state_dict_source_in_registration_order_is_recovered(name: str) -> None:
    model = INVARIANT_MODELS[name]()
    owners = list(dict.fromkeys(k.rpartition(".")[0] for k in model.state_dict()))
    new_owner = {o: f"net.{i}.block_{o.replace('.', '_')}" for i, o in enumerate(owners)}
    renamed = {f"{new_owner[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": v
               for k, v in model.state_dict().items()}
    plan = archalign.align(renamed, model)
    expected = {k: nk for k, nk in zip(model.state_dict(), renamed)}
    assert plan.mapping() == expected
    assert plan.src_tracer == "fitted"  # the key tree put in the destination's order


@pytest.mark.parametrize("name", sorted(INVARIANT_MODELS))
def test_plan_survives_a_json_round_trip(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = INVARIANT_MODELS[name]()
    plan = archalign.align(model, copy.deepcopy(model))
    path = tmp_path / "plan.json"
    plan.save(path)
    again = archalign.load_plan(path)
    assert again == plan
    again.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


# ---------------------------------------------------------------- property: rename, re-wrap, reorder

_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6).filter(
    lambda s: s not in {"paths", "forward", "training", "to", "cpu", "cuda", "eval", "train",
                        "float", "double", "half", "type", "apply", "zero_grad"})


@st.composite
def _variants(draw: st.DrawFn) -> tuple[str, list[int], list[bool], list[str], list[int]]:
    kind = draw(st.sampled_from(["mlp", "cnn"]))
    depth = draw(st.integers(1, 6))
    hidden = draw(st.lists(st.sampled_from([4, 6, 8]), min_size=depth, max_size=depth))
    widths = [draw(st.sampled_from([3, 4])), *hidden]
    norm = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    n_layers = depth + sum(norm)
    paths: list[str] = []
    while len(paths) < n_layers:
        nesting = draw(st.integers(1, 3))
        path = ".".join(draw(st.lists(_names, min_size=nesting, max_size=nesting)))
        if all(not (p == path or p.startswith(path + ".") or path.startswith(p + "."))
               for p in paths):
            paths.append(path)
    registration = draw(st.permutations(list(range(n_layers))))
    return kind, widths, norm, paths, list(registration)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_variants())
def test_renamed_rewrapped_reordered_copy_is_recovered_exactly(
        variant: tuple[str, list[int], list[bool], list[str], list[int]]) -> None:
    kind, widths, norm, paths, registration = variant
    torch.manual_seed(0)
    src_layers = make_layers(kind, widths, norm)
    src = SpecNet(src_layers, [f"layer{i}" for i in range(len(src_layers))]).eval()
    randomise_buffers(src, 1)
    torch.manual_seed(1)
    dst = SpecNet(make_layers(kind, widths, norm), paths, registration).eval()

    plan = archalign.align(src, dst)
    expected = {}
    for i, path in enumerate(paths):
        for name in src.get_submodule(f"layer{i}").state_dict():
            expected[f"{path}.{name}"] = f"layer{i}.{name}"
    assert plan.mapping() == expected
    report = plan.apply(dst)
    assert report.complete, report
    x = torch.randn(2, widths[0]) if kind == "mlp" else torch.randn(2, widths[0], 5, 5)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_a_source_with_nothing_in_common_is_refused_naming_keys_of_both_sides() -> None:
    """Another model's file (or a file of something else): no plan that loads nothing is
    proposed as if it were a port; the error names keys of both sides."""
    torch.manual_seed(0)
    unrelated = {"mystery.table": torch.randn(5, 7, 3), "other.x": torch.randn(9)}
    dst = mlp(10, 5, 2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(archalign.AlignError, match=r"none of its 2 tensors \(mystery\.table, "
                       r"other\.x\) fits any of the destination's 4 \(0\.weight, 0\.bias"):
        archalign.align_and_load(unrelated, dst)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    # a reviewer who dropped every layer asked for an empty plan: no error
    assert archalign.align(unrelated, dst, hints=archalign.Hints(drop=("*",))).matches == ()


def test_align_and_load_warns_when_the_destination_stays_partly_initial(caplog) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    src, dst = mlp(10, 8, 5, 2), mlp(10, 5, 2)
    with caplog.at_level(logging.WARNING, logger="archalign"):
        report = archalign.align_and_load(src, dst)
    (warning,) = [r for r in caplog.records if "stay at their initial values" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(
        "2 of 4 destination tensors stay at their initial values (2 skipped below min_confidence "
        "0.50 or by shape, 0 without counterpart): 0.weight, 0.bias.")
    assert report.plan is not None and report.plan.source is None  # plain data
    assert [m.confidence for m in report.plan.matches] == [
        m.confidence for m in archalign.align(src, mlp(10, 5, 2)).matches]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="archalign"):
        complete = archalign.align_and_load(src, mlp(10, 8, 5, 2))
    assert complete.complete and not caplog.records
