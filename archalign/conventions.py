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
- `FUSED_BLOCKS` (``prior_fused_blocks``): a fused projection of the formats that name it
  ``c_attn`` (GPT-2, whose ``Conv1D`` stores it ``(in, out)``; nanoGPT), ``qkv`` (timm),
  ``in_proj`` (``nn.MultiheadAttention``), ``qkv_proj`` (Phi-3), ``wqkv`` / ``Wqkv`` (InternLM,
  MPT), ``to_qkv`` or ``gate_up_proj`` stores its parts as blocks, one after the other
  (``q | k | v``), as does a projection archalign concatenates from separate source tensors. When
  the destination's code reads the layer per head instead (GPTBigCode's ``c_attn``: ``q_h, k_h,
  v_h`` for each head; found by running the destination, `archalign.row_parts`), the rows are
  regrouped (``regroup``); a row order no regroup gives stays below the threshold.
  `FUSED_UNDECIDED` (``prior_fused_undecided``): a source of another name, copied into a layer
  the destination reads per head, shows no layout; its matches stay below the default
  threshold (`archalign.confidence.UNDECIDED_LAYOUT_CAP`). A source layer of the destination's
  own name and storage is taken to be the destination's own format.
- `POSITION_OFFSET` (``prior_position_offset``): a learned position table of ``n`` rows, as
  every format but OPT's reads it from row 0, into a destination table of ``n + k`` rows that its
  code reads from row ``o <= k`` (OPT's ``embed_positions``: from 2; found by running the
  destination, `archalign.row_parts.find_position_offsets`): the near miss is loaded padded,
  ``o`` rows before and ``k - o`` after (``pad``), as OPT's converters do.
- `FFN_META` (``prior_ffn_meta``): Meta's feed-forward names ``w1`` (gate), ``w3`` (up), ``w2``
  (down). Where experts held flattened (``block_sparse_moe.w1`` / ``w2`` / ``w3``, all
  ``[E*I, H]``) fill stacked ones and the shapes leave open which tensor is which
  (`archalign.stacked.UNDECIDED_GROUPING`), the concatenated destination takes ``w1`` then
  ``w3``, the transposed one ``w2``, as ``convert_mixtral_weights_to_hf.py`` does.

Planning only: the rules read keys, shapes, the destination's config and how the destination
reads its layers (run once on its input), never the source's tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .confidence import ORDER_ONLY_GROUP, UNDECIDED_LAYOUT_CAP, confidence, prior_confidence
from .errors import RunError
from .ops import Op, OpKind, apply_ops
from .plan import Match, Plan
from .row_parts import RowParts, find_position_offsets, find_row_parts
from .stacked import UNDECIDED_GROUPING

__all__ = ["FFN_META", "FUSED_BLOCKS", "FUSED_UNDECIDED", "POSITION_OFFSET", "ROTARY_META",
           "apply_conventions"]

logger = logging.getLogger(__name__)

ROTARY_META = "prior_rotary_meta"
FFN_META = "prior_ffn_meta"
_FFN = ("w1", "w3", "w2")  # Meta's gate, up and down projections, in the order the prior wants
_META = {"wq": "q_proj", "wk": "k_proj"}  # Meta's projection -> Hugging Face's, rotated ones
_LAST = re.compile(r"(?:^|\.)([A-Za-z_]+)\.weight$")
_ROTARY_CONFIG = ("rope_theta", "rope_scaling", "rope_parameters", "rotary_emb_base")
FUSED_BLOCKS = "prior_fused_blocks"
FUSED_UNDECIDED = "prior_fused_undecided"
POSITION_OFFSET = "prior_position_offset"
_BLOCK_NAMES = frozenset({"c_attn", "qkv", "in_proj", "qkv_proj", "wqkv", "Wqkv", "to_qkv",
                          "gate_up_proj"})  # fused layers whose formats store blocks
_LAYER = re.compile(r"^(?:(?P<path>.*)\.)?(?:(?P<mha>in_proj)_(?:weight|bias)|"
                    r"(?P<name>[^.]+)\.(?:weight|bias))$")


def apply_conventions(plan: Plan, dst: nn.Module, inputs: Any = None) -> Plan:
    """The plan with the checkpoint conventions its keys follow applied (see the module).

    Parameters
    ----------
    plan : Plan
        A plan whose source is a checkpoint (no module).
    dst : nn.Module
        The destination; its ``config`` says whether it is rotary and how many heads it has.
    inputs : optional
        What ``dst`` is called with; with it, ``dst`` runs once to show how it reads its fused
        layers (`FUSED_BLOCKS`). Without it (or when the run fails), that rule is skipped.

    Returns
    -------
    Plan
        The same plan when no convention applies.
    """
    plan = _rotary(_meta_ffn(plan), dst)
    if inputs is not None:
        plan = _position_offsets(_fused_rows(plan, dst, inputs), dst, inputs)
    return plan


def _rotary(plan: Plan, dst: nn.Module) -> Plan:
    """`ROTARY_META` applied."""
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


# ----------------------------------------------------------------------------- fused rows


def _fused_rows(plan: Plan, dst: nn.Module, inputs: Any) -> Plan:
    """`FUSED_BLOCKS` and `FUSED_UNDECIDED` applied, for every destination layer loaded from
    one source layer (or one concatenation) whose code reads it in parts."""
    by_layer: dict[str, list[int]] = {}
    for n, m in enumerate(plan.matches):
        owner = _layer_of(m.dst[0]) if len(m.dst) == 1 else None
        if owner is not None and m.dst_shapes[0] and m.dst_shapes[0][0] % 2 == 0:
            by_layer.setdefault(owner[0], []).append(n)
    if not by_layer:
        return plan
    try:
        parts = find_row_parts(dst, by_layer, inputs)
    except RunError as exc:
        logger.info("fused row layouts not read from the destination: %s", exc)
        return plan
    matches = list(plan.matches)
    for layer, found in parts.items():
        group = [matches[n] for n in by_layer[layer]]
        changed = _regrouped(group, found)
        for n, m in zip(by_layer[layer], changed):
            matches[n] = m
    if matches == list(plan.matches):
        return plan
    return dataclasses.replace(plan, matches=tuple(matches))


def _regrouped(group: Sequence[Match], parts: RowParts) -> list[Match]:
    """The matches of one destination layer, once its parts' row layout is settled."""
    order = _blocks_order(parts)
    if order == tuple(range(parts.rows)):
        return list(group)  # the destination reads blocks too: nothing moves
    weight = next((m for m in group if len(m.dst_shapes[0]) == 2), group[0])
    src_layer = _layer_of(weight.src[0]) if len(weight.src) == 1 else None
    dst_name = _layer_of(weight.dst[0])
    concatenated = any(op.kind == OpKind.CONCAT for op in weight.ops)
    stored_in_out = any(op.kind == OpKind.TRANSPOSE for op in weight.ops)
    same_format = (src_layer is not None and dst_name is not None
                   and src_layer[1] == dst_name[1] and not stored_in_out)
    if not concatenated and same_format:
        return list(group)
    if not concatenated and (src_layer is None or src_layer[1] not in _BLOCK_NAMES):
        logger.info("%s: the destination reads its rows per head, and the checkpoint's %s shows "
                    "no layout (%s)", parts.layer, weight.src, FUSED_UNDECIDED)
        return [_capped(m) for m in group]
    op = _regroup_for(order)
    out = []
    for m in group:
        if m.dst_shapes[0][0] != parts.rows:
            out.append(m)
        elif op is None:
            out.append(_capped(m))
        else:
            out.append(dataclasses.replace(
                m, ops=(*m.ops, op), confidence=round(prior_confidence(m.confidence), 6),
                costs=(*m.costs, (FUSED_BLOCKS, 0.0))))
    logger.info("%s: stored as blocks (%s), read per part by the destination: %s", parts.layer,
                FUSED_BLOCKS, op if op is not None else "no regroup gives its order (undecided)")
    return out


def _blocks_order(parts: RowParts) -> tuple[int, ...]:
    """For each destination row, the source row a block layout puts there: part ``p`` (in the
    order of their first rows) takes the ``p``-th block, its rows in the order the part is read."""
    order = [0] * parts.rows
    start = 0
    for part in parts.parts:
        for j, row in enumerate(part):
            order[row] = start + j
        start += len(part)
    return tuple(order)


@functools.lru_cache(maxsize=64)  # each block of a model asks for the same order
def _regroup_for(order: tuple[int, ...]) -> Op | None:
    """The regroup that puts source row ``order[r]`` at row ``r``; None when none does."""
    rows = len(order)
    want = torch.tensor(order)
    divisors = [a for a in range(2, rows // 2 + 1) if rows % a == 0]
    for a in divisors:
        for b in (b for b in divisors if (rows // a) % b == 0):
            op = Op(OpKind.REGROUP, groups=(a, b))
            if torch.equal(apply_ops([torch.arange(rows)], (op,))[0], want):
                return op
    return None


def _capped(m: Match) -> Match:
    return dataclasses.replace(m, confidence=round(min(m.confidence, UNDECIDED_LAYOUT_CAP), 6),
                               costs=(*m.costs, (FUSED_UNDECIDED, 0.0)))


def _layer_of(key: str) -> tuple[str, str] | None:
    """(module path of the layer holding ``key``, its name): ``("h.0.attn.c_attn", "c_attn")``;
    ``nn.MultiheadAttention``'s ``in_proj_weight`` is the layer ``in_proj``, inside its module."""
    found = _LAYER.match(key)
    if found is None:
        return None
    if found.group("mha"):
        path = found.group("path") or ""
        return path, "in_proj"
    name = found.group("name")
    path = found.group("path")
    return (f"{path}.{name}" if path else name), name


# ------------------------------------------------------------------------ position offsets


def _position_offsets(plan: Plan, dst: nn.Module, inputs: Any) -> Plan:
    """`POSITION_OFFSET` applied to the near misses of a table into a longer one."""
    longer = {n: _layer_of(mm.dst[0]) for n, mm in enumerate(plan.mismatches)
              if len(mm.src) == len(mm.dst) == 1 and len(mm.src_shapes[0]) == 2
              and len(mm.dst_shapes[0]) == 2 and mm.src_shapes[0][1] == mm.dst_shapes[0][1]
              and mm.dst_shapes[0][0] > mm.src_shapes[0][0]}
    layers = {n: owner[0] for n, owner in longer.items() if owner is not None}
    if not layers:
        return plan
    try:
        offsets = find_position_offsets(dst, layers.values(), inputs)
    except RunError as exc:
        logger.info("position tables not read from the destination: %s", exc)
        return plan
    promoted: list[Match] = []
    kept = []
    for n, mm in enumerate(plan.mismatches):
        offset = offsets.get(layers.get(n, ""))
        extra = mm.dst_shapes[0][0] - mm.src_shapes[0][0]
        if offset is None or offset > extra:
            kept.append(mm)
            continue
        promoted.append(Match(
            src=mm.src, dst=mm.dst, src_shapes=mm.src_shapes, dst_shapes=mm.dst_shapes,
            ops=(Op(OpKind.PAD, sizes=(offset, extra - offset)),),
            confidence=round(prior_confidence(mm.confidence), 6),
            costs=((POSITION_OFFSET, 0.0),), src_unit=mm.src[0].rpartition(".")[0],
            dst_unit=mm.dst[0].rpartition(".")[0]))
        logger.info("%s reads positions from row %d (%s): %s loaded padded", mm.dst[0], offset,
                    POSITION_OFFSET, mm.src[0])
    if not promoted:
        return plan
    moved_src = {k for m in promoted for k in m.src}
    moved_dst = {k for m in promoted for k in m.dst}
    return dataclasses.replace(
        plan, matches=(*plan.matches, *promoted), mismatches=tuple(kept),
        unmatched_src=tuple(k for k in plan.unmatched_src if k not in moved_src),
        unmatched_dst=tuple(k for k in plan.unmatched_dst if k not in moved_dst))
