"""Tests for archalign.plan: value equality, JSON round trips, plan files (the review
table itself: test_review.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from archalign.errors import ArchalignError, PlanError
from archalign.ops import Op
from archalign.plan import PLAN_VERSION, Match, Mismatch, Plan, load_plan
from archalign.review import format_plan, format_plan_html
from archalign.source import read_source

COSTS = (("type", 0.0), ("position", 0.125), ("context", 0.0), ("name", 0.2), ("regret", 2.3))


def make_plan(**changes) -> Plan:
    m1 = Match(src=("enc.0.weight",), dst=("fc1.weight",), src_shapes=((4, 3),),
               dst_shapes=((4, 3),), confidence=0.9, costs=COSTS, src_unit="enc.0", dst_unit="fc1")
    m2 = Match(src=("enc.0.bias",), dst=("fc1.bias",), src_shapes=((4,),), dst_shapes=((4,),),
               confidence=0.45, costs=(("type", 0.0), ("regret", 0.1)), src_unit="enc.0",
               dst_unit="fc1")
    mm = Mismatch(src=("enc.2.weight",), dst=("fc2.weight",), src_shapes=((5, 4),),
                  dst_shapes=((2, 4),), reason="shape mismatch: source (5, 4) vs destination (2, 4)")
    fields = {
        "matches": (m1, m2),
        "mismatches": (mm,),
        "unmatched_src": ("enc.2.weight", "enc.2.bias"),
        "unmatched_dst": ("fc2.weight", "fc2.bias"),
        "tied_src": (("head.weight", "emb.weight"),),
        "tied_dst": (),
        "src_tracer": "fx",
        "dst_tracer": "hooks",
    }
    fields.update(changes)
    return Plan(**fields)


# --------------------------------------------------------------------------- reading


def test_len_and_mapping():
    plan = make_plan()
    assert len(plan) == 2
    assert plan.mapping() == {"fc1.weight": "enc.0.weight", "fc1.bias": "enc.0.bias"}
    assert plan.matches[0].cost_terms == dict(COSTS)


def test_mapping_skips_many_to_one_matches():
    fused = Match(src=("q", "k"), dst=("qkv",), src_shapes=((2,), (2,)), dst_shapes=((4,),),
                  confidence=1.0, costs=(), src_unit="attn", dst_unit="attn")
    plan = make_plan(matches=(make_plan().matches[0], fused))
    assert plan.mapping() == {"fc1.weight": "enc.0.weight"}


def test_equality_is_by_value_and_ignores_the_source():
    a = make_plan()
    b = make_plan(source=read_source({"w.weight": torch.zeros(1)}))
    assert a == b
    assert hash(a) == hash(b)
    assert a != make_plan(dst_tracer="fx")
    assert a != make_plan(unmatched_dst=("fc2.weight",))


def test_inverse_swaps_the_sides():
    plan = make_plan()
    inv = plan.inverse()
    assert inv.mapping() == {"enc.0.weight": "fc1.weight", "enc.0.bias": "fc1.bias"}
    assert inv.matches[0].src_shapes == ((4, 3),) and inv.matches[0].src_unit == "fc1"
    assert inv.mismatches[0].dst == ("enc.2.weight",)
    assert (inv.unmatched_src, inv.unmatched_dst) == (plan.unmatched_dst, plan.unmatched_src)
    assert (inv.tied_src, inv.tied_dst) == (plan.tied_dst, plan.tied_src)
    assert (inv.src_tracer, inv.dst_tracer) == ("hooks", "fx")
    assert inv.inverse() == plan


def test_inverse_inverts_adaptations():
    fused = Match(src=("q", "k"), dst=("qkv",), src_shapes=((2, 3), (2, 3)), dst_shapes=((3, 4),),
                  confidence=0.5, costs=(), src_unit="q+k", dst_unit="qkv",
                  ops=(Op("concat", sizes=(2, 2)), Op("transpose")))
    inv = Plan(matches=(fused,)).inverse().matches[0]
    assert inv.src == ("qkv",) and inv.dst == ("q", "k")
    assert inv.ops == (Op("transpose"), Op("split", sizes=(2, 2)))
    assert Plan(matches=(fused,)).inverse().inverse() == Plan(matches=(fused,))


# --------------------------------------------------------------------------- JSON


def test_to_dict_schema():
    data = make_plan().to_dict()
    # the schema grows (new optional fields); these are the ones every reader relies on
    required = ["archalign_plan", "src_tracer", "dst_tracer", "matches", "mismatches",
                "unmatched_src", "unmatched_dst", "tied_src", "tied_dst"]
    assert [k for k in data if k in required] == required
    assert (data["src_tracer"], data["dst_tracer"]) == ("fx", "hooks")
    assert data["unmatched_src"] == ["enc.2.weight", "enc.2.bias"]
    assert data["unmatched_dst"] == ["fc2.weight", "fc2.bias"]
    assert data["archalign_plan"] == PLAN_VERSION == 1
    assert data["matches"][0] == {
        "src": ["enc.0.weight"], "dst": ["fc1.weight"], "src_shapes": [[4, 3]],
        "dst_shapes": [[4, 3]], "confidence": 0.9, "costs": dict(COSTS),
        "src_unit": "enc.0", "dst_unit": "fc1"}
    assert data["mismatches"] == [{
        "src": ["enc.2.weight"], "dst": ["fc2.weight"], "src_shapes": [[5, 4]],
        "dst_shapes": [[2, 4]], "reason": "shape mismatch: source (5, 4) vs destination (2, 4)",
        "confidence": 0.0}]
    assert data["tied_src"] == [["head.weight", "emb.weight"]]
    assert data["tied_dst"] == []
    json.dumps(data, allow_nan=False)  # plain JSON


@pytest.mark.parametrize(
    "plan",
    [
        make_plan(),
        Plan(matches=()),
        make_plan(mismatches=(), tied_src=(), unmatched_src=()),
        make_plan(matches=(dataclasses.replace(make_plan().matches[0],
                                               costs=(("regret", math.inf),)),)),
        make_plan(matches=(Match(src=("s",), dst=("d",), src_shapes=((),), dst_shapes=((),),
                                 confidence=1.0, costs=(), src_unit="s", dst_unit="d"),)),
        make_plan(matches=(Match(src=("q", "k"), dst=("qkv",), src_shapes=((2, 3), (2, 3)),
                                 dst_shapes=((3, 4),), confidence=0.5, costs=(("fused", 0.3),),
                                 src_unit="q+k", dst_unit="qkv",
                                 ops=(Op("concat", sizes=(2, 2)), Op("transpose"))),)),
        make_plan(verification="outputs agree (max abs diff 0)"),
        make_plan(nonfinite=("enc.0.weight", "enc.2.bias")),
    ],
    ids=["full", "empty", "no-extras", "infinite-regret", "scalar", "ops", "verification",
         "nonfinite"],
)
def test_json_round_trip(plan):
    text = plan.to_json()
    assert text.endswith("\n")
    again = Plan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    assert Plan.from_dict(plan.to_dict()) == plan


def test_round_trip_types_are_tuples():
    again = Plan.from_json(make_plan().to_json())
    m = again.matches[0]
    assert m.src_shapes == ((4, 3),) and isinstance(m.src_shapes[0], tuple)
    assert isinstance(m.costs, tuple) and m.costs == COSTS
    assert again.tied_src == (("head.weight", "emb.weight"),)
    assert again.source is None


def test_values_are_stored_to_six_decimals():
    match = dataclasses.replace(make_plan().matches[0], confidence=1 / 3, costs=(("name", 2 / 3),))
    data = make_plan(matches=(match,)).to_dict()
    assert data["matches"][0]["confidence"] == 0.333333
    assert data["matches"][0]["costs"] == {"name": 0.666667}


def test_save_and_load(tmp_path):
    plan = make_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    assert load_plan(path) == plan
    assert load_plan(str(path)) == plan
    assert path.read_text(encoding="utf-8") == plan.to_json()


def test_same_plan_same_bytes(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    make_plan().save(a)
    copy.deepcopy(make_plan()).save(b)
    assert a.read_bytes() == b.read_bytes()
    Plan.from_json(a.read_text()).save(b)
    assert a.read_bytes() == b.read_bytes()


def _valid() -> dict:
    return make_plan().to_dict()


def _with(**changes) -> dict:
    data = _valid()
    data.update(changes)
    return data


def _match_with(**changes) -> dict:
    data = _valid()
    data["matches"][0].update(changes)
    return data


def _without(key: str) -> dict:
    data = _valid()
    del data[key]
    return data


def _match_without(key: str) -> dict:
    data = _valid()
    del data["matches"][0][key]
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(archalign_plan=2), "schema version 2 is not supported"),
        (_with(archalign_plan="1"), "schema version '1' is not supported"),
        (_without("archalign_plan"), "schema version None"),
        ([], "must be a JSON object, got list"),
        ("plan", "must be a JSON object, got str"),
        (_without("matches"), "malformed plan: KeyError"),
        (_with(matches=None), "malformed plan"),
        (_with(matches=[1]), "malformed plan"),
        (_match_without("confidence"), "malformed plan: KeyError"),
        (_match_without("src_unit"), "malformed plan: KeyError"),
        (_match_with(src="enc.0.weight"), "expected a list of keys"),
        (_match_with(dst=[1]), "expected a list of keys"),
        (_match_with(src_shapes=[["four", 3]]), "the shape of 'enc.0.weight' holds 'four'"),
        (_match_with(src_shapes=[[4.5, 3]]), "holds 4.5, not a size"),
        (_match_with(src_shapes=[[True, 3]]), "holds True, not a size"),
        (_match_with(src_shapes=[[-1, 3]]), "holds -1, not a size"),
        (_match_with(src_shapes=[4]), "the shape of 'enc.0.weight' must be a list of sizes"),
        (_match_with(costs=[["type", 0.0]]), "malformed plan: AttributeError"),
        (_match_with(confidence="high"), "expected a number, got 'high'"),
        (_match_with(confidence=10**400), "malformed plan: OverflowError"),
        (_match_with(src=[]), "malformed match"),
        (_with(mismatches=[{"src": ["a"]}]), "malformed plan: KeyError"),
        (_with(unmatched_dst="fc2.weight"), "expected a list of keys"),
        (_with(unmatched_src=None), "malformed plan"),
        (_with(tied_src=[["a"]]), "malformed plan: ValueError"),
        (_match_with(ops=[{"op": "rotate"}]), "unknown adaptation 'rotate'"),
        (_match_with(ops=[{"op": "reshape", "shape": [4], "colour": 1}]), "unknown fields ['colour']"),
        (_match_with(ops=[{"shape": [4]}]), "an adaptation is an object with a string \"op\""),
        (_match_with(ops=[{"op": "regroup", "groups": [4]}]), "two group counts"),
        (_match_with(ops=[{"op": "regroup", "groups": []}]), "two group counts"),
        (_match_with(ops=[{"op": "split", "sizes": [0, 4]}]), "sizes must be positive"),
        (_match_with(ops=[{"op": "transpose", "sizes": [4]}]), "takes no sizes"),
        (_with(mismatches=[{"src": ["a"], "dst": ["b"], "src_shapes": [[1]], "dst_shapes": [[2]],
                            "reason": "r", "confidence": 7}]), "malformed mismatch"),
    ],
)
def test_malformed_plans_raise_plan_error(data, message):
    with pytest.raises(PlanError) as info:
        Plan.from_dict(data)
    assert message in str(info.value)
    if isinstance(data, dict):
        with pytest.raises(PlanError):
            Plan.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["", "{", "not json", "[1, 2"])
def test_from_json_rejects_non_json(text):
    with pytest.raises(PlanError, match="must be JSON"):
        Plan.from_json(text)


def test_load_plan_rejects_a_wrong_version_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_with(archalign_plan=0)), encoding="utf-8")
    with pytest.raises(PlanError, match="version 0"):
        load_plan(path)


def test_plan_error_hierarchy():
    assert issubclass(PlanError, ArchalignError)
    assert issubclass(PlanError, ValueError)


def test_optional_fields_default():
    data = {"archalign_plan": 1, "matches": []}
    assert Plan.from_dict(data) == Plan(matches=())


# --------------------------------------------------------------------------- the review table


def test_str_and_the_jupyter_repr_are_the_review():
    # the tables themselves are tested in test_review.py
    plan = make_plan(nonfinite=("enc.0.weight",), verification="outputs agree")
    assert str(plan) == format_plan(plan)
    assert str(plan).splitlines()[0].startswith("Plan: 2 matches (0 adapted), 1 shape mismatches")
    assert plan._repr_html_() == format_plan_html(plan)


# --------------------------------------------------------------------------- NaN/Inf in the source


def test_nonfinite_source_keys_are_saved_only_when_there_are_some():
    assert "nonfinite" not in make_plan().to_dict()  # files of plans without them do not change
    data = make_plan(nonfinite=("enc.0.weight",)).to_dict()
    assert data["nonfinite"] == ["enc.0.weight"]
    assert list(data)[-1] == "nonfinite"
    assert Plan.from_dict(data).nonfinite == ("enc.0.weight",)
    with pytest.raises(PlanError, match="malformed plan"):
        Plan.from_dict({**data, "nonfinite": "enc.0.weight"})  # a bare string is not a key list


def test_nonfinite_source_keys_are_listed_for_review():
    plan = make_plan(nonfinite=("enc.0.weight",))
    lines = str(plan).splitlines()
    assert lines[1] == "WARNING: NaN/Inf in 1 source tensors (loaded as they are): enc.0.weight"
    assert [r["nonfinite"] for r in plan.to_records()] == [True, False]
    assert "NaN/Inf" not in str(make_plan())
    assert plan.inverse().nonfinite == ()  # they are source keys: not the inverse's source


@pytest.mark.parametrize(("text", "message"), [
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nests deeper than Python can parse"),
    ("[" + "1" * 5000 + "]", "must be JSON"),
    (json.dumps(_valid()).replace('"src_shapes": [[4, 3]]', '"src_shapes": [[1e400, 3]]', 1),
     "holds inf, not a size"),
    (json.dumps(_valid()).replace('"fc1.weight"', '"\\ud800"', 1), "UnicodeEncodeError"),
])
def test_plan_text_that_python_cannot_hold_is_a_plan_error(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        Plan.from_json(text)


def test_a_plan_file_that_is_not_utf8_is_a_plan_error_naming_it(tmp_path) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(make_plan().to_json().replace("fc1", "f\xe9").encode("latin-1"))
    with pytest.raises(PlanError, match=r"plan\.json.*UTF-8 text; byte \d+ is not"):
        load_plan(path)


def _flagged_plan() -> Plan:
    """Two same-shaped layers told apart by registration order, one decided by a named prior."""
    def match(i: int, *terms: str) -> Match:
        return Match(src=(f"a.{i}.weight",), dst=(f"b.{i}.weight",), src_shapes=((4, 4),),
                     dst_shapes=((4, 4),), confidence=0.7,
                     costs=(("shape", 0.0), *((t, 0.1) for t in terms)),
                     src_unit=f"a.{i}", dst_unit=f"b.{i}")
    return Plan(matches=(match(0), match(1, "prior_layout_in_out")),
                src_tracer="state_dict", dst_tracer="registration")


def test_json_rows_carry_their_flags():
    plan = _flagged_plan()
    rows = plan.to_dict()["matches"]
    assert rows[0]["flags"] == ["order-only"]
    assert rows[1]["flags"] == ["order-only", "prior"]
    assert [r["flags"] for r in plan.to_records()] == ["order-only", "order-only prior"]
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()


def test_flags_field_is_optional_and_derived_on_load():
    plan = _flagged_plan()
    data = plan.to_dict()
    for row in data["matches"]:
        del row["flags"]  # a file written before flags were saved
    assert Plan.from_dict(data) == plan
    data["matches"][0]["flags"] = ["index-shift"]  # a stale value: derived again
    assert Plan.from_dict(data).to_dict()["matches"][0]["flags"] == ["order-only"]
    data["matches"][0]["flags"] = ["made-up"]
    with pytest.raises(PlanError, match="unknown flag"):
        Plan.from_dict(data)
    data["matches"][0]["flags"] = "order-only"
    with pytest.raises(PlanError):
        Plan.from_dict(data)


def test_unflagged_rows_write_no_flags_field():
    plan = dataclasses.replace(_flagged_plan(), src_tracer="fx", dst_tracer="fx")
    assert "flags" not in plan.to_dict()["matches"][0]
    assert plan.to_records()[0]["flags"] == ""
