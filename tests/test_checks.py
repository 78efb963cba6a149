"""Tests for archalign.checks: what is refused before anything is written."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import archalign
from archalign.checks import check_plan, check_value, gains_nonfinite, refuse_unwritable, unplanned_keys
from archalign.errors import ApplyError, PlanError
from archalign.ops import Op
from archalign.source import read_destination, read_source


def _plan():
    torch.manual_seed(0)
    src, dst = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), nn.Sequential(
        nn.Linear(3, 4), nn.Linear(4, 2))
    return src, dst, archalign.align(src, dst)


def test_a_plan_that_agrees_passes_with_and_without_a_destination() -> None:
    src, dst, plan = _plan()
    check_plan(plan, read_source(src), read_destination(dst))
    check_plan(plan, read_source(src), None)


@pytest.mark.parametrize(("change", "message"), [
    (dict(src=("missing.weight",)), "source has no tensor 'missing.weight'"),
    (dict(src_shapes=((9, 9),)), "has shape"),
    (dict(ops=(Op("transpose"),)), "turns"),
    (dict(ops=(Op("reshape", shape=(5,), from_shape=(4, 3)),)), "does not fit"),
])
def test_a_plan_that_disagrees_is_refused_naming_the_match(change, message) -> None:
    src, dst, plan = _plan()
    first = dataclasses.replace(plan.matches[0], **change)
    bad = dataclasses.replace(plan, matches=(first, *plan.matches[1:]))
    for target in (read_destination(dst), None):
        with pytest.raises(PlanError, match=message):
            check_plan(bad, read_source(src), target)


def test_a_destination_key_written_twice_is_refused() -> None:
    src, dst, plan = _plan()
    twice = dataclasses.replace(plan, matches=(*plan.matches, plan.matches[0]))
    with pytest.raises(PlanError, match="written twice"):
        check_plan(twice, read_source(src), read_destination(dst))


def test_meta_and_quantized_sources_and_integer_destinations_are_refused() -> None:
    src, dst, plan = _plan()
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    for target in (read_destination(dst), None):
        with pytest.raises(ApplyError, match="meta device"):
            refuse_unwritable(plan.matches, (), read_source(meta), target)
    into = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    into[0].weight = nn.Parameter(into[0].weight.detach().to(torch.int64), requires_grad=False)
    with pytest.raises(ApplyError, match="truncated"):
        refuse_unwritable(plan.matches, (), read_source(src), read_destination(into))
    refuse_unwritable(plan.matches, (), read_source(src), None)  # a file keeps the source's dtypes


def test_check_value_refuses_what_copy_would_refuse() -> None:
    with pytest.raises(ApplyError, match="shape"):
        check_value("w", torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ApplyError, match="expanded"):
        check_value("w", torch.zeros(1, 3).expand(2, 3), torch.zeros(2, 3))
    check_value("w", torch.zeros(2, 3), torch.ones(2, 3))


def _refusal(state: dict[str, torch.Tensor], dst: nn.Module, **to: torch.dtype) -> str:
    """The message `refuse_unwritable` gives for a plain copy of every key of ``state``."""
    for key, dtype in to.items():
        getattr(dst, key).data = getattr(dst, key).data.to(dtype)
    plan = archalign.align(state, dst)
    with pytest.raises(ApplyError) as info:
        refuse_unwritable(plan.matches, (), read_source(state), read_destination(dst))
    return str(info.value)


@pytest.mark.parametrize("layout", ["to_sparse", "to_sparse_csr"])
def test_a_sparse_source_or_destination_tensor_is_refused_by_name(layout: str) -> None:
    state = {"weight": getattr(torch.randn(4, 3), layout)(), "bias": torch.randn(4)}
    assert "source tensor 'weight' is not dense" in _refusal(state, nn.Linear(3, 4))
    dst = nn.Linear(3, 4)
    dst.weight = nn.Parameter(torch.randn(4, 3).to_sparse())
    assert "destination tensor 'weight' is not dense" in _refusal(
        {"weight": torch.randn(4, 3), "bias": torch.randn(4)}, dst)


def test_complex_values_into_real_ones_are_refused() -> None:
    state = {"weight": torch.randn(4, 3, dtype=torch.complex64), "bias": torch.randn(4)}
    assert "imaginary part would be dropped" in _refusal(state, nn.Linear(3, 4))


def test_integers_that_would_wrap_are_refused_and_those_that_fit_pass() -> None:
    into = torch.zeros(3, dtype=torch.int8)
    check_value("ids", into, torch.tensor([-128, 0, 127]))
    with pytest.raises(ApplyError, match=r"'ids'.*\[0, 200\].*torch.int8 \[-128, 127\]"):
        check_value("ids", into, torch.tensor([0, 5, 200]))
    with pytest.raises(ApplyError, match="wrap"):
        check_value("flag", torch.zeros(2, dtype=torch.bool), torch.tensor([0, 2]))


@pytest.mark.parametrize(("dtype", "value", "gains"), [
    (torch.float16, 65504.0, False),  # the largest float16
    (torch.float16, 65519.0, False),  # rounds down to it
    (torch.float16, 65520.0, True),  # rounds up to Inf
    (torch.float16, -1e5, True),
    (torch.bfloat16, 1e38, False),
    (torch.float32, 1e300, True),  # from float64
    (torch.float16, float("inf"), False),  # the source was not finite: not gained
])
def test_values_beyond_the_destination_range_are_found(dtype, value, gains) -> None:  # type: ignore[no-untyped-def]
    source = torch.tensor([0.5, value], dtype=torch.float64 if abs(value) > 1e38 else torch.float32)
    assert gains_nonfinite(torch.zeros(2, dtype=dtype), source) is gains
    assert gains_nonfinite(torch.zeros(2, dtype=dtype), torch.tensor([70000, 1])) is (
        dtype == torch.float16)


def test_keys_a_plan_never_mentions_say_it_was_made_for_other_models() -> None:
    src, dst, plan = _plan()
    assert unplanned_keys(plan, read_source(src), read_destination(dst)) == ([], [])
    deeper = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    assert unplanned_keys(plan, read_source(deeper), read_destination(deeper)) == (
        ["2.weight", "2.bias"], ["2.weight", "2.bias"])
    dropped = plan.drop("1")  # what the plan leaves untouched on purpose is still known to it
    assert unplanned_keys(dropped, read_source(src), read_destination(dst))[1] == []


def test_a_plan_made_on_a_structure_says_how_to_read_the_wrapped_file_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src, dst, plan = _plan()  # the plan names the module's keys
    path = tmp_path / "ddp.pt"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)
    with pytest.raises(PlanError, match=r"under the wrapper prefix 'module.'.*structure=module"):
        check_plan(plan, read_source(path), read_destination(dst))
    with pytest.raises(PlanError, match="Were the models changed"):
        check_plan(plan, read_source({"x.weight": torch.ones(4, 3)}), read_destination(dst))
