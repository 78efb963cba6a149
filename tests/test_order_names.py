"""Tests for archalign.order_names: names as the order fit's tie-breaks."""

from __future__ import annotations

import pytest

from archalign.order_names import (
    name_inversions,
    ordinal_inversions,
    ordinal_spread,
    role_inversions,
    role_of,
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
