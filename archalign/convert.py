"""Write a converted checkpoint straight to (sharded) safetensors, without building the model.

The plan knows every destination key and shape; the source is read one tensor at a time (a
``.safetensors`` or sharded source is lazy), so peak memory is about one output shard.

All or nothing: every file is written into a hidden staging folder inside the output folder
(``.archalign-partial-*``, removed on any failure, Ctrl-C included) and moved into place only
when all of them are complete. A folder that already holds a checkpoint is refused unless
``overwrite=True``; then its safetensors files and indexes are replaced as a set (see
`convert_checkpoint`), so that no later read returns a stale index or stale shards.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .apply import split_by_confidence
from .checks import check_plan, refuse_unwritable
from .confidence import DEFAULT_MIN_CONFIDENCE
from .errors import ApplyError, PlanError, UsageError
from .interrupts import interrupts_kept, sigint_deferred
from .ops import apply_ops
from .plan import Match, Plan
from .source import TensorSource, read_source

__all__ = ["convert_checkpoint"]

logger = logging.getLogger(__name__)

_RESERVED_KEY = "__metadata__"  # the safetensors header's own entry: no tensor may be named so


def convert_checkpoint(plan: Plan, src: Any, out: str | os.PathLike[str], *,
                       min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                       max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> list[Path]:
    """Convert ``src`` with ``plan`` into safetensors files under ``out``.

    One file (``model.safetensors``) when everything fits in ``max_shard_bytes``; otherwise
    ``model-0000k-of-0000n.safetensors`` shards and a Hugging Face
    ``model.safetensors.index.json``. Only matches at or above ``min_confidence`` are written;
    destination keys the plan does not load are absent (load with ``strict=False``).

    Parameters
    ----------
    overwrite : bool
        Whether to replace the checkpoint ``out`` already holds (any ``*.safetensors`` file or
        ``*.safetensors.index.json``; other files, such as ``config.json``, are kept). The new
        files are written completely first; then the old indexes are removed, then the old
        safetensors files, and the new files are moved in, the index last. A reader
        (`archalign.checkpoint`) finds at every moment either a whole checkpoint, old or new,
        or a folder it refuses (several files without an index, or a lone shard).

    Returns
    -------
    list of Path
        The files written (the index last, when there is one).

    Raises
    ------
    PlanError
        If a source key or shape of the plan is not in ``src``, an adaptation does not turn
        the source shapes into the plan's destination shapes, a destination key is
        ``__metadata__`` (the name safetensors keeps for its header), or no match reaches
        ``min_confidence`` (checked before anything is written, as `archalign.apply` checks).
    ApplyError
        If a source tensor cannot be written (meta device, quantized, sparse) or read; nothing
        is then left in ``out``.
    UsageError
        If ``max_shard_bytes`` is not positive, ``min_confidence`` lies outside [0, 1], or
        ``out`` holds a checkpoint already and ``overwrite`` is False.
    OSError
        If a file cannot be written (full disk, read-only folder, file-size limit), naming the
        output file; nothing new is then left in ``out``, and the checkpoint it held is intact
        (only the final renames, after every file was written, touch it).
    KeyboardInterrupt
        On Ctrl-C while writing: as for an `OSError`. One during the final renames waits for
        them to end.
    """
    if max_shard_bytes <= 0:
        raise UsageError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    with interrupts_kept():
        source = read_source(src, role="source")
        matches, _ = split_by_confidence(plan.matches, min_confidence)
        check_plan(dataclasses.replace(plan, matches=tuple(matches), mismatches=()), source, None)
        refuse_unwritable(matches, (), source, None)
        _refuse_unstorable(matches, min_confidence)
        folder = Path(out)
        old = _checkpoint_files(folder)
        if old and not overwrite:
            shown = ", ".join(p.name for p in old[:5]) + (" ..." if len(old) > 5 else "")
            raise UsageError(f"the folder {str(folder)!r} already holds a checkpoint ({shown}); "
                             "pass overwrite=True to replace it, or choose another folder")
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            staging = Path(tempfile.mkdtemp(prefix=".archalign-partial-", dir=folder))
        except OSError as exc:  # it names the staging folder, which the caller never chose
            raise OSError(exc.errno, exc.strerror, str(folder)) from exc
        try:
            names = _write_all(matches, source, staging, folder, max_shard_bytes)
            with sigint_deferred():  # a few renames: a Ctrl-C waits for them
                _move_in(staging, folder, names, old)
        except BaseException:
            if created:
                shutil.rmtree(folder, ignore_errors=True)  # nothing of ours was there before
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    files = [folder / name for name in names]
    logger.info("wrote %s", ", ".join(map(str, files)) if len(files) < 4 else
                f"{len(files) - 1} shards and {files[-1]}")
    return files


def _refuse_unstorable(matches: list[Match], min_confidence: float) -> None:
    """What a safetensors file cannot hold, refused before anything is written.

    Raises
    ------
    PlanError
        If a destination key is the reserved ``__metadata__``, or there is nothing to write.
    """
    if any(_RESERVED_KEY in m.dst for m in matches):
        raise PlanError(f"the plan writes a tensor named {_RESERVED_KEY!r}, the name safetensors "
                        "keeps for its header: the file could not be read back. Rename that "
                        "destination key (or drop its match) first")
    if not matches:
        raise PlanError(f"no match of the plan reaches min_confidence {min_confidence}: there "
                        "is nothing to write (a checkpoint without tensors cannot be read back)")


def _checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoint files a folder holds: what `archalign.checkpoint` would read there."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (
        p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json")))


def _write_all(matches: list[Match], source: TensorSource, staging: Path, folder: Path,
               max_shard_bytes: int) -> list[str]:
    """Write every shard (and the index) into ``staging`` (inside ``folder``, the output folder
    that write errors name); returns their names, index last."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    size = 0
    written: list[list[str]] = []  # the keys of each shard written, as staging/part-k

    def flush() -> None:
        part = staging / f"part-{len(written) + 1:05d}.safetensors"
        _save(save_file, shard, part, str(folder), f"shard {len(written) + 1}")
        written.append(list(shard))
        shard.clear()

    with source.reading():  # a lazy source keeps its file open between tensors
        for match in matches:
            try:
                values = apply_ops([source.get(k) for k in match.src], match.ops)
            except Exception as exc:
                raise ApplyError(f"computing {', '.join(map(repr, match.dst))} from "
                                 f"{', '.join(map(repr, match.src))} failed: {exc}; nothing "
                                 "was written") from exc
            for key, value in zip(match.dst, values):
                nbytes = value.numel() * value.element_size()
                if shard and size + nbytes > max_shard_bytes:
                    flush()
                    size = 0
                value = value.detach().contiguous()
                if any(value.data_ptr() == v.data_ptr() for v in shard.values() if v.numel()):
                    value = value.clone()  # one source tensor written twice: its own copy
                shard[key] = value
                size += nbytes
    if not written:
        _save(save_file, shard, staging / "model.safetensors", str(folder / "model.safetensors"),
              "the checkpoint")
        return ["model.safetensors"]
    flush()
    total = len(written)
    names: list[str] = []
    weight_map: dict[str, str] = {}
    for n, keys in enumerate(written, start=1):
        name = f"model-{n:05d}-of-{total:05d}.safetensors"
        (staging / f"part-{n:05d}.safetensors").replace(staging / name)
        names.append(name)
        weight_map.update(dict.fromkeys(keys, name))
    index = "model.safetensors.index.json"
    total_size = sum((staging / name).stat().st_size for name in names)
    text = json.dumps({"metadata": {"total_size": total_size},
                       "weight_map": dict(sorted(weight_map.items()))}, indent=1) + "\n"
    try:
        (staging / index).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(folder / index)) from exc
    return [*names, index]


def _save(save_file: Callable[..., None], tensors: dict[str, torch.Tensor], path: Path,
          shown: str, what: str) -> None:
    """``save_file``, whose write errors (a `SafetensorError` naming no file) become an
    `OSError` naming ``shown`` (the output file, or the output folder for a shard, whose final
    name is known only at the end), with the system's error number when it gives one.
    """
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror} (writing {what})", shown) from exc
    except Exception as exc:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, f"{os.strerror(code)} (writing {what}, {len(tensors)} tensors: {exc})",
                      shown) from exc


def _move_in(staging: Path, folder: Path, names: list[str], old: list[Path]) -> None:
    """Replace the old checkpoint files by the new ones (see `convert_checkpoint`'s
    ``overwrite`` for why in this order)."""
    for path in old:
        if path.name.endswith(".index.json"):
            path.unlink()
    for path in old:
        if not path.name.endswith(".index.json") and path.name not in names:
            path.unlink()
    for name in names:  # the index last
        (staging / name).replace(folder / name)
