"""Exports: a transformers key_mapping and a standalone converter, each loaded for real."""

from __future__ import annotations

import re

import pytest
import torch

import archalign
from archalign.errors import PlanError
from archalign.exports import _replay
from corpus import get_pair, run_model

transformers = pytest.importorskip("transformers")


def _renamed_llama_checkpoint() -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """A Llama checkpoint in an "original repository" naming, and the model it came from."""
    src = get_pair("hf_llama->hf_mistral").make_src()
    renamed = {
        re.sub(r"^model\.layers\.(\d+)\.", r"blk.\1.", k)
        .replace("self_attn.", "att_").replace("mlp.", "ff_").replace("model.", "base."): v
        for k, v in src.state_dict().items()}
    return renamed, src


def test_key_mapping_loads_through_from_pretrained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    pair = get_pair("hf_llama->hf_mistral")
    checkpoint, src = _renamed_llama_checkpoint()
    dst = pair.make_dst()
    plan = archalign.align(checkpoint, dst)
    mapping = plan.to_key_mapping()
    assert any(r"(\d+)" in pattern for pattern in mapping)  # layer indices folded
    assert len(mapping) < len(checkpoint)

    dst.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(tmp_path / "model.safetensors"))
    loaded = type(dst).from_pretrained(tmp_path, key_mapping=mapping).eval()
    expected = pair.make_dst()
    plan.apply(expected, strict=True)
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = pair.make_inputs()
    assert float((run_model(loaded, inputs) - run_model(src, inputs)).abs().max()) <= 1e-5


def test_key_mapping_refuses_adaptations() -> None:
    pair = get_pair("hf_gpt2->hf_gpt_bigcode")
    plan = archalign.align(pair.make_src(), pair.make_dst())
    with pytest.raises(PlanError, match="use to_python"):
        plan.to_key_mapping()


def test_replay_fires_every_matching_pattern_in_turn() -> None:
    assert _replay("a.1.x", {r"^a\.(\d+)\.x$": r"b.\1.x", r"^b\.1\.x$": "c"}) == "c"


def test_chained_renames_fall_back_to_literals_or_refuse() -> None:
    swap = archalign.Plan(matches=(
        archalign.Match(src=("a.0.w",), dst=("b.0.w",), src_shapes=((1,),), dst_shapes=((1,),),
                        confidence=1.0, costs=(), src_unit="a.0", dst_unit="b.0"),
        archalign.Match(src=("b.0.w",), dst=("a.0.w",), src_shapes=((1,),), dst_shapes=((1,),),
                        confidence=1.0, costs=(), src_unit="b.0", dst_unit="a.0")))
    with pytest.raises(PlanError, match="chain"):
        swap.to_key_mapping()


@pytest.mark.parametrize("name", ["hf_gpt2->hf_gpt_bigcode", "hf_llama->hf_phi3",
                                  "tv_convnext_tiny->timm_convnext_tiny"])
def test_standalone_converter_equals_plan_apply(name: str) -> None:
    pair = get_pair(name)
    src = pair.make_src()
    plan = archalign.align(src, pair.make_dst())
    code = plan.to_python()
    assert "archalign" not in code.split('"""', 2)[2]  # the code itself does not import it
    namespace: dict[str, object] = {}
    exec(compile(code, "<generated>", "exec"), namespace)
    converted = namespace["convert_state_dict"](src.state_dict())  # type: ignore[operator]
    by_export, by_plan = pair.make_dst(), pair.make_dst()
    by_export.load_state_dict(converted, strict=False)
    plan.apply(by_plan)
    for key, value in by_plan.state_dict().items():
        assert torch.equal(by_export.state_dict()[key], value), key
    assert code == plan.to_python()  # deterministic
