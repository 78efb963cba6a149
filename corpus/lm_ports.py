"""Real ports of language models: original reference codebases -> Hugging Face, and between HF models.

The sources are the re-implementations in `corpus.reference` (Meta's LLaMA, Mistral's Mixtral,
nanoGPT, transformers 4.x Qwen2-MoE) or Hugging Face models; destinations are transformers 5
models. Each truth is what the public conversion scripts do (``convert_llama_weights_to_hf.py``'s
``permute``, the ``mixtral`` / ``qwen2_moe`` entries of ``conversion_mapping.py``, nanoGPT's
``from_pretrained`` transposes), written here as rename rules plus a per-key tensor transform.
These pairs are a measuring stick: they are not in `corpus.PAIRS` (see `corpus.PORTS`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import language
from ._pair import (
    Pair,
    Rule,
    Truth,
    identity_truth,
    make_pair,
    map_keys,
    token_input,
    token_tensor,
)
from .reference import meta_llama, mistral_moe, nanogpt, qwen2_moe_v4

__all__ = ["LLAMA", "MOE", "PAIRS", "electra_truth", "meta_attention_rules", "meta_llama_transform",
           "meta_llama_truth", "nanogpt_truth", "permute_for_rope", "qwen2_moe_transform",
           "qwen2_moe_truth", "stack_experts", "transpose_conv1d"]

VOCAB = 128
LLAMA: dict[str, Any] = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
                         "norm_eps": 1e-5, "rope_theta": 10000.0, "max_seq_len": 64}
LLAMA_HIDDEN = 192  # Meta's FeedForward: 32 * ceil(int(2 * 4 * 64 / 3) / 32)
HEAD_DIM = 16
MOE: dict[str, Any] = {"experts": 4, "top_k": 2, "hidden": 128, "rope_theta": 1e6}
ATTENTION_STD = 0.2  # q.k / sqrt(head_dim) ~ 64 * std^2 at width 64: ~2.6, a non-uniform attention
# (GPT-2's and BERT's N(0, 0.02) init gives uniform attention: q/k rows could be in any order)


# --------------------------------------------------------------------------- shared transforms

def permute_for_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``convert_llama_weights_to_hf.py``'s ``permute``: per head, rows ``(0, 1, 2, 3, ...)`` in
    interleaved rotary pairs become ``(0, 2, 4, ..., 1, 3, 5, ...)`` for rotation on halves.

    ``weight.view(n_heads, head_dim // 2, 2, in).transpose(1, 2).reshape(out, in)``; ``n_heads`` is
    the query heads for ``wq`` and the key/value heads for ``wk``.
    """
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def stack_experts(tensors: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """transformers 5's ``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``.

    ``tensors`` are ``groups`` runs of one tensor per expert, in truth order (e.g. every expert's
    gate projection, then every expert's up projection); each run is stacked into ``[E, rows, in]``
    and the runs are concatenated along axis 1: ``gate_up_proj[e] = cat(gate_e, up_e)``.
    """
    per_group = len(tensors) // groups
    runs = [torch.stack(list(tensors[g * per_group:(g + 1) * per_group])) for g in range(groups)]
    return torch.cat(runs, dim=1)


# --------------------------------------------------------------------------- 1. Meta LLaMA -> HF

def _meta_llama() -> nn.Module:
    return meta_llama.Transformer(meta_llama.ModelArgs(**LLAMA, vocab_size=VOCAB))


def _hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        hidden_size=LLAMA["dim"], intermediate_size=LLAMA_HIDDEN, num_hidden_layers=LLAMA["n_layers"],
        num_attention_heads=LLAMA["n_heads"], num_key_value_heads=LLAMA["n_kv_heads"],
        head_dim=HEAD_DIM, vocab_size=VOCAB, max_position_embeddings=128,
        rms_norm_eps=LLAMA["norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": LLAMA["rope_theta"]},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, use_cache=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=None))


def meta_attention_rules(block: str) -> list[Rule]:
    """HF ``model.layers.<i>`` attention and norms <- Meta ``<block>`` (``layers.<i>``-like)."""
    layer = r"model\.layers\.(?P<i>\d+)\."
    return [
        (layer + r"self_attn\.(?P<p>[qkvo])_proj\.weight",
         lambda m: f"{block.format(m['i'])}attention.w{m['p']}.weight"),
        (layer + r"input_layernorm\.weight", lambda m: f"{block.format(m['i'])}attention_norm.weight"),
        (layer + r"post_attention_layernorm\.weight",
         lambda m: f"{block.format(m['i'])}ffn_norm.weight"),
        (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
        (r"model\.norm\.weight", "norm.weight"),
        (r"lm_head\.weight", "output.weight"),
    ]


def meta_llama_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """HF Llama <- Meta LLaMA: renames; gate/down/up_proj <- feed_forward.w1/w2/w3."""
    mlp = {"gate": "w1", "down": "w2", "up": "w3"}
    rules: list[Rule] = [
        (r"model\.layers\.(?P<i>\d+)\.mlp\.(?P<p>gate|down|up)_proj\.weight",
         lambda m: f"layers.{m['i']}.feed_forward.{mlp[m['p']]}.weight"),
        *meta_attention_rules("layers.{}."),
    ]
    return map_keys(dst_keys, rules)


def meta_llama_transform(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """q_proj / k_proj: the per-head rotary row permutation (4 query heads, 2 key/value heads)."""
    (tensor,) = tensors
    if key.endswith("self_attn.q_proj.weight"):
        return permute_for_rope(tensor, LLAMA["n_heads"])
    if key.endswith("self_attn.k_proj.weight"):
        return permute_for_rope(tensor, LLAMA["n_kv_heads"])
    return tensor


# --------------------------------------------------------------------------- 2. Mixtral -> HF

def _mistral_moe() -> nn.Module:
    return mistral_moe.Transformer(mistral_moe.TransformerArgs(
        dim=LLAMA["dim"], n_layers=LLAMA["n_layers"], head_dim=HEAD_DIM, hidden_dim=MOE["hidden"],
        n_heads=LLAMA["n_heads"], n_kv_heads=LLAMA["n_kv_heads"], norm_eps=1e-5, vocab_size=VOCAB,
        moe=mistral_moe.MoeArgs(MOE["experts"], MOE["top_k"]), rope_theta=MOE["rope_theta"]))


def _hf_mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        hidden_size=LLAMA["dim"], intermediate_size=MOE["hidden"], num_hidden_layers=LLAMA["n_layers"],
        num_attention_heads=LLAMA["n_heads"], num_key_value_heads=LLAMA["n_kv_heads"],
        head_dim=HEAD_DIM, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": MOE["rope_theta"]},
        num_local_experts=MOE["experts"], num_experts_per_tok=MOE["top_k"], sliding_window=None,
        router_jitter_noise=0.0, tie_word_embeddings=False, use_cache=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=None))


def _mixtral_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """gate_up_proj <- every expert's w1, then every expert's w3; down_proj <- every expert's w2."""
    experts = range(MOE["experts"])

    def each(m: re.Match[str], *names: str) -> tuple[str, ...]:
        return tuple(f"layers.{m['i']}.feed_forward.experts.{e}.{n}.weight"
                     for n in names for e in experts)

    layer = r"model\.layers\.(?P<i>\d+)\."
    rules: list[Rule] = [
        (layer + r"mlp\.experts\.gate_up_proj", lambda m: each(m, "w1", "w3")),
        (layer + r"mlp\.experts\.down_proj", lambda m: each(m, "w2")),
        (layer + r"mlp\.gate\.weight", lambda m: f"layers.{m['i']}.feed_forward.gate.weight"),
        *meta_attention_rules("layers.{}."),
    ]
    return map_keys(dst_keys, rules)


def _mixtral_transform(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if key.endswith("experts.gate_up_proj"):
        return stack_experts(tensors, groups=2)
    if key.endswith("experts.down_proj"):
        return stack_experts(tensors, groups=1)
    return meta_llama_transform(key, tensors)


# --------------------------------------------------------------------------- 3. nanoGPT -> HF GPT-2

NANOGPT_TIED = language.GPT_TIED  # lm_head.weight is transformer.wte.weight on both sides


def _nanogpt() -> nn.Module:
    """nanoGPT at its own init, but c_attn redrawn with `ATTENTION_STD`: at N(0, 0.02) attention is
    uniform and the query/key rows could be in any order without changing the output."""
    g = language.GPT
    model = nanogpt.GPT(nanogpt.GPTConfig(block_size=g["n_positions"], vocab_size=g["vocab_size"],
                                          n_layer=g["n_layer"], n_head=g["n_head"], n_embd=g["n_embd"],
                                          dropout=0.0, bias=True))
    for module in model.modules():
        if isinstance(module, nanogpt.CausalSelfAttention):
            nn.init.normal_(module.c_attn.weight, std=ATTENTION_STD)
    return model


def _hf_gpt2_exact_gelu() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = {**language.GPT_SHARED, "activation_function": "gelu"}  # nanoGPT: nn.GELU() (erf)
    return GPT2LMHeadModel(GPT2Config(**config, scale_attn_by_inverse_layer_idx=False,
                                      reorder_and_upcast_attn=False))


def nanogpt_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    return identity_truth(src_keys, dst_keys, skip=[alias for alias, _ in NANOGPT_TIED])


def transpose_conv1d(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """nn.Linear ``(out, in)`` <-> GPT-2 Conv1D ``(in, out)``: every attention / MLP weight."""
    (tensor,) = tensors
    if re.search(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$", key):
        return tensor.t()
    return tensor


# --------------------------------------------------------------------------- 4. GPT-2 -> OPT

OPT_OFFSET = 2  # OPTLearnedPositionalEmbedding reads row position + 2; rows 0 and 1 are never read
OPT_TIED = (("lm_head.weight", "model.decoder.embed_tokens.weight"),)


def _hf_gpt2_relu() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = {**language.GPT_SHARED, "activation_function": "relu"}  # OPT's MLP activation
    return GPT2LMHeadModel(GPT2Config(**config, scale_attn_by_inverse_layer_idx=False,
                                      reorder_and_upcast_attn=False,
                                      initializer_range=ATTENTION_STD))  # 0.02: uniform attention


def _hf_opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    g = language.GPT
    return OPTForCausalLM(OPTConfig(
        vocab_size=g["vocab_size"], hidden_size=g["n_embd"], num_hidden_layers=g["n_layer"],
        ffn_dim=4 * g["n_embd"], num_attention_heads=g["n_head"],
        max_position_embeddings=g["n_positions"], word_embed_proj_dim=g["n_embd"],
        do_layer_norm_before=True, activation_function="relu", enable_bias=True, dropout=0.0,
        attention_dropout=0.0, layerdrop=0.0, tie_word_embeddings=True, use_cache=False,
        pad_token_id=1, bos_token_id=0, eos_token_id=2))


def opt_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """q/k/v_proj each <- the whole c_attn (a third of its columns); the rest renamed."""
    layer = r"model\.decoder\.layers\.(?P<i>\d+)\."
    part = {"self_attn.out_proj": "attn.c_proj", "self_attn_layer_norm": "ln_1", "fc1": "mlp.c_fc",
            "fc2": "mlp.c_proj", "final_layer_norm": "ln_2"}
    rules: list[Rule] = [
        (layer + r"self_attn\.[qkv]_proj\.(?P<t>weight|bias)",
         lambda m: f"transformer.h.{m['i']}.attn.c_attn.{m['t']}"),
        (layer + r"(?P<p>self_attn\.out_proj|self_attn_layer_norm|fc1|fc2|final_layer_norm)\."
                 r"(?P<t>weight|bias)",
         lambda m: f"transformer.h.{m['i']}.{part[m['p']]}.{m['t']}"),
        (r"model\.decoder\.embed_tokens\.weight", "transformer.wte.weight"),
        (r"model\.decoder\.embed_positions\.weight", "transformer.wpe.weight"),
        (r"model\.decoder\.final_layer_norm\.(.+)", r"transformer.ln_f.\1"),
    ]
    return map_keys(dst_keys, rules, skip=[alias for alias, _ in OPT_TIED])


def opt_transform(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Conv1D weights transposed; c_attn split in three along its output axis (q, k, v);
    wpe gets `OPT_OFFSET` zero rows in front."""
    (tensor,) = tensors
    found = re.search(r"self_attn\.([qkv])_proj\.(weight|bias)$", key)
    if found:
        third = "qkv".index(found[1])
        return tensor.chunk(3, dim=-1)[third].t() if found[2] == "weight" else tensor.chunk(3)[third]
    if key.endswith("embed_positions.weight"):
        return torch.cat([tensor.new_zeros(OPT_OFFSET, tensor.shape[1]), tensor])
    if re.search(r"\.(out_proj|fc1|fc2)\.weight$", key):
        return tensor.t()
    return tensor


# --------------------------------------------------------------------------- 5. BERT -> ELECTRA

BERT: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "intermediate_size": 128,
                        "max_position_embeddings": 64, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                        "initializer_range": ATTENTION_STD}  # 0.02 makes attention uniform
ELECTRA_TIED = (("generator_lm_head.weight", "electra.embeddings.word_embeddings.weight"),)


def _hf_bert_mlm() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(**BERT))


def _hf_electra_mlm() -> nn.Module:
    from transformers import ElectraConfig, ElectraForMaskedLM

    # embedding_size == hidden_size: no embeddings_project, the generator head is BERT's transform
    return ElectraForMaskedLM(ElectraConfig(**BERT, embedding_size=BERT["hidden_size"]))


def electra_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    rules: list[Rule] = [
        (r"electra\.(.+)", r"bert.\1"),
        (r"generator_predictions\.(dense|LayerNorm)\.(.+)", r"cls.predictions.transform.\1.\2"),
        (r"generator_lm_head\.bias", "cls.predictions.bias"),
    ]
    return map_keys(dst_keys, rules, skip=[alias for alias, _ in ELECTRA_TIED])


# --------------------------------------------------------------------------- 6. Qwen2-MoE 4.x -> 5

QWEN: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2,
                        "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
                        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 96,
                        "num_experts_per_tok": 2, "num_experts": 4, "norm_topk_prob": False,
                        "intermediate_size": 128, "decoder_sparse_step": 1}


def _qwen2_moe_v4() -> nn.Module:
    return qwen2_moe_v4.Qwen2MoeForCausalLM(qwen2_moe_v4.Qwen2MoeConfig(**QWEN, rope_theta=10000.0))


def _hf_qwen2_moe() -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        **QWEN, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_sliding_window=False, mlp_only_layers=[], tie_word_embeddings=False, use_cache=False,
        router_aux_loss_coef=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=None))


def qwen2_moe_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    """Same names but the experts: gate_up_proj <- every expert's gate_proj then every up_proj."""
    experts = range(QWEN["num_experts"])

    def each(m: re.Match[str], *names: str) -> tuple[str, ...]:
        return tuple(f"model.layers.{m['i']}.mlp.experts.{e}.{n}_proj.weight"
                     for n in names for e in experts)

    layer = r"model\.layers\.(?P<i>\d+)\."
    rules: list[Rule] = [
        (layer + r"mlp\.experts\.gate_up_proj", lambda m: each(m, "gate", "up")),
        (layer + r"mlp\.experts\.down_proj", lambda m: each(m, "down")),
        (r"(.+)", r"\1"),
    ]
    return map_keys(dst_keys, rules)


def qwen2_moe_transform(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if key.endswith("experts.gate_up_proj"):
        return stack_experts(tensors, groups=2)
    if key.endswith("experts.down_proj"):
        return stack_experts(tensors, groups=1)
    (tensor,) = tensors
    return tensor


# --------------------------------------------------------------------------- the pairs

PAIRS: list[Pair] = [
    make_pair("meta_llama->hf_llama", _meta_llama, _hf_llama, token_tensor(VOCAB), meta_llama_truth,
          exact=True, transform=meta_llama_transform, note="""
          Meta's LLaMA 2 reference (dim 64, 2 layers, 4 heads, 2 KV heads, FFN 192, vocab 128)
          into transformers' LlamaForCausalLM. Every key is renamed (tok_embeddings, attention.wq,
          feed_forward.w1/w2/w3, attention_norm, ffn_norm, output). Meta rotates interleaved
          feature pairs (complex numbers), HF rotates halves: q_proj and k_proj are wq and wk with
          the rows of every head permuted (convert_llama_weights_to_hf.py's permute, with 4 query
          heads for wq and 2 key/value heads for wk); the shapes fit either way, so only the output
          tells. w1/w3 (gate/up) have equal shapes, and the block registers feed_forward before its
          two norms although it runs attention_norm first. forward is torch.inference_mode and
          takes tokens positionally."""),
    make_pair("mistral_moe->hf_mixtral", _mistral_moe, _hf_mixtral, token_tensor(VOCAB), _mixtral_truth,
          exact=True, transform=_mixtral_transform, note="""
          Mistral's Mixtral reference (moe_one_file_ref.py: 4 experts, top-2, dim 64, 2 layers,
          4 heads / 2 KV heads, rope_theta 1e6) into transformers 5's MixtralForCausalLM, which
          stores the experts as two 3-D parameters: mlp.experts.gate_up_proj [4, 256, 64] =
          stack over experts of cat(w1_e, w3_e) (one destination tensor from 8 source tensors) and
          mlp.experts.down_proj [4, 64, 128] = stack of w2_e; the router feed_forward.gate becomes
          mlp.gate. Rotary as in Meta's LLaMA: q/k rows permuted per head. The model registers
          tok_embeddings, norm and output before the layers (a ModuleDict), so registration order
          puts the final norm and the lm_head first. Routing differs in form (softmax of the top-k
          logits vs top-k of the softmax, renormalised) but not in value."""),
    make_pair("nanogpt->hf_gpt2", _nanogpt, _hf_gpt2_exact_gelu, token_tensor(VOCAB), nanogpt_truth,
          exact=True, transform=transpose_conv1d, tied_dst=NANOGPT_TIED, note="""
          Karpathy's nanoGPT (bias=True, exact GELU, 2 layers, width 64, 4 heads) into
          GPT2LMHeadModel with activation 'gelu'. Key names are equal, but nanoGPT's nn.Linear
          weights are the transposes of GPT-2's Conv1D ones: c_attn (192x64 vs 64x192), c_fc,
          mlp.c_proj and the square attn.c_proj (64x64, fits untransposed). lm_head.weight is
          transformer.wte.weight on both sides (nanoGPT ties it by assigning wte.weight =
          lm_head.weight). forward returns (logits, loss) and takes idx positionally."""),
    make_pair("hf_gpt2->hf_opt", _hf_gpt2_relu, _hf_opt, token_input(VOCAB), opt_truth, exact=True,
          transform=opt_transform, tied_dst=OPT_TIED, note="""
          GPT-2 (activation relu) into OPTForCausalLM (pre-LayerNorm, relu, width 64, 2 layers,
          4 heads, lm_head tied to embed_tokens). c_attn (Conv1D, [64, 192]) is split along its
          output axis into q_proj, k_proj, v_proj, each transposed: three destination tensors from
          one source tensor, all 64x64 like out_proj (so are their biases, 64 each). OPT registers
          k_proj, v_proj, q_proj in that order, and its decoder registers final_layer_norm before
          the layers. OPT's learned positions are read at position + 2: embed_positions [66, 64] is
          wpe [64, 64] with two rows in front that no input reaches (the converter writes zeros
          there), so the shapes differ by a pad and a plain copy cannot fit."""),
    make_pair("hf_bert_mlm->hf_electra_mlm", _hf_bert_mlm, _hf_electra_mlm, token_input(VOCAB),
          electra_truth, exact=True, tied_dst=ELECTRA_TIED, note="""
          BertForMaskedLM into ElectraForMaskedLM (the generator) with embedding_size ==
          hidden_size, where no embeddings_project exists and the port is exact: bert.* ->
          electra.*, cls.predictions.transform.dense/LayerNorm -> generator_predictions.dense/
          LayerNorm, cls.predictions.bias -> generator_lm_head.bias. BERT's decoder weight and bias
          are aliases (of the word embeddings and of cls.predictions.bias); ELECTRA ties
          generator_lm_head.weight to the word embeddings. ELECTRA registers the generator's
          LayerNorm before its dense layer, and both heads are 64x64 like every attention matrix.
          The generator's activation is gelu whatever hidden_act says, so BERT uses gelu."""),
    make_pair("qwen2_moe_v4->hf_qwen2_moe", _qwen2_moe_v4, _hf_qwen2_moe, token_tensor(VOCAB),
          qwen2_moe_truth, exact=True, transform=qwen2_moe_transform, note="""
          Qwen2-MoE as transformers 4.x saved it (every Hub checkpoint: one Qwen2MoeMLP per expert)
          into transformers 5's Qwen2MoeForCausalLM (4 experts of width 32, top-2, a shared expert of
          width 96 with its sigmoid gate). Names agree except for the experts: gate_up_proj
          [4, 64, 64] = stack of cat(gate_proj_e, up_proj_e) and down_proj [4, 64, 32] = stack of
          down_proj_e (conversion_mapping.py's MergeModulelist + Concatenate). gate_up_proj's last
          two axes are both 64, so a transposed layout fits too; the shared expert's three Linears
          sit next to the stacked ones with other widths."""),
]
