"""Apply a plan while loading a ``torch.distributed.checkpoint`` (DCP) directory.

Each rank reads, through DCP's own planner, only the source tensors its plan loads, into buffers
of the source's shapes; the plan is then applied from those buffers by `archalign.apply`, the one
writer, with every check it runs (keys, shapes, adaptations, dtypes, NaN/Inf) and its
all-or-nothing guarantee. The buffers cost one copy of the tensors a rank loads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from torch import nn

from .apply import apply_plan, split_by_confidence
from .confidence import DEFAULT_MIN_CONFIDENCE
from .errors import PlanError
from .plan import Plan
from .report import LoadReport, Skipped
from .source import read_destination

__all__ = ["load_distributed_checkpoint"]

logger = logging.getLogger(__name__)


def load_distributed_checkpoint(plan: Plan, dst: nn.Module, checkpoint_id: str | os.PathLike[str],
                                *, min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                                process_group: Any = None) -> LoadReport:
    """Load the source checkpoint at ``checkpoint_id`` (a DCP directory) into ``dst`` by ``plan``.

    Call it on every rank, like ``torch.distributed.checkpoint.load``; it also works without a
    process group (one process). The plan's mismatches are not loaded (there is no shape policy
    here): they are reported as skipped.

    Raises
    ------
    PlanError
        If a key of the plan is missing from the checkpoint's metadata or its shape differs, or
        the plan does not agree with ``dst``.
    ApplyError
        If a value cannot be written (`archalign.apply.apply_plan`); ``dst`` is then unchanged.
    UsageError
        If ``min_confidence`` is outside [0, 1].
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    matches, skipped = split_by_confidence(plan.matches, min_confidence)
    skipped += [Skipped(d, ", ".join(mm.src), mm.reason) for mm in plan.mismatches for d in mm.dst]
    reader = FileSystemReader(str(checkpoint_id))
    metadata = reader.read_metadata().state_dict_metadata
    target = read_destination(dst)
    buffers: dict[str, torch.Tensor] = {}
    problems = []
    for match in matches:
        like = target.get(match.dst[0])
        for key, shape in zip(match.src, match.src_shapes):
            meta = metadata.get(key)
            size = tuple(getattr(meta, "size", ()) or ())
            if meta is None or size != tuple(shape):
                problems.append(f"{key!r} (plan: {tuple(shape)}, checkpoint: "
                                f"{size if meta is not None else 'absent'})")
            elif key not in buffers:
                dtype = getattr(getattr(meta, "properties", None), "dtype", like.dtype)
                buffers[key] = torch.empty(shape, dtype=dtype, device=like.device)
    if problems:
        raise PlanError("the checkpoint does not hold what the plan reads: "
                        + "; ".join(problems[:10]))
    used = {k for m in matches for k in m.src}
    unused = tuple(k for k in metadata if k not in used)
    if not buffers:  # nothing to load: nothing is read, nothing written
        return LoadReport(loaded=(), skipped=tuple(skipped), missing=tuple(target.specs),
                          unexpected=unused, tied=tuple(sorted(target.aliases.items())))
    dcp.load(buffers, checkpoint_id=str(checkpoint_id), process_group=process_group)
    to_load = dataclasses.replace(plan, matches=tuple(matches), mismatches=())
    report = apply_plan(to_load, dst, buffers, min_confidence=0.0)
    return dataclasses.replace(report, skipped=tuple(skipped), unexpected=unused)
