"""Per-layer activations: what each layer received and produced on one input, and whether two
layers' activations are the same.

Two implementations of one network rarely lay their activations out alike: a sequence-first
transformer (CLIP, ``nn.MultiheadAttention`` without ``batch_first``) against a batch-first one, a
patch embedding that flattens inside (timm) or outside (torchvision). `same` compares two tensors
up to a permutation of their axes and a reshape, which is what such implementations differ by,
and never up to a permutation of their values (a wrongly permuted weight permutes values: that
must stay a difference).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .running import run_in_eval

__all__ = ["ACTIVATION_RTOL", "Activation", "Recording", "first_tensor", "informative",
           "record_activations", "same"]

ACTIVATION_RTOL = 1e-3  # two activations are the same when max |a - b| <= this * max |a|: float32
# error stays ~1e-6 relative even after dozens of layers; a wrong weight is an O(1) difference
_FLOOR = 1e-12  # below this an activation counts as zero everywhere
_MAX_PERMUTED_RANK = 5  # axis permutations are tried up to this rank (5! = 120)


class Activation(NamedTuple):
    """What one layer saw and produced during one forward (its first call)."""

    input: torch.Tensor | None  # the first tensor among its arguments (positional, then keyword)
    output: torch.Tensor | None  # the first tensor of what it returned
    calls: int  # how many times it ran in that forward


class Recording(NamedTuple):
    """The activations of one forward pass."""

    layers: dict[str, Activation]  # module path -> its activation, for the paths asked for
    order: tuple[str, ...]  # the paths in the order they first ran
    output: Any  # what the model returned


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor inside ``value`` (a tensor, tuple, list, dict or Hugging Face output)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        values: Any = value.values()
    elif isinstance(value, (tuple, list)):
        values = value
    else:
        return None
    for item in values:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def record_activations(model: nn.Module, inputs: Any, paths: Collection[str]) -> Recording:
    """Run ``model`` once on ``inputs`` (eval mode, no gradients) and record, for each module at
    ``paths``, the first tensor it received and the first tensor it returned, on its first call.

    Tensors are cloned as they are recorded (a later in-place operation must not change them).
    Hooks are removed and training flags restored, also when the forward raises.

    Raises
    ------
    Exception
        Whatever the model raises on ``inputs``.
    """
    modules = dict(model.named_modules())
    layers: dict[str, Activation] = {}
    order: list[str] = []
    handles = []
    for path in paths:
        module = modules.get(path)
        if module is not None:
            handles.append(module.register_forward_hook(_recorder(path, layers, order),
                                                        with_kwargs=True))
    try:
        output = run_in_eval(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return Recording(layers=layers, order=tuple(order), output=output)


def _recorder(path: str, layers: dict[str, Activation], order: list[str]
              ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
             output: Any) -> None:
        known = layers.get(path)
        if known is not None:
            layers[path] = known._replace(calls=known.calls + 1)
            return
        received = first_tensor(args)
        if received is None:
            received = first_tensor(kwargs)
        produced = first_tensor(output)
        layers[path] = Activation(input=_kept(received), output=_kept(produced), calls=1)
        order.append(path)

    return hook


def _kept(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or not (tensor.is_floating_point() or tensor.is_complex()):
        return None if tensor is None else tensor.detach().clone()
    return tensor.detach().clone()


def informative(tensor: torch.Tensor | None, batch: int = 0) -> bool:
    """Whether a comparison of ``tensor`` can fail: it is not all zero, not constant, and, when
    ``batch`` > 1 is its leading size, its samples differ (an output that ignores the input, such
    as a zero-initialised head's, proves nothing about what feeds it)."""
    if tensor is None or not tensor.numel() or not tensor.is_floating_point():
        return False
    values = tensor.detach().float()
    scale = float(values.abs().max())
    if not math.isfinite(scale) or scale <= _FLOOR:
        return False
    if float(values.max() - values.min()) <= ACTIVATION_RTOL * scale:
        return False
    if batch > 1 and values.dim() and values.shape[0] == batch:
        return bool((values - values[:1]).abs().max() > ACTIVATION_RTOL * scale)
    return True


def same(a: torch.Tensor | None, b: torch.Tensor | None, *,
         rtol: float = ACTIVATION_RTOL) -> bool | None:
    """Whether two activations are the same tensor, up to a permutation of axes and a reshape.

    Returns None when they cannot be compared (missing, or not floating point); False when their
    element counts differ (no layout makes them the same); True when one layout of ``a`` equals
    ``b`` within ``rtol`` of its scale.
    """
    if a is None or b is None or not (a.is_floating_point() and b.is_floating_point()):
        return None
    if a.numel() != b.numel():
        return False
    if not a.numel():
        return None
    x, y = a.detach().float().cpu(), b.detach().float().cpu()
    tolerance = rtol * max(float(x.abs().max()), float(y.abs().max()), _FLOOR)
    return any(float((layout - y).abs().max()) <= tolerance for layout in _layouts(x, y.shape))


def _layouts(x: torch.Tensor, shape: torch.Size) -> Iterator[torch.Tensor]:
    """``x`` in every layout that could be ``shape``: itself, then its axis permutations (size-1
    axes dropped first), each reshaped to ``shape``."""
    if x.shape == shape:
        yield x
    core = x.reshape([d for d in x.shape if d != 1]) if 1 in x.shape else x
    if core.dim() > _MAX_PERMUTED_RANK:
        yield core.reshape(shape)
        return
    target = [d for d in shape if d != 1]
    for perm in itertools.permutations(range(core.dim())):
        sizes = [core.shape[p] for p in perm]
        if not _may_flatten_into(sizes, target):
            continue
        yield core.permute(perm).reshape(shape)


def _may_flatten_into(sizes: list[int], target: list[int]) -> bool:
    """Whether consecutive groups of ``sizes`` multiply into ``target`` (a reshape that only merges
    or splits neighbouring axes, never one that mixes them up)."""
    i = j = 0
    while i < len(sizes) and j < len(target):
        a, b = sizes[i], target[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b and i < len(sizes):
                a *= sizes[i]
                i += 1
            elif b < a and j < len(target):
                b *= target[j]
                j += 1
            else:
                return False
    return i == len(sizes) and j == len(target)
