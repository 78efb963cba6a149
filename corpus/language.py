"""Hugging Face language-model pairs: renamed, transposed (Conv1D), fused and regrouped."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._pair import (
    Pair,
    Rule,
    Truth,
    concat_rows,
    identity_truth,
    make_pair,
    map_keys,
    token_input,
)

# --------------------------------------------------------------------------- 5./7. Llama family

LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "use_cache": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": None,
}


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE, attention_bias=False, mlp_bias=False))


def _mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**LLAMA_LIKE, sliding_window=None))


def _phi3() -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    config = {k: v for k, v in LLAMA_LIKE.items() if k != "head_dim"}  # Phi3: hidden / heads
    config["rope_parameters"] = {**LLAMA_LIKE["rope_parameters"], "partial_rotary_factor": 1.0}
    return Phi3ForCausalLM(Phi3Config(**config, original_max_position_embeddings=64,
                                      sliding_window=None, resid_pdrop=0.0, embd_pdrop=0.0))


def _phi3_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (row concatenation)."""
    layer = r"model\.layers\.(?P<i>\d+)\."
    rules: list[Rule] = [
        (layer + r"self_attn\.qkv_proj\.weight",
         lambda m: tuple(f"model.layers.{m['i']}.self_attn.{p}_proj.weight" for p in "qkv")),
        (layer + r"mlp\.gate_up_proj\.weight",
         lambda m: tuple(f"model.layers.{m['i']}.mlp.{p}_proj.weight" for p in ("gate", "up"))),
        (r"(.+)", r"\1"),
    ]
    return map_keys(dst_keys, rules)



# --------------------------------------------------------------------------- 6. GPT-2 -> GPTBigCode

GPT = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64}
GPT_SHARED: dict[str, Any] = {
    **GPT,
    "activation_function": "gelu_new",  # GPTBigCode defaults to gelu_pytorch_tanh
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "tie_word_embeddings": True,
    "use_cache": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
GPT_TIED = (("lm_head.weight", "transformer.wte.weight"),)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**GPT_SHARED, scale_attn_by_inverse_layer_idx=False,
                                      reorder_and_upcast_attn=False))


def _gpt_bigcode() -> nn.Module:
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM(GPTBigCodeConfig(**GPT_SHARED, multi_query=False))


def gpt_bigcode_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """Same names; ``lm_head.weight`` is an alias of ``transformer.wte.weight`` on both sides."""
    return identity_truth(src_keys, dst_keys, skip=[alias for alias, _ in GPT_TIED])


def gpt_bigcode_transform(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """GPT-2 Conv1D (in, out) -> nn.Linear (out, in); c_attn rows regrouped per head.

    GPT-2 splits c_attn's output as [q | k | v], each ``n_head * head_dim`` wide. GPTBigCode with
    ``multi_query=False`` views it as ``(n_head, 3 * head_dim)``: [q_h, k_h, v_h] per head.
    """
    (tensor,) = tensors
    heads = GPT["n_head"]
    head_dim = GPT["n_embd"] // heads
    if key.endswith("attn.c_attn.weight"):
        weight = tensor.t()  # (3 * embd, embd) as [q; k; v]
        return weight.reshape(3, heads, head_dim, -1).permute(1, 0, 2, 3).reshape(weight.shape)
    if key.endswith("attn.c_attn.bias"):
        return tensor.reshape(3, heads, head_dim).permute(1, 0, 2).reshape(-1)
    if re.search(r"\.(attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$", key):
        return tensor.t()
    return tensor



# --------------------------------------------------------------------------- the pairs

PAIRS: list[Pair] = [
    make_pair("hf_llama->hf_mistral", _llama, _mistral, token_input(LLAMA_LIKE["vocab_size"]),
          identity_truth, exact=True, note="""
          Tiny Llama and Mistral (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 128, untied
          lm_head) with identical key names; Mistral needs sliding_window=None (default 4096) and
          the same rope_theta / rms_norm_eps. Tests that a matcher keeps q/k/v/o and gate/up/down
          apart although k/v and gate/up have equal shapes."""),
    make_pair("hf_gpt2->hf_gpt_bigcode", _gpt2, _gpt_bigcode, token_input(GPT["vocab_size"]),
          gpt_bigcode_truth, exact=True, transform=gpt_bigcode_transform, tied_dst=GPT_TIED,
          note="""
          Same key names, but GPT-2's Conv1D stores weights (in, out): every attention and MLP
          weight is transposed (attn.c_proj is 64x64, so a missing transpose still fits the shape).
          GPTBigCode with multi_query=False reads c_attn's output per head as [q_h, k_h, v_h], so the
          fused c_attn rows (and bias) are also regrouped from [q | k | v] to per-head order - same
          keys, permuted contents. Both use activation gelu_new (GPTBigCode's default is
          gelu_pytorch_tanh), scale_attn_weights=True. lm_head.weight is tied to
          transformer.wte.weight in both: it is left out of the truth (see tied_dst)."""),
    make_pair("hf_llama->hf_phi3", _llama, _phi3, token_input(LLAMA_LIKE["vocab_size"]), _phi3_truth,
          exact=True, transform=concat_rows, note="""
          Phi-3 fuses attention and MLP inputs: qkv_proj = cat(q_proj, k_proj, v_proj) (rows
          64 + 32 + 32) and gate_up_proj = cat(gate_proj, up_proj); truth lists those source keys in
          concatenation order. Phi-3 needs partial_rotary_factor=1.0, rope_type default,
          rms_norm_eps=1e-6 (its default is 1e-5), sliding_window=None, pad_token_id=None."""),
]
