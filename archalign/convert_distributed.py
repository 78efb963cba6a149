"""`convert_checkpoint` spread over the ranks of a ``torch.distributed`` process group.

Every rank reads the same plan and source and computes the same shard layout from the plan alone
(`shard_layout`: destination shapes and source dtypes, packed as `archalign.convert` packs them, so
the files are byte for byte those of a one-process conversion). The shards are then split into
contiguous ranges of about equal size, one per rank (`assign_shards`); each rank computes only
the matches its shards hold, reads only their source tensors, and writes its shards into one
hidden staging folder inside the output folder. Once every rank has reported success (gathered
on every rank), rank 0 writes the index and moves the files into place as one set, as
`write_safetensors` does; then every rank returns the same list of files.

All or nothing, across processes: when any rank fails (an error, Ctrl-C, SIGTERM from
``torchrun`` after another rank died, a dead peer that breaks the collective), every surviving
rank removes the staging folder, no index is written, and an earlier checkpoint in the folder is
intact. Without a process group (or with one rank) it runs the same way in one process.

Launch: ``torchrun --nproc-per-node N -m archalign convert SRC PLAN -o OUT --distributed`` (the
gloo backend works on CPU), or call `convert_distributed` on every rank of a group.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .confidence import DEFAULT_MIN_CONFIDENCE
from .convert import (
    DEFAULT_SHARD_BYTES,
    INDEX_NAME,
    SINGLE_NAME,
    Progress,
    ShardTensors,
    ShardWriter,
    _check_folder,
    _checkpoint_files,
    _converted,
    _index_text,
    _move_in,
    _prepared,
)
from .errors import ApplyError
from .interrupts import interrupts_kept, sigint_deferred
from .plan import Match, Plan
from .source import TensorSource

__all__ = ["Shard", "assign_shards", "convert_distributed", "shard_layout"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One output file of a conversion, planned before any tensor is computed."""

    name: str  # its file name: model.safetensors, or model-0000k-of-0000n.safetensors
    keys: tuple[str, ...]  # the destination keys it holds, in the order they are computed
    nbytes: int  # the bytes of its tensors


def shard_layout(matches: Sequence[Match], source: TensorSource,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Shard]:
    """The files a conversion of ``matches`` writes, as `archalign.convert.write_safetensors`
    packs them: destination tensors in plan order, a new shard when the next one would make the
    current shard exceed ``max_shard_bytes``. A tensor's size is its destination shape times the
    size of its source dtype (the promoted dtype of several sources); the conversion checks it."""
    shards: list[list[tuple[str, int]]] = [[]]
    size = 0
    for match in matches:
        dtype = _dtype(match, source)
        for key, shape in zip(match.dst, match.dst_shapes):
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, nbytes))
            size += nbytes
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)]
    return [Shard(name, tuple(k for k, _ in shard), sum(b for _, b in shard))
            for name, shard in zip(names, shards)]


def assign_shards(shards: Sequence[Shard], world_size: int) -> list[list[Shard]]:
    """Contiguous ranges of ``shards``, one per rank, of about equal bytes: a shard goes to the
    rank whose equal share of the bytes holds the shard's middle (with fewer shards than ranks,
    some get none). Neighbouring shards read neighbouring source tensors."""
    total = sum(s.nbytes for s in shards) or 1
    ranges: list[list[Shard]] = [[] for _ in range(world_size)]
    before = 0
    for shard in shards:
        middle = before + shard.nbytes / 2  # the rank whose share holds the shard's middle
        ranges[min(world_size - 1, int(middle * world_size / total))].append(shard)
        before += shard.nbytes
    return ranges


def convert_distributed(plan: Plan, src: Any, out: str | os.PathLike[str], *,
                        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                        writers: int = 1, progress: Progress | None = None,
                        process_group: Any = None) -> list[Path]:
    """`archalign.convert.convert_checkpoint`, with the shards written by every rank of
    ``process_group`` (the default group when None; one process when torch.distributed is not
    initialised). Call it on every rank with the same arguments.

    Parameters
    ----------
    plan, src, out, min_confidence, max_shard_bytes, overwrite
        As for `convert_checkpoint`; ``out`` must be a folder every rank sees (one machine, or
        a shared file system).
    writers : int
        How many of its shards each rank writes at once (threads; see
        `archalign.convert.write_safetensors`). One by default: the ranks are the parallelism.
    progress : callable, optional
        Called as ``progress(converted, total)`` after each tensor this rank computes.
    process_group : ProcessGroup, optional
        The ranks to spread the conversion over.

    Returns
    -------
    list of Path
        The files written (the index last, when there is one), on every rank.

    Raises
    ------
    PlanError, UsageError
        As `convert_checkpoint` (every rank checks the plan before anything is written).
    ApplyError
        If a tensor cannot be computed or has another size than planned, or another rank failed
        (the message names it and says why); nothing is then left in ``out``.
    OSError
        If a file cannot be written, naming it; nothing new is then left in ``out``.
    KeyboardInterrupt
        On Ctrl-C, or SIGTERM (``torchrun`` stopping the other ranks after one failed); nothing
        new is then left in ``out``.
    """
    group = _Group(process_group)
    staging: Path | None = None
    created = False
    try:
        with interrupts_kept(), _sigterm_raises():
            try:
                matches, source, folder = _prepared(
                    plan, src, out, min_confidence=min_confidence,
                    max_shard_bytes=max_shard_bytes, overwrite=overwrite, writers=writers)
                layout = shard_layout(matches, source, max_shard_bytes)
                mine = assign_shards(layout, group.size)[group.rank]
                if group.rank == 0:
                    _check_folder(folder.parent)
                    created = not folder.exists()
                    folder.mkdir(exist_ok=True)
                    staging = Path(tempfile.mkdtemp(prefix=".archalign-partial-", dir=folder))
            except BaseException as exc:
                group.tell(exc)
                raise
            told = group.agree((str(staging), created) if group.rank == 0 else None)
            staging, created = Path(told[0]), bool(told[1])
            try:
                _write_shards(mine, matches, source, staging, folder, progress, writers)
            except BaseException as exc:
                group.tell(exc)
                raise
            group.agree()
            try:
                if group.rank == 0:
                    names = [s.name for s in layout]
                    if len(layout) > 1:
                        weight_map = {k: s.name for s in layout for k in s.keys}
                        total = sum((staging / name).stat().st_size for name in names)
                        _write_index(staging / INDEX_NAME, _index_text(weight_map, total),
                                     folder / INDEX_NAME)
                        names.append(INDEX_NAME)
                    old = _checkpoint_files(folder)
                    with sigint_deferred():  # a few renames: a Ctrl-C waits for them
                        _move_in(staging, folder, names, old)
            except BaseException as exc:
                group.tell(exc)
                raise
            group.agree()
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            if created:  # nothing of ours was there before
                shutil.rmtree(staging.parent, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    files = [folder / s.name for s in layout] + ([folder / INDEX_NAME] if len(layout) > 1 else [])
    if group.rank == 0:
        logger.info("%d ranks wrote %s", group.size,
                    ", ".join(map(str, files)) if len(files) < 4
                    else f"{len(files) - 1} shards and {files[-1]}")
    return files


def _write_shards(mine: Sequence[Shard], matches: Sequence[Match], source: TensorSource,
                  staging: Path, folder: Path, progress: Progress | None, writers: int
                  ) -> None:
    """Compute the tensors of this rank's shards (only the matches they hold) and write each
    shard into ``staging`` under its final name once it is complete.

    Raises
    ------
    ApplyError
        If a tensor cannot be computed, or its size differs from the layout's.
    """
    if not mine:
        return
    shard_of = {key: n for n, shard in enumerate(mine) for key in shard.keys}
    needed = [m for m in matches if any(k in shard_of for k in m.dst)]
    planned = {key: math.prod(shape) * _dtype(m, source).itemsize for m in needed
               for key, shape in zip(m.dst, m.dst_shapes)}
    open_shards: dict[int, ShardTensors] = {}
    with ShardWriter(writers) as writer:
        for key, value in _converted(needed, source, progress):
            n = shard_of.get(key)
            if n is None:  # a piece of a split whose other pieces another rank writes
                continue
            if value.numel() * value.element_size() != planned[key]:
                raise ApplyError(f"{key!r} came out with {value.numel() * value.element_size()} "
                                 f"bytes ({value.dtype}), not the planned {planned[key]}: "
                                 "nothing was written")
            shard = open_shards.setdefault(n, ShardTensors())
            shard.add(key, value)
            if len(shard.tensors) == len(mine[n].keys):
                name = mine[n].name
                writer.write(shard.tensors, staging / name, {"format": "pt"},
                             str(folder if name != SINGLE_NAME else folder / name),
                             "the checkpoint" if name == SINGLE_NAME else f"shard {name}")
                del open_shards[n]


def _write_index(path: Path, text: str, shown: Path) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(shown)) from exc


def _dtype(match: Match, source: TensorSource) -> torch.dtype:
    """The dtype the destination tensors of ``match`` come out with: the source's (promoted)."""
    dtypes = [source.specs[k].dtype for k in match.src]
    out = dtypes[0]
    for dtype in dtypes[1:]:
        out = torch.promote_types(out, dtype)
    return out


class _Group:
    """The ranks of a conversion, and how they agree that every one of them succeeded."""

    def __init__(self, process_group: Any) -> None:
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.group = process_group
        self.rank = self.dist.get_rank(process_group) if self.dist else 0
        self.size = self.dist.get_world_size(process_group) if self.dist else 1

    def agree(self, payload: Any = None) -> Any:
        """Wait until every rank has succeeded so far (or failed: `tell`); rank 0's ``payload``.

        Raises
        ------
        ApplyError
            On a rank that did not fail itself, when another one did (its rank and reason).
        """
        if self.dist is None or self.size == 1:
            return payload
        gathered = self._gather((None, payload))
        failed = [(r, why) for r, (why, _) in enumerate(gathered) if why is not None]
        if failed:
            rank, why = failed[0]
            raise ApplyError(f"rank {rank} of {self.size} failed ({why}); nothing was written")
        return gathered[0][1]

    def tell(self, failure: BaseException) -> None:
        """Tell the other ranks that this one failed (their `agree` raises); a broken group
        (a dead peer) is not this rank's error to report: ``failure`` is."""
        if self.dist is None or self.size == 1:
            return
        with contextlib.suppress(Exception):
            self._gather((f"{type(failure).__name__}: {failure}", None))

    def _gather(self, item: tuple[str | None, Any]) -> list[Any]:
        assert self.dist is not None
        gathered: list[Any] = [None] * self.size
        self.dist.all_gather_object(gathered, item, group=self.group)
        return gathered


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM (what ``torchrun`` sends the other ranks when one fails) raises
    `KeyboardInterrupt`, so that the staging folder is removed; on the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
