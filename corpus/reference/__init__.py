"""Small, faithful re-implementations of original reference codebases (the sources of real ports).

One module per codebase, written from its public source: module and parameter names, parameter
shapes and storage conventions, registration order and forward math are the original's, so that a
state_dict of these modules has the layout of the original release's checkpoints. Training-only
paths (stochastic depth, xFormers kernels, nested tensors, fp16 casts) are left out; everything
that runs in eval mode is kept.

* `clip`: OpenAI CLIP's vision tower (``clip/model.py``).
* `dinov2`: facebookresearch/dinov2's ``DinoVisionTransformer``.
* `convnext`: facebookresearch/ConvNeXt's ``ConvNeXt``.
"""

from __future__ import annotations

from . import clip, convnext, dinov2

__all__ = ["clip", "convnext", "dinov2"]
