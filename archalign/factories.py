"""What the command line builds from its SRC, DST and ``--input`` arguments.

A model comes from a *factory*, ``module:callable`` or ``module:callable(literal args)`` (e.g.
``"timm:create_model('resnet18', num_classes=10)"``), or from a Hugging Face model's folder or its
``config.json``: the class its ``architectures`` names, built from the config (random weights:
the structure) or, when the folder also holds weights, loaded with ``from_pretrained``. A source
may also be a checkpoint file or folder, read as `archalign.read_source` reads it (``entry``
picks the entry of a training checkpoint).

Factories import only from installed packages: the current directory is not searched (a
``torchvision.py`` lying there must not run), unless the caller adds folders to ``sys.path``
itself (`import_paths`, the command line's ``--import-path``).

Every failure is a `SourceError` whose one-line message names the argument and what to do.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import PICKLE_SUFFIXES
from .errors import SourceError
from .running import first_line
from .source import read_source

__all__ = ["build_model", "import_paths", "load_source", "parse_input"]

logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".safetensors", ".json", *PICKLE_SUFFIXES)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")  # a Hugging Face folder that holds weights


@contextlib.contextmanager
def import_paths(folders: Sequence[str | os.PathLike[str]]) -> Iterator[None]:
    """Let factories import modules from ``folders`` (first on ``sys.path``) inside the block;
    ``sys.path`` is as before afterwards (modules imported stay imported).

    Raises
    ------
    SourceError
        If one of ``folders`` is not a folder.
    """
    added = [str(Path(f).resolve()) for f in folders]
    for folder in added:
        if not Path(folder).is_dir():
            raise SourceError(f"--import-path {folder!r} is not a folder")
    sys.path[:0] = added
    try:
        yield
    finally:
        for folder in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


def load_source(spec: str, *, entry: str | None = None, structure: str | None = None) -> Any:
    """The source named by ``spec``: a model (a factory, a Hugging Face folder or config.json)
    or a checkpoint (read now, so that a bad file is reported before any work).

    Parameters
    ----------
    spec : str
        SRC as the command line takes it.
    entry : str, optional
        The entry of a training checkpoint that holds the weights.
    structure : str, optional
        A factory (or Hugging Face folder or config.json) of the module the checkpoint was saved
        from: it is built on the meta device (on the CPU when it holds buffers that only its
        constructor computes) and the checkpoint's tensors are attached to it
        (`archalign.read_source` with ``structure=``); the source is then that module.

    Raises
    ------
    SourceError
        If ``spec`` is none of those, or building or reading it fails; if ``structure`` is given
        for a source that is a model, or its keys do not fit the checkpoint's.
    """
    path = Path(spec)
    if path.exists() or path.suffix in _CHECKPOINT_SUFFIXES:
        config = _hugging_face_config(path)
        if config is not None:
            if entry is not None or structure is not None:
                raise SourceError(f"--{'entry' if entry is not None else 'source-structure'} is "
                                  f"for a checkpoint file; {spec!r} is a Hugging Face model's "
                                  "folder or config, built with its weights already")
            return _build_hugging_face(path, config, "source")
        if structure is not None:
            return read_source(path, role="source", entry=entry,
                               structure=_structure(structure))
        return read_source(path, role="source", entry=entry)
    if structure is not None:
        raise SourceError(f"--source-structure gives the module of a checkpoint file; the source "
                          f"{spec!r} is a factory, which builds the module itself")
    if entry is not None:
        raise SourceError(f"--entry picks an entry of a checkpoint file; the source {spec!r} is "
                          "a factory")
    return build_model(spec, role="source")


def _structure(spec: str) -> nn.Module:
    """The module of ``--source-structure``: built on the meta device (no memory, no init),
    unless it then holds non-persistent buffers that nothing computes off its constructor."""
    from .structure import uncomputable_buffers

    with torch.device("meta"):
        module = build_model(spec, role="source structure")
    left = uncomputable_buffers(module)
    if left:
        logger.info("--source-structure %r: built on the CPU, since its buffers %s are computed "
                    "by its constructor only", spec, ", ".join(left[:5]))
        module = build_model(spec, role="source structure")
    return module


def build_model(spec: str, *, role: str = "destination") -> nn.Module:
    """Build a model from ``module:callable``, ``module:callable(literal, key=literal)``, or a
    Hugging Face model's folder or ``config.json``; in eval mode.

    Raises
    ------
    SourceError
        If the spec is malformed, its arguments are not Python literals, its module cannot be
        imported, the callable fails or builds no module; the message says what to do.
    """
    path = Path(spec)
    if path.exists():
        config = _hugging_face_config(path)
        if config is None:
            raise SourceError(
                f"the {role} {spec!r} is a checkpoint, not a model: give a factory "
                "('module:callable(...)') or a Hugging Face model's folder or config.json")
        return _build_hugging_face(path, config, role)
    module_name, sep, call = spec.partition(":")
    if not sep or not module_name or not call:
        hint = ("no such file or folder" if path.suffix in _CHECKPOINT_SUFFIXES or "/" in spec
                else "not 'module:callable', e.g. \"torchvision.models:resnet18\"")
        raise SourceError(f"the {role} {spec!r}: {hint}")
    name, args, kwargs = _parse_call(call, spec, role)
    target = _import(module_name, name, spec, role)
    if _is_hugging_face_class(target) and len(args) == 1 and isinstance(args[0], str):
        config = _hugging_face_config(Path(args[0]))  # a class given its folder or config.json
        if config is None:
            raise SourceError(f"the {role} factory {spec!r}: {args[0]!r} is neither a Hugging Face "
                              "model's folder nor its config.json")
        return _build_hugging_face(Path(args[0]), config, role, cls=target, **kwargs)
    try:
        model = target(*args, **kwargs)
    except Exception as exc:
        raise SourceError(_build_failed(spec, role, target, args, exc)) from exc
    if not isinstance(model, nn.Module):
        raise SourceError(f"the {role} factory {spec!r} built a {type(model).__name__}, not an "
                          "nn.Module")
    return model.eval()


def parse_input(spec: str | None, model: Any) -> Any:
    """``randn:1,3,224,224`` -> a float tensor; ``ids:2,16`` -> token ids below the vocab size.

    Raises
    ------
    SourceError
        If the spec is not one of those forms.
    """
    if spec is None:
        return None
    kind, _, dims = spec.partition(":")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d)
    except ValueError as exc:
        raise SourceError(f"--input {spec!r}: the shape must be integers, e.g. randn:1,3,224,224"
                          ) from exc
    if not shape or any(d <= 0 for d in shape):
        raise SourceError(f"--input {spec!r}: give a shape of positive sizes, e.g. "
                          "randn:1,3,224,224")
    generator = torch.Generator().manual_seed(0)
    if kind == "randn":
        return torch.randn(shape, generator=generator)
    if kind == "ids":
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 100
        return {"input_ids": torch.randint(0, int(vocab), shape, generator=generator)}
    raise SourceError(f"--input {spec!r}: use 'randn:SHAPE' or 'ids:SHAPE'")


# ------------------------------------------------------------------------------- factories

def _parse_call(call: str, spec: str, role: str) -> tuple[str, list[Any], dict[str, Any]]:
    if "(" not in call:
        return call, [], {}
    try:
        tree = ast.parse(call, mode="eval").body
        if not isinstance(tree, ast.Call):
            raise ValueError("not a call")
        name = ast.unparse(tree.func)
        args = [ast.literal_eval(a) for a in tree.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords if k.arg}
    except (SyntaxError, ValueError) as exc:
        raise SourceError(f"the {role} factory {spec!r}: its arguments must be Python literals "
                          f"(numbers, strings, tuples...): {first_line(exc)}") from exc
    return name, args, kwargs


def _import(module_name: str, name: str, spec: str, role: str) -> Any:
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        local = Path(module_name.split(".")[0] + ".py")
        hint = (f"; {local} is in the current directory, which factories do not import from: "
                "pass --import-path . to allow it" if local.exists() or
                Path(module_name.split(".")[0]).is_dir() else "; is it installed?")
        raise SourceError(f"the {role} factory {spec!r}: cannot import {module_name!r} "
                          f"({first_line(exc)}){hint}") from exc
    owner = module_name
    for part in name.split("."):
        found = getattr(target, part, None)
        if found is None:
            close = difflib.get_close_matches(part, [n for n in dir(target) if not n.startswith("_")],
                                              n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SourceError(f"the {role} factory {spec!r}: {owner!r} has no {part!r}{hint}")
        target, owner = found, f"{owner}.{part}"
    if not callable(target):
        raise SourceError(f"the {role} factory {spec!r}: {owner!r} is not callable")
    return target


def _build_failed(spec: str, role: str, target: Any, args: list[Any], exc: Exception) -> str:
    """The message for a factory call that raised: what failed, and what the factory needs."""
    text = f"building the {role} with {spec!r} failed: {type(exc).__name__}: {first_line(exc)}"
    if isinstance(exc, TypeError) and _is_hugging_face_class(target):
        return (f"{text}. A Hugging Face model is built from its config: give the model's folder "
                f"or its config.json as the {role}, or the class with it: "
                f"\"transformers:{target.__name__}('path/to/config.json')\"")
    timm = sys.modules.get("timm")
    if timm is not None and target is getattr(timm, "create_model", None) and args and isinstance(
            args[0], str) and args[0] not in timm.list_models():
        close = difflib.get_close_matches(args[0], timm.list_models(), n=3)
        return text + (f"; timm models with a similar name: {', '.join(close)}" if close else
                       "; timm.list_models('*name*') lists the names")
    return f"{text}; check the callable's name and arguments"


# ------------------------------------------------------------------------------- Hugging Face

def _hugging_face_config(path: Path) -> Path | None:
    """The ``config.json`` of a Hugging Face model at ``path`` (its folder or the file itself)."""
    if path.is_dir():
        config = path / "config.json"
        return config if config.is_file() else None
    if path.suffix != ".json" or path.name.endswith(".index.json") or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return path if isinstance(data, dict) and "model_type" in data else None


def _classes_of(model_type: str) -> list[str]:
    """The transformers classes built for ``model_type``, from its auto mappings."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return []
    first = ["MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_MAPPING_NAMES"]  # the usual ones
    tables = [*first, *sorted(n for n in dir(modeling_auto) if n.startswith("MODEL")
                              and n.endswith("_MAPPING_NAMES") and n not in first)]
    found: list[str] = []
    for name in tables:
        table = getattr(modeling_auto, name, None)
        value = table.get(model_type) if isinstance(table, dict) else None
        if isinstance(value, str) and value not in found:
            found.append(value)
    return found


def _is_hugging_face_class(target: Any) -> bool:
    transformers = sys.modules.get("transformers")
    return (transformers is not None and isinstance(target, type)
            and issubclass(target, transformers.PreTrainedModel))


def _build_hugging_face(path: Path, config_file: Path, role: str, cls: Any = None,
                        **kwargs: Any) -> nn.Module:
    """A Hugging Face model of class ``cls`` (by default the class the config's ``architectures``
    names): loaded with its weights when ``path`` is a folder that holds them, else built from
    the config (random weights). Nothing is looked up on the Hub."""
    try:
        import transformers
    except ImportError as exc:
        raise SourceError(f"the {role} {str(path)!r} is a Hugging Face model; building it needs "
                          "transformers (pip install transformers)") from exc
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_file), local_files_only=True)
    except Exception as exc:
        raise SourceError(f"cannot read the {role}'s config {str(config_file)!r}: "
                          f"{type(exc).__name__}: {first_line(exc)}") from exc
    if cls is None:
        names = list(getattr(config, "architectures", None) or ())
        cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
        if cls is None:
            classes = _classes_of(getattr(config, "model_type", ""))
            raise SourceError(
                f"the {role}'s config {str(config_file)!r} names no model class this transformers "
                f"has (architectures: {', '.join(names) or 'none'}); name the class with it: "
                f"\"transformers:{classes[0] if classes else 'ModelClass'}('{path}')\""
                + (f" (the classes of {config.model_type}: {', '.join(classes)})" if classes
                   else ""))
    folder = config_file.parent
    weighted = path.is_dir() and any((folder / n).is_file() for n in _WEIGHT_FILES)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        if weighted:
            model = cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
        else:
            model = cls(config, **kwargs)
            if role == "source":
                logger.warning("the source %s holds no weights: %s is built from its config with "
                               "random weights (its structure only)", path, cls.__name__)
    except Exception as exc:
        how = "loading" if weighted else "building"
        raise SourceError(f"{how} the {role} {cls.__name__} from {str(path)!r} failed: "
                          f"{type(exc).__name__}: {first_line(exc)}") from exc
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.eval()
