"""Write a converted checkpoint straight to (sharded) safetensors, without building the model.

The plan knows every destination key and shape; the source is read one tensor at a time (a
``.safetensors`` or sharded source is lazy), so peak memory is about ``writers + 1`` output shards:
the one being filled, and those the writer threads are writing (`DEFAULT_WRITERS`).

`write_safetensors` is archalign's one writer of safetensors checkpoints: `convert_checkpoint`
and `archalign.outputs` (a loaded model saved as a Hugging Face folder or a file) both write
through it. All or nothing: every file is written into a hidden staging folder inside the output
folder (``.archalign-partial-*``, removed on any failure, Ctrl-C included) and moved into place
only when all of them are complete, replacing the files of an earlier checkpoint as a set, so
that no later read returns a stale index or stale shards. A failure (a full disk, a file-size
limit, a read-only folder) names the real file in an `OSError`.
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
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
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

__all__ = ["DEFAULT_SHARD_BYTES", "DEFAULT_WRITERS", "convert_checkpoint", "write_safetensors",
           "write_safetensors_file"]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 * 1024**3  # a checkpoint larger than this is written as shards
DEFAULT_WRITERS = 2  # shards one process writes at once: safetensors writes without the GIL, so
# two threads keep two cores busy (the files of a conversion come out about twice as fast on two
# cores); each shard being written stays in memory until its file is complete
INDEX_NAME = "model.safetensors.index.json"  # the Hugging Face names of a (sharded) checkpoint
SINGLE_NAME = "model.safetensors"
_RESERVED_KEY = "__metadata__"  # the safetensors header's own entry: no tensor may be named so

Progress = Callable[[int, int], None]  # called as progress(written, total) after each tensor


def convert_checkpoint(plan: Plan, src: Any, out: str | os.PathLike[str], *,
                       min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                       writers: int = DEFAULT_WRITERS, progress: Progress | None = None
                       ) -> list[Path]:
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
    overwrite : bool
        Whether to replace the checkpoint ``out`` already holds (any ``*.safetensors`` file or
        ``*.safetensors.index.json``; other files, such as ``config.json``, are kept; see
        `write_safetensors` for the order in which they are replaced).
    writers : int
        How many shards are written at once, each by its own thread (see `write_safetensors`).
    progress : callable, optional
        Called as ``progress(converted, total)`` after each destination tensor is computed.

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
        If ``max_shard_bytes`` or ``writers`` is not positive, ``min_confidence`` lies outside
        [0, 1], or ``out`` holds a checkpoint already and ``overwrite`` is False.
    OSError
        If a file cannot be written (full disk, read-only folder, file-size limit), naming the
        output file; nothing new is then left in ``out``, and the checkpoint it held is intact.
    KeyboardInterrupt
        On Ctrl-C while writing: as for an `OSError`. One during the final renames waits for
        them to end.
    """
    with interrupts_kept():
        matches, source, folder = _prepared(plan, src, out, min_confidence=min_confidence,
                                            max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                                            writers=writers)
        return write_safetensors(_converted(matches, source, progress), folder,
                                 max_shard_bytes=max_shard_bytes, writers=writers)


def _prepared(plan: Plan, src: Any, out: str | os.PathLike[str], *, min_confidence: float,
              max_shard_bytes: int, overwrite: bool, writers: int
              ) -> tuple[list[Match], TensorSource, Path]:
    """The matches to write, the source and the output folder, once every check before a write
    has passed (see `convert_checkpoint` for what raises); creates the folder's parent."""
    if max_shard_bytes <= 0:
        raise UsageError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    _check_writers(writers)
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
    folder.parent.mkdir(parents=True, exist_ok=True)
    return matches, source, folder


def _converted(matches: list[Match], source: TensorSource, progress: Progress | None
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Each destination tensor, computed from the source one match at a time."""
    total = sum(len(m.dst) for m in matches)
    done = 0
    with source.reading():  # a lazy source keeps its file open between tensors
        for match in matches:
            try:
                values = apply_ops([source.get(k) for k in match.src], match.ops)
            except Exception as exc:
                raise ApplyError(f"computing {', '.join(map(repr, match.dst))} from "
                                 f"{', '.join(map(repr, match.src))} failed: {exc}; nothing "
                                 "was written") from exc
            for key, value in zip(match.dst, values):
                yield key, value
                done += 1
                if progress is not None:
                    progress(done, total)


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


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out: str | os.PathLike[str],
                      *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      metadata: Mapping[str, str] | None = None,
                      writers: int = DEFAULT_WRITERS) -> list[Path]:
    """Write named tensors into the folder ``out`` as a Hugging Face checkpoint.

    ``model.safetensors`` when they fit in ``max_shard_bytes``, otherwise shards
    ``model-0000k-of-0000n.safetensors`` of at most that size (a larger tensor gets a shard of
    its own) and ``model.safetensors.index.json``. Tensors are taken one at a time, and each
    complete shard is written by one of ``writers`` threads while the next one fills: at most
    ``writers + 1`` shards are held in memory (tensors taken from a model are references, not
    copies). The folder is created if its parent exists. The files of an
    earlier checkpoint in the folder are replaced once the new ones are complete: the old
    indexes are removed, then the old safetensors files, and the new files are moved in, the
    index last, so that a reader (`archalign.checkpoint`) finds at every moment either a whole
    checkpoint, old or new, or a folder it refuses (several files without an index, or a lone
    shard). Other files (``config.json``) are kept.

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
    writers : int
        How many shards are written at once (1: one after the other, in this thread).

    Returns
    -------
    list of Path
        The files written (the index last, when there is one).

    Raises
    ------
    OSError
        If the folder's parent does not exist, ``out`` is a file, or a file cannot be written
        (read-only folder, full disk, file-size limit): the error names the file, nothing new
        is left behind, and an earlier checkpoint there is intact.
    UsageError
        If ``writers`` is not positive.
    """
    _check_writers(writers)
    folder = Path(out)
    _check_folder(folder.parent)
    if folder.exists() and not folder.is_dir():
        raise OSError(errno.ENOTDIR, "the output folder is a file", str(folder))
    meta = {"format": "pt", **(metadata or {})}
    old = _checkpoint_files(folder)
    created = not folder.exists()
    try:
        folder.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".archalign-partial-", dir=folder))
    except OSError as exc:  # name the folder asked for, not the staging folder
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise OSError(exc.errno, exc.strerror, str(folder)) from exc
    try:
        names = _write_all(tensors, staging, folder, max_shard_bytes, meta, writers)
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
        _save({k: v.detach().contiguous() for k, v in tensors.items()}, temp,
              {"format": "pt", **(metadata or {})}, str(target), "the file")
        _rename(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


# ------------------------------------------------------------------------------- file system

def _checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoint files a folder holds: what `archalign.checkpoint` would read there."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (
        p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json")))


def _check_folder(folder: Path) -> None:
    """Refuse a folder that does not exist (or is a file) before anything is computed."""
    if not folder.is_dir():
        reason = "is a file, not a folder" if folder.exists() else "does not exist"
        raise OSError(errno.ENOENT if not folder.exists() else errno.ENOTDIR,
                      f"the output folder {reason}", str(folder))


def _write_all(tensors: Iterable[tuple[str, torch.Tensor]], staging: Path, folder: Path,
               max_shard_bytes: int, metadata: dict[str, str], writers: int) -> list[str]:
    """Write every shard (and the index) into ``staging`` (inside ``folder``, the output folder
    that write errors name); returns their names, index last."""
    shard = ShardTensors()
    written: list[list[str]] = []  # the keys of each shard written, as staging/part-k
    with ShardWriter(writers) as writer:

        def hand_over() -> None:
            part = staging / f"part-{len(written) + 1:05d}.safetensors"
            writer.write(shard.tensors, part, metadata, str(folder), f"shard {len(written) + 1}")
            written.append(list(shard.tensors))

        for key, value in tensors:
            nbytes = value.numel() * value.element_size()
            if shard.tensors and shard.nbytes + nbytes > max_shard_bytes:
                hand_over()
                shard = ShardTensors()
            shard.add(key, value)
        if not written:
            writer.write(shard.tensors, staging / SINGLE_NAME, metadata,
                         str(folder / SINGLE_NAME), "the checkpoint")
            return [SINGLE_NAME]
        hand_over()
    total = len(written)
    names: list[str] = []
    weight_map: dict[str, str] = {}
    for n, keys in enumerate(written, start=1):
        name = f"model-{n:05d}-of-{total:05d}.safetensors"
        (staging / f"part-{n:05d}.safetensors").replace(staging / name)
        names.append(name)
        weight_map.update(dict.fromkeys(keys, name))
    text = _index_text(weight_map, sum((staging / name).stat().st_size for name in names))
    try:
        (staging / INDEX_NAME).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(folder / INDEX_NAME)) from exc
    return [*names, INDEX_NAME]


class ShardTensors:
    """The tensors of one shard as it fills: contiguous, and each its own storage."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}  # key -> tensor, in the order written
        self.nbytes = 0  # their size
        self._starts: set[int] = set()  # the data pointers held (a tensor twice needs a copy)

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().contiguous()
        if value.numel() and value.data_ptr() in self._starts:
            value = value.clone()  # one source tensor written twice: its own copy
        if value.numel():
            self._starts.add(value.data_ptr())
        self.tensors[key] = value
        self.nbytes += value.numel() * value.element_size()


class ShardWriter:
    """Complete shards written by up to ``writers`` threads (`_save` each), in a ``with`` block.

    `write` returns once the shard is handed over; it waits first while ``writers`` shards are
    still being written, so that at most that many are held besides the one filling. A write
    that failed raises at the next `write` or at the end of the block; leaving the block by an
    exception cancels the shards not started and waits for those being written (their files
    lie in a staging folder, removed by the caller).
    """

    def __init__(self, writers: int) -> None:  # checked by the caller (`_check_writers`)
        self._limit = writers  # shards handed over and not yet written, at most
        self._pool = (ThreadPoolExecutor(writers, thread_name_prefix="archalign-writer")
                      if writers > 1 else None)
        self._pending: deque[Future[None]] = deque()  # the shards handed over, oldest first

    def __enter__(self) -> ShardWriter:
        return self

    def write(self, tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str],
              shown: str, what: str) -> None:
        """Write ``tensors`` into ``path`` (as `_save`), now or in a writer thread."""
        if self._pool is None:
            _save(tensors, path, metadata, shown, what)
            return
        while self._pending and (self._pending[0].done() or len(self._pending) >= self._limit):
            self._pending.popleft().result()  # raises the failure of that shard's write
        self._pending.append(self._pool.submit(_save, tensors, path, metadata, shown, what))

    def __exit__(self, kind: Any, _value: Any, _traceback: Any) -> None:
        if self._pool is None:
            return
        try:
            if kind is None:
                while self._pending:
                    self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _check_writers(writers: int) -> None:
    if not isinstance(writers, int) or isinstance(writers, bool) or writers < 1:
        raise UsageError(f"writers must be a positive number of threads, got {writers!r}")


def _index_text(weight_map: Mapping[str, str], total_size: int) -> str:
    """The Hugging Face index of a sharded checkpoint: which shard holds each key."""
    return json.dumps({"metadata": {"total_size": total_size},
                       "weight_map": dict(sorted(weight_map.items()))}, indent=1) + "\n"


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], shown: str,
          what: str) -> None:
    """``save_file``, whose write errors (a `SafetensorError` naming no file) become an
    `OSError` naming ``shown`` (the output file, or the output folder for a shard, whose final
    name is known only at the end), with the system's error number when it gives one.
    """
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError as exc:
        raise OSError(exc.errno, _reason(str(exc.strerror or exc), what), shown) from exc
    except Exception as exc:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, _reason(os.strerror(code), what), shown) from exc


def _reason(reason: str, what: str) -> str:
    """The system's reason, and which shard it hit when the error names the folder."""
    return f"{reason} (writing {what})" if what.startswith("shard") else reason


def _rename(temp: Path, target: Path) -> None:
    """Give ``temp`` its final name, with the permissions a new file gets (safetensors writes
    through a private temporary file, readable by its owner only)."""
    try:
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, target)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(target)) from exc


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _move_in(staging: Path, folder: Path, names: list[str], old: list[Path]) -> None:
    """Replace the old checkpoint files by the new ones (see `write_safetensors` for why in
    this order), with the permissions a new file gets."""
    for path in old:
        if path.name.endswith(".index.json"):
            path.unlink()
    for path in old:
        if not path.name.endswith(".index.json") and path.name not in names:
            path.unlink()
    for name in names:  # the index last
        _rename(staging / name, folder / name)
