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
- `FFN_META` (``prior_ffn_meta``): Meta's feed-forward names ``w1`` (gate), ``w3`` (up), ``w2``
  (down). Where experts held flattened (``block_sparse_moe.w1`` / ``w2`` / ``w3``, all
  ``[E*I, H]``) fill stacked ones and the shapes leave open which tensor is which
  (`archalign.stacked.UNDECIDED_GROUPING`), the concatenated destination takes ``w1`` then
  ``w3``, the transposed one ``w2``, as ``convert_mixtral_weights_to_hf.py`` does.

Planning only: the rules read keys, shapes and the destination's config, never tensors.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from torch import nn

from .confidence import ORDER_ONLY_GROUP, confidence, prior_confidence
from .ops import Op, OpKind
from .plan import Match, Plan
from .stacked import UNDECIDED_GROUPING

__all__ = ["FFN_META", "ROTARY_META", "apply_conventions"]

logger = logging.getLogger(__name__)

ROTARY_META = "prior_rotary_meta"
FFN_META = "prior_ffn_meta"
_FFN = ("w1", "w3", "w2")  # Meta's gate, up and down projections, in the order the prior wants
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
    plan = _meta_ffn(plan)
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


def _meta_ffn(plan: Plan) -> Plan:
    """The plan with `FFN_META` deciding flattened experts' undecided groupings (see the module):
    per destination unit, a concat of two such tensors and a transpose of one, from Meta's
    ``w1``, ``w2``, ``w3`` of one parent, become ``w1`` + ``w3`` and ``w2``."""
    by_unit: dict[str, list[int]] = {}
    for i, m in enumerate(plan.matches):
        if UNDECIDED_GROUPING in m.cost_terms:
            by_unit.setdefault(m.dst_unit, []).append(i)
    matches = list(plan.matches)
    for indices in by_unit.values():
        decided = _ffn_grouping([plan.matches[i] for i in indices])
        if decided is not None:
            for i, m in zip(indices, decided):
                matches[i] = m
    if matches == list(plan.matches):
        return plan
    logger.info("flattened experts follow Meta's feed-forward names (%s): w1 and w3 concatenated, "
                "w2 transposed", FFN_META)
    return dataclasses.replace(plan, matches=tuple(matches))


def _ffn_grouping(group: list[Match]) -> list[Match] | None:
    """``group`` regrouped by `FFN_META`, or None when it is not Meta's three tensors."""
    if len(group) != 2:
        return None
    keys = [k for m in group for k in m.src]
    parents = {k.rpartition(".")[0] for k in keys}
    names = sorted(k.rpartition(".")[2] for k in keys)
    if len(parents) != 1 or names != sorted(_FFN) or len({s for m in group
                                                           for s in m.src_shapes}) != 1:
        return None
    (parent,) = parents
    out = []
    for m in group:
        kinds = [op.kind for op in m.ops]
        if OpKind.CONCAT in kinds and len(m.src) == 2:
            src: tuple[str, ...] = tuple(f"{parent}.{n}" for n in _FFN[:2])
        elif OpKind.TRANSPOSE in kinds and len(m.src) == 1:
            src = (f"{parent}.{_FFN[2]}",)
        else:
            return None
        terms = m.cost_terms
        structural = sum(v for k, v in terms.items() if k not in ("regret", UNDECIDED_GROUPING))
        conf = prior_confidence(confidence(structural, terms.get("regret", 0.0)) * ORDER_ONLY_GROUP)
        costs = tuple((k, v) for k, v in m.costs if k != UNDECIDED_GROUPING)
        out.append(dataclasses.replace(m, src=src, confidence=round(conf, 6),
                                       costs=(*costs, (FFN_META, 0.0))))
    return out
