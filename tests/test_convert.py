"""Converted checkpoints written straight to (sharded) safetensors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import archalign
from archalign.errors import PlanError, UsageError
from corpus import get_pair, run_model


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 20_000])
def test_converted_checkpoint_loads_and_reproduces_the_source(tmp_path: Path,
                                                              max_shard_bytes: int) -> None:
    pair = get_pair("hf_llama->hf_phi3")
    src = pair.make_src()
    plan = archalign.align(src, pair.make_dst())
    files = plan.convert_checkpoint(src, tmp_path, max_shard_bytes=max_shard_bytes)
    if max_shard_bytes > 1 << 29:
        assert [f.name for f in files] == ["model.safetensors"]
    else:
        assert files[-1].name == "model.safetensors.index.json" and len(files) > 3
    dst = pair.make_dst()
    # the folder is itself a source: read it back through archalign's own reader
    state = archalign.source.read_source(tmp_path)
    dst.load_state_dict({k: state.get(k) for k in state.specs}, strict=True)
    inputs = pair.make_inputs()
    assert float((run_model(src, inputs) - run_model(dst, inputs)).abs().max()) <= 1e-5


def test_convert_checks_the_source_and_the_shard_size(tmp_path: Path) -> None:
    pair = get_pair("mlp->mlp_identical")
    src = pair.make_src()
    plan = archalign.align(src, pair.make_dst())
    with pytest.raises(UsageError):
        plan.convert_checkpoint(src, tmp_path, max_shard_bytes=0)
    with pytest.raises(PlanError, match="has no tensor"):
        plan.convert_checkpoint({"x": torch.zeros(1)}, tmp_path)


def test_a_plan_whose_adaptation_does_not_fit_is_refused_before_any_file(tmp_path: Path) -> None:
    pair = get_pair("hf_llama->hf_phi3")
    src = pair.make_src()
    plan = archalign.align(src, pair.make_dst())
    fused = next(i for i, m in enumerate(plan.matches) if m.ops)
    bad = plan.matches[fused].ops[0]
    tampered = dataclasses.replace(plan.matches[fused], ops=(
        dataclasses.replace(bad, sizes=tuple(n + 1 for n in bad.sizes)),))
    plan = dataclasses.replace(plan, matches=(*plan.matches[:fused], tampered,
                                              *plan.matches[fused + 1:]))
    with pytest.raises(PlanError, match="concat"):
        plan.convert_checkpoint(src, tmp_path / "out", max_shard_bytes=20_000)
    assert not (tmp_path / "out").exists()
