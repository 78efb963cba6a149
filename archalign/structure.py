"""The source module as structure only: a checkpoint's tensors attached to the module it came from.

A user who has the source's code but not its weights builds the module (on the meta device, with
``with torch.device("meta"): ...``, or anywhere) and passes it with the file:
``read_source("ckpt.pt", structure=module)``. The file's keys must be the module's keys, or differ
from them only by a wrapper prefix (`archalign.wrappers`: ``module.``, ``_orig_mod.``,
``model.``, either side; keys releases ship that no module loads, `LEFTOVERS` such as
``rope.freqs``, are left unused); the file's tensors are then attached to the module with
``load_state_dict(assign=True)`` (the module's ties restored), and the source is that module:
tracing, layout probes and the output check run on it with the file's weights. The module's tensors
are replaced, never written into: the file's tensors are not copied, except those stored narrower
than the module was built (a bfloat16 release on a float32 structure), which are widened, exactly,
so that the module runs, and compares with the destination, at the precision it was built for.

Non-persistent buffers are not in any file (a rotary embedding's ``inv_freq``, BERT's
``position_ids``). On a module built on the meta device they have no values; a Hugging Face
model's are computed again (moved to the CPU, then its ``_init_weights`` on the modules that hold
only such buffers, as ``from_pretrained`` does). Any left on the meta device are named in a
warning: the module cannot run, so the plan is not checked by running it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import SourceError
from .wrappers import describe, wrapper_of

__all__ = ["LEFTOVERS", "KeyFit", "attach", "fit_keys", "uncomputable_buffers"]

logger = logging.getLogger(__name__)


# keys that releases ship and that no module loads: left unused when attaching, not an error
LEFTOVERS: dict[str, str] = {
    "rope.freqs": "Meta's LLaMA 2 releases: the rotary frequencies, which Meta's model computes "
                  "itself (its loader uses strict=False)",
}


class KeyFit(NamedTuple):
    """How a file's keys name a module's tensors."""

    renamed: dict[str, str]  # module key -> the file's key holding its tensor (ties: the one kept)
    strip: str  # the prefix taken off the file's keys ("module."), "" when none
    add: str  # the prefix put on the file's keys to make the module's, "" when none
    unused: tuple[str, ...]  # the file's keys left out: known leftovers (`LEFTOVERS`)


def fit_keys(file_keys: list[str], module_keys: list[str], ties: Mapping[str, str],
             where: str) -> KeyFit:
    """Name every module tensor by a file key: the same key, or one that differs only by a
    wrapper prefix on either side.

    Parameters
    ----------
    file_keys : list of str
        The file's keys (tied ones included).
    module_keys : list of str
        The module's state_dict keys.
    ties : Mapping[str, str]
        ``module key -> the first key of its tie group``, for every module key: a tied key the
        file leaves out (Hugging Face saves ``lm_head.weight`` once, as the embedding) is named
        by its group's.
    where : str
        How to name the file and the module in the error.

    Raises
    ------
    SourceError
        When no such naming explains every key: the first unexplained keys of both sides.
    """
    candidates = [("", "")]
    file_prefix, module_prefix = wrapper_of(file_keys), wrapper_of(module_keys)
    while file_prefix:
        candidates.append((file_prefix, ""))
        file_prefix = file_prefix[file_prefix.index(".") + 1:]
    while module_prefix:
        candidates.append(("", module_prefix))
        module_prefix = module_prefix[module_prefix.index(".") + 1:]
    best: tuple[int, list[str], list[str]] | None = None
    known = set(module_keys)
    for strip, add in candidates:
        named = {add + k[len(strip):]: k for k in file_keys if k.startswith(strip)}
        outside = [k for k in file_keys if not k.startswith(strip)
                   or add + k[len(strip):] not in known]
        unknown = [k for k in outside if not k.startswith(strip)
                   or k[len(strip):] not in LEFTOVERS]
        by_group: dict[str, str] = {}
        for key in module_keys:
            if key in named:
                by_group.setdefault(ties[key], named[key])
        missing = [k for k in module_keys if ties[k] not in by_group]
        if not unknown and not missing:
            renamed = {k: named.get(k, by_group[ties[k]]) for k in module_keys}
            if strip or add:
                logger.info("%s: the file's keys are the module's %s", where,
                            f"under {describe(strip)}" if strip else f"without {add!r}")
            for key in outside:
                logger.info("%s: %s is left unused (%s)", where, key, LEFTOVERS[key[len(strip):]])
            return KeyFit(renamed, strip, add, tuple(outside))
        if best is None or len(unknown) + len(missing) < best[0]:
            best = (len(unknown) + len(missing), unknown, missing)
    assert best is not None
    _, unknown, missing = best
    said = []
    if unknown:
        said.append(f"{len(unknown)} of the file's keys name no tensor of the module "
                    f"({', '.join(unknown[:5])})")
    if missing:
        said.append(f"{len(missing)} of the module's tensors are not in the file "
                    f"({', '.join(missing[:5])})")
    raise SourceError(f"{where}: {' and '.join(said)}. The file's keys must be the module's, or "
                      "differ from them only by a wrapper prefix (module., _orig_mod., model.); "
                      "is it the module the file was saved from, built with the same arguments?")


def attach(module: nn.Module, tensors: Mapping[str, torch.Tensor], file_keys: list[str],
           description: str) -> nn.Module:
    """Replace ``module``'s tensors by the file's (``load_state_dict(assign=True)``).

    Parameters
    ----------
    module : nn.Module
        The source's structure, on any device (its values are not used).
    tensors : Mapping[str, Tensor]
        The file's tensors by the file's keys (read on access).
    file_keys : list of str
        The file's keys, tied ones included.
    description : str
        How to name the file in messages.

    Returns
    -------
    nn.Module
        ``module`` itself, its tensors now the file's, its ties kept.

    Raises
    ------
    SourceError
        If the keys do not fit (`fit_keys`), or a tensor's shape is not the module's.
    """
    where = f"the {description} on the structure {type(module).__name__}"
    state = module.state_dict(keep_vars=True)
    if not state:
        raise SourceError(f"{where}: the module has no parameters or buffers to attach to")
    first: dict[int, str] = {}
    ties = {key: first.setdefault(id(t), key) for key, t in state.items()}
    fit = fit_keys(file_keys, list(state), ties, where)
    loaded: dict[str, torch.Tensor] = {}
    widened: dict[tuple[torch.dtype, torch.dtype], int] = {}
    for key, file_key in fit.renamed.items():
        value, into = tensors[file_key], state[key]
        if tuple(value.shape) != tuple(into.shape):
            raise SourceError(f"{where}: the file's {file_key!r} is {tuple(value.shape)}, the "
                              f"module's {key!r} is {tuple(into.shape)}; build the module "
                              "with the arguments the file was saved from")
        if _widens(value.dtype, into.dtype):  # a bf16 release on a float32 structure: the
            # module runs as it was built, and compares with the destination at its precision
            widened[value.dtype, into.dtype] = widened.get((value.dtype, into.dtype), 0) + 1
            value = value.to(into.dtype)
        loaded[key] = value
    for (old, new), count in widened.items():
        logger.info("%s: %d tensors widened from %s to the structure's %s (exactly)", where,
                    count, old, new)
    module.load_state_dict(loaded, strict=True, assign=True)
    _tie_again(module, ties)
    _materialise_buffers(module, where)
    return module


def _widens(stored: torch.dtype, built: torch.dtype) -> bool:
    """Whether ``stored`` values convert exactly into the wider floating dtype ``built``."""
    return (stored != built and stored.is_floating_point and built.is_floating_point
            and torch.finfo(built).bits > torch.finfo(stored).bits)


def _tie_again(module: nn.Module, ties: Mapping[str, str]) -> None:
    """``assign=True`` gives every key its own Parameter: tied keys share their group's again."""
    for key, primary in ties.items():
        if key != primary:
            owner, _, name = key.rpartition(".")
            target = module.get_submodule(owner)
            kept = module.get_parameter(primary) if name in target._parameters else (
                module.get_buffer(primary))
            setattr(target, name, kept)


def uncomputable_buffers(module: nn.Module) -> list[str]:
    """The non-persistent buffers of ``module`` on the meta device that `attach` cannot compute
    again (their module holds weights too, or the model is not a Hugging Face one)."""
    init = getattr(module, "_init_weights", None)
    persistent = set(module.state_dict())
    left = []
    for name, buffer in module.named_buffers(remove_duplicate=False):
        if buffer.device.type != "meta" or name in persistent:
            continue
        owner = module.get_submodule(name.rpartition(".")[0])
        own = [*owner._parameters.values(), *(b for n, b in owner._buffers.items()
                                              if n not in owner._non_persistent_buffers_set)]
        if not callable(init) or any(t is not None for t in own):
            left.append(name)
    return left


def _materialise_buffers(module: nn.Module, where: str) -> None:
    """Give values to the non-persistent buffers left on the meta device (see the module
    docstring); warn naming those that keep none (they stay on the meta device)."""
    persistent = set(module.state_dict())
    on_meta = [name for name, b in module.named_buffers(remove_duplicate=False)
               if b.device.type == "meta" and name not in persistent]
    if not on_meta:
        return
    init: Any = getattr(module, "_init_weights", None)
    by_owner: dict[str, list[str]] = {}
    for name in on_meta:
        owner_path, _, local = name.rpartition(".")
        by_owner.setdefault(owner_path, []).append(local)
    left: list[str] = []
    for path, names in by_owner.items():
        owner = module.get_submodule(path)
        own = [*owner._parameters.values(), *(b for n, b in owner._buffers.items()
                                              if n not in owner._non_persistent_buffers_set)]
        if callable(init) and not any(t is not None for t in own):
            metas = {n: owner._buffers[n] for n in names}
            for n, b in metas.items():  # a sentinel no computed buffer holds
                assert b is not None
                owner._buffers[n] = torch.full(b.shape, -1 if not b.is_floating_point() else
                                               float("nan"), dtype=b.dtype, device="cpu")
            with torch.no_grad():
                init(owner)  # it holds only buffers: none of the file's weights is touched
            for n, b in metas.items():
                value = owner._buffers[n]
                assert value is not None
                if bool((value.isnan() if value.is_floating_point() else value == -1).any()):
                    owner._buffers[n] = b  # not computed: back on the meta device
                    left.append(f"{path}.{n}" if path else n)
        else:
            left += [f"{path}.{n}" if path else n for n in names]
    if left:
        logger.warning("%s: the module's non-persistent buffers %s are on the meta device and "
                       "no file holds them: the module cannot run, so the plan is not checked by "
                       "running it; build the structure on the CPU to have it checked", where,
                       ", ".join(left[:5]))
