"""Save a loaded destination model in the form its library loads back.

After `Plan.apply`, the destination's weights are saved with `save_model`:

- a Hugging Face model into a folder (any path not ending in ``.safetensors``): the folder that
  ``from_pretrained(folder)`` loads, written as ``save_pretrained`` writes it: ``config.json``
  (and ``generation_config.json`` for a generating model), ``model.safetensors`` or shards with
  ``model.safetensors.index.json``, tied tensors left out (``lm_head.weight`` when the config
  says ``tie_word_embeddings``: ``from_pretrained`` ties them again) and the weights in the
  checkpoint format transformers saves (its reverse conversion mapping applied);
- any model into one ``.safetensors`` file of its whole state_dict (tied tensors each under
  their own key), which ``model.load_state_dict(safetensors.torch.load_file(path))`` loads and
  which a timm model loads as its pretrained weights: ``timm.create_model(name, pretrained=True,
  pretrained_cfg_overlay=dict(file=path, num_classes=...))``;
- any other model into a folder holding that state_dict as ``model.safetensors`` (or shards and
  an index), which `archalign.read_source` and `Plan.apply` read as a checkpoint.

The files go through `archalign.convert.write_safetensors`, the one safetensors writer: a failure
leaves no partial file and raises an `OSError` naming the file.
"""

from __future__ import annotations

import copy
import enum
import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .convert import DEFAULT_SHARD_BYTES, SINGLE_NAME, write_safetensors, write_safetensors_file
from .errors import SourceError

__all__ = ["OutputKind", "Saved", "check_output", "copy_config", "output_kind", "save_model"]


class OutputKind(str, enum.Enum):
    """What `save_model` writes."""

    HUGGING_FACE = "huggingface"  # a from_pretrained folder: config.json and the weights
    FILE = "file"  # one .safetensors file of the whole state_dict
    FOLDER = "folder"  # a folder of the state_dict: model.safetensors, or shards and an index


class Saved(NamedTuple):
    """What `save_model` wrote."""

    kind: OutputKind  # the form of the output
    files: tuple[Path, ...]  # every file written (configs, weights, the index last)
    tensors: int  # how many tensors the weights files hold
    load_with: str  # a line of Python that loads the output back, e.g. "X.from_pretrained('out')"


def output_kind(model: nn.Module, path: str | os.PathLike[str]) -> OutputKind:
    """The form `save_model` gives ``model`` at ``path``: a ``.safetensors`` path is one file;
    otherwise a Hugging Face model gets a ``from_pretrained`` folder, any other model a folder."""
    if str(path).endswith(".safetensors"):
        return OutputKind.FILE
    return OutputKind.HUGGING_FACE if _is_hugging_face(model) else OutputKind.FOLDER


def check_output(path: str | os.PathLike[str], *, file: bool | None = None) -> None:
    """Refuse, before any work, an output `save_model` or `archalign.convert_checkpoint` could not
    write: a folder that does not exist, a folder where a file is named or a file where a folder
    is needed, a folder that is not writable.

    Parameters
    ----------
    path : str or os.PathLike
        Where the output goes.
    file : bool, optional
        Whether the output is one file; by default, when ``path`` ends in ``.safetensors`` (as
        `save_model` decides).

    Raises
    ------
    OSError
        Naming the path and the reason.
    """
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        raise OSError(errno.ENOENT, "the output's folder does not exist", str(parent))
    if str(target).endswith(".safetensors") if file is None else file:
        if target.is_dir():
            raise OSError(errno.EISDIR, "is a folder, not a file", str(target))
    elif target.exists() and not target.is_dir():
        raise OSError(errno.ENOTDIR, "is a file; a folder is needed (or name a .safetensors "
                      "file)", str(target))
    writable = target if target.is_dir() else parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(writable))


def copy_config(config: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """Copy a Hugging Face ``config.json`` (and the ``generation_config.json`` beside it) into
    ``folder``, so that a converted checkpoint there loads with ``from_pretrained(folder)``.

    Raises
    ------
    SourceError
        If ``config`` is not a JSON object with a ``model_type``.
    OSError
        If a file cannot be read or written (naming it).
    """
    source = Path(config)
    text = source.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SourceError(f"{source} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise SourceError(f"{source} is not a Hugging Face config (it has no model_type)")
    target = Path(folder) / "config.json"
    target.write_text(text, encoding="utf-8")
    generation = source.with_name("generation_config.json")
    if generation.is_file():
        (Path(folder) / generation.name).write_bytes(generation.read_bytes())
    return target


def save_model(model: nn.Module, path: str | os.PathLike[str], *,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES,
               progress: Callable[[int, int], None] | None = None) -> Saved:
    """Save ``model``'s weights at ``path`` in the form its library loads back (see the module).

    Parameters
    ----------
    model : nn.Module
        The loaded destination.
    path : str or os.PathLike
        A ``.safetensors`` file, or a folder (created if its parent exists).
    max_shard_bytes : int
        A folder's checkpoint is split into shards of this size.
    progress : callable, optional
        Called as ``progress(written, total)`` after each tensor is handed to the writer.

    Returns
    -------
    Saved

    Raises
    ------
    SourceError
        If ``model`` is not a module, or some of its tensors are still on the meta device (not
        loaded: they have no values to save).
    OSError
        If the output cannot be written (naming the file; nothing partial is left).
    """
    if not isinstance(model, nn.Module):
        raise SourceError(f"save_model saves an nn.Module, got {type(model).__name__}")
    target = Path(path)
    kind = output_kind(model, target)
    if kind is OutputKind.HUGGING_FACE:
        return _save_hugging_face(model, target, max_shard_bytes, progress)
    state = _whole_state(model)
    if kind is OutputKind.FILE:
        file = write_safetensors_file(dict(_ticking(state, progress)), target)
        return Saved(kind, (file,), len(state), _load_line(model, file))
    files = write_safetensors(_ticking(state, progress), target, max_shard_bytes=max_shard_bytes)
    shown = files[0] if len(files) == 1 else target
    return Saved(kind, tuple(files), len(state), _load_line(model, shown))


# ------------------------------------------------------------------------------- state_dicts

def _whole_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every key of the state_dict with its own tensor: a tensor tied to an earlier key is cloned
    (safetensors holds no aliases; loading writes the same value through both keys)."""
    state = model.state_dict()
    _refuse_meta(state, model)
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[key] = tensor.clone() if ident in seen and tensor.numel() else tensor
        seen.add(ident)
    return out


def _refuse_meta(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    meta = [k for k, v in state.items() if v.device.type == "meta"]
    if meta:
        shown = ", ".join(meta[:5]) + (f" and {len(meta) - 5} more" if len(meta) > 5 else "")
        raise SourceError(f"{len(meta)} tensors of {type(model).__name__} are on the meta device "
                          f"(never loaded, so there is nothing to save): {shown}; load them, or "
                          "build the destination on a real device")


def _ticking(state: dict[str, torch.Tensor], progress: Callable[[int, int], None] | None
             ) -> Iterator[tuple[str, torch.Tensor]]:
    for done, item in enumerate(state.items(), start=1):
        yield item
        if progress is not None:
            progress(done, len(state))


# ------------------------------------------------------------------------------- Hugging Face

def _is_hugging_face(model: nn.Module) -> bool:
    transformers = _transformers()
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _transformers() -> Any:
    """The transformers module when it is installed (not imported for other models)."""
    import sys

    if "transformers" not in sys.modules:
        return None  # a model of it exists only once it was imported
    return sys.modules["transformers"]


def _save_hugging_face(model: Any, folder: Path, max_shard_bytes: int,
                       progress: Callable[[int, int], None] | None) -> Saved:
    """The folder ``save_pretrained`` writes, weights written by `write_safetensors`."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # transformers 4: its own writer does it all
        model.save_pretrained(folder, max_shard_size=max_shard_bytes, safe_serialization=True)
        files = tuple(sorted(p for p in folder.iterdir() if p.is_file()))
        return Saved(OutputKind.HUGGING_FACE, files, len(model.state_dict()),
                     _load_line(model, folder))
    state = model.state_dict()
    _refuse_meta(state, model)
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)  # from_pretrained ties them again
    state = revert_weight_conversion(model, state)  # the checkpoint format transformers saves
    weights = write_safetensors(_ticking(state, progress), folder, max_shard_bytes=max_shard_bytes)
    config = copy.deepcopy(model.config)  # as save_pretrained records them, without touching the model
    config.architectures = [type(model).__name__]
    config.dtype = str(model.dtype).removeprefix("torch.")
    written = [folder / "config.json"]
    config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
        written.append(folder / "generation_config.json")
    return Saved(OutputKind.HUGGING_FACE, (*written, *weights), len(state),
                 _load_line(model, folder))


# ------------------------------------------------------------------------------- how to load

def _load_line(model: nn.Module, path: Path) -> str:
    """A line of Python that loads what was written at ``path`` back into a model like ``model``."""
    where = str(path)
    if _is_hugging_face(model) and path.is_dir():
        return f"{type(model).__name__}.from_pretrained({where!r})"
    cfg = getattr(model, "pretrained_cfg", None)
    if type(model).__module__.startswith("timm.") and isinstance(cfg, dict) and path.is_file():
        overlay = f"file={where!r}"
        classes = getattr(model, "num_classes", None)
        if isinstance(classes, int):
            overlay += f", num_classes={classes}"
        return (f"timm.create_model({cfg.get('architecture', '?')!r}, pretrained=True, "
                f"pretrained_cfg_overlay=dict({overlay}))  # and the arguments it was built with")
    if path.is_file():
        return f"model.load_state_dict(safetensors.torch.load_file({where!r}))"
    single = path / SINGLE_NAME
    if single.is_file():
        return f"model.load_state_dict(safetensors.torch.load_file({str(single)!r}))"
    return f"archalign.read_source({where!r})  # a sharded checkpoint"
