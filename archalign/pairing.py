"""Tensor pairing: which tensor of one matched unit goes into which tensor of the other, and how.

A matched pair of units (a Linear and a Linear, a BatchNorm and a BatchNorm) still has to pair its
tensors: by canonical name first (``gamma`` is ``weight``), by shape and layout (a known transpose,
a reshape), and by order only when nothing else tells equal-shaped tensors apart (the pair then
says so: ``by_name=False``). A fused unit pairs with the members of a group along axis 0.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from .graph import Unit
from .ops import Op, OpKind, derive_ops

__all__ = ["MatchMode", "TensorPair", "canonical_name", "fused_pairs", "pair_tensors"]


class MatchMode(str, enum.Enum):
    """What a matching stage lets two units' tensors differ in."""

    EXACT = "exact"  # canonical shapes agree (a known layout difference is a transpose)
    ADAPT = "adapt"  # a reshape, or a transpose that only the shapes suggest, is allowed too
    NEAR = "near"  # tensors of equal rank pair whatever their shapes (to report mismatches)

    def __str__(self) -> str:
        return self.value


class TensorPair(NamedTuple):
    """Source tensor(s) that become destination tensor(s) through ``ops``."""

    src: tuple[str, ...]  # source keys (several: concatenated into one destination tensor)
    dst: tuple[str, ...]  # destination keys (several: split from one source tensor)
    ops: tuple[Op, ...]  # adaptations, applied in order; () for a plain copy
    by_name: bool  # False when equal shapes had to be paired by order alone



_SYNONYMS = {"gamma": "weight", "beta": "bias", "scale": "weight", "g": "weight", "b": "bias",
             "moving_mean": "running_mean", "moving_variance": "running_var",
             "moving_var": "running_var",
             # nn.MultiheadAttention packs q, k and v into one input projection
             "in_proj_weight": "weight", "in_proj_bias": "bias"}


def pair_tensors(src: Unit, dst: Unit, mode: MatchMode | str = MatchMode.EXACT
                 ) -> list[TensorPair] | None:
    """Pair the tensors of two matched units; names decide among tensors that fit alike.

    Parameters
    ----------
    mode : MatchMode or its value ("exact", "adapt", "near")
        "exact": canonical shapes must agree (a known layout difference is a transpose);
        "adapt": a reshape or a transpose that the shapes suggest is allowed too;
        "near": tensors of equal rank pair whatever their shapes (for reporting mismatches).

    Returns
    -------
    list of TensorPair or None
        In the destination's tensor order; None when ("exact"/"adapt") not every tensor pairs.
    """
    mode = MatchMode(mode)
    src_names = [canonical_name(n) for n in src.local_names()]
    dst_names = [canonical_name(n) for n in dst.local_names()]
    n, m = len(src.tensors), len(dst.tensors)
    if mode is not MatchMode.NEAR and n != m:
        return None
    cost = np.full((n, m), 1e6)
    ops: dict[tuple[int, int], tuple[Op, ...]] = {}
    for i in range(n):
        for j in range(m):
            flip = src.is_transposed(i) != dst.is_transposed(j)
            if mode is MatchMode.NEAR:
                if len(src.shapes[i]) != len(dst.shapes[j]):
                    continue
                found: tuple[Op, ...] | None = ()
                penalty = 0.0 if src.canonical_shapes[i] == dst.canonical_shapes[j] else 0.05
            else:
                found = derive_ops(src.shapes[i], dst.shapes[j], transpose=flip,
                                   allow_shape_transpose=mode is MatchMode.ADAPT)
                if found is None or (mode is MatchMode.EXACT
                                     and any(o.kind is not OpKind.TRANSPOSE for o in found)):
                    continue
                penalty = 0.05 * sum(o.kind is not OpKind.TRANSPOSE or not flip for o in found)
            assert found is not None
            ops[i, j] = found
            if src_names[i] == dst_names[j]:
                cost[i, j] = penalty
            elif src_names[i].endswith(dst_names[j]) or dst_names[j].endswith(src_names[i]):
                cost[i, j] = 0.1 + penalty  # in_proj_weight ~ weight
            else:
                cost[i, j] = 1.0 + penalty + 0.001 * abs(i - j)
    rows, cols = linear_sum_assignment(cost)
    pairs = []
    for i, j in zip(rows, cols):
        if cost[i, j] >= 1e6:
            continue
        rivals = sum((i2, j) in ops for i2 in range(n))
        by_name = bool(cost[i, j] < 1.0 or rivals == 1)
        pairs.append((j, TensorPair(src=(src.tensors[i],), dst=(dst.tensors[j],), ops=ops[i, j],
                                    by_name=by_name)))
    if mode is not MatchMode.NEAR and len(pairs) != n:
        return None
    return [p for _, p in sorted(pairs)]


def canonical_name(name: str) -> str:
    name = name.lower()
    return _SYNONYMS.get(name, name)



def fused_pairs(single: Unit, members: Sequence[Unit], fused_is_dst: bool
                 ) -> list[TensorPair] | None:
    """Tensor pairs when ``single`` holds the members' tensors concatenated along axis 0."""
    single_names = [canonical_name(n) for n in single.local_names()]
    if len(set(single_names)) != len(single_names):
        return None
    pairs = []
    for k, name in enumerate(single_names):
        keys, sizes, flips = [], [], []
        for member in members:
            member_names = [canonical_name(n) for n in member.local_names()]
            if name not in member_names:
                return None
            idx = member_names.index(name)
            keys.append(member.tensors[idx])
            sizes.append(member.canonical_shapes[idx])
            flips.append(member.is_transposed(idx))
        whole = single.canonical_shapes[k]
        if (len(set(flips)) != 1 or any(s[1:] != whole[1:] for s in sizes)
                or sum(s[0] for s in sizes) != whole[0]):
            return None
        member_t = [Op(OpKind.TRANSPOSE)] if flips[0] else []
        single_t = [Op(OpKind.TRANSPOSE)] if single.is_transposed(k) else []
        counts = tuple(s[0] for s in sizes)
        if fused_is_dst:
            ops = (*member_t, Op(OpKind.CONCAT, sizes=counts), *single_t)
            pairs.append(TensorPair(src=tuple(keys), dst=(single.tensors[k],), ops=ops,
                                    by_name=True))
        else:
            ops = (*single_t, Op(OpKind.SPLIT, sizes=counts), *member_t)
            pairs.append(TensorPair(src=(single.tensors[k],), dst=tuple(keys), ops=ops,
                                    by_name=True))
    return pairs
