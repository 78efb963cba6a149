"""Small re-implementations of original reference models, written as their authors wrote them.

Each module follows one original codebase: its class names, module names, parameter shapes,
registration order and math (rotary convention, attention grouping, routing), so that a model's
``state_dict`` is what the original saves and its outputs are what the original computes. What is
left out never reaches a state_dict: KV caches, tensor-parallel layers (fairscale's
Column/RowParallelLinear and ParallelEmbedding are nn.Linear / nn.Embedding at world size 1),
sampling, training helpers. Each module's docstring lists its deviations.
"""

from __future__ import annotations

from . import meta_llama, mistral_moe, nanogpt, qwen2_moe_v4

__all__ = ["meta_llama", "mistral_moe", "nanogpt", "qwen2_moe_v4"]
