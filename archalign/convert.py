"""Write a converted checkpoint straight to (sharded) safetensors, without building the model.

The plan knows every destination key and shape; the source is read one tensor at a time (a
``.safetensors`` or sharded source is lazy), so peak memory is about one output shard.

`write_safetensors` is archalign's one writer of safetensors files: `convert_checkpoint` and
`archalign.outputs` (a loaded model saved as a Hugging Face folder or a file) both write
through it. Each file is written under a temporary name in its own folder and renamed when the
whole checkpoint is written, so that a failure (a full disk, a file-size limit, a read-only
folder, Ctrl-C) leaves no partial file and names the real file in an `OSError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
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

__all__ = ["DEFAULT_SHARD_BYTES", "convert_checkpoint", "write_safetensors",
           "write_safetensors_file"]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 * 1024**3  # a checkpoint larger than this is written as shards
INDEX_NAME = "model.safetensors.index.json"  # the Hugging Face names of a (sharded) checkpoint
SINGLE_NAME = "model.safetensors"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

Progress = Callable[[int, int], None]  # called as progress(written, total) after each tensor


def convert_checkpoint(plan: Plan, src: Any, out: str | os.PathLike[str], *,
                       min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       progress: Progress | None = None) -> list[Path]:
    """Convert ``src`` with ``plan`` into safetensors files under ``out``.

    One file (``model.safetensors``) when everything fits in ``max_shard_bytes``; otherwise
    ``model-0000k-of-0000n.safetensors`` shards and a Hugging Face
    ``model.safetensors.index.json`` (see `write_safetensors`). Only matches at or above
    ``min_confidence`` are written; destination keys the plan does not load are absent (load with
    ``strict=False``). Tied destination tensors are written once, under their primary key, as
    Hugging Face writes them: a folder that also holds the destination's ``config.json`` loads
    with ``from_pretrained`` (which ties them again).

    Parameters
    ----------
    progress : callable, optional
        Called as ``progress(converted, total)`` after each destination tensor is computed.

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
    OSError
        If the files cannot be written (naming the file; nothing partial is left behind).
    """
    if max_shard_bytes <= 0:
        raise UsageError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    source = read_source(src, role="source")
    matches, _ = split_by_confidence(plan.matches, min_confidence)
    check_plan(dataclasses.replace(plan, matches=tuple(matches), mismatches=()), source, None)
    refuse_unwritable(matches, (), source, None)
    total = sum(len(m.dst) for m in matches)

    def tensors() -> Iterable[tuple[str, torch.Tensor]]:
        done = 0
        with source.reading():  # a lazy source keeps its file open between tensors
            for match in matches:
                values = apply_ops([source.get(k) for k in match.src], match.ops)
                for key, value in zip(match.dst, values):
                    yield key, value
                    done += 1
                    if progress is not None:
                        progress(done, total)

    return write_safetensors(tensors(), out, max_shard_bytes=max_shard_bytes)


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out: str | os.PathLike[str],
                      *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write named tensors into the folder ``out`` as a Hugging Face checkpoint.

    ``model.safetensors`` when they fit in ``max_shard_bytes``, otherwise shards
    ``model-0000k-of-0000n.safetensors`` of at most that size (a larger tensor gets a shard of
    its own) and ``model.safetensors.index.json``. Tensors are taken one at a time: at most one
    shard is held in memory. The folder is created if its parent exists. Files of an earlier
    checkpoint in the folder (other shards, an index) are removed once the new one is complete,
    so that reading the folder never mixes two checkpoints.

    Parameters
    ----------
    tensors : iterable of (str, Tensor)
        Key and value of each tensor, in the order to write them.
    out : str or os.PathLike
        The folder.
    max_shard_bytes : int
        The size of a shard.
    metadata : mapping of str to str, optional
        Stored in every file's header (``{"format": "pt"}`` is always there).

    Returns
    -------
    list of Path
        The files written (the index last, when there is one).

    Raises
    ------
    OSError
        If the folder's parent does not exist, ``out`` is a file, or a file cannot be written
        (read-only folder, full disk, file-size limit): the error names the file, and no file of
        this checkpoint is left behind (temporary files are removed).
    """
    folder = Path(out)
    _check_folder(folder.parent)
    if folder.exists() and not folder.is_dir():
        raise OSError(errno.ENOTDIR, "the output folder is a file", str(folder))
    meta = {"format": "pt", **(metadata or {})}
    temporary: list[Path] = []  # written, not yet renamed
    created = not folder.exists()
    try:
        folder.mkdir(exist_ok=True)
        shards: list[list[str]] = []  # the keys of each shard written
        shard: dict[str, torch.Tensor] = {}
        size = 0
        for key, value in tensors:
            nbytes = value.numel() * value.element_size()
            if shard and size + nbytes > max_shard_bytes:
                temporary.append(_write_shard(shard, folder / _temporary_name(len(shards)),
                                              meta, folder))
                shards.append(list(shard))
                shard, size = {}, 0
            shard[key] = value.detach().contiguous()
            size += nbytes
        temporary.append(_write_shard(shard, folder / _temporary_name(len(shards)), meta,
                                      folder if shards else folder / SINGLE_NAME))
        shards.append(list(shard))
        del shard
        names = ([SINGLE_NAME] if len(shards) == 1 else
                 [f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                  for n in range(1, len(shards) + 1)])
        final = [folder / name for name in names]
        for temp, target in zip(temporary, final):
            _rename(temp, target)
        temporary.clear()
        if len(shards) > 1:
            weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
            index = {"metadata": {"total_size": sum(p.stat().st_size for p in final)},
                     "weight_map": dict(sorted(weight_map.items()))}
            final.append(_write_text(folder / INDEX_NAME,
                                     json.dumps(index, indent=1) + "\n"))
    except BaseException:
        for temp in temporary:
            temp.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if it is still empty
        raise
    _remove_stale(folder, {p.name for p in final})
    logger.info("wrote %s (%d files)", folder, len(final))
    return final


def write_safetensors_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *,
                           metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` into one safetensors file at ``path`` (replaced as a whole, or not at all).

    Raises
    ------
    OSError
        If the folder of ``path`` does not exist, or the file cannot be written (naming it).
    """
    target = Path(path)
    _check_folder(target.parent)
    temp = target.with_name(f".{target.name}.archalign-partial")
    try:
        _write_shard({k: v.detach().contiguous() for k, v in tensors.items()}, temp,
                     {"format": "pt", **(metadata or {})}, target)
        _rename(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


# ------------------------------------------------------------------------------- file system

def _temporary_name(number: int) -> str:
    return f".archalign-shard-{number + 1:05d}.safetensors"


def _check_folder(folder: Path) -> None:
    """Refuse a folder that does not exist (or is a file) before anything is computed."""
    if not folder.is_dir():
        reason = "is a file, not a folder" if folder.exists() else "does not exist"
        raise OSError(errno.ENOENT if not folder.exists() else errno.ENOTDIR,
                      f"the output folder {reason}", str(folder))


def _write_shard(shard: dict[str, torch.Tensor], path: Path, metadata: dict[str, str],
                 named: Path) -> Path:
    """Write one file at ``path``; a failure raises an `OSError` naming ``named`` (the file or
    folder the user asked for, not the temporary file)."""
    from safetensors.torch import save_file

    try:
        save_file(shard, str(path), metadata=metadata)
    except Exception as exc:
        raise _write_error(exc, named) from exc
    return path


def _write_text(path: Path, text: str) -> Path:
    temp = path.with_name(f".{path.name}.archalign-partial")
    try:
        temp.write_text(text, encoding="utf-8")
        _rename(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise _write_error(exc, path) from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def _rename(temp: Path, target: Path) -> None:
    """Give ``temp`` its final name, with the permissions a new file gets (safetensors writes
    through a private temporary file, readable by its owner only)."""
    try:
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, target)
    except OSError as exc:
        raise _write_error(exc, target) from exc


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(exc: Exception, path: Path) -> OSError:
    """An `OSError` naming ``path`` with the system's reason, as Python's own I/O errors do
    (``[Errno 27] File too large: 'out/model.safetensors'``); safetensors reports I/O errors as
    ``SafetensorError`` text, which holds the number."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    reason = os.strerror(code) if code else (str(exc).splitlines() or [repr(exc)])[0]
    return OSError(code or errno.EIO, reason, str(path))


def _remove_stale(folder: Path, written: set[str]) -> None:
    """Remove the files of an earlier checkpoint in ``folder`` (shards, index, single file)."""
    for path in folder.iterdir():
        name = path.name
        if name in written or not path.is_file():
            continue
        if name in (SINGLE_NAME, INDEX_NAME) or _SHARD_NAME.fullmatch(name):
            logger.info("removing %s of an earlier checkpoint", path)
            path.unlink(missing_ok=True)
