"""The benchmark corpus: every exact pair's hand-written truth is proved by its converter.

Slow pairs (building the models and running them takes a few seconds on 2 CPU cores) are marked
``slow``; deselect them with ``-m "not slow"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

import pytest
import torch
from torch import nn

import corpus

TOLERANCE = 1e-4  # max abs output difference allowed for an exact port (float32)
SLOW = frozenset({
    "tv_resnet50->timm_resnet50",
    "tv_resnet34->tv_resnet18",
})

PORTS = corpus.VISION_PORTS
ALL = [*corpus.PAIRS, *PORTS]
EXACT = [p for p in ALL if p.exact]
PARTIAL = [p for p in ALL if not p.exact]


def _params(pairs: Iterable[Any]) -> list[Any]:
    return [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW else [])
            for p in pairs]


@cache
def _models(name: str) -> tuple[nn.Module, nn.Module]:
    """One (source, destination) build per pair, shared by the read-only tests."""
    pair = corpus.get_pair(name)
    return pair.make_src(), pair.make_dst()


# --------------------------------------------------------------------------- the corpus itself

def test_pairs_are_named_uniquely_and_found_by_name() -> None:
    assert len(corpus.PAIRS) == 13
    assert len(PORTS) == 9 and all(p.exact for p in PORTS)
    names = [p.name for p in ALL]
    assert len(names) == len(set(names))
    for name in names:
        assert corpus.get_pair(name).name == name
    with pytest.raises(KeyError, match="known pairs"):
        corpus.get_pair("no-such-pair")


def test_exact_pairs_have_a_converter_and_partial_pairs_do_not() -> None:
    assert all(p.convert is not None for p in EXACT)
    assert all(p.convert is None for p in PARTIAL)
    assert all(p.note for p in ALL)


@pytest.mark.parametrize("pair", _params(PARTIAL))
def test_partial_pairs_cannot_be_verified(pair: Any) -> None:
    with pytest.raises(ValueError, match="partial"):
        corpus.verify_truth(pair)


# --------------------------------------------------------------------------- truth

@pytest.mark.parametrize("pair", _params(ALL))
def test_truth_is_consistent(pair: Any) -> None:
    """Keys exist on their side, aliases are excluded, exact truths cover every destination key."""
    src, dst = _models(pair.name)
    assert corpus.validate_truth(pair, src, dst) == []


@pytest.mark.parametrize("pair", _params(EXACT))
def test_exact_truth_covers_every_destination_key_but_tied_aliases(pair: Any) -> None:
    src, dst = _models(pair.name)
    truth = pair.truth(src, dst)
    aliases = {alias for alias, _ in pair.tied_dst}
    assert set(truth) == set(dst.state_dict()) - aliases
    assert not aliases & set(truth)


@pytest.mark.parametrize("pair", _params(EXACT))
def test_exact_pairs_use_the_same_norm_epsilons(pair: Any) -> None:
    """eps 1e-5 vs 1e-6 moves outputs by less than the tolerance, so it is checked directly."""
    src, dst = _models(pair.name)
    assert corpus.norm_eps_profile(src) == corpus.norm_eps_profile(dst)


def test_seed_scenario_truths() -> None:
    rename = corpus.get_pair("mlp->mlp_renamed_plus_fc3")
    assert rename.truth(*_models(rename.name)) == {
        "first_layer.weight": ("fc1.weight",), "first_layer.bias": ("fc1.bias",),
        "fc2.weight": ("fc2.weight",), "fc2.bias": ("fc2.bias",)}
    deeper = corpus.get_pair("mlp3->mlp2")
    assert deeper.truth(*_models(deeper.name)) == {"fc2.weight": ("fc3.weight",),
                                                   "fc2.bias": ("fc3.bias",),
                                                   "fc1.weight": ("fc1.weight",),
                                                   "fc1.bias": ("fc1.bias",)}


def test_fused_and_tied_truths() -> None:
    phi3 = corpus.get_pair("hf_llama->hf_phi3")
    truth = phi3.truth(*_models(phi3.name))
    assert truth["model.layers.1.self_attn.qkv_proj.weight"] == tuple(
        f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv")
    assert truth["model.layers.0.mlp.gate_up_proj.weight"] == (
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight")
    gpt = corpus.get_pair("hf_gpt2->hf_gpt_bigcode")
    truth = gpt.truth(*_models(gpt.name))
    assert "lm_head.weight" not in truth
    assert truth["transformer.wte.weight"] == ("transformer.wte.weight",)


# --------------------------------------------------------------------------- verification

@pytest.mark.parametrize("pair", _params(EXACT))
def test_exact_pair_converts_to_the_same_function(pair: Any) -> None:
    assert corpus.verify_truth(pair) <= TOLERANCE


def _diff_with(pair: Any, edit: Any) -> float:
    """Max output difference after loading the converted weights edited by ``edit(state)``."""
    src, dst = pair.make_src(), pair.make_dst()
    state = pair.convert(src.state_dict(), dst)
    edit(state)
    dst.load_state_dict(state, strict=True)
    inputs = pair.make_inputs()
    return float((corpus.run_model(src, inputs) - corpus.run_model(dst, inputs)).abs().max())


@pytest.mark.parametrize("pair", _params(EXACT))
def test_a_wrong_mapping_is_caught(pair: Any) -> None:
    """Swapping two same-shape tensors breaks the port: the verification is not vacuous.

    Sources are decorrelated, so even norm weights and BatchNorm statistics differ between layers.
    """
    def swap_first_same_shape(state: dict[str, torch.Tensor]) -> None:
        seen: dict[tuple[int, ...], str] = {}
        for key, tensor in state.items():
            if not tensor.is_floating_point() or key in dict(pair.tied_dst):
                continue
            other = seen.setdefault(tuple(tensor.shape), key)
            if other != key:
                state[key], state[other] = state[other], tensor
                return
        first = next(k for k, t in state.items() if t.dim() == 2)  # no two shapes agree: flip rows
        state[first] = state[first].flip(0)

    assert _diff_with(pair, swap_first_same_shape) > 100 * TOLERANCE


@pytest.mark.parametrize("pair", _params(ALL))
def test_source_output_depends_on_the_input(pair: Any) -> None:
    """A saturated or collapsed source would make every verification vacuous."""
    src, _ = _models(pair.name)
    inputs = pair.make_inputs()
    first = corpus.run_model(src, inputs)
    if isinstance(inputs, dict):
        shifted = {**inputs, "input_ids": inputs["input_ids"].roll(1, dims=-1)}
    else:
        shifted = inputs.flip(0)
    second = corpus.run_model(src, shifted)
    assert float((first - second).abs().max()) > 1e-2 * float(first.abs().max())


def test_gpt_bigcode_needs_the_per_head_regrouping_and_the_transposes() -> None:
    """Both GPT-2 -> GPTBigCode traps fit the shapes and still change the function."""
    pair = corpus.get_pair("hf_gpt2->hf_gpt_bigcode")
    src = pair.make_src().state_dict()

    def undo_regrouping(state: dict[str, torch.Tensor]) -> None:
        for key in state:
            if key.endswith("attn.c_attn.weight"):
                state[key] = src[key].t().contiguous()
            elif key.endswith("attn.c_attn.bias"):
                state[key] = src[key].clone()

    def skip_square_transpose(state: dict[str, torch.Tensor]) -> None:
        for key in state:
            if key.endswith("attn.c_proj.weight"):  # 64 x 64: fits either way
                state[key] = src[key].clone()

    assert _diff_with(pair, undo_regrouping) > 100 * TOLERANCE
    assert _diff_with(pair, skip_square_transpose) > 100 * TOLERANCE


def test_models_are_seeded_and_sources_decorrelated() -> None:
    pair = corpus.get_pair("tv_vit->timm_vit")
    a, b = pair.make_src().state_dict(), pair.make_src().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(pair.make_inputs(), pair.make_inputs())
    for key, tensor in a.items():  # no constant tensors left (ones, zeros, class token)
        flat = tensor.reshape(-1)
        assert not bool((flat == flat[0]).all()) or flat.numel() == 1, key


# --------------------------------------------------------------------------- the vision ports

# A key projection's bias adds one constant to every score of a query: softmax ignores it, so no
# output depends on it (on either side); the rest of every port's truth is checked by the outputs.
SOFTMAX_INVARIANT = r"\.(k_proj|key)\.bias$"
UNUSED_AT_INFERENCE = {"dinov2_vit->hf_dinov2": {"embeddings.mask_token"}}  # used with masks only


@pytest.mark.parametrize("pair", _params(PORTS))
def test_port_outputs_depend_on_every_converted_tensor(pair: Any) -> None:
    """Rolling any one destination tensor by one element moves the output by > 10x the tolerance.

    A tensor the output ignores (a zero head behind it, a vanishing class token) would make its
    truth unchecked: any mapping of it would pass the output check.
    """
    import re

    src, dst = pair.make_src(), pair.make_dst()
    dst.load_state_dict(pair.convert(src.state_dict(), dst), strict=True)
    inputs = pair.make_inputs()
    reference = corpus.run_model(dst, inputs)
    unused = UNUSED_AT_INFERENCE.get(pair.name, set())
    weak = {}
    for key, tensor in dst.state_dict().items():
        if not tensor.is_floating_point() or tensor.numel() < 2:
            continue
        original = tensor.clone()
        with torch.no_grad():
            tensor.copy_(original.reshape(-1).roll(1).reshape(original.shape))
            diff = float((corpus.run_model(dst, inputs) - reference).abs().max())
            tensor.copy_(original)
        exempt = key in unused or re.search(SOFTMAX_INVARIANT, key) is not None
        if exempt != (diff <= 10 * TOLERANCE):
            weak[key] = diff
    assert weak == {}


@pytest.mark.parametrize("pair", _params(PORTS))
def test_port_sources_have_no_constant_or_vanishing_tensors(pair: Any) -> None:
    src, _ = _models(pair.name)
    for key, tensor in src.state_dict().items():
        if not tensor.is_floating_point() or tensor.numel() < 2:
            continue
        flat = tensor.reshape(-1)
        assert not bool((flat == flat[0]).all()), key
        assert float(flat.abs().max()) >= 1e-4, key


def _swap(state: dict[str, torch.Tensor], a: str, b: str) -> None:
    state[a], state[b] = state[b], state[a]


def _kv_before_q(state: dict[str, torch.Tensor]) -> None:
    """SigLIP's in_proj built as cat(kv, q) instead of cat(q, kv): same shape, rows [k; v; q]."""
    for key in ("head.attention.in_proj_weight", "head.attention.in_proj_bias"):
        q, kv = state[key].split([TINY_WIDTH, 2 * TINY_WIDTH])
        state[key] = torch.cat([kv, q])


TINY_WIDTH = 64
TRAPS = {  # a wrong conversion that fits every shape, per port
    "timm_vit->hf_vit": lambda s: _swap(s, "vit.layers.0.attention.q_proj.weight",
                                        "vit.layers.0.attention.k_proj.weight"),
    "timm_deit_distilled->hf_deit_with_teacher": lambda s: _swap(
        s, "deit.embeddings.cls_token", "deit.embeddings.distillation_token"),
    "timm_vit_siglip->hf_siglip_vision": _kv_before_q,
    "dinov2_vit->hf_dinov2": lambda s: _swap(s, "encoder.layer.1.layer_scale1.lambda1",
                                             "encoder.layer.1.layer_scale2.lambda1"),
    "openai_clip_vit->hf_clip_vision": lambda s: _swap(
        s, "vision_model.encoder.layers.0.self_attn.q_proj.bias",
        "vision_model.encoder.layers.0.self_attn.v_proj.bias"),
    "hf_swin->timm_swin": lambda s: _swap(s, "layers.0.blocks.0.attn.relative_position_bias_table",
                                          "layers.0.blocks.1.attn.relative_position_bias_table"),
}


@pytest.mark.parametrize("name", sorted(TRAPS))
def test_port_traps_fit_the_shapes_and_change_the_function(name: str) -> None:
    assert _diff_with(corpus.get_pair(name), TRAPS[name]) > 100 * TOLERANCE


def test_run_model_takes_the_most_downstream_output() -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

    hidden, pooled, logits = torch.ones(1, 3, 2), torch.full((1, 2), 2.0), torch.full((1, 4), 3.0)

    class Fixed(nn.Module):
        def __init__(self, out: Any) -> None:
            super().__init__()
            self.out = out

        def forward(self, x: torch.Tensor) -> Any:
            return self.out

    x = torch.zeros(1)
    with_pool = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
    assert corpus.run_model(Fixed(with_pool), x) is pooled
    assert corpus.run_model(Fixed(BaseModelOutputWithPooling(last_hidden_state=hidden)), x) is hidden
    assert corpus.run_model(Fixed(ImageClassifierOutput(logits=logits)), x) is logits
    assert corpus.run_model(Fixed((hidden, pooled)), x) is hidden
    with pytest.raises(TypeError, match="output tensor"):
        corpus.run_model(Fixed(("no tensor",)), x)
