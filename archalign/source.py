"""Read what a source or destination holds: tensor names, shapes, dtypes, ties, module types.

Everything here is *reading*: nothing is copied or changed. A `TensorSource` answers the planning
questions (which keys, which shapes, which module owns what) without touching tensor data, and
hands out tensors only when `apply` asks for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .checkpoint import LazySafetensors, read_checkpoint
from .errors import SourceError
from .interrupts import interrupts_kept
from .wrappers import AVERAGED_COUNT, describe, set_aside, wrapper_of

__all__ = ["TensorSource", "TensorSpec", "has_nonfinite", "read_destination", "read_source",
           "storage_start"]

logger = logging.getLogger(__name__)

class TensorSpec(NamedTuple):
    """What planning needs to know about one tensor."""

    key: str  # the name in the state_dict, e.g. "layer1.0.conv1.weight"
    shape: tuple[int, ...]  # the tensor's shape
    dtype: torch.dtype  # e.g. torch.float32
    device: str = "cpu"  # device type of the tensor ("meta" has shapes but no values)


@dataclass
class TensorSource:
    """The tensors of a model or checkpoint, read for planning and, later, for loading.

    Attributes
    ----------
    specs : dict
        ``key -> TensorSpec`` for every *primary* tensor, in state_dict order.
    aliases : dict
        ``alias key -> primary key`` for tied tensors (GPT-2's ``lm_head.weight`` is
        ``transformer.wte.weight``): a tie is one tensor and is matched once.
    module_types : dict
        ``module path -> class name`` for every submodule when the source is a module; empty for a
        state_dict or a checkpoint file.
    layer_owners : frozenset
        Module paths whose direct tensors form one layer (weight, bias and statistics move together).
    module : nn.Module or None
        The module itself, when the source is one (tracing needs it).
    description : str
        How the source was given, for messages ("module ResNet", "state_dict", "file x.pt").
    ordered : bool
        Whether the key order is the registration order. A ``.safetensors`` file stores its tensors
        sorted, so its order says nothing about the model's structure.
    lazy : bool
        Whether `get` reads the tensor from a file each time (see the property).
    wrapper : str
        The wrapper prefix every key carries (``"module."``, ``"_orig_mod."``, ``"model."``;
        `archalign.wrappers`), recorded, not stripped: the plan names the keys as they are.
    set_aside : tuple of str
        Keys read but left out because they are not weights (an ``AveragedModel``'s
        ``n_averaged``).
    """

    specs: dict[str, TensorSpec]
    aliases: dict[str, str]
    module_types: dict[str, str]
    layer_owners: frozenset[str]
    module: nn.Module | None
    description: str
    ordered: bool = True
    wrapper: str = ""  # the prefix every key carries, e.g. "module." (DDP); "" when none
    set_aside: tuple[str, ...] = ()  # keys read but not weights, e.g. ("n_averaged",)
    _tensors: Mapping[str, torch.Tensor] = field(repr=False, default_factory=dict)
    # primary key -> (the tensor's state when it was scanned, whether it held NaN/Inf then)
    _scanned: dict[str, tuple[tuple[Any, ...], bool]] = field(
        repr=False, compare=False, default_factory=dict)

    @property
    def lazy(self) -> bool:
        """True when `get` reads the tensor from a file each time (a ``.safetensors`` file or a
        sharded checkpoint: a new tensor per call, one disk read each); False when the tensors are
        in memory (a module, a state_dict, a ``torch.load(mmap=True)`` checkpoint), where `get`
        hands out the same tensor every time."""
        return isinstance(self._tensors, LazySafetensors)

    def nonfinite(self, key: str, tensor: torch.Tensor | None = None) -> bool:
        """Whether the tensor at ``key`` holds NaN or Inf (see `has_nonfinite`).

        An in-memory tensor is scanned once per state: the answer is kept with the tensor's
        version counter, data pointer, shape, strides and dtype, and reused while none of them
        changes. An in-place write (``weight[0, 0] = nan`` under ``torch.no_grad``, ``copy_``,
        an optimiser step) bumps the version and the tensor is scanned again; replacing
        ``param.data`` changes the data pointer. Writes through ``param.data[...]`` do *not* bump
        the version counter and go unnoticed: scan again with a fresh `read_source`. A lazy
        source's tensors are scanned on every call (the file may have changed).

        Parameters
        ----------
        key : str
            A primary or an alias key.
        tensor : Tensor, optional
            What ``get(key)`` returned, when the caller holds it already (a lazy source would
            read it from disk again).

        Raises
        ------
        KeyError
            If the source holds no tensor of that name.
        """
        primary = self.aliases.get(key, key)
        value = self.get(primary) if tensor is None else tensor
        if self.lazy:
            return has_nonfinite(value)
        state = _tensor_state(value)
        known = self._scanned.get(primary)
        if state is not None and known is not None and known[0] == state:
            return known[1]
        found = has_nonfinite(value)
        if state is not None:
            self._scanned[primary] = (state, found)
        return found

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Read many tensors in a row: within this block a lazy source keeps one file open
        between reads (memory-mapped; closed after every 16 MiB read, so that the mapped pages it
        holds stay below that) instead of opening it for every tensor (about 0.5 ms each: most
        of the time for small tensors). The file is closed at the end of the block; nothing
        changes for in-memory sources.
        """
        if isinstance(self._tensors, LazySafetensors):
            with self._tensors.reading():
                yield
        else:
            yield

    def scan_nonfinite(self) -> tuple[str, ...]:
        """The primary keys whose tensors hold NaN or Inf, in state_dict order.

        Scans the in-memory tensors (one ``sum`` each, remembered: see `nonfinite`); a lazy
        source (files read one tensor at a time) and tensors on the meta device are not read,
        and a tensor that cannot be summed (an exotic subclass) is left out, with a debug log.
        """
        if self.lazy:
            return ()
        found: list[str] = []
        for key, spec in self.specs.items():
            if spec.device == "meta":
                continue
            try:
                if self.nonfinite(key):
                    found.append(key)
            except (RuntimeError, TypeError, NotImplementedError) as exc:
                logger.debug("cannot scan %r of the %s for NaN/Inf: %s", key, self.description, exc)
        return tuple(found)

    def get(self, key: str) -> torch.Tensor:
        """Return the tensor stored under ``key`` (a primary or an alias key).

        Raises
        ------
        KeyError
            If the source holds no tensor of that name.
        """
        key = self.aliases.get(key, key)
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"{self.description} holds no tensor {key!r}") from None

    def __len__(self) -> int:
        return len(self.specs)


def has_nonfinite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds NaN or Inf anywhere (read-only).

    One native ``sum`` (NaN and Inf propagate; bf16/fp16 accumulate in float32 inside it, at
    about half the cost of a copy); only when the sum is not finite, which a finite half tensor
    can also give by overflowing its own dtype, is the answer confirmed exactly with
    ``isfinite().all()`` (13x a copy, paid only then). Complex tensors: ``isfinite``; float8:
    widened to float16 first; integer, boolean, quantized, empty and meta tensors: never.
    """
    if not tensor.numel() or tensor.device.type == "meta":
        return False
    if tensor.is_complex():
        return not bool(torch.isfinite(tensor.detach()).all())
    if not tensor.is_floating_point():
        return False
    tensor = tensor.detach()  # no autograd graph for the sum
    if tensor.element_size() == 1:  # float8: no sum or isfinite kernels; float16 holds them all
        tensor = tensor.to(torch.float16)
    if math.isfinite(float(tensor.sum())):
        return False
    return not bool(torch.isfinite(tensor).all())


def _tensor_state(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """What identifies the contents of ``tensor`` until it is written: its version counter
    (bumped by every in-place write), data pointer, shape, strides and dtype. None when it has
    no version counter (an inference tensor) or no storage: it is then scanned every time."""
    try:
        return (tensor._version, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()),
                tensor.dtype, tensor.device)
    except RuntimeError:
        return None


def read_source(obj: Any, *, role: str = "source", entry: str | None = None,
                structure: nn.Module | None = None) -> TensorSource:
    """Read an ``nn.Module``, a state_dict or a checkpoint file into a `TensorSource`.

    What it returns is accepted wherever a source is (`archalign.align`, `Plan.apply`), so
    that a checkpoint read with options is read once: ``align(read_source("last.ckpt",
    entry="model"), dst)``.

    Parameters
    ----------
    obj : nn.Module, Mapping[str, Tensor], str, os.PathLike or TensorSource
        The model, its state_dict, or the path of a ``.safetensors``/``.pt``/``.pth``/``.bin``
        file, of a sharded checkpoint's ``*.safetensors.index.json``, or of a folder holding one.
        Safetensors files are read lazily: headers for planning, one tensor at a time to apply.
        A `TensorSource` is returned as it is.
    role : str
        "source" or "destination", used in error messages.
    entry : str, optional
        The entry of a pickled training checkpoint that holds the weights (``"model"`` for
        ``{"model": {...}, "optimizer": {...}}``); see `archalign.checkpoint.read_checkpoint`.
    structure : nn.Module, optional
        The module the checkpoint was saved from, built anywhere (on the meta device: ``with
        torch.device("meta"): model = Model(...)``): the file's tensors are attached to it
        (`archalign.structure.attach`; its own values are replaced) and the source is that
        module, so that tracing, layout probes and the output check run on it with the file's
        weights. Its keys must be the file's, or differ only by a wrapper prefix.

    Raises
    ------
    SourceError
        If ``obj`` is none of those, holds no tensor, or holds values that are not tensors; if
        ``entry`` is given for anything but a pickle checkpoint, or names no entry of it; if
        ``structure`` is not a module, is given with a module or a read source, or its keys do
        not fit the file's (naming the first unexplained keys of both).
    KeyboardInterrupt
        On Ctrl-C, also when a native reader swallowed it (`archalign.interrupts`).
    """
    if structure is not None:
        return _read_on_structure(obj, structure, role, entry)
    if entry is not None and not isinstance(obj, (str, os.PathLike)):
        raise SourceError(f"entry={entry!r} picks an entry of a checkpoint file; the {role} is a "
                          f"{type(obj).__name__}: pass obj[{entry!r}] instead")
    if isinstance(obj, TensorSource):
        return obj
    if isinstance(obj, nn.Module):
        return _read_module(obj, role)
    if isinstance(obj, (str, os.PathLike)):
        with interrupts_kept():
            return _read_checkpoint(Path(obj), role, entry)
    if isinstance(obj, Mapping):
        return _read_state_dict(obj, role, description="state_dict")
    raise SourceError(
        f"the {role} is a {type(obj).__name__}; pass an nn.Module, a state_dict "
        "(a mapping of names to tensors) or the path of a checkpoint file"
    )


def _read_on_structure(obj: Any, structure: Any, role: str, entry: str | None) -> TensorSource:
    """A checkpoint (or state_dict) attached to the module it was saved from."""
    from .structure import attach

    if not isinstance(structure, nn.Module):
        raise SourceError(f"structure= is the module the {role} checkpoint was saved from; got "
                          f"a {type(structure).__name__}")
    if isinstance(obj, (nn.Module, TensorSource)):
        raise SourceError(f"structure= gives the module of a checkpoint file or state_dict; the "
                          f"{role} is a {type(obj).__name__} already: pass it alone")
    file = read_source(obj, role=role, entry=entry)
    module = attach(structure, file._tensors, [*file.specs, *file.aliases],
                    file.description.removeprefix(f"{role} "))
    source = _read_module(module, role)
    return dataclasses.replace(
        source, description=f"{file.description} on the structure {type(module).__name__}",
        wrapper=file.wrapper, set_aside=file.set_aside)


def read_destination(module: nn.Module) -> TensorSource:
    """What writing into ``module`` needs: its tensors, their shapes and its ties; not the layer
    structure that planning reads (module classes, layer owners: left empty), which costs as
    much again on every `apply`.

    Raises
    ------
    SourceError
        If ``module`` is not an ``nn.Module`` or holds no tensors.
    """
    if not isinstance(module, nn.Module):
        raise SourceError(f"the destination must be an nn.Module, got {type(module).__name__}")
    return _read_module(module, "destination", structure=False)


def _read_module(module: nn.Module, role: str, *, structure: bool = True) -> TensorSource:
    state = module.state_dict(keep_vars=True)
    if not state:
        raise SourceError(
            f"the {role} module {type(module).__name__} has no parameters or buffers; "
            "there is nothing to align"
        )
    _refuse_nested(state, f"{role} module {type(module).__name__}")
    specs, aliases = _specs_and_aliases(state, by_identity=True)
    module_types: dict[str, str] = {}
    layer_owners: frozenset[str] = frozenset()
    if structure:
        modules = dict(module.named_modules(remove_duplicate=False))
        module_types = {path: type(m).__name__ for path, m in modules.items()}
        owners = {_owner(k) for k in specs}
        layer_owners = frozenset(o for o in owners if o in modules and _is_layer(modules[o]))
    return TensorSource(
        specs=specs,
        aliases=aliases,
        module_types=module_types,
        layer_owners=layer_owners,
        module=module,
        description=f"{role} module {type(module).__name__}",
        _tensors=state,
    )


def _read_state_dict(state: Mapping[Any, Any], role: str, description: str,
                     ordered: bool = True) -> TensorSource:
    if not state:
        raise SourceError(f"the {role} {description} is empty; there is nothing to align")
    bad = [(k, type(v).__name__) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not all(isinstance(k, str) for k in state):
        shown = ", ".join(f"{k!r} ({t})" for k, t in bad[:5])
        raise SourceError(
            f"the {role} {description} holds values that are not tensors: {shown}; if this is a "
            "training checkpoint, pass the model weights inside it (e.g. ckpt['state_dict'])"
            if bad
            else f"the {role} {description} has keys that are not strings"
        )
    tensors, aside = set_aside(state)
    _refuse_nested(tensors, f"{role} {description}")
    specs, aliases = _specs_and_aliases(tensors, by_identity=False)
    layer_owners = _layer_owners(specs)
    prefix = wrapper_of(tensors)
    return TensorSource(
        specs=specs,
        aliases=aliases,
        module_types={},
        layer_owners=layer_owners,
        module=None,
        description=_described(f"{role} {description}", prefix, aside),
        ordered=ordered and not _is_sorted(list(tensors)),
        wrapper=prefix,
        set_aside=aside,
        _tensors=tensors,
    )


def _described(description: str, prefix: str, aside: tuple[str, ...]) -> str:
    """The description with the recorded facts about its keys (logged once, at INFO)."""
    facts = [f"every key under {describe(prefix)}"] if prefix else []
    if aside:
        why = [f"{k} (AveragedModel's count)" if k == AVERAGED_COUNT
               else f"{k} (rotary frequencies the model computes)" for k in aside]
        facts.append(f"{', '.join(why)} set aside: not weights")
    if facts:
        logger.info("the %s: %s", description, "; ".join(facts))
    return f"{description} ({'; '.join(facts)})" if facts else description


def _read_checkpoint(path: Path, role: str, entry: str | None = None) -> TensorSource:
    checkpoint = read_checkpoint(path, role, entry=entry)
    if checkpoint.headers is None:
        return _read_state_dict(checkpoint.tensors, role, description=checkpoint.description,
                                ordered=checkpoint.ordered)
    headers, aside = set_aside(checkpoint.headers)
    specs = {k: TensorSpec(k, shape, dtype) for k, (shape, dtype) in headers.items()}
    prefix = wrapper_of(specs)
    return TensorSource(
        specs=specs,
        aliases={},
        module_types={},
        layer_owners=_layer_owners(specs),
        module=None,
        description=_described(f"{role} {checkpoint.description}", prefix, aside),
        ordered=checkpoint.ordered,
        wrapper=prefix,
        set_aside=aside,
        _tensors=checkpoint.tensors,
    )


def _refuse_nested(state: Mapping[str, torch.Tensor], description: str) -> None:
    """Nested (ragged) tensors have no shape to plan with.

    Raises
    ------
    SourceError
        Naming up to five of them.
    """
    nested = [k for k, v in state.items() if v.is_nested]
    if nested:
        raise SourceError(f"the {description} holds nested tensors, which have no single shape: "
                          f"{', '.join(map(repr, nested[:5]))}; store them as regular tensors "
                          "(e.g. torch.nested.to_padded_tensor) or leave them out")


def _specs_and_aliases(
    state: Mapping[str, torch.Tensor], *, by_identity: bool
) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    specs: dict[str, TensorSpec] = {}
    aliases: dict[str, str] = {}
    seen: dict[Any, str] = {}
    for key, tensor in state.items():
        ident = _identity(tensor, by_identity)
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        specs[key] = TensorSpec(key, tuple(tensor.shape), tensor.dtype, tensor.device.type)
    return specs, aliases


def storage_start(tensor: torch.Tensor) -> int | None:
    """Where the memory of ``tensor``'s storage starts: one value for every view of it. None for
    meta, empty or storage-less tensors (some subclasses)."""
    if tensor.device.type == "meta" or not tensor.numel():
        return None
    try:  # the data pointer less the offset: no storage object is built (a few us per call)
        return int(tensor.data_ptr()) - int(tensor.storage_offset()) * tensor.element_size()
    except (RuntimeError, NotImplementedError):
        return None


def _identity(tensor: torch.Tensor, by_identity: bool) -> Any:
    if by_identity:
        return id(tensor)
    start = storage_start(tensor)
    if start is None:
        return None
    return (start, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype)


def _is_sorted(keys: list[str]) -> bool:
    """Keys in lexicographic order, or in a few long sorted runs (shards of a safetensors
    checkpoint merged in shard order): the order carries no structure. Registration order
    descends at nearly every layer ("weight" then "bias"), so its sorted runs are short."""
    if len(keys) <= 4:
        return False
    runs = 1 + sum(a > b for a, b in itertools.pairwise(keys))
    return runs <= max(1, len(keys) // 8)


def _owner(key: str) -> str:
    return key.rpartition(".")[0]


def _is_layer(module: nn.Module) -> bool:
    """A layer's direct tensors move together: a module from torch.nn, or one whose children hold
    no tensors (timm's BatchNormAct2d keeps its activation as a child)."""
    if not (module._parameters or module._buffers):
        return False
    if type(module).__module__.startswith(("torch.nn", "torch.ao.nn")):
        return True
    return not any(True for child in module.children()
                   for _ in (*child.parameters(), *child.buffers()))


_LAYER_TENSOR_NAMES = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def _layer_owners(specs: Mapping[str, TensorSpec]) -> frozenset[str]:
    """Without a module, the groups that are layers: every local name a weight, bias or
    statistic (one pass over the keys, not one per group: a checkpoint of 10^4 tensors has
    thousands of groups)."""
    locals_: dict[str, list[str]] = {}
    for key in specs:
        owner = _owner(key)
        locals_.setdefault(owner, []).append(key[len(owner) + 1:] if owner else key)
    return frozenset(owner for owner, names in locals_.items() if all(
        name in _LAYER_TENSOR_NAMES or name.endswith(("weight", "bias")) for name in names
    ) and any(name.endswith("weight") for name in names))
