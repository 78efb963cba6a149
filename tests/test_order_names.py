"""Tests for archalign.order_names: names as the order fit's tie-breaks."""

from __future__ import annotations

import pytest

from archalign.order_names import (
    name_inversions,
    ordinal_inversions,
    ordinal_spread,
    role_inversions,
    role_of,
    role_spread,
)


@pytest.mark.parametrize("order, inversions", [
    (["q_proj", "k_proj", "v_proj", "o_proj"], 0),
    (["k_proj", "o_proj", "q_proj", "v_proj"], 3),  # k>q, o>q, o>v
    (["wq", "wk", "wv", "wo", "w1"], 0),
    (["query", "key", "value", "proj"], 0),  # proj: no step of its own
    (["up_proj", "gate_proj", "down_proj"], 1),
    (["layernorm_after", "attention", "layernorm_before"], 1),
    (["post_attention_layernorm", "input_layernorm"], 1),
    (["layers", "norm", "output", "tok_embeddings"], 1),  # Meta's names, sorted: head first
    (["attention", "output"], 0),  # BERT's attention output: no embedding among them
])
def testrole_inversions(order, inversions):
    assert role_inversions(order) == inversions


def test_name_inversions():
    names_at = {"norm1": 0, "attn": 1, "norm2": 2, "mlp": 3}
    assert name_inversions(["norm1", "attn", "norm2", "mlp"], names_at) == 0
    assert name_inversions(["attn", "norm1", "mlp", "other"], names_at) == 1


@pytest.mark.parametrize("order, inversions, spread", [
    (["conv1", "bn1", "conv2", "bn2"], 0, 0),
    (["conv2", "bn1", "conv1", "bn2"], 1, 2),
    (["w1", "w3", "w2"], 1, 0),
])
def test_ordinals(order, inversions, spread):
    assert ordinal_inversions(order) == inversions
    assert ordinal_spread(order) == spread


def test_role_of_is_the_first_step_a_name_claims():
    assert role_of("q_proj") == (0, 0) and role_of("output") == (0, 3)
    assert role_of("proj") is None


@pytest.mark.parametrize("name, role", [
    ("kv", (0, 1)), ("qkv", (0, 0)), ("wqkv", (0, 0)), ("kv_proj", (0, 1)), ("wkv", (0, 1)),
    ("vk", None), ("qq", None), ("w", None), ("in_proj", None),  # no fused projection's name
])
def test_a_fused_projection_runs_where_its_first_part_does(name, role):
    assert role_of(name) == role


def test_kv_after_q_and_attention_steps_back_to_back():
    # timm's attention-pool head, sorted as a safetensors file keeps it
    assert role_inversions(["kv", "latent", "q", "proj", "norm"]) == 1
    assert role_spread(["latent", "q", "kv", "proj", "norm", "mlp"]) == 0
    assert role_spread(["latent", "q", "proj", "norm", "kv", "mlp"]) == 2
    # norms before and after attention stand apart, as they run: no spread counted for them
    assert role_spread(["input_layernorm", "self_attn", "post_attention_layernorm"]) == 0
    assert role_spread(["gate_proj", "act", "up_proj", "down_proj"]) == 1
