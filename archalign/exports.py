"""Exports a user can ship without archalign: a Hugging Face ``key_mapping`` and a standalone
``convert_state_dict`` function (the shape of timm's ``checkpoint_filter_fn``).

Both are generated from a plan alone (pure: no model, no tensor).
"""

from __future__ import annotations

import pprint
import re
from collections import defaultdict

from .errors import PlanError
from .plan import Match, Plan

__all__ = ["to_key_mapping", "to_python"]

_DIGITS = re.compile(r"\d+")


def to_key_mapping(plan: Plan, *, min_confidence: float = 0.0) -> dict[str, str]:
    """A ``{regex: replacement}`` for ``from_pretrained(..., key_mapping=...)`` (transformers v5).

    Layer indices are folded into one pattern where a single index varies (``layers\\.(\\d+)\\.wq``
    -> ``model.layers.\\1.q_proj``; transformers substitutes only ``\\1``). The mapping is checked
    by replaying transformers' renaming (every matching pattern fires, in order) over all the
    plan's source keys: each matched key must land on its destination, and no other key on a
    destination key.

    Raises
    ------
    PlanError
        If a match needs an adaptation (a transpose, a split...: key_mapping only renames; export
        with `to_python` instead), or if the renames cannot be expressed without chaining.
    """
    matches = [m for m in plan.matches if m.confidence >= min_confidence]
    adapted = [m for m in matches if not _is_rename(m)]
    if adapted:
        shown = ", ".join(f"{m.dst[0]} ({' '.join(map(str, m.ops)) or 'fused'})"
                          for m in adapted[:4])
        raise PlanError(f"{len(adapted)} matches need adaptations a key_mapping cannot express: "
                        f"{shown}; use to_python() for a converter that applies them")
    renames = {m.src[0]: m.dst[0] for m in matches if m.src[0] != m.dst[0]}
    all_src = sorted({*(m.src[0] for m in matches), *plan.unmatched_src})
    all_dst = {*(m.dst[0] for m in matches), *plan.unmatched_dst}
    expected = {m.src[0]: m.dst[0] for m in matches}

    folded = _fold(renames)
    for mapping in (folded, {f"^{re.escape(s)}$": d for s, d in renames.items()}):
        if _consistent(mapping, all_src, all_dst, expected):
            return mapping
    raise PlanError("these renames chain into each other (a key renamed into another source "
                    "key's name), which a transformers key_mapping applies in turn; use "
                    "to_python() instead")


def _fold(renames: dict[str, str]) -> dict[str, str]:
    """Group renames that differ in one index into one pattern with one capture group."""
    groups: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    literal: dict[str, str] = {}
    for src, dst in renames.items():
        template = _one_index_template(src, dst)
        if template is None:
            literal[f"^{re.escape(src)}$"] = dst
        else:
            groups[template].append((src, dst))
    out: dict[str, str] = {}
    for (pattern, replacement), members in sorted(groups.items()):
        if len(members) > 1:
            out[pattern] = replacement
        else:
            src, dst = members[0]
            literal[f"^{re.escape(src)}$"] = dst
    out.update(sorted(literal.items()))
    return out


def _one_index_template(src: str, dst: str) -> tuple[str, str] | None:
    """``(pattern, replacement)`` folding the one index that both keys carry in the same place
    among their indices (all other indices literal), or None."""
    src_nums, dst_nums = _DIGITS.findall(src), _DIGITS.findall(dst)
    candidates = [(i, j) for i, a in enumerate(src_nums) for j, b in enumerate(dst_nums) if a == b]
    if not candidates:
        return None
    i, j = candidates[-1]  # the innermost shared index: usually the block number
    src_parts = _DIGITS.split(src)
    dst_parts = _DIGITS.split(dst)
    pattern = "".join(
        re.escape(part) + ("" if k >= len(src_nums) else
                           r"(\d+)" if k == i else re.escape(src_nums[k]))
        for k, part in enumerate(src_parts))
    replacement = "".join(
        part.replace("\\", "\\\\") + ("" if k >= len(dst_nums) else
                                      r"\1" if k == j else dst_nums[k])
        for k, part in enumerate(dst_parts))
    return f"^{pattern}$", replacement


def _replay(key: str, mapping: dict[str, str]) -> str:
    """What transformers v5 does with one checkpoint key: every matching renaming fires in turn."""
    for pattern, replacement in mapping.items():
        found = re.search(pattern, key)
        if found is None:
            continue
        if r"\1" in replacement:
            replacement = replacement.replace(r"\1", found.group(1))
        key = key.replace(found.group(0), replacement, 1)
    return key


def _consistent(mapping: dict[str, str], all_src: list[str], all_dst: set[str],
                expected: dict[str, str]) -> bool:
    for key in all_src:
        renamed = _replay(key, mapping)
        if key in expected:
            if renamed != expected[key]:
                return False
        elif renamed != key and renamed in all_dst:
            return False
    return True


_TEMPLATE = '''"""Convert a state_dict for loading into {dst_description}.

Generated by archalign from a reviewed plan ({n} tensors: {n_plain} renamed or copied,
{n_adapted} adapted). Needs only torch. Keys not listed are dropped; every destination key the
plan does not load keeps its own initialisation (load with strict=False).
"""

import torch

# destination key -> source key (plain copies)
RENAMES = {renames}

# (destination keys, source keys, operations) for tensors that need an adaptation
ADAPTED = {adapted}


def _run(tensors, ops):
    for op in ops:
        kind = op["op"]
        if kind == "transpose":
            tensors = [t.transpose(0, 1) for t in tensors]
        elif kind == "reshape":
            tensors = [tensors[0].reshape(op["shape"])]
        elif kind == "concat":
            tensors = [torch.cat(tensors, dim=0)]
        elif kind == "split":
            tensors = list(torch.split(tensors[0], op["sizes"], dim=0))
        elif kind == "regroup":
            a, b = op["groups"]
            t = tensors[0]
            rows = t.shape[0] // (a * b)
            tensors = [t.reshape(a, b, rows, *t.shape[1:]).transpose(0, 1).reshape(t.shape)]
        elif kind in ("rope", "unrope"):  # rotary rows: interleaved pairs <-> halves, per head
            heads = op["groups"][0]
            t = tensors[0]
            half = t.shape[0] // heads // 2
            inner = (half, 2) if kind == "rope" else (2, half)
            tensors = [t.reshape(heads, *inner, *t.shape[1:]).transpose(1, 2).reshape(t.shape)]
        elif kind == "pad":  # zero rows before and after, on axis 0
            before, after = op["sizes"]
            t = tensors[0]
            tensors = [torch.cat([t.new_zeros((before, *t.shape[1:])), t,
                                  t.new_zeros((after, *t.shape[1:]))])]
        elif kind == "crop":
            before, after = op["sizes"]
            tensors = [tensors[0][before:tensors[0].shape[0] - after]]
        else:
            raise ValueError("unknown operation " + repr(kind))
    return tensors


def convert_state_dict(state_dict):
    """Return a new state_dict with the destination's keys (tensors are not copied unless adapted)."""
    out = {{}}
    for dst, src in RENAMES.items():
        out[dst] = state_dict[src]
    for dsts, srcs, ops in ADAPTED:
        for dst, tensor in zip(dsts, _run([state_dict[s] for s in srcs], ops)):
            out[dst] = tensor.contiguous()
    return out
'''


def to_python(plan: Plan, *, min_confidence: float = 0.0,
              description: str = "the destination model") -> str:
    """Source code of a standalone ``convert_state_dict(state_dict) -> state_dict`` (torch only).

    Matches below ``min_confidence`` are left out, as `Plan.apply` would skip them.
    """
    matches = [m for m in plan.matches if m.confidence >= min_confidence]
    plain = {m.dst[0]: m.src[0] for m in matches if _is_rename(m)}
    adapted = [(m.dst, m.src, [op.to_dict() for op in m.ops])
               for m in matches if not _is_rename(m)]
    return _TEMPLATE.format(
        dst_description=description, n=len(matches), n_plain=len(plain), n_adapted=len(adapted),
        renames=pprint.pformat(plain, width=100, sort_dicts=False),
        adapted=pprint.pformat(adapted, width=100, sort_dicts=False))


def _is_rename(match: Match) -> bool:
    """One source tensor copied as it is into one destination tensor: a plain rename."""
    return not match.ops and len(match.src) == 1 and len(match.dst) == 1
