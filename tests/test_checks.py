"""Tests for archalign.checks: what is refused before anything is written."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import archalign
from archalign.checks import check_plan, check_value, refuse_unwritable, unplanned_keys
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


def test_keys_a_plan_never_mentions_say_it_was_made_for_other_models() -> None:
    src, dst, plan = _plan()
    assert unplanned_keys(plan, read_source(src), read_destination(dst)) == ([], [])
    deeper = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    assert unplanned_keys(plan, read_source(deeper), read_destination(deeper)) == (
        ["2.weight", "2.bias"], ["2.weight", "2.bias"])
    dropped = plan.drop("1")  # what the plan leaves untouched on purpose is still known to it
    assert unplanned_keys(dropped, read_source(src), read_destination(dst))[1] == []
