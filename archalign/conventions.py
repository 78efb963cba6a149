"""Named conventions of released checkpoints, for a source that is only a checkpoint.

With the source module at hand, archalign runs both models and finds row layouts by their outputs
(`archalign.repair`). A checkpoint cannot run, so where its key names follow a format whose
layout is known, the format says it, as a *prior*: an explicit, named rule whose matches carry a
cost term ``prior_<name>`` (the review flags them, `archalign.review.Flag.PRIOR`) and whose
confidence is held below certainty (`archalign.confidence.prior_confidence`).

- `ROTARY_META` (``prior_rotary_meta``): Meta's reference Llama code (``attention.wq`` /
  ``attention.wk``, also Mistral's and Mixtral's releases) rotates interleaved pairs of a query or
  key projection's rows; Hugging Face's rotary models rotate the two halves of each head. A
  plain copy from ``wq`` into ``q_proj`` (``wk`` into ``k_proj``) gets the ``rope`` op with the
  destination's head count (key/value heads for ``wk``), as ``convert_llama_weights_to_hf.py``'s
  ``permute`` does.

Planning only: the rules read keys, shapes and the destination's config, never tensors.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from torch import nn

from .confidence import prior_confidence
from .ops import Op, OpKind
from .plan import Match, Plan

__all__ = ["ROTARY_META", "apply_conventions"]

logger = logging.getLogger(__name__)

ROTARY_META = "prior_rotary_meta"
_META = {"wq": "q_proj", "wk": "k_proj"}  # Meta's projection -> Hugging Face's, rotated ones
_LAST = re.compile(r"(?:^|\.)([A-Za-z_]+)\.weight$")
_ROTARY_CONFIG = ("rope_theta", "rope_scaling", "rope_parameters", "rotary_emb_base")


def apply_conventions(plan: Plan, dst: nn.Module) -> Plan:
    """The plan with the checkpoint conventions its keys follow applied (see the module).

    Parameters
    ----------
    plan : Plan
        A plan whose source is a checkpoint (no module).
    dst : nn.Module
        The destination; its ``config`` says whether it is rotary and how many heads it has.

    Returns
    -------
    Plan
        The same plan when no convention applies.
    """
    heads = _rotary_heads(dst)
    if heads is None:
        return plan
    changed = 0
    matches = []
    for m in plan.matches:
        rotated = _rotated(m, heads)
        changed += rotated is not m
        matches.append(rotated)
    if not changed:
        return plan
    logger.info("%d query/key projections follow Meta's rotary layout (%s): rows regrouped from "
                "interleaved pairs to halves, heads %s", changed, ROTARY_META, heads)
    return dataclasses.replace(plan, matches=tuple(matches))


def _rotary_heads(dst: nn.Module) -> tuple[int, int] | None:
    """(attention heads, key/value heads) of a rotary destination; None when it is not one."""
    config = getattr(dst, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or not any(getattr(config, a, None) is not None
                                             for a in _ROTARY_CONFIG):
        return None
    kv = getattr(config, "num_key_value_heads", None)
    return heads, kv if isinstance(kv, int) and kv >= 1 else heads


def _rotated(m: Match, heads: tuple[int, int]) -> Match:
    """``m`` with the rotary op when it copies Meta's wq / wk into q_proj / k_proj."""
    if m.ops or len(m.src) != 1 or len(m.dst) != 1 or m.src_shapes != m.dst_shapes:
        return m
    src, dst = _LAST.search(m.src[0]), _LAST.search(m.dst[0])
    if src is None or dst is None or _META.get(src.group(1)) != dst.group(1):
        return m
    count = heads[0] if src.group(1) == "wq" else heads[1]
    rows = m.dst_shapes[0][0] if m.dst_shapes[0] else 0
    if len(m.dst_shapes[0]) != 2 or rows % (2 * count):
        return m
    return dataclasses.replace(
        m, ops=(Op(OpKind.ROPE, groups=(count,)),),
        confidence=round(prior_confidence(m.confidence), 6),
        costs=(*m.costs, (ROTARY_META, 0.0)))
