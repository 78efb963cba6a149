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

EXACT = [p for p in corpus.PAIRS if p.exact]
PARTIAL = [p for p in corpus.PAIRS if not p.exact]


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
    names = [p.name for p in corpus.PAIRS]
    assert len(names) == len(set(names)) == 13
    for name in names:
        assert corpus.get_pair(name).name == name
    with pytest.raises(KeyError, match="known pairs"):
        corpus.get_pair("no-such-pair")


def test_exact_pairs_have_a_converter_and_partial_pairs_do_not() -> None:
    assert all(p.convert is not None for p in EXACT)
    assert all(p.convert is None for p in PARTIAL)
    assert all(p.note for p in corpus.PAIRS)


@pytest.mark.parametrize("pair", _params(PARTIAL))
def test_partial_pairs_cannot_be_verified(pair: Any) -> None:
    with pytest.raises(ValueError, match="partial"):
        corpus.verify_truth(pair)


# --------------------------------------------------------------------------- truth

@pytest.mark.parametrize("pair", _params(corpus.PAIRS))
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


@pytest.mark.parametrize("pair", _params(corpus.PAIRS))
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
