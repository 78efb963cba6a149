"""Wrapper prefixes: the keys a model's wrapper puts in front of every key it saves.

``torch.save(wrapped.state_dict())`` of a wrapped model names each tensor under the wrapper's
attribute that holds the model: ``module.`` (``DistributedDataParallel``, ``DataParallel``,
``torch.optim.swa_utils.AveragedModel``), ``_orig_mod.`` (``torch.compile``'s ``OptimizedModule``),
``model.`` (a PyTorch Lightning module holding the network as ``self.model``); wrappers nest
(``module._orig_mod.``). `wrapper_of` finds the prefix all keys share, so that it is recorded
(`archalign.source.TensorSource.wrapper`) and, when a file is attached to the module it was saved
from (`archalign.structure`), told apart from a real difference of keys.

Matching a file's keys does not need the prefix stripped: measured on the checkpoint-only pairs
of the corpus, stripping it changes no match (a prefix every key shares is one name token every
unit shares). The plan therefore names the file's keys as they are.

``AveragedModel`` also saves ``n_averaged``, the count of models averaged so far: a buffer, not a
weight of the network. `set_aside` takes it out of an averaged model's state (keys ``module.*``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple, TypeVar

__all__ = ["AVERAGED_COUNT", "ROTARY_FREQUENCIES", "WRAPPERS", "Wrapper", "describe", "set_aside",
           "wrapper_of"]

V = TypeVar("V")


class Wrapper(NamedTuple):
    """A wrapper that prefixes every key of the model it holds."""

    prefix: str  # what it puts in front of every key, e.g. "module."
    wrapper: str  # who writes it, for messages


WRAPPERS: tuple[Wrapper, ...] = (
    Wrapper("module.", "DistributedDataParallel, DataParallel or AveragedModel"),
    Wrapper("_orig_mod.", "torch.compile's OptimizedModule"),
    Wrapper("model.", "a PyTorch Lightning module holding the model as self.model"),
)

AVERAGED_COUNT = "n_averaged"  # AveragedModel's buffer: how many models were averaged
ROTARY_FREQUENCIES = ("rope.freqs", "rotary_emb.inv_freq")  # key endings of rotary frequencies a
# model computes from its config (buffers some releases save): never weights


def wrapper_of(keys: Iterable[str]) -> str:
    """The wrapper prefix every key of ``keys`` starts with (nested ones joined: ``module._orig_mod.``),
    or ``""``. A prefix is only taken when something follows it in every key."""
    keys = list(keys)
    found = ""
    while keys:
        step = next((w.prefix for w in WRAPPERS
                     if all(k.startswith(w.prefix) and len(k) > len(w.prefix) for k in keys)), "")
        if not step:
            break
        found += step
        keys = [k[len(step):] for k in keys]
    return found


def describe(prefix: str) -> str:
    """``'module.', as written by DistributedDataParallel, DataParallel or AveragedModel``, for
    messages."""
    who = [w.wrapper for part in prefix.split(".")[:-1] for w in WRAPPERS
           if w.prefix == part + "."]
    return f"{prefix!r}, as written by {' inside '.join(who)}" if who else repr(prefix)


def set_aside(state: Mapping[str, V]) -> tuple[dict[str, V], tuple[str, ...]]:
    """``state`` without the keys that are not weights of the network, and those keys.

    ``n_averaged`` beside keys that all start with ``module.`` (an ``AveragedModel``'s state_dict,
    as an EMA copy is saved), and rotary frequencies a model computes from its config, saved by
    some releases (`ROTARY_FREQUENCIES`: Meta's ``rope.freqs``; ``rotary_emb.inv_freq`` of older
    Hugging Face checkpoints), which converters drop.
    """
    aside = tuple(k for k in state if k.endswith(ROTARY_FREQUENCIES))
    rest = [k for k in state if k != AVERAGED_COUNT and k not in aside]
    if AVERAGED_COUNT in state and rest and all(k.startswith("module.") for k in rest):
        aside = (*aside, AVERAGED_COUNT)
    if not aside or not rest:
        return dict(state), ()
    return {k: state[k] for k in state if k not in aside}, aside
