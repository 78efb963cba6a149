"""Small re-implementations of original reference models, written as their authors wrote them.

Each module follows one original codebase: its class names, module names, parameter shapes,
registration order and math (rotary convention, attention grouping, routing), so that a model's
``state_dict`` is what the original saves and its outputs are what the original computes. What is
left out never reaches a state_dict: KV caches, tensor-parallel layers (fairscale's
Column/RowParallelLinear and ParallelEmbedding are nn.Linear / nn.Embedding at world size 1),
sampling, training helpers (and, for the vision towers, stochastic depth, xFormers kernels, nested
tensors, fp16 casts). Each module's docstring lists its deviations.

* `meta_llama`: Meta's LLaMA 2 ``model.py``; `mistral_moe`: mistral-inference's MoE reference;
  `nanogpt`: nanoGPT's ``model.py``; `qwen2_moe_v4`: transformers 4.x Qwen2-MoE.
* `clip`: OpenAI CLIP's vision tower (``clip/model.py``); `dinov2`: facebookresearch/dinov2's
  ``DinoVisionTransformer``; `convnext`: facebookresearch/ConvNeXt's ``ConvNeXt``.
"""

from __future__ import annotations

from . import clip, convnext, dinov2, meta_llama, mistral_moe, nanogpt, qwen2_moe_v4

__all__ = ["clip", "convnext", "dinov2", "meta_llama", "mistral_moe", "nanogpt", "qwen2_moe_v4"]
