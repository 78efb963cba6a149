"""Apply a plan while loading a ``torch.distributed.checkpoint`` (DCP) directory.

Each rank reads, through DCP's own planner, only the source tensors its plan loads, into buffers
of the source's shapes; the plan is then applied from those buffers by `archalign.apply`, the one
writer, with every check it runs (keys, shapes, adaptations, dtypes, NaN/Inf) and its
all-or-nothing guarantee. The buffers cost one copy of the tensors a rank loads.

No code from the folder runs. DCP keeps its ``.metadata`` as a pickle, which torch's own reader
unpickles whole (a planted ``__reduce__`` would run); archalign reads it with `read_dcp_metadata`,
an unpickler that builds only the plain records DCP metadata is made of (`_METADATA_GLOBALS`:
its dataclasses, ``torch.Size``, dtypes, layouts, paths) and refuses any other global, then checks
what it built (types, sizes, that every data file lies inside the folder). Only tensors are read
(never DCP's pickled "bytes" entries, which torch reads with ``weights_only=False``), each through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import pickletools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .apply import apply_plan, split_by_confidence
from .checkpoint import inside_folder
from .confidence import DEFAULT_MIN_CONFIDENCE
from .errors import PlanError, SourceError
from .plan import Plan
from .report import LoadReport, Skipped
from .source import read_destination

__all__ = ["load_distributed_checkpoint", "read_dcp_metadata"]

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
    SourceError
        If the folder's ``.metadata`` is not DCP metadata (`read_dcp_metadata`), a tensor the
        plan reads is not stored as a tensor there, or DCP cannot read the tensors (its
        ``CheckpointException``, a ``BaseException``, comes back as this; ``dst`` is then
        unchanged).
    KeyboardInterrupt
        On Ctrl-C, also inside DCP (which wraps it in a ``CheckpointException``).
    UsageError
        If ``min_confidence`` is outside [0, 1].
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    matches, skipped = split_by_confidence(plan.matches, min_confidence)
    skipped += [Skipped(d, ", ".join(mm.src), mm.reason) for mm in plan.mismatches for d in mm.dst]
    reader = _safe_reader(checkpoint_id)
    metadata = reader.read_metadata().state_dict_metadata
    target = read_destination(dst)
    buffers: dict[str, torch.Tensor] = {}
    problems = []
    for match in matches:
        like = target.get(match.dst[0])
        for key, shape in zip(match.src, match.src_shapes):
            meta = metadata.get(key)
            if meta is not None and not isinstance(meta, _tensor_metadata()):
                raise SourceError(f"the checkpoint {str(checkpoint_id)!r} stores {key!r} as "
                                  "pickled bytes, not as a tensor; archalign reads only tensors "
                                  "(pickled bytes could run code)")
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
    try:  # into the buffers only: dst is not touched yet
        dcp.load(buffers, storage_reader=reader, planner=_tensors_only_planner(),
                 process_group=process_group)
    except SourceError:
        raise
    except (Exception, CheckpointException) as exc:  # the latter wraps each rank's failure
        inner = [f[0] if isinstance(f, tuple) else f
                 for f in getattr(exc, "failures", {}).values()]
        for failure in inner:  # a Ctrl-C, or archalign's own refusal, on some rank
            if isinstance(failure, (KeyboardInterrupt, SourceError)):
                raise failure from exc
        raise SourceError(f"cannot read the tensors of the DCP checkpoint {str(checkpoint_id)!r}: "
                          f"{type(exc).__name__}: {inner[0] if inner else exc!s:.500}") from exc
    to_load = dataclasses.replace(plan, matches=tuple(matches), mismatches=())
    report = apply_plan(to_load, dst, buffers, min_confidence=0.0)
    return dataclasses.replace(report, skipped=tuple(skipped), unexpected=unused)


def read_dcp_metadata(folder: str | os.PathLike[str], *, rank: int | None = None) -> Any:
    """The ``Metadata`` of the DCP folder ``folder``, read without unpickling code.

    Parameters
    ----------
    folder : path
        A ``torch.distributed.checkpoint`` folder (written by ``dcp.save``).
    rank : int, optional
        Read ``__<rank>.metadata`` instead of ``.metadata`` (what DCP's reader takes).

    Returns
    -------
    torch.distributed.checkpoint.metadata.Metadata

    Raises
    ------
    SourceError
        If the file is missing, is not a whole pickle (an opcode declaring more bytes than the
        file holds is refused before anything is allocated), is not DCP metadata, names a
        global other than those metadata is made of (`_METADATA_GLOBALS`: nothing else is
        imported or called), or describes tensors, chunks or data files that do not hold
        together (a data file outside the folder included).
    """
    path = Path(folder) / (".metadata" if rank is None else f"__{rank}.metadata")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read the DCP metadata {str(path)!r}: {exc}; is "
                          f"{str(folder)!r} a torch.distributed.checkpoint folder?") from exc
    problem = _pickle_problem(data)
    if problem:
        raise SourceError(f"the DCP metadata {str(path)!r} is not a whole pickle: {problem}")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except SourceError as exc:
        raise SourceError(f"the DCP metadata {str(path)!r} {exc}") from exc
    except Exception as exc:  # a malformed pickle: any error of the records it builds
        raise SourceError(f"cannot read the DCP metadata {str(path)!r}: {type(exc).__name__}: "
                          f"{exc!s:.300}") from exc
    try:
        problem = _metadata_problem(metadata, Path(folder))
    except Exception as exc:  # records built without the fields they need, unhashable keys
        problem = f"{type(exc).__name__}: {exc!s:.300}"
    if problem:
        raise SourceError(f"the DCP metadata {str(path)!r} is not DCP metadata: {problem}")
    return metadata


def _pickle_problem(data: bytes) -> str:
    """What would make the C unpickler allocate beyond the file ("" when nothing would): a length
    declared past the file's end (checked by reading the opcodes in pure Python, bounded by the
    file), or a memo index beyond the number of opcodes (its memo grows to the index given: one
    ``LONG_BINPUT 2**30`` costs 16 GB); ``pickle.dumps`` numbers its memo entries in order."""
    try:
        for count, (opcode, arg, _) in enumerate(pickletools.genops(data)):
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (
                    isinstance(arg, int) and 0 <= arg <= count):
                return f"memo index {arg!r:.30} at opcode {count}"
    except (ValueError, TypeError, KeyError, IndexError) as exc:  # truncated, unknown opcode
        return f"{type(exc).__name__}: {exc!s:.300}"
    return ""


def _metadata_globals() -> dict[tuple[str, str], Any]:
    """Everything a DCP ``.metadata`` pickle may name: DCP's metadata records and the few
    values they hold. Calling any of them with any arguments runs no code of the file's choice."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {
        (metadata.__name__, name): getattr(metadata, name) for name in (
            "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
            "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # by name
    allowed.update({("pathlib", n): getattr(__import__("pathlib"), n) for n in (
        "Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")})
    allowed.update({("torch", n): v for n, v in vars(torch).items()
                    if isinstance(v, torch.dtype)})
    return allowed


_METADATA_GLOBALS: dict[tuple[str, str], Any] = {}  # filled on first use (DCP imports slowly)


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that finds only `_METADATA_GLOBALS` (the C unpickler calls `find_class` for
    every global, extension code and old-style instance)."""

    def find_class(self, module: str, name: str) -> Any:
        if not _METADATA_GLOBALS:
            _METADATA_GLOBALS.update(_metadata_globals())
        found = _METADATA_GLOBALS.get((module, name))
        if found is None:
            raise SourceError(f"names {module}.{name}, which DCP metadata is not made of; "
                              "archalign refuses it (unpickling it could run code)")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise SourceError("holds a persistent reference, which DCP metadata never does")


def _metadata_problem(metadata: Any, folder: Path) -> str:
    """What does not hold together in unpickled DCP metadata ("" when it does)."""
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint import metadata as md

    if not isinstance(metadata, md.Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        return f"it holds a {type(metadata).__name__}"
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(key, str):
            return f"a key {key!r:.100} that is not a string"
        if isinstance(entry, md.BytesStorageMetadata):
            continue
        if not isinstance(entry, md.TensorStorageMetadata):
            return f"{key!r} is described by a {type(entry).__name__}"
        if not (isinstance(entry.properties, md.TensorProperties)
                and isinstance(entry.properties.dtype, torch.dtype)
                and _is_size(entry.size) and isinstance(entry.chunks, list)):
            return f"{key!r} has no dtype, size and list of chunks"
        for chunk in entry.chunks:
            if not (isinstance(chunk, md.ChunkStorageMetadata) and _is_size(chunk.offsets)
                    and _is_size(chunk.sizes) and len(chunk.offsets) == len(entry.size)
                    and len(chunk.sizes) == len(entry.size)
                    and all(o + n <= d for o, n, d in zip(chunk.offsets, chunk.sizes, entry.size))):
                return f"a chunk of {key!r} does not lie within its size {tuple(entry.size)}"
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        return "it names no data files"
    for index, info in storage.items():
        if not (isinstance(index, md.MetadataIndex) and isinstance(info, filesystem._StorageInfo)
                and isinstance(info.relative_path, str) and _is_count(info.offset)
                and _is_count(info.length)):
            return f"a data entry {index!r:.100} has no file, offset and length"
        try:
            inside_folder(folder, info.relative_path, f"the entry of {index.fqn!r}")
        except SourceError as exc:
            return str(exc)
    if metadata.storage_meta is not None and not isinstance(metadata.storage_meta, md.StorageMeta):
        return "its storage_meta is not a StorageMeta"
    return ""


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_size(value: Any) -> bool:
    return isinstance(value, torch.Size) and all(_is_count(d) for d in value)


def _tensor_metadata() -> type:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return TensorStorageMetadata


def _safe_reader(checkpoint_id: str | os.PathLike[str]) -> Any:
    """A DCP ``FileSystemReader`` of ``checkpoint_id`` whose metadata is `read_dcp_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_dcp_metadata(self.path, rank=kwargs.get("rank"))
            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(checkpoint_id))


def _tensors_only_planner() -> Any:
    """DCP's default load planner, except that it never unpickles a "bytes" entry."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise SourceError(f"the checkpoint stores {read_item.dest_index.fqn!r} as pickled "
                              "bytes; archalign reads only tensors (pickled bytes could run code)")

    return TensorsOnly()
