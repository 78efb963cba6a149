"""Mistral's Mixtral reference (``mistralai/mistral-inference``, ``moe_one_file_ref.py``), re-implemented.

A sparse mixture of experts: ``feed_forward`` is a ``MoeLayer`` holding ``experts`` (a ModuleList of
SwiGLU ``FeedForward``, each with its own ``w1``/``w2``/``w3``) and a router ``gate`` (Linear, no
bias). Routing takes the top-k *logits* and softmaxes them (Hugging Face: softmax over all experts,
top-k, renormalise: the same weights). Rotary embeddings act on interleaved pairs (complex numbers),
as in Meta's LLaMA; keys and values are repeated with ``repeat_interleave``.

Registration order differs from execution order twice: the model registers ``tok_embeddings``,
``norm``, ``output`` and only then ``layers`` (a ModuleDict keyed "0", "1", ...), and a block
registers ``feed_forward`` before ``attention_norm`` and ``ffn_norm``.

Deviations, none touching a weight or the math: no KV cache, ``positions`` defaults to
``arange(seqlen)``, no pipeline parallelism (one rank holds every layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .meta_llama import RMSNorm, apply_rotary_emb, precompute_freqs_cis

__all__ = ["Attention", "FeedForward", "MoeArgs", "MoeLayer", "Transformer", "TransformerArgs",
           "TransformerBlock"]


@dataclass
class MoeArgs:
    num_experts: int = 8
    num_experts_per_tok: int = 2


@dataclass
class TransformerArgs:
    """The fields of a release's ``params.json``."""

    dim: int = 4096
    n_layers: int = 32
    head_dim: int = 128
    hidden_dim: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    norm_eps: float = 1e-5
    vocab_size: int = 32000
    moe: MoeArgs = field(default_factory=MoeArgs)
    rope_theta: float | None = None


def repeat_kv(keys: torch.Tensor, values: torch.Tensor,
              repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.repeat_interleave(keys, repeats=repeats, dim=2)
    values = torch.repeat_interleave(values, repeats=repeats, dim=2)
    return keys, values


class Attention(nn.Module):
    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.args = args
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.repeats = self.n_heads // self.n_kv_heads
        self.scale = args.head_dim ** -0.5
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bsz, seqlen, self.n_heads, self.args.head_dim)
        xk = xk.view(bsz, seqlen, self.n_kv_heads, self.args.head_dim)
        xv = xv.view(bsz, seqlen, self.n_kv_heads, self.args.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        key, value = repeat_kv(xk, xv, self.repeats)
        query, key, value = xq.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        scores = torch.matmul(query, key.transpose(2, 3)) * self.scale
        if mask is not None:
            scores += mask[None, None, ...]
        scores = nn.functional.softmax(scores.float(), dim=-1).type_as(query)
        output = torch.matmul(scores, value)
        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(output)


class FeedForward(nn.Module):
    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class MoeLayer(nn.Module):
    def __init__(self, experts: list[nn.Module], gate: nn.Module, moe_args: MoeArgs) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.args = moe_args

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs_squashed = inputs.view(-1, inputs.shape[-1])
        gate_logits = self.gate(inputs_squashed)
        weights, selected_experts = torch.topk(gate_logits, self.args.num_experts_per_tok)
        weights = nn.functional.softmax(weights, dim=1, dtype=torch.float).type_as(inputs)
        results = torch.zeros_like(inputs_squashed)
        for i, expert in enumerate(self.experts):
            batch_idx, nth_expert = torch.where(selected_experts == i)
            results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(
                inputs_squashed[batch_idx])
        return results.view_as(inputs)


class TransformerBlock(nn.Module):
    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.dim = args.dim
        self.attention = Attention(args)
        self.feed_forward = MoeLayer(
            experts=[FeedForward(args=args) for _ in range(args.moe.num_experts)],
            gate=nn.Linear(args.dim, args.moe.num_experts, bias=False),
            moe_args=args.moe,
        )
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.args = args

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args=args)
                                     for i in range(args.n_layers)})
        theta = args.rope_theta or 1000000.0
        self.freqs_cis = precompute_freqs_cis(args.head_dim, 4096, theta)  # not a buffer

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        _bsz, seqlen = input_ids.shape
        if positions is None:
            positions = torch.arange(seqlen, device=input_ids.device)
        freqs_cis = self.freqs_cis.to(input_ids.device)[positions]
        h = self.tok_embeddings(input_ids)
        mask: torch.Tensor | None = None
        if seqlen > 1:
            tensor = torch.full((seqlen, seqlen), dtype=h.dtype, fill_value=1, device=h.device)
            mask = torch.log(torch.tril(tensor, diagonal=0)).to(h.dtype)
        for layer in self.layers.values():
            h = layer(h, freqs_cis, mask)
        return self.output(self.norm(h)).float()
