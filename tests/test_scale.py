"""corpus.scale: the full-size shapes and the MoE pair whose truth is a key rename."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from corpus.scale import (
    LLAMA_70B,
    LlamaShape,
    MoeShape,
    fill_distinct,
    make_llama_pair,
    make_moe,
    make_vision_pair,
    rename_mixtral_to_deepseek,
)

SMALL = MoeShape(layers=2, experts=3, hidden=16, intermediate=24, vocab=50)


def _trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Every tensor redrawn (norm scales away from one, no zero tensor), so a wrong load shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.3 + 0.1)
    return model.eval()


@pytest.mark.parametrize("style", ["a", "b"])
def test_moe_has_the_documented_tensor_count(style: str) -> None:
    with torch.device("meta"):
        model = make_moe(MoeShape(layers=3, experts=5), style)
    assert len(model.state_dict()) == 3 * (7 + 3 * 5) + 3


def test_moe_styles_share_only_the_head_name() -> None:
    a, b = make_moe(SMALL, "a"), make_moe(SMALL, "b")
    assert set(a.state_dict()) & set(b.state_dict()) == {"lm_head.weight"}
    assert any(".block_sparse_moe.experts.2.w3." in k for k in a.state_dict())
    assert any(".mlp.experts.2.up_proj." in k for k in b.state_dict())


def test_the_rename_is_a_bijection_onto_the_deepseek_keys_with_equal_shapes() -> None:
    a, b = make_moe(SMALL, "a").state_dict(), make_moe(SMALL, "b").state_dict()
    renamed = {rename_mixtral_to_deepseek(k): k for k in a}
    assert set(renamed) == set(b)
    assert all(a[renamed[k]].shape == b[k].shape for k in b)


def _output_after_renamed_load(rename: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    a = _trained_like(make_moe(SMALL, "a"), seed=1)
    b = _trained_like(make_moe(SMALL, "b"), seed=2)
    b.load_state_dict({rename[k]: v for k, v in a.state_dict().items()}, strict=True)
    inputs = a.dummy_inputs
    return a(**inputs), b(**inputs)


def test_the_rename_moves_the_function() -> None:
    out_a, out_b = _output_after_renamed_load({k: rename_mixtral_to_deepseek(k)
                                               for k in make_moe(SMALL, "a").state_dict()})
    assert out_a.abs().max() > 0.1
    assert torch.allclose(out_a, out_b, atol=1e-5)


def test_a_wrong_rename_changes_the_function() -> None:
    """Mixtral's w3 is the up projection and w1 the gate: swapping them must show in the output."""
    swap = {"w1": "w3", "w3": "w1"}
    wrong = {k: rename_mixtral_to_deepseek(re.sub(r"\.(w1|w3)\.", lambda m: f".{swap[m[1]]}.", k))
             for k in make_moe(SMALL, "a").state_dict()}
    out_a, out_b = _output_after_renamed_load(wrong)
    assert not torch.allclose(out_a, out_b, atol=1e-3)


def test_moe_is_not_fx_traceable_and_has_dummy_inputs() -> None:
    model = make_moe(SMALL, "b")
    assert set(model.dummy_inputs) == {"input_ids"}
    with pytest.raises(Exception):  # noqa: B017 - torch.fx raises TraceError on the length check
        torch.fx.symbolic_trace(model)


def test_llama_and_mistral_share_keys_and_shapes() -> None:
    shape = LlamaShape(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=100)
    src, dst = make_llama_pair(shape, "meta")
    assert type(src).__name__ == "LlamaForCausalLM"
    assert type(dst).__name__ == "MistralForCausalLM"
    assert not src.training and not dst.training
    assert {k: v.shape for k, v in src.state_dict().items()} == {
        k: v.shape for k, v in dst.state_dict().items()}
    assert src.config.num_key_value_heads == 2


def test_llama_70b_is_built_on_meta_with_its_grouped_query_attention() -> None:
    src, _ = make_llama_pair(LLAMA_70B, "meta")
    k_proj = src.state_dict()["model.layers.0.self_attn.k_proj.weight"]
    assert k_proj.device.type == "meta"
    assert tuple(k_proj.shape) == (8192 * 8 // 64, 8192)


def test_fill_distinct_gives_every_floating_tensor_its_position_plus_one() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    fill_distinct(model)
    for i, (key, tensor) in enumerate(model.state_dict().items()):
        if tensor.is_floating_point():
            assert bool((tensor == i + 1).all()), key
        else:
            assert key.endswith("num_batches_tracked") and int(tensor) == 0


def test_vision_pair_comes_from_torchvision_and_timm() -> None:
    src, dst = make_vision_pair(("resnet18", "resnet18"))
    assert type(src).__module__.startswith("torchvision")
    assert type(dst).__module__.startswith("timm")
    assert not src.training and not dst.training


@pytest.mark.parametrize("style", ["a", "b"])
def test_traceable_moe_takes_the_fx_path_with_the_same_tensors(style):
    from archalign.source import read_source
    from archalign.trace import trace_graph

    plain, traceable = make_moe(SMALL, style), make_moe(SMALL, style, traceable=True)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in traceable.state_dict().items()}
    assert trace_graph(read_source(traceable)).tracer == "fx"
    assert trace_graph(read_source(plain)).tracer == "hooks"  # the input-length check
    torch.manual_seed(0)
    ids = torch.randint(0, SMALL.vocab, (2, 5))
    traceable.load_state_dict(plain.state_dict())
    assert torch.equal(plain(ids), traceable(ids))
