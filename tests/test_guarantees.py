"""Cross-cutting guarantees: all or nothing, no code execution, determinism, untraceable models,
clear errors on bad input, and properties over random architectures (with inserted and deleted
layers) and random malformed files."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import archalign
from archalign import apply as apply_module
from archalign.errors import ApplyError, ArchalignError, PlanError, SourceError
from archalign.source import read_source
from tests.models import write_sharded


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def mlp(*widths: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(widths)])


# ---------------------------------------------------------------------- all or nothing

def test_a_failure_midway_leaves_the_destination_exactly_as_before(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    src, dst = mlp(4, 8, 8, 8, 2), mlp(4, 8, 8, 8, 2)
    plan = archalign.align(src, dst)
    before = snapshot(dst)
    real = apply_module.apply_ops
    calls = {"n": 0}

    def broken(tensors, ops):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        out = real(tensors, ops)
        return [torch.zeros(99)] if calls["n"] == 5 else out  # the 5th value cannot be written

    monkeypatch.setattr(apply_module, "apply_ops", broken)
    with pytest.raises(ApplyError, match="restored"):
        plan.apply(dst)
    assert_unchanged(dst, before)


def _fail_at_value(monkeypatch, n: int) -> None:  # type: ignore[no-untyped-def]
    """The ``n``-th value apply computes cannot be written (the shape is wrong)."""
    real = apply_module.apply_ops
    calls = {"n": 0}

    def broken(tensors, ops):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        out = real(tensors, ops)
        return [torch.zeros(99)] if calls["n"] == n else out

    monkeypatch.setattr(apply_module, "apply_ops", broken)


@pytest.mark.parametrize("layout", ["safetensors", "sharded"])
def test_a_failure_midway_from_a_lazy_file_leaves_the_destination_exactly_as_before(
        monkeypatch, tmp_path: Path, layout: str) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src, dst = mlp(4, 8, 8, 8, 2), mlp(4, 8, 8, 8, 2)
    if layout == "safetensors":
        path = tmp_path / "src.safetensors"
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        path = write_sharded(src, tmp_path, per_shard=3)
    plan = archalign.align(path, dst)
    assert plan.source is not None and plan.source.lazy
    before = snapshot(dst)
    _fail_at_value(monkeypatch, 5)
    with pytest.raises(ApplyError, match="restored"):
        plan.apply(dst, min_confidence=0.0)
    assert_unchanged(dst, before)
    monkeypatch.undo()
    assert plan.apply(dst, min_confidence=0.0, strict=True).complete
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


def _interrupt_copies(monkeypatch, at: set[int]) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Make the writes numbered ``at`` (1-based ``Tensor.copy_`` calls) raise SIGINT right after
    they copied; returns the running count of writes."""
    import signal

    real_copy = torch.Tensor.copy_
    writes = {"n": 0}

    def copy_then_interrupt(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_copy(self, *args, **kwargs)
        writes["n"] += 1
        if writes["n"] in at:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(torch.Tensor, "copy_", copy_then_interrupt)
    return writes


def test_ctrl_c_while_writing_is_held_until_every_tensor_is_written(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import signal

    torch.manual_seed(0)
    src, dst = mlp(4, 8, 8, 8, 2), mlp(4, 8, 8, 8, 2)
    plan = archalign.align(src, dst)
    handler = signal.getsignal(signal.SIGINT)
    writes = _interrupt_copies(monkeypatch, at={3})  # the third write of the committing phase
    with pytest.raises(KeyboardInterrupt):
        plan.apply(dst)
    monkeypatch.undo()
    assert writes["n"] == len(src.state_dict())  # every write ran, the interrupt came after
    assert signal.getsignal(signal.SIGINT) is handler
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


def test_a_second_ctrl_c_interrupts_the_writes_at_once(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    import signal

    torch.manual_seed(0)
    src, dst = mlp(4, 8, 8, 8, 2), mlp(4, 8, 8, 8, 2)
    plan = archalign.align(src, dst)
    handler = signal.getsignal(signal.SIGINT)
    writes = _interrupt_copies(monkeypatch, at={2, 3})
    with pytest.raises(KeyboardInterrupt):
        plan.apply(dst)
    monkeypatch.undo()
    assert writes["n"] == 3
    assert "partially written: 3 tensors were overwritten" in caplog.text
    assert signal.getsignal(signal.SIGINT) is handler


# ---------------------------------------------------------------------- no code execution

class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    with pytest.raises(SourceError, match="weights_only") as info:
        archalign.align(path, nn.Linear(2, 2))
    assert not marker.exists()
    assert "re-save" in str(info.value)


def test_truncated_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(nn.Linear(4, 4).state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(SourceError, match="cannot read"):
        read_source(path)


# ---------------------------------------------------------------------- determinism

def test_same_inputs_give_the_same_plan_bytes_across_processes(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys, torch, archalign
        from corpus import get_pair
        pair = get_pair(sys.argv[1])
        plan = archalign.align(pair.make_src(), pair.make_dst())
        sys.stdout.write(plan.to_json())
    """)
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script, "tv_vit->timm_vit"], env=env,
                              capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1])
        outputs.add(done.stdout)
    assert len(outputs) == 1 and json.loads(outputs.pop())["matches"]


# ---------------------------------------------------------------------- untraceable models

class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        if x.sum() > 0:  # fx cannot trace this
            x = x * 2
        return self.c(self.b(x))


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class CustomAutograd(DataDependent):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(_Square.apply(self.a(x))))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.mix = nn.Linear(4, 4), nn.Linear(3, 4), nn.Linear(4, 2)
        self.act = nn.ReLU()  # a module with no parameters

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.mix(self.act(self.left(x) + self.right(y)))


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = self.a(batch["x"])
        if h.abs().max() > 100:
            h = h / 100
        return {"out": self.b(h)}


UNTRACEABLE = [
    (DataDependent, torch.randn(2, 4), "hooks"),
    (CustomAutograd, torch.randn(2, 4), "fx"),  # fx records the Function as one call
    (TwoInputs, (torch.randn(2, 4), torch.randn(2, 3)), "fx"),
    (DictInput, ({"x": torch.randn(2, 4)},), "hooks"),
]


@pytest.mark.parametrize(("cls", "inputs", "tracer"), UNTRACEABLE)
def test_hard_models_align_to_themselves_through_the_fallbacks(cls, inputs, tracer) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    src, dst = cls(), cls()
    plan = archalign.align(src, dst, example_inputs=inputs)
    assert plan.src_tracer == tracer
    assert plan.mapping() == {k: k for k in src.state_dict()}
    plan.apply(dst, strict=True)


def test_without_inputs_an_untraceable_model_falls_back_to_registration_order() -> None:
    plan = archalign.align(DataDependent(), DataDependent(), check_outputs=False)
    assert plan.src_tracer == plan.dst_tracer == "registration"
    assert plan.mapping() == {k: k for k in DataDependent().state_dict()}


def test_without_inputs_an_untraceable_model_is_run_on_an_input_made_for_it() -> None:
    plan = archalign.align(DataDependent(), DataDependent())
    assert plan.src_tracer == plan.dst_tracer == "hooks"  # execution order, by running it
    assert "input made" in plan.verification
    assert plan.mapping() == {k: k for k in DataDependent().state_dict()}


# ---------------------------------------------------------------------- bad input

@pytest.mark.parametrize(("src", "message"), [
    (3, "pass an nn.Module, a state_dict"),
    ([torch.zeros(2)], "pass an nn.Module, a state_dict"),
    (nn.ReLU(), "has no parameters or buffers"),
    ({}, "is empty"),
    ({"w": [1.0, 2.0]}, "not tensors"),
    ({1: torch.zeros(2)}, "not strings"),
    ("/no/such/file.safetensors", "does not exist"),
])
def test_bad_sources_name_what_is_wrong(src: Any, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        archalign.align(src, nn.Linear(2, 2))


def test_meta_tensors_in_the_source_are_refused_before_writing() -> None:
    dst = nn.Linear(3, 3)
    before = snapshot(dst)
    src = nn.Linear(3, 3, device="meta")
    with pytest.raises(ApplyError, match="meta device"):
        archalign.align_and_load(src, dst)
    assert_unchanged(dst, before)


def test_nan_in_the_source_is_loaded_with_a_warning(caplog) -> None:  # type: ignore[no-untyped-def]
    src, dst = nn.Linear(3, 3), nn.Linear(3, 3)
    with torch.no_grad():
        src.weight[0, 0] = float("nan")
    report = archalign.align_and_load(src, dst)
    assert report.nonfinite == ("weight",)
    assert "NaN or Inf" in caplog.text and "WARNING: NaN/Inf loaded into: weight" in str(report)
    assert archalign.align(src, dst).apply(dst, check_finite=False).nonfinite == ()
    plan = archalign.align(src, dst)  # seen while reviewing, before anything is loaded
    assert plan.nonfinite == ("weight",)
    assert "holds NaN or Inf in 1 tensors" in caplog.text and "NaN/Inf in 1 source" in str(plan)
    half = nn.Linear(300, 300).half()  # a finite half tensor whose half-precision sum overflows
    with torch.no_grad():
        half.weight.fill_(60000.0)
    assert archalign.align_and_load(half, nn.Linear(300, 300).half()).nonfinite == ()


def test_integer_destination_refuses_floats_and_quantized_sources_are_refused() -> None:
    dst = nn.BatchNorm1d(3)
    src = {k: v.float() + 0.5 for k, v in dst.state_dict().items()}  # num_batches_tracked: 0.5
    before = snapshot(dst)
    with pytest.raises(ApplyError, match="truncated"):
        archalign.align_and_load(src, dst, min_confidence=0.0)
    assert_unchanged(dst, before)
    quantized = {"weight": torch.quantize_per_tensor(torch.randn(3, 3), 0.1, 0, torch.qint8)}
    with pytest.raises(ApplyError, match="quantized"):
        archalign.align_and_load(quantized, nn.Linear(3, 3, bias=False), min_confidence=0.0)


def test_destination_dtype_and_device_are_kept() -> None:
    src, dst = nn.Linear(3, 3), nn.Linear(3, 3).double()
    archalign.align_and_load(src, dst)
    assert dst.weight.dtype == torch.float64
    torch.testing.assert_close(dst.weight, src.weight.double())


def test_tied_weights_load_once_and_stay_tied() -> None:
    from corpus import get_pair

    pair = get_pair("hf_gpt2->hf_gpt_bigcode")
    src, dst = pair.make_src(), pair.make_dst()
    plan = archalign.align(src, dst)
    assert ("lm_head.weight", "transformer.wte.weight") in plan.tied_dst
    assert not any("lm_head.weight" in m.dst for m in plan.matches)
    report = plan.apply(dst, strict=True)
    assert report.complete
    assert dst.lm_head.weight is dst.transformer.wte.weight
    assert torch.equal(dst.lm_head.weight, src.transformer.wte.weight)


def test_a_plan_for_other_models_is_refused_naming_the_keys() -> None:
    torch.manual_seed(0)
    plan = archalign.align(mlp(4, 8, 2), mlp(4, 8, 2))
    other = mlp(4, 6, 2)
    before = snapshot(other)
    with pytest.raises(PlanError, match=r"'0.weight' has shape \(6, 4\), the plan says \(8, 4\)"):
        plan.apply(other, mlp(4, 8, 2))
    assert_unchanged(other, before)


# ---------------------------------------------------------------------- properties

@st.composite
def _edited(draw: st.DrawFn) -> tuple[list[int], list[int], str, int]:
    widths = draw(st.lists(st.sampled_from([4, 6, 8]), min_size=3, max_size=8))
    edit = draw(st.sampled_from(["delete", "insert"]))
    # deleting layer k keeps the network valid only where it maps a width onto itself; insert a
    # square layer anywhere
    if edit == "delete":
        square = [k for k in range(len(widths) - 1) if widths[k] == widths[k + 1]]
        if not square:
            edit = "insert"
        else:
            k = draw(st.sampled_from(square))
            return widths, widths[:k] + widths[k + 1:], edit, k
    k = draw(st.integers(1, len(widths) - 1))
    return widths, [*widths[:k], widths[k], *widths[k:]], edit, k


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_edited())
def test_with_a_layer_deleted_or_inserted_no_wrong_match_is_confident(
        case: tuple[list[int], list[int], str, int]) -> None:
    widths, new_widths, edit, k = case
    torch.manual_seed(0)
    src, dst = mlp(*widths), mlp(*new_widths)
    plan = archalign.align(src, dst)
    n_src = len(widths) - 1
    for match in plan.matches:
        s = int(match.src[0].split(".")[0])
        d = int(match.dst[0].split(".")[0])
        # the layers that survived: source layer s is destination layer s before the edit,
        # s - 1 (deleted) or s + 1 (inserted) after it
        shift = (-1 if s > k else None if s == k else 0) if edit == "delete" else (s >= k)
        truth = None if shift is None else s + int(shift)
        assert 0 <= s < n_src
        if d != truth:
            assert match.confidence < 0.9, (widths, new_widths, edit, k, match)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


def _plan_like(draw: st.DrawFn) -> Any:
    base = archalign.align(mlp(3, 4, 2), mlp(3, 4, 2)).to_dict()
    path = draw(st.lists(st.sampled_from(["matches", 0, "src", "dst_shapes", "costs", "ops",
                                          "hints", "pin", "confidence", "archalign_plan"]),
                         max_size=3))
    node: Any = base
    for step in path[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            break
    if path:
        with contextlib.suppress(KeyError, IndexError, TypeError):
            node[path[-1]] = draw(_json)
    return base


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_json, st.composite(_plan_like)()))
def test_fuzzed_plan_files_raise_only_plan_errors(data: Any) -> None:
    with contextlib.suppress(PlanError):
        archalign.Plan.from_json(json.dumps(data))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_fuzzed_plan_bytes_raise_only_plan_errors(blob: bytes) -> None:
    with contextlib.suppress(PlanError):
        archalign.Plan.from_json(blob.decode("latin-1"))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.one_of(st.text(max_size=6), st.integers()),
                       st.one_of(st.integers(), st.text(max_size=4),
                                 st.builds(torch.zeros, st.integers(0, 3))), max_size=5))
def test_fuzzed_state_dicts_raise_only_source_errors(state: dict[Any, Any]) -> None:
    with contextlib.suppress(ArchalignError):
        archalign.align(state, nn.Linear(3, 3), check_outputs=False)
