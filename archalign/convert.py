"""Write a converted checkpoint straight to (sharded) safetensors, without building the model.

The plan knows every destination key and shape; the source is read one tensor at a time (a
``.safetensors`` or sharded source is lazy), so peak memory is about one output shard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .apply import split_by_confidence
from .checks import check_plan, refuse_unwritable
from .confidence import DEFAULT_MIN_CONFIDENCE
from .errors import UsageError
from .ops import apply_ops
from .plan import Plan
from .source import read_source

__all__ = ["convert_checkpoint"]

logger = logging.getLogger(__name__)


def convert_checkpoint(plan: Plan, src: Any, out: str | os.PathLike[str], *,
                       min_confidence: float = DEFAULT_MIN_CONFIDENCE, max_shard_bytes: int = 2 * 1024**3
                       ) -> list[Path]:
    """Convert ``src`` with ``plan`` into safetensors files under ``out``.

    One file (``model.safetensors``) when everything fits in ``max_shard_bytes``; otherwise
    ``model-0000k-of-0000n.safetensors`` shards and a Hugging Face
    ``model.safetensors.index.json``. Only matches at or above ``min_confidence`` are written;
    destination keys the plan does not load are absent (load with ``strict=False``).

    Returns
    -------
    list of Path
        The files written (the index last, when there is one).

    Raises
    ------
    PlanError
        If a source key or shape of the plan is not in ``src``, or an adaptation does not turn
        the source shapes into the plan's destination shapes (checked before anything is written,
        as `archalign.apply` checks).
    ApplyError
        If a source tensor cannot be written (meta device, quantized).
    UsageError
        If ``max_shard_bytes`` is not positive or ``min_confidence`` lies outside [0, 1].
    """
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise UsageError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    source = read_source(src, role="source")
    matches, _ = split_by_confidence(plan.matches, min_confidence)
    check_plan(dataclasses.replace(plan, matches=tuple(matches), mismatches=()), source, None)
    refuse_unwritable(matches, (), source, None)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    written: list[tuple[Path, list[str]]] = []  # each shard's temporary file and its keys
    with source.reading():  # a lazy source keeps its file open between tensors
        for match in matches:
            values = apply_ops([source.get(k) for k in match.src], match.ops)
            for key, value in zip(match.dst, values):
                nbytes = value.numel() * value.element_size()
                if shards[-1] and size + nbytes > max_shard_bytes:
                    written.append(_flush(shards[-1], folder, len(shards), save_file))
                    shards.append({})
                    size = 0
                shards[-1][key] = value.detach().contiguous()
                size += nbytes
    if len(shards) == 1:
        path = folder / "model.safetensors"
        save_file(shards[0], str(path), metadata={"format": "pt"})
        return [path]
    written.append(_flush(shards[-1], folder, len(shards), save_file))
    total = len(written)
    final: list[Path] = []
    weight_map: dict[str, str] = {}
    for n, (temporary, keys) in enumerate(written, start=1):
        name = f"model-{n:05d}-of-{total:05d}.safetensors"
        target = folder / name
        temporary.replace(target)
        final.append(target)
        weight_map.update(dict.fromkeys(keys, name))
    index = folder / "model.safetensors.index.json"
    total_size = sum(p.stat().st_size for p in final)
    index.write_text(json.dumps({"metadata": {"total_size": total_size},
                                 "weight_map": dict(sorted(weight_map.items()))}, indent=1) + "\n",
                     encoding="utf-8")
    logger.info("wrote %d shards and %s", total, index)
    return [*final, index]


def _flush(shard: dict[str, torch.Tensor], folder: Path, number: int, save_file: Any
           ) -> tuple[Path, list[str]]:
    """Write ``shard`` to a temporary file and empty it; returns the file and the keys it holds."""
    path = folder / f".archalign-shard-{number:05d}.safetensors"
    save_file(shard, str(path), metadata={"format": "pt"})
    keys = list(shard)
    shard.clear()
    return path, keys
