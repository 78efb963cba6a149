"""Tests for archalign.apply: loading a plan, refusing it, and leaving the destination untouched."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import archalign
from archalign.apply import apply_plan
from archalign.errors import ApplyError, PlanError, SourceError
from archalign.ops import Op
from archalign.plan import Match, Mismatch, Plan
from archalign.report import Adapted, LoadReport, Skipped
from archalign.source import read_source

# --------------------------------------------------------------------------- models & helpers


class Src(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        self.bn = nn.BatchNorm1d(2)


class Dst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)
        self.norm = nn.BatchNorm1d(2)


PAIRS = [
    ("enc.0.weight", "fc1.weight"), ("enc.0.bias", "fc1.bias"),
    ("enc.2.weight", "fc2.weight"), ("enc.2.bias", "fc2.bias"),
    ("bn.weight", "norm.weight"), ("bn.bias", "norm.bias"),
    ("bn.running_mean", "norm.running_mean"), ("bn.running_var", "norm.running_var"),
    ("bn.num_batches_tracked", "norm.num_batches_tracked"),
]
DST_KEYS = tuple(d for _, d in PAIRS)
SRC_KEYS = tuple(s for s, _ in PAIRS)


def models(seed: int = 0) -> tuple[Src, Dst]:
    torch.manual_seed(seed)
    src = Src()
    # make the norm distinguishable from a fresh BatchNorm
    with torch.no_grad():
        src.bn.weight.uniform_(0.5, 1.5)
        src.bn.bias.uniform_(-0.5, 0.5)
    src.bn.running_mean.uniform_()
    src.bn.running_var.uniform_(1, 2)
    src.bn.num_batches_tracked.fill_(7)
    return src, Dst()


def match(src: nn.Module, dst: nn.Module, s: str, d: str, confidence: float = 1.0) -> Match:
    return Match(src=(s,), dst=(d,), src_shapes=(tuple(src.state_dict()[s].shape),),
                 dst_shapes=(tuple(dst.state_dict()[d].shape),), confidence=confidence,
                 costs=(("regret", 1.0),), src_unit=s.rpartition(".")[0],
                 dst_unit=d.rpartition(".")[0])


def make_plan(src: nn.Module, dst: nn.Module, pairs=PAIRS, confidence=None, *, carry=True,
              **extra) -> Plan:
    confidence = confidence or {}
    matches = tuple(match(src, dst, s, d, confidence.get(d, 1.0)) for s, d in pairs)
    return Plan(matches=matches, source=read_source(src) if carry else None, **extra)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose value changed since ``before`` (an empty list: nothing was written)."""
    now = module.state_dict()
    assert list(now) == list(before)
    return [k for k in before
            if before[k].device.type != "meta" and not torch.equal(now[k], before[k])]


def loaded_correctly(src: nn.Module, dst: nn.Module, pairs=PAIRS) -> bool:
    s, d = src.state_dict(), dst.state_dict()
    return all(torch.equal(d[dk].to(s[sk].dtype), s[sk]) for sk, dk in pairs)


# --------------------------------------------------------------------------- loading


def test_apply_loads_every_tensor_and_reports():
    src, dst = models()
    before = snapshot(dst)
    plan = make_plan(src, dst)
    report = apply_plan(plan, dst)
    assert isinstance(report, LoadReport)
    assert report == LoadReport(loaded=DST_KEYS, skipped=(), missing=(), unexpected=(), tied=(),
                                plan=plan)
    assert report.plan is not None and report.plan.source is None  # plain data: no tensors kept
    assert report.complete
    assert loaded_correctly(src, dst)
    assert sorted(unchanged(dst, before)) == sorted(DST_KEYS)  # every tensor was written
    assert dst.norm.num_batches_tracked.item() == 7


def test_apply_writes_in_place():
    src, dst = models()
    weight = dst.fc1.weight
    apply_plan(make_plan(src, dst), dst)
    assert dst.fc1.weight is weight
    assert isinstance(dst.fc1.weight, nn.Parameter)
    assert dst.fc1.weight.requires_grad
    assert dst.fc1.weight.grad_fn is None
    assert dst.fc1.weight.data_ptr() != src.enc[0].weight.data_ptr()  # a copy, not shared


def test_apply_partial_plan_reports_missing_and_unexpected():
    src, dst = models()
    before = snapshot(dst)
    report = apply_plan(make_plan(src, dst, PAIRS[:2]), dst)
    assert report.loaded == ("fc1.weight", "fc1.bias")
    assert report.missing == DST_KEYS[2:]
    assert report.unexpected == SRC_KEYS[2:]
    assert report.skipped == ()
    assert not report.complete
    assert unchanged(dst, before) == ["fc1.weight", "fc1.bias"]


def test_min_confidence_skips_with_a_reason():
    src, dst = models()
    before = snapshot(dst)
    plan = make_plan(src, dst, confidence={"fc2.weight": 0.3, "fc2.bias": 0.3})
    report = apply_plan(plan, dst)
    assert report.skipped == (
        Skipped("fc2.weight", "enc.2.weight", "confidence 0.30 < min_confidence 0.50"),
        Skipped("fc2.bias", "enc.2.bias", "confidence 0.30 < min_confidence 0.50"),
    )
    assert report.missing == ("fc2.weight", "fc2.bias")
    assert report.unexpected == ("enc.2.weight", "enc.2.bias")
    assert "fc2.weight" not in report.loaded
    assert sorted(unchanged(dst, before)) == sorted(set(DST_KEYS) - {"fc2.weight", "fc2.bias"})


@pytest.mark.parametrize(
    ("confidence", "min_confidence", "loaded"),
    [(0.5, 0.5, True), (0.49, 0.5, False), (0.0, 0.0, True), (1.0, 1.0, True), (0.99, 1.0, False)],
)
def test_min_confidence_boundary(confidence, min_confidence, loaded):
    src, dst = models()
    plan = make_plan(src, dst, PAIRS[:1], {"fc1.weight": confidence})
    report = apply_plan(plan, dst, min_confidence=min_confidence)
    assert (report.loaded == ("fc1.weight",)) is loaded
    assert torch.equal(dst.fc1.weight, src.enc[0].weight) is loaded


def test_mismatches_are_skipped_with_their_reason():
    src, dst = models()
    mm = Mismatch(src=("enc.2.weight",), dst=("fc2.weight",), src_shapes=((2, 4),),
                  dst_shapes=((2, 4),), reason="its layer fc2 does not fit")
    pairs = [p for p in PAIRS if p[1] != "fc2.weight"]
    report = apply_plan(make_plan(src, dst, pairs, mismatches=(mm,)), dst)
    assert report.skipped == (Skipped("fc2.weight", "enc.2.weight", "its layer fc2 does not fit"),)
    assert report.missing == ("fc2.weight",)
    assert not torch.equal(dst.fc2.weight, src.enc[2].weight)


# --------------------------------------------------------------------------- strict


def test_strict_refuses_and_writes_nothing():
    src, dst = models()
    before = snapshot(dst)
    plan = make_plan(src, dst, confidence={"fc2.weight": 0.2})
    with pytest.raises(ApplyError) as info:
        apply_plan(plan, dst, strict=True)
    message = str(info.value)
    assert "strict: 1 destination tensors would stay unloaded" in message
    assert "fc2.weight (confidence 0.20 < min_confidence 0.50)" in message
    assert unchanged(dst, before) == []


def test_strict_names_keys_without_a_counterpart():
    src, dst = models()
    before = snapshot(dst)
    with pytest.raises(ApplyError, match=r"norm\.running_var \(no counterpart\)"):
        apply_plan(make_plan(src, dst, PAIRS[:7]), dst, strict=True)
    assert unchanged(dst, before) == []


def test_strict_lists_at_most_ten_keys():
    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(6))

    src, dst = Wide(), Wide()
    plan = make_plan(src, dst, [("layers.0.weight", "layers.0.weight")])
    with pytest.raises(ApplyError, match=r"11 destination tensors would stay unloaded.*and 1 more"):
        apply_plan(plan, dst, strict=True)


def test_strict_passes_when_everything_loads():
    src, dst = models()
    report = apply_plan(make_plan(src, dst), dst, strict=True)
    assert report.complete
    assert loaded_correctly(src, dst)


# --------------------------------------------------------------------------- plans that do not agree


def _rename_dst(plan: Plan, key: str) -> Plan:
    m = plan.matches[0]
    return Plan(matches=(Match(m.src, (key,), m.src_shapes, m.dst_shapes, m.confidence, m.costs,
                               m.src_unit, m.dst_unit), *plan.matches[1:]), source=plan.source)


def _rename_src(plan: Plan, key: str) -> Plan:
    m = plan.matches[0]
    return Plan(matches=(Match((key,), m.dst, m.src_shapes, m.dst_shapes, m.confidence, m.costs,
                               m.src_unit, m.dst_unit), *plan.matches[1:]), source=plan.source)


def _reshape(plan: Plan, src_shape, dst_shape) -> Plan:
    m = plan.matches[0]
    return Plan(matches=(Match(m.src, m.dst, (src_shape,), (dst_shape,), m.confidence, m.costs,
                               m.src_unit, m.dst_unit), *plan.matches[1:]), source=plan.source)


def _duplicate(plan: Plan, key: str) -> Plan:
    m = plan.matches[1]
    return Plan(matches=(*plan.matches, Match(m.src, (key,), m.src_shapes, m.dst_shapes,
                                              m.confidence, m.costs, m.src_unit, m.dst_unit)),
                source=plan.source)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: _rename_dst(p, "fc9.weight"), "destination has no tensor 'fc9.weight'"),
        (lambda p: _rename_src(p, "enc.9.weight"), "source has no tensor 'enc.9.weight'"),
        (lambda p: _reshape(p, (4, 3), (3, 4)),
         "destination tensor 'fc1.weight' has shape (4, 3), the plan says (3, 4)"),
        (lambda p: _reshape(p, (3, 4), (4, 3)),
         "source tensor 'enc.0.weight' has shape (4, 3), the plan says (3, 4)"),
        (lambda p: _duplicate(p, "fc2.bias"), "destination keys written twice: fc2.bias"),
    ],
    ids=["dst-key", "src-key", "dst-shape", "src-shape", "written-twice"],
)
def test_plan_that_does_not_agree_raises_and_writes_nothing(edit, message):
    src, dst = models()
    before = snapshot(dst)
    with pytest.raises(PlanError) as info:
        apply_plan(edit(make_plan(src, dst)), dst)
    assert message in str(info.value)
    assert "Re-run align" in str(info.value)
    assert unchanged(dst, before) == []


def test_plan_whose_shapes_changed_since_align():
    src, dst = models()
    plan = make_plan(src, dst)
    dst.fc2 = nn.Linear(4, 3)  # the destination was edited after aligning
    before = snapshot(dst)
    with pytest.raises(PlanError, match=re.escape("'fc2.weight' has shape (3, 4), the plan says (2, 4)")):
        apply_plan(plan, dst)
    assert unchanged(dst, before) == []


def test_single_match_copying_between_shapes_is_refused():
    src, dst = models()
    before = snapshot(dst)
    # claims enc.0.bias (4,) goes into fc2.bias (2,); both shapes agree with their models
    plan = make_plan(src, dst, [("enc.0.bias", "fc2.bias")])
    with pytest.raises(PlanError, match=r"match enc\.0\.bias -> fc2\.bias: .*\(2,\)"):
        apply_plan(plan, dst)
    assert unchanged(dst, before) == []


def test_plan_error_comes_before_strict():
    src, dst = models()
    plan = _rename_dst(make_plan(src, dst, PAIRS[:1]), "nope.weight")
    with pytest.raises(PlanError):
        apply_plan(plan, dst, strict=True)


# --------------------------------------------------------------------------- dtype, ties, sources


def test_dtype_follows_the_destination():
    src, dst = models()
    dst = dst.to(torch.float64)
    report = apply_plan(make_plan(src, dst), dst)
    assert report.complete
    assert dst.fc1.weight.dtype == torch.float64
    assert dst.norm.num_batches_tracked.dtype == torch.int64
    assert torch.equal(dst.fc1.weight, src.enc[0].weight.double())
    assert torch.equal(dst.norm.running_var, src.bn.running_var.double())


def test_half_destination_from_float_source():
    src, dst = models()
    dst = dst.half()
    apply_plan(make_plan(src, dst), dst)
    assert dst.fc2.bias.dtype == torch.float16
    assert torch.equal(dst.fc2.bias, src.enc[2].bias.half())


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("atomic", [False, True])
def test_values_beyond_float16_load_as_inf_and_are_reported(tmp_path, lazy, atomic, caplog):  # type: ignore[no-untyped-def]
    src, dst = models()
    dst = dst.half()
    with torch.no_grad():
        src.enc[2].bias[0] = 1e5  # float16 holds at most 65504
    given: object = src
    if lazy:
        given = tmp_path / "src.safetensors"
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(given))
    report = apply_plan(make_plan(src, dst), dst, given, atomic=atomic)
    assert report.nonfinite == ("fc2.bias",)
    assert torch.isinf(dst.fc2.bias[0]) and "float16" in caplog.text
    assert apply_plan(make_plan(src, dst), dst, given, check_finite=False).nonfinite == ()


@pytest.mark.parametrize("change", ["complex", "sparse"])
def test_a_source_tensor_that_cannot_be_written_is_refused_before_any_write(change):  # type: ignore[no-untyped-def]
    src, dst = models()
    state = dict(src.state_dict())
    last = "enc.2.weight"  # written last: a refusal after the first write would show
    state[last] = (state[last].to(torch.complex64) if change == "complex"
                   else state[last].to_sparse())
    before = snapshot(dst)
    with pytest.raises(ApplyError, match=f"refused before writing anything: .*'{last}'"):
        apply_plan(make_plan(src, dst), dst, state)
    assert unchanged(dst, before) == []


class TiedDst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


class UntiedSrc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)


def test_tied_destination_tensors_stay_tied():
    torch.manual_seed(0)
    src, dst = UntiedSrc(), TiedDst()
    report = apply_plan(make_plan(src, dst, [("embed.weight", "emb.weight")]), dst, strict=True)
    assert dst.head.weight is dst.emb.weight
    assert torch.equal(dst.head.weight, src.embed.weight)
    assert report.loaded == ("emb.weight",)
    assert report.missing == ()
    assert report.tied == (("head.weight", "emb.weight"),)


def test_plan_loaded_from_file_needs_the_source(tmp_path):
    src, dst = models()
    path = tmp_path / "plan.json"
    make_plan(src, dst).save(path)
    plan = Plan.from_json(path.read_text(encoding="utf-8"))
    assert plan.source is None
    before = snapshot(dst)
    with pytest.raises(PlanError, match="does not carry its source"):
        apply_plan(plan, dst)
    assert unchanged(dst, before) == []
    report = apply_plan(plan, dst, src)
    assert report.complete
    assert loaded_correctly(src, dst)


@pytest.mark.parametrize("kind", ["module", "state_dict", "safetensors", "pt"])
def test_explicit_source_kinds(tmp_path, kind):
    src, dst = models()
    if kind == "module":
        given = src
    elif kind == "state_dict":
        given = src.state_dict()
    elif kind == "safetensors":
        given = tmp_path / "w.safetensors"
        save_file(dict(src.state_dict()), str(given))
    else:
        given = tmp_path / "w.pt"
        torch.save(src.state_dict(), given)
    report = apply_plan(make_plan(src, dst, carry=False), dst, given)
    assert report.complete
    assert loaded_correctly(src, dst)


def test_explicit_source_wins_over_the_carried_one():
    src, dst = models(0)
    other, _ = models(1)
    apply_plan(make_plan(src, dst), dst, other)
    assert loaded_correctly(other, dst)
    assert not torch.equal(dst.fc1.weight, src.enc[0].weight)


def test_plan_apply_forwards_to_apply_plan():
    src, dst = models()
    plan = make_plan(src, dst, confidence={"fc1.bias": 0.6})
    report = plan.apply(dst, min_confidence=0.7)
    assert [s.dst for s in report.skipped] == ["fc1.bias"]
    with pytest.raises(ApplyError):
        plan.apply(dst, min_confidence=0.7, strict=True)


@pytest.mark.parametrize("bad_dst", [{"fc1.weight": torch.zeros(4, 3)}, "model.pt", None])
def test_destination_must_be_a_module(bad_dst):
    src, dst = models()
    with pytest.raises(SourceError, match=r"the destination must be an nn\.Module"):
        apply_plan(make_plan(src, dst), bad_dst)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_min_confidence_must_lie_in_unit_interval(value):
    src, dst = models()
    before = snapshot(dst)
    with pytest.raises(ValueError, match="min_confidence must lie in"):
        apply_plan(make_plan(src, dst), dst, min_confidence=value)
    assert unchanged(dst, before) == []


def test_unreadable_source_raises_source_error(tmp_path):
    src, dst = models()
    with pytest.raises(SourceError, match="does not exist"):
        apply_plan(make_plan(src, dst), dst, tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------- multi-tensor matches


def test_fused_match_concatenates_into_one_destination_tensor():
    src, _ = models()
    dst6 = nn.Linear(3, 6)  # its bias takes enc.0.bias (4,) and enc.2.bias (2,) end to end
    fused = Match(src=("enc.0.bias", "enc.2.bias"), dst=("bias",), src_shapes=((4,), (2,)),
                  dst_shapes=((6,),), confidence=1.0, costs=(), src_unit="enc", dst_unit="",
                  ops=(Op("concat", sizes=(4, 2)),))
    report = apply_plan(Plan(matches=(fused,), source=read_source(src)), dst6)
    assert report.loaded == ("bias",)
    assert report.adapted == (Adapted("bias", "enc.0.bias, enc.2.bias", "concat[4, 2]"),)
    assert torch.equal(dst6.bias, torch.cat([src.enc[0].bias, src.enc[2].bias]))
    assert report.unexpected == tuple(k for k in read_source(src).specs
                                      if k not in ("enc.0.bias", "enc.2.bias"))


def test_transposed_match():
    src, dst = models()
    t = Match(src=("enc.0.weight",), dst=("fc2.weight",), src_shapes=((4, 3),), dst_shapes=((2, 4),),
              confidence=1.0, costs=(), src_unit="enc.0", dst_unit="fc2", ops=(Op("transpose"),))
    before = snapshot(dst)
    with pytest.raises(PlanError, match=r"turns \[\(4, 3\)\] into \[\(3, 4\)\], not \[\(2, 4\)\]"):
        apply_plan(Plan(matches=(t,), source=read_source(src)), dst)
    assert unchanged(dst, before) == []
    dst34 = nn.Linear(4, 3)
    ok = Match(src=("enc.0.weight",), dst=("weight",), src_shapes=((4, 3),), dst_shapes=((3, 4),),
               confidence=1.0, costs=(), src_unit="enc.0", dst_unit="", ops=(Op("transpose"),))
    report = apply_plan(Plan(matches=(ok,), source=read_source(src)), dst34)
    assert report.adapted == (Adapted("weight", "enc.0.weight", "transpose"),)
    assert torch.equal(dst34.weight, src.enc[0].weight.T)


def test_multi_tensor_match_with_mismatched_shapes_writes_nothing():
    """Each tensor of a multi-tensor match is checked before anything is written."""
    src, dst = models()
    before = snapshot(dst)
    # both keys and shapes agree with the models, but enc.2.bias (2,) cannot go into fc1.bias (4,)
    bad = Match(src=("enc.0.weight", "enc.2.bias"), dst=("fc1.weight", "fc1.bias"),
                src_shapes=((4, 3), (2,)), dst_shapes=((4, 3), (4,)), confidence=1.0, costs=(),
                src_unit="enc", dst_unit="fc1")
    with pytest.raises(PlanError):
        apply_plan(Plan(matches=(bad,), source=read_source(src)), dst)
    assert unchanged(dst, before) == []


def test_match_with_unequal_key_counts_is_refused():
    src, dst = models()
    before = snapshot(dst)
    bad = Match(src=("enc.0.weight",), dst=("fc1.weight", "fc1.bias"), src_shapes=((4, 3),),
                dst_shapes=((4, 3), (4,)), confidence=1.0, costs=(), src_unit="enc.0",
                dst_unit="fc1")
    with pytest.raises(PlanError):
        apply_plan(Plan(matches=(bad,), source=read_source(src)), dst)
    assert unchanged(dst, before) == []


def test_a_partly_meta_destination_is_materialised_where_loaded():
    src, dst = models()
    dst.fc2 = nn.Linear(4, 2, device="meta")  # fc1 comes first in the plan and is real
    apply_plan(make_plan(src, dst), dst, strict=True)
    assert dst.fc2.weight.device.type == "cpu" and isinstance(dst.fc2.weight, nn.Parameter)
    assert torch.equal(dst.fc2.weight, src.enc[2].weight)
    assert torch.equal(dst.fc1.weight, src.enc[0].weight)


def test_a_failed_write_puts_meta_tensors_back():
    src, dst = models()
    dst.fc1 = nn.Linear(3, 4, device="meta")
    meta_weight = dst.fc1.weight
    plan = make_plan(src, dst)
    broken = Match(src=("enc.2.weight",), dst=("fc2.weight",), src_shapes=((2, 4),),
                   dst_shapes=((2, 4),), confidence=1.0, costs=(), src_unit="enc.2",
                   dst_unit="fc2", ops=(Op("reshape", shape=(2, 4), from_shape=(2, 4)),))
    plan = Plan(matches=(*plan.matches[:2], broken), source=plan.source)
    real = archalign.apply.apply_ops

    def failing(tensors, ops):  # type: ignore[no-untyped-def]
        if ops:
            raise RuntimeError("injected")
        return real(tensors, ops)

    archalign.apply.apply_ops = failing  # type: ignore[assignment]
    try:
        with pytest.raises(ApplyError, match="restored"):
            apply_plan(plan, dst)
    finally:
        archalign.apply.apply_ops = real  # type: ignore[assignment]
    assert dst.fc1.weight is meta_weight


# --------------------------------------------------------------------------- bugs


def test_writing_through_a_destination_alias_counts_as_loaded():
    torch.manual_seed(0)
    src, dst = UntiedSrc(), TiedDst()
    plan = make_plan(src, dst, [("embed.weight", "head.weight")])
    report = apply_plan(plan, dst)
    assert torch.equal(dst.emb.weight, src.embed.weight)  # it was written...
    assert report.missing == ()  # ...so nothing is missing
    apply_plan(plan, dst, strict=True)


def test_writing_a_tied_tensor_twice_is_refused():
    torch.manual_seed(0)
    src, dst = UntiedSrc(), TiedDst()
    plan = make_plan(src, dst, [("embed.weight", "emb.weight"), ("embed.weight", "head.weight")])
    with pytest.raises(PlanError, match="written twice"):
        apply_plan(plan, dst)


def test_match_with_more_keys_than_shapes_is_refused():
    src, dst = models()
    before = snapshot(dst)
    # two source keys, one declared shape: the plan file was edited by hand
    bad = Match(src=("enc.0.bias", "enc.2.bias"), dst=("fc1.bias",), src_shapes=((4,),),
                dst_shapes=((4,),), confidence=1.0, costs=(), src_unit="enc", dst_unit="fc1")
    with pytest.raises(PlanError):
        apply_plan(Plan(matches=(bad,), source=read_source(src)), dst)
    assert unchanged(dst, before) == []


# --------------------------------------------------------------------------- meta and lazy


def test_a_meta_destination_is_materialised_once_with_ties_kept() -> None:
    torch.manual_seed(0)
    src = UntiedSrc()
    with torch.device("meta"):
        dst = TiedDst()
    plan = archalign.align(src, dst)
    report = plan.apply(dst, strict=True)
    assert report.complete
    assert dst.emb.weight.device.type == "cpu" and dst.head.weight is dst.emb.weight
    assert not any(t.device.type == "meta" for t in dst.state_dict().values())
    assert torch.equal(dst.emb.weight, src.embed.weight)
    assert dst.emb.weight.data_ptr() != src.embed.weight.data_ptr()  # a copy, not the source's


def test_a_lazy_safetensors_source_applies_tensor_by_tensor(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src, dst = models()
    path = tmp_path / "src.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    plan = archalign.align(path, dst)
    assert plan.src_tracer == "sorted"
    plan.apply(dst, strict=True)
    assert plan.mapping() == {d: s for s, d in PAIRS}
    for src_key, dst_key in PAIRS:
        assert torch.equal(dst.state_dict()[dst_key], src.state_dict()[src_key])


# --------------------------------------------------------------------------- prepare, then commit


def _allocated_bytes(run) -> int:  # type: ignore[no-untyped-def]
    """Bytes the CPU allocator handed out while ``run()`` ran (torch's memory profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_an_in_memory_source_is_applied_without_copies_of_the_destination(monkeypatch):
    torch.manual_seed(0)
    src, dst = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256)), \
        nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    plan = archalign.align(src, dst)
    dst_bytes = sum(t.numel() * t.element_size() for t in dst.state_dict().values())
    clones = []
    real_clone = torch.Tensor.clone

    def counting_clone(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        clones.append(tuple(self.shape))
        return real_clone(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    allocated = _allocated_bytes(lambda: plan.apply(dst, strict=True))
    assert clones == []
    assert allocated < dst_bytes / 100, allocated  # a few scalars, not a second destination
    assert loaded_correctly(src, dst, [(k, k) for k in src.state_dict()])


def test_a_value_computed_from_the_destination_itself_is_taken_before_any_write():
    """Swapping two tensors of one model through a plan: every value is computed (and copied
    where it views the destination) before the first write, so neither reads a written one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    first, second = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    swap = [("0.weight", "1.weight"), ("1.weight", "0.weight")]
    apply_plan(make_plan(model, model, swap), model)
    assert torch.equal(model[0].weight, second) and torch.equal(model[1].weight, first)


def test_a_shape_the_value_does_not_have_is_refused_naming_both_shapes(monkeypatch):
    src, dst = models()
    before = snapshot(dst)
    real = archalign.apply.apply_ops

    def wrong(tensors, ops):  # type: ignore[no-untyped-def]
        out = real(tensors, ops)
        return [torch.zeros(7)] if out[0].shape == (2,) and tensors[0] is src.enc[2].bias else out

    monkeypatch.setattr(archalign.apply, "apply_ops", wrong)
    for atomic in (True, False):
        with pytest.raises(ApplyError, match=re.escape(
                "'fc2.bias': a value of shape (7,) for a destination tensor of shape (2,)")):
            apply_plan(make_plan(src, dst), dst, atomic=atomic)
    # atomic: nothing written; atomic=False: what came before fc2.bias was written, and named
    assert set(unchanged(dst, before)) == {"fc1.weight", "fc1.bias", "fc2.weight"}


def test_atomic_false_names_the_tensors_written_before_a_failure(monkeypatch):
    src, dst = models()
    real = archalign.apply.apply_ops
    calls = {"n": 0}

    def broken(tensors, ops):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return real(tensors, ops)

    monkeypatch.setattr(archalign.apply, "apply_ops", broken)
    with pytest.raises(ApplyError, match=r"computing 'fc2\.weight' from 'enc\.2\.weight' failed: "
                                         r"injected; the destination is partially written: 2 "
                                         r"tensors were overwritten \(fc1\.weight, fc1\.bias\)"):
        apply_plan(make_plan(src, dst), dst, atomic=False)
    calls["n"] = 0
    before = snapshot(dst)
    with pytest.raises(ApplyError, match=r"computing 'fc2\.weight' .* injected; the destination "
                                         r"is exactly as before"):
        apply_plan(make_plan(src, dst), dst)
    assert unchanged(dst, before) == []


# --------------------------------------------------------------------------- lazy sources, atomic


def _save(model: nn.Module, path) -> None:  # type: ignore[no-untyped-def]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _fail_at(monkeypatch, n: int) -> None:  # type: ignore[no-untyped-def]
    """Make the ``n``-th value apply computes one that cannot be written."""
    real = archalign.apply.apply_ops
    calls = {"n": 0}

    def broken(tensors, ops):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        out = real(tensors, ops)
        return [torch.zeros(99)] if calls["n"] == n else out

    monkeypatch.setattr(archalign.apply, "apply_ops", broken)


def test_a_lazy_source_applies_in_two_passes_reading_each_tensor_twice(tmp_path, monkeypatch):
    src, dst = models()
    path = tmp_path / "src.safetensors"
    _save(src, path)
    plan = make_plan(src, dst, carry=False)
    source = read_source(path)
    reads: list[str] = []
    real_get = type(source._tensors).__getitem__

    def counting(self, key):  # type: ignore[no-untyped-def]
        reads.append(key)
        return real_get(self, key)

    monkeypatch.setattr(type(source._tensors), "__getitem__", counting)
    assert apply_plan(plan, dst, path).complete
    assert reads == [*SRC_KEYS, *SRC_KEYS]  # a checking pass, then a writing pass
    assert loaded_correctly(src, dst)
    reads.clear()
    apply_plan(plan, dst, path, atomic=False)
    assert reads == list(SRC_KEYS)


def test_a_failure_in_the_writing_pass_of_a_lazy_source_says_what_was_written(tmp_path,
                                                                             monkeypatch):
    src, dst = models()
    path = tmp_path / "src.safetensors"
    _save(src, path)
    _fail_at(monkeypatch, len(PAIRS) + 3)  # the checking pass went through; the file "changed"
    with pytest.raises(ApplyError, match=r"partially written: 2 tensors were overwritten "
                                         r"\(fc1\.weight, fc1\.bias\)"):
        apply_plan(make_plan(src, dst, carry=False), dst, path)


def test_a_lazy_source_into_a_meta_destination_takes_one_pass_and_rolls_back(tmp_path,
                                                                            monkeypatch):
    src, _ = models()
    path = tmp_path / "src.safetensors"
    _save(src, path)
    with torch.device("meta"):
        dst = Dst()
    metas = dict(dst.state_dict(keep_vars=True))
    _fail_at(monkeypatch, 5)
    with pytest.raises(ApplyError, match="restored"):
        apply_plan(make_plan(src, dst, carry=False), dst, path)
    assert all(dst.state_dict(keep_vars=True)[k] is t for k, t in metas.items())
    monkeypatch.undo()
    apply_plan(make_plan(src, dst, carry=False), dst, path, strict=True)
    assert loaded_correctly(src, dst)


# --------------------------------------------------------------------------- NaN/Inf, scanned once


def test_an_unchanged_source_is_not_scanned_again_and_a_changed_one_is(monkeypatch, caplog):
    torch.manual_seed(0)
    src, dst = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), \
        nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    scanned: list[tuple[int, ...]] = []
    real = archalign.source.has_nonfinite

    def counting(tensor):  # type: ignore[no-untyped-def]
        scanned.append(tuple(tensor.shape))
        return real(tensor)

    monkeypatch.setattr(archalign.source, "has_nonfinite", counting)
    plan = archalign.align(src, dst, check_outputs=False)
    assert len(scanned) == 4 and plan.nonfinite == ()  # align scanned every source tensor once
    scanned.clear()
    assert plan.apply(dst).nonfinite == ()
    assert scanned == []  # unchanged since align: not scanned again
    with torch.no_grad():
        src[1].weight[0, 0] = float("nan")
    report = plan.apply(dst)
    assert scanned == [(2, 4)]  # only the tensor written since
    assert report.nonfinite == ("1.weight",)
    assert "NaN or Inf in the tensors loaded into: 1.weight" in caplog.text
    scanned.clear()
    assert plan.apply(dst).nonfinite == ("1.weight",) and scanned == []
    assert plan.apply(dst, check_finite=False).nonfinite == ()


def test_nonfinite_values_are_reported_per_destination_tensor(tmp_path):
    torch.manual_seed(0)
    src = {"q": torch.randn(2, 3), "k": torch.randn(2, 3), "qk": torch.randn(4, 3)}
    src["k"][1, 1] = float("inf")
    src["qk"][0, 0] = float("nan")  # in the first half only
    dst = nn.ParameterDict({"fused": nn.Parameter(torch.zeros(4, 3)),
                            "a": nn.Parameter(torch.zeros(2, 3)),
                            "b": nn.Parameter(torch.zeros(2, 3))})
    fused = Match(src=("q", "k"), dst=("fused",), src_shapes=((2, 3), (2, 3)),
                  dst_shapes=((4, 3),), confidence=1.0, costs=(), src_unit="q+k", dst_unit="fused",
                  ops=(Op("concat", sizes=(2, 2)),))
    split = Match(src=("qk",), dst=("a", "b"), src_shapes=((4, 3),), dst_shapes=((2, 3), (2, 3)),
                  confidence=1.0, costs=(), src_unit="qk", dst_unit="a+b",
                  ops=(Op("split", sizes=(2, 2)),))
    plan = Plan(matches=(fused, split))
    path = tmp_path / "src.safetensors"
    save_file(src, str(path))
    for given in (src, path):
        assert apply_plan(plan, dst, given).nonfinite == ("fused", "a")


# --------------------------------------------------------------------------- progress


@pytest.mark.parametrize(("kind", "atomic"), [("module", True), ("module", False),
                                              ("safetensors", True), ("safetensors", False),
                                              ("meta", True)])
def test_progress_counts_every_write_once(tmp_path, kind, atomic):
    src, dst = models()
    given: object = src
    if kind == "safetensors":
        given = tmp_path / "w.safetensors"
        save_file(dict(src.state_dict()), str(given))
    if kind == "meta":
        with torch.device("meta"):
            dst = Dst()
    seen: list[tuple[int, int]] = []
    apply_plan(make_plan(src, dst, carry=False), dst, given, atomic=atomic,
               progress=lambda done, total: seen.append((done, total)))
    assert seen == [(k, len(PAIRS)) for k in range(1, len(PAIRS) + 1)]
    assert loaded_correctly(src, dst)


def test_no_progress_for_a_refused_plan():
    src, dst = models()
    plan = make_plan(src, dst, pairs=[("enc.0.weight", "fc2.weight")])  # shapes disagree
    seen: list[tuple[int, int]] = []
    with pytest.raises(PlanError):
        apply_plan(plan, dst, progress=lambda done, total: seen.append((done, total)))
    assert seen == []
