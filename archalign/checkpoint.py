"""Checkpoint files: what a ``.safetensors``, sharded index, folder or pickle file holds.

Reading only: shapes and dtypes come from safetensors headers without reading data, and tensors
are read one at a time when asked for (`LazySafetensors`); pickle files are read with
``torch.load(weights_only=True)`` (memory-mapped when they are zip files, as every torch >= 1.6
writes), which never unpickles code. What a file holds comes back as a `Checkpoint`, which
`archalign.source` turns into a `TensorSource`.

Only the files of the checkpoint's own folder are read: a sharded index naming ``../x`` or an
absolute path, or a file in the folder that is a link to one outside it, is refused
(`inside_folder`; the one exception is the Hugging Face cache, whose ``snapshots/<revision>``
files link into the same repository's ``blobs``). In a folder, hidden files (``.name``) are not
read, and a lone ``*-0000k-of-0000n.safetensors`` shard without its index is refused, not read as
the whole checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple

import torch

from .errors import SourceError
from .releases import load_flat, read_release

__all__ = ["PICKLE_SUFFIXES", "Checkpoint", "LazySafetensors", "inside_folder", "read_checkpoint"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class Checkpoint(NamedTuple):
    """What one checkpoint (a file, a sharded index, a folder) holds, read for planning."""

    tensors: Mapping[str, torch.Tensor]  # key -> tensor: in memory, or read on access (lazy)
    headers: dict[str, tuple[tuple[int, ...], torch.dtype]] | None  # key -> (shape, dtype) from
    # the files' headers when `tensors` is lazy (nothing read yet); None for in-memory tensors
    ordered: bool  # whether the key order is the saving model's registration order
    description: str  # how to name it in messages: "file model.pt", "checkpoint x.index.json"


def read_checkpoint(path: Path, role: str, *, entry: str | None = None) -> Checkpoint:
    """Read the checkpoint at ``path`` for planning.

    Parameters
    ----------
    path : Path
        A ``.safetensors`` file, a Hugging Face ``*.safetensors.index.json``, a folder holding
        exactly one of them, or a ``.pt``/``.pth``/``.bin``/``.ckpt`` pickle (a state_dict, or
        ``{"state_dict": {...}, ...}``).
    role : str
        "source" or "destination", used in error messages.
    entry : str, optional
        For a pickle that holds a training checkpoint (``{"model": {...}, "optimizer": {...}}``):
        the key of the entry that holds the weights.

    Raises
    ------
    SourceError
        If the path does not exist, has an unknown suffix, or does not hold a readable state_dict;
        if a folder holds no checkpoint, several, or a lone shard; if a file of a folder or an
        index lies outside that folder; if ``entry`` is not a key of the pickle's top level, or
        is given for a safetensors file.
    """
    if "\0" in str(path):
        raise SourceError(f"the {role} path {str(path)!r} holds a NUL character, which no file "
                          "name can")
    if path.is_dir():
        picked = _pick_in_folder(path, role)
        if isinstance(picked, list):  # numbered pickles: tensor-parallel ranks, or parts
            if entry is not None:
                raise SourceError(f"entry={entry!r} picks an entry of one pickle file; the "
                                  f"{role} folder {str(path)!r} is a release of "
                                  f"{len(picked)} files, each a state_dict")
            tensors, headers, description = read_release(path, picked, role)
            return Checkpoint(tensors=tensors, headers=headers, ordered=True,
                              description=description)
        path = picked
    if not path.exists():
        raise SourceError(f"the {role} file {str(path)!r} does not exist")
    if entry is not None and path.suffix not in PICKLE_SUFFIXES:
        raise SourceError(f"entry={entry!r} picks an entry of a pickle checkpoint; the {role} "
                          f"file {str(path)!r} is not one (safetensors files hold tensors only)")
    if path.name.endswith(".safetensors.index.json"):
        return _read_safetensors(_shards_of(path, role), role, f"checkpoint {path.name}")
    if path.name.endswith(tuple(f"{s}.index.json" for s in PICKLE_SUFFIXES)):
        return _read_pickle_shards(path, role)
    if path.suffix == ".safetensors":
        return _read_safetensors({path: None}, role, f"file {path.name}")
    if path.suffix in PICKLE_SUFFIXES:
        try:  # only zip files can be memory-mapped; older (torch < 1.6) pickles are read whole
            state = torch.load(str(path), map_location="cpu", weights_only=True,
                               mmap=zipfile.is_zipfile(path))
        except Exception as exc:
            raise SourceError(
                f"cannot read the {role} file {str(path)!r} with torch.load(weights_only=True): "
                f"{exc}. archalign never unpickles code; if you trust the file, re-save its "
                "tensors once with torch.save(model.state_dict(), ...) or safetensors"
            ) from exc
        if entry is not None:
            state = _entry_of(state, entry, role, path)
        elif isinstance(state, Mapping) and "state_dict" in state and isinstance(
            state["state_dict"], Mapping
        ):
            state = state["state_dict"]
        elif isinstance(state, Mapping) and state and (
                not any(isinstance(v, torch.Tensor) for v in state.values())
                or any(_holds_tensors(v) for v in state.values())):  # nanoGPT's ckpt.pt also
            # holds a tensor of its own at the top ('best_val_loss')
            raise SourceError(_training_checkpoint(state, role, path))
        if not isinstance(state, Mapping):
            raise SourceError(
                f"the {role} file {str(path)!r} holds a {type(state).__name__}, not a state_dict"
            )
        return Checkpoint(tensors=state, headers=None, ordered=True,
                          description=f"file {path.name}")
    raise SourceError(
        f"the {role} file {str(path)!r} has an unknown suffix {path.suffix!r}; use one of "
        f".safetensors, .safetensors.index.json, {', '.join(PICKLE_SUFFIXES)}, or a folder"
    )


def _entry_of(state: Any, entry: str, role: str, path: Path) -> Any:
    """The entry ``entry`` of a training checkpoint (its top level must be a mapping)."""
    if not isinstance(state, Mapping):
        raise SourceError(f"entry={entry!r}: the {role} file {str(path)!r} holds a "
                          f"{type(state).__name__}, not a mapping of entries")
    if entry not in state:
        raise SourceError(f"the {role} file {str(path)!r} has no entry {entry!r}; its entries: "
                          f"{_describe_entries(state)}")
    return state[entry]


def _training_checkpoint(state: Mapping[Any, Any], role: str, path: Path) -> str:
    """The error for a pickle whose top level holds entries, not tensors: which entry to pick."""
    weights = [k for k, v in state.items() if isinstance(k, str) and _holds_tensors(v)]
    pick = (f"; pick the entry that holds the weights: entry={weights[0]!r} (command line: "
            f"--entry {weights[0]})" if weights else "")
    if len(weights) > 1:
        pick += (f"; {', '.join(map(repr, weights[1:]))} "
                 f"{'holds' if len(weights) == 2 else 'hold'} weights too (an EMA copy?): "
                 "pick the one to port")
    return (f"the {role} file {str(path)!r} is a training checkpoint, not a state_dict: its "
            f"entries are {_describe_entries(state)}{pick}")


def _describe_entries(state: Mapping[Any, Any], limit: int = 8) -> str:
    """``'model' (120 tensors), 'optimizer' (no tensors), 'epoch' (int)``, at most ``limit``."""
    shown = []
    for key, value in list(state.items())[:limit]:
        if isinstance(value, Mapping):
            count = sum(isinstance(v, torch.Tensor) for v in value.values())
            shown.append(f"{key!r} ({count} tensors)" if count else f"{key!r} (no tensors)")
        else:
            shown.append(f"{key!r} ({type(value).__name__})")
    more = f" and {len(state) - limit} more" if len(state) > limit else ""
    return ", ".join(shown) + more


def _holds_tensors(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(v, torch.Tensor) for v in value.values())


def _pick_in_folder(folder: Path, role: str) -> Path | list[Path]:
    """The one checkpoint of a folder: its sharded index, or its single safetensors file; in a
    folder without safetensors, its one pickle, or its pickles when they are several (a release
    of numbered files, `archalign.releases`)."""
    where = f"the {role} folder {str(folder)!r}"
    visible = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    indexes = [p for p in visible if p.name.endswith(".safetensors.index.json")]
    singles = [p for p in visible if p.suffix == ".safetensors"]
    pickles = [p for p in visible if p.suffix in PICKLE_SUFFIXES and p.is_file()]
    pickle_indexes = [p for p in visible
                      if p.name.endswith(tuple(f"{s}.index.json" for s in PICKLE_SUFFIXES))]
    if len(indexes) == 1:
        return inside_folder(folder, indexes[0].name, where)
    if not indexes and not singles and len(pickle_indexes) == 1:
        return inside_folder(folder, pickle_indexes[0].name, where)
    if not indexes and not singles and pickles:
        inside = [inside_folder(folder, p.name, where) for p in pickles]
        return inside[0] if len(inside) == 1 else inside
    if len(indexes) > 1 or len(singles) != 1:
        raise SourceError(f"{where} holds {len(indexes)} safetensors indexes, {len(singles)} "
                          f"safetensors files and {len(pickles)} pickle files; name the file")
    shard = _SHARD_NAME.fullmatch(singles[0].name)
    if shard and int(shard.group(2)) > 1:
        raise SourceError(
            f"the {role} folder {str(folder)!r} holds only {singles[0].name!r}, one shard of "
            f"{int(shard.group(2))}, and no index: it is not a whole checkpoint (an interrupted "
            "copy or conversion?). Copy the whole checkpoint, or name the file to read that shard")
    return inside_folder(folder, singles[0].name, f"the {role} folder {str(folder)!r}")


_SHARD_NAME = re.compile(r"(.*)-\d+-of-(\d+)\.safetensors")  # "model-00001-of-00004.safetensors"


def inside_folder(folder: Path, name: str, where: str) -> Path:
    """``folder / name``, refused unless it stays inside ``folder``: no absolute path, no
    ``..``, and no link resolving outside it (except from a Hugging Face cache snapshot into
    its repository's ``blobs``, where the hub keeps the files its snapshots link to).

    Raises
    ------
    SourceError
        Naming ``where`` (what named the file) and the file.
    """
    parts = PurePosixPath(name).parts
    if (not name or "\0" in name or PurePosixPath(name).is_absolute()
            or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive
            or ".." in parts or ".." in PureWindowsPath(name).parts):
        raise SourceError(f"{where} names the file {name!r:.200}, outside its own folder; "
                          "archalign reads only the files of a checkpoint's folder")
    path = folder / name
    try:
        real, root = path.resolve(), folder.resolve()
    except (OSError, RuntimeError) as exc:  # a loop of links
        raise SourceError(f"{where} names {name!r}, which cannot be resolved: {exc}") from exc
    roots = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    if not any(real.is_relative_to(r) for r in roots):
        raise SourceError(f"{where} names {name!r}, a link to {str(real)!r} outside the folder; "
                          "archalign reads only the files of a checkpoint's folder: name the "
                          "file itself if you trust it")
    return path


def _shards_of(index: Path, role: str, suffixes: tuple[str, ...] = (".safetensors",)
               ) -> dict[Path, list[str]]:
    """Shard file -> its keys, from a Hugging Face ``*.safetensors.index.json`` (or, with
    ``suffixes=PICKLE_SUFFIXES``, a ``pytorch_model.bin.index.json``).

    Raises
    ------
    SourceError
        If the index is not such JSON, or names a shard that is missing, not a file of one of
        ``suffixes``, or outside the index's folder.
    """
    where = f"the {role} index {str(index)!r}"
    try:
        data = json.loads(index.read_bytes())  # bytes: UTF-8 (or -16/-32), as JSON allows
    except (OSError, ValueError, RecursionError) as exc:
        raise SourceError(f"cannot read {where}: {type(exc).__name__}: {exc!s:.300}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{where} holds no \"weight_map\" object naming the shard of each "
                          "tensor; is it a safetensors index?")
    shards: dict[Path, list[str]] = {}
    paths: dict[str, Path] = {}  # each shard's name checked once, not once per key
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(suffixes):
            raise SourceError(f"{where} maps {key!r:.200} to {shard!r:.200}, not the name of a "
                              f"{' or '.join(suffixes)} file")
        if shard not in paths:
            paths[shard] = inside_folder(index.parent, shard, where)
        shards.setdefault(paths[shard], []).append(key)
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise SourceError(f"{where} names missing shards: {', '.join(missing[:10])}")
    return shards


_REOPEN_BYTES = 16 * 2**20  # inside `TensorSource.reading`, a file is closed as soon as this many
# bytes were read through it: the memory-mapped pages it keeps resident stay below this


class LazySafetensors(Mapping[str, torch.Tensor]):
    """Tensors of one or more safetensors files, read only when asked for (one at a time).

    Outside `reading`, every read opens and closes its file (about 0.5 ms each). Inside, one
    file stays open between reads until `_REOPEN_BYTES` were read through it, or another file is read.
    """

    def __init__(self, where: dict[str, Path]) -> None:
        self._where = where  # key -> file
        self._depth = 0  # how many `reading` blocks are open
        self._handle: Any = None  # the open safe_open handle (only inside `reading`)
        self._handle_path: Path | None = None  # the file it reads
        self._handle_bytes = 0  # bytes read through it since it was opened

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                self._close()

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._where[key]
        if not self._depth:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(key)
        if self._handle is None or self._handle_path != path:
            self._close()
            self._handle = safe_open(str(path), framework="pt")
            self._handle_path = path
        tensor: torch.Tensor = self._handle.get_tensor(key)
        self._handle_bytes += tensor.numel() * tensor.element_size()
        if self._handle_bytes >= _REOPEN_BYTES:
            self._close()  # its pages leave memory now, not when the next read comes
        return tensor

    def _close(self) -> None:
        handle, self._handle, self._handle_path, self._handle_bytes = self._handle, None, None, 0
        if handle is not None:
            handle.__exit__(None, None, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


# safetensors dtype names -> torch dtypes (those torch has; others are refused when read)
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: dtype for name, dtype in (
        ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16),
        ("BF16", torch.bfloat16), ("I64", torch.int64), ("I32", torch.int32),
        ("I16", torch.int16), ("I8", torch.int8), ("U8", torch.uint8), ("BOOL", torch.bool),
        ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)),
        ("F8_E5M2", getattr(torch, "float8_e5m2", None)),
        ("U16", getattr(torch, "uint16", None)), ("U32", getattr(torch, "uint32", None)),
        ("U64", getattr(torch, "uint64", None)), ("C64", torch.complex64))
    if isinstance(dtype, torch.dtype)}


def _read_pickle_shards(index: Path, role: str) -> Checkpoint:
    """A Hugging Face ``pytorch_model.bin.index.json``: every shard its ``weight_map`` names,
    each memory-mapped, merged in shard order (each shard's keys in its own, saved, order).

    Raises
    ------
    SourceError
        As `_shards_of`; if a shard is not a flat state_dict, or lacks keys the index puts there.
    """
    merged: dict[str, torch.Tensor] = {}
    for path, keys in sorted(_shards_of(index, role, PICKLE_SUFFIXES).items()):
        state = load_flat(path, role)
        lacking = [k for k in keys if k not in state]
        if lacking:
            raise SourceError(f"the {role} shard {str(path)!r} lacks {len(lacking)} keys its index "
                              f"{index.name} puts there ({', '.join(lacking[:5])}): a half-saved "
                              "or mixed-up checkpoint; copy it again")
        wanted = set(keys)
        merged.update((k, v) for k, v in state.items() if k in wanted)
    return Checkpoint(tensors=merged, headers=None, ordered=True,
                      description=f"checkpoint {index.name}")


def _read_safetensors(files: Mapping[Path, list[str] | None], role: str,
                      description: str) -> Checkpoint:
    """Shapes and dtypes from the headers alone; tensors are read lazily when applying."""
    from safetensors import safe_open

    headers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    where: dict[str, Path] = {}
    for path, wanted in files.items():
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in wanted if wanted is not None else handle.keys():
                    piece = handle.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise SourceError(f"tensor {key!r} has dtype {piece.get_dtype()!r}, "
                                          "which this torch cannot hold")
                    headers[key] = (tuple(piece.get_shape()), dtype)
                    where[key] = path
        except Exception as exc:
            raise SourceError(f"cannot read the {role} file {str(path)!r}: {exc}") from exc
    if not headers:
        raise SourceError(f"the {role} {description} is empty; there is nothing to align")
    # safetensors stores keys sorted: their order says nothing
    return Checkpoint(tensors=LazySafetensors(where), headers=headers, ordered=False,
                      description=description)
