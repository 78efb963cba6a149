"""Apply a plan while loading a ``torch.distributed.checkpoint`` (DCP) directory.

Each rank loads only what its own destination tensors need: the plan's renames are handed to
DCP as a state_dict keyed by *source* names whose values are the destination's own tensors (a
plain copy lands in place, with no second copy), and tensors that need an adaptation are read
into buffers of the source's shape, adapted, then written. DCP's own planner decides which
shards each rank reads.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from .apply import split_by_confidence
from .confidence import DEFAULT_MIN_CONFIDENCE
from .errors import PlanError
from .ops import apply_ops
from .plan import Plan
from .report import Adapted, LoadReport
from .source import read_destination

__all__ = ["load_distributed_checkpoint"]

logger = logging.getLogger(__name__)


def load_distributed_checkpoint(plan: Plan, dst: nn.Module, checkpoint_id: str | os.PathLike[str],
                                *, min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                                process_group: Any = None) -> LoadReport:
    """Load the source checkpoint at ``checkpoint_id`` (a DCP directory) into ``dst`` by ``plan``.

    Call it on every rank, like ``torch.distributed.checkpoint.load``; it also works without a
    process group (one process).

    Raises
    ------
    PlanError
        If a key of the plan is missing from the checkpoint's metadata or its shape differs.
    UsageError
        If ``min_confidence`` is outside [0, 1].
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    matches, skipped = split_by_confidence(plan.matches, min_confidence)
    reader = FileSystemReader(str(checkpoint_id))
    metadata = reader.read_metadata().state_dict_metadata
    target = read_destination(dst)
    problems = []
    for match in matches:
        for key, shape in zip(match.src, match.src_shapes):
            meta = metadata.get(key)
            size = tuple(getattr(meta, "size", ()) or ())
            if meta is None or size != tuple(shape):
                problems.append(f"{key!r} (plan: {tuple(shape)}, checkpoint: "
                                f"{size if meta is not None else 'absent'})")
    if problems:
        raise PlanError("the checkpoint does not hold what the plan reads: "
                        + "; ".join(problems[:10]))

    by_source: dict[str, torch.Tensor] = {}
    adapted = []
    for match in matches:
        plain = not match.ops and len(match.src) == len(match.dst) == 1
        for key, shape in zip(match.src, match.src_shapes):
            if plain:
                by_source[key] = target.get(match.dst[0]).detach()
            elif key not in by_source:
                like = target.get(match.dst[0])
                by_source[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        if not plain:
            adapted.append(match)
    dcp.load(by_source, checkpoint_id=str(checkpoint_id), process_group=process_group)
    with torch.no_grad():
        for match in adapted:
            values = apply_ops([by_source[k] for k in match.src], match.ops)
            for key, value in zip(match.dst, values):
                target.get(key).copy_(value)

    loaded = tuple(k for m in matches for k in m.dst)
    loaded_set = {target.aliases.get(k, k) for k in loaded}
    used = {k for m in matches for k in m.src}
    return LoadReport(
        loaded=loaded, skipped=tuple(skipped),
        missing=tuple(k for k in target.specs if k not in loaded_set),
        unexpected=tuple(k for k in metadata if k not in used),
        tied=tuple(sorted(target.aliases.items())),
        adapted=tuple(Adapted(k, ", ".join(m.src), " ".join(map(str, m.ops)))
                      for m in adapted for k in m.dst))
