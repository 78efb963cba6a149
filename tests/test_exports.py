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


# --------------------------------------------------------------------------- the converter's other faces


def test_the_converter_runs_as_a_command(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from safetensors.torch import load_file

    pair = get_pair("tv_convnext_tiny->timm_convnext_tiny")  # layer scales are reshaped
    src = pair.make_src()
    plan = archalign.align(src, pair.make_dst())
    script = tmp_path / "convert.py"
    script.write_text(plan.to_python(), encoding="utf-8")
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": src.state_dict(), "optimizer": {"lr": 0.1}}, checkpoint)
    out = tmp_path / "converted.safetensors"
    done = subprocess.run([sys.executable, str(script), str(checkpoint), str(out), "--entry",
                           "model"], capture_output=True, text=True, check=False, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {out} ({len(plan.matches)} tensors)\n"
    missing = subprocess.run([sys.executable, str(script), str(checkpoint), str(tmp_path / "x.pt")],
                             capture_output=True, text=True, check=False, timeout=300, cwd=tmp_path)
    assert missing.returncode == 2 and missing.stdout == ""  # the whole file: no --entry
    assert missing.stderr.startswith(f"error: {checkpoint} holds no tensor")
    assert "a training checkpoint needs --entry" in missing.stderr
    by_command, by_plan = pair.make_dst(), pair.make_dst()
    by_command.load_state_dict(load_file(str(out)), strict=True)
    plan.apply(by_plan, strict=True)
    for key, value in by_plan.state_dict().items():
        assert torch.equal(by_command.state_dict()[key], value), key


def test_the_converter_is_a_timm_checkpoint_filter_fn(tmp_path) -> None:  # type: ignore[no-untyped-def]
    timm = pytest.importorskip("timm")
    pair = get_pair("tv_convnext_tiny->timm_convnext_tiny")
    src = pair.make_src()
    plan = archalign.align(src, pair.make_dst())
    namespace: dict[str, object] = {}
    exec(compile(plan.to_python(), "<generated>", "exec"), namespace)
    checkpoint = tmp_path / "torchvision.pth"
    torch.save(src.state_dict(), checkpoint)
    by_timm, by_plan = pair.make_dst(), pair.make_dst()
    timm.models.load_checkpoint(by_timm, str(checkpoint), strict=True,  # timm's own loader
                                filter_fn=namespace["checkpoint_filter_fn"])
    plan.apply(by_plan, strict=True)
    for key, value in by_plan.state_dict().items():
        assert torch.equal(by_timm.state_dict()[key], value), key


# --------------------------------------------------------------------------- transformers v5 rules


@pytest.fixture
def registry():  # type: ignore[no-untyped-def]
    """transformers' conversion-mapping registry, put back as it was after the test."""
    from transformers import conversion_mapping

    conversion_mapping.get_checkpoint_conversion_mapping("llama")  # builds the cache
    cache = dict(conversion_mapping._checkpoint_conversion_mapping_cache)
    users = set(conversion_mapping.USER_REGISTERED_MAPPINGS)
    yield conversion_mapping
    conversion_mapping._checkpoint_conversion_mapping_cache.clear()
    conversion_mapping._checkpoint_conversion_mapping_cache.update(cache)
    conversion_mapping.USER_REGISTERED_MAPPINGS.clear()
    conversion_mapping.USER_REGISTERED_MAPPINGS.update(users)


def load_with_rules(plan: archalign.Plan, dst: torch.nn.Module, checkpoint: dict[str, torch.Tensor],
                    folder) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    """Write the rules as a module, import it, register them and let from_pretrained load the
    source checkpoint (beside the destination's config) with them."""
    import importlib.util

    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    rules = folder / "rules.py"
    rules.write_text(plan.to_conversion_rules(destination=type(dst).__name__), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("generated_rules", rules)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.register()
    dst.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(folder / "model.safetensors"))
    return type(dst).from_pretrained(folder).eval()


def test_conversion_rules_load_fused_layers_through_from_pretrained(tmp_path, registry) -> None:  # type: ignore[no-untyped-def]
    pair = get_pair("hf_llama->hf_phi3")  # q, k, v -> qkv_proj; gate, up -> gate_up_proj
    src, dst = pair.make_src(), pair.make_dst()
    plan = archalign.align(src, dst)
    code = plan.to_conversion_rules(destination="Phi3ForCausalLM")
    assert code.count("WeightConverter(") == 2  # one rule per kind of layer, as upstream writes
    assert "source_patterns=['self_attn\\\\.q_proj\\\\.weight'" in code
    loaded = load_with_rules(plan, dst, dict(src.state_dict()), tmp_path)
    expected = pair.make_dst()
    plan.apply(expected, strict=True)
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = pair.make_inputs()
    assert float((run_model(loaded, inputs) - run_model(src, inputs)).abs().max()) <= 1e-5


def test_conversion_rules_rename_and_transpose(tmp_path, registry) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from archalign.ops import OpKind

    checkpoint, _ = _renamed_llama_checkpoint()  # renames, folded over the layer index
    pair = get_pair("hf_llama->hf_mistral")
    plan = archalign.align(checkpoint, pair.make_dst())
    assert "WeightRenaming('^blk\\\\.(\\\\d+)\\\\." in plan.to_conversion_rules()
    loaded = load_with_rules(plan, pair.make_dst(), checkpoint, tmp_path / "renamed")
    expected = pair.make_dst()
    plan.apply(expected, strict=True)
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    pair = get_pair("hf_gpt2->hf_gpt_bigcode")  # Conv1D -> Linear: transposes
    src = pair.make_src()
    plan = archalign.align(src, pair.make_dst())
    with pytest.raises(PlanError, match=r"regroup3x4: no transformers op.*use to_python"):
        plan.to_conversion_rules()
    plain = dataclasses.replace(plan, matches=tuple(
        m for m in plan.matches if all(op.kind is not OpKind.REGROUP for op in m.ops)))
    kept = {k for m in plain.matches for k in m.src}
    loaded = load_with_rules(plain, pair.make_dst(),
                             {k: v for k, v in src.state_dict().items() if k in kept},
                             tmp_path / "transposed")
    expected = pair.make_dst()
    plain.apply(expected)
    for key in (k for m in plain.matches for k in m.dst):
        assert torch.equal(loaded.state_dict()[key], expected.state_dict()[key]), key
