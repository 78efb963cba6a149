"""Running a model on example inputs: in eval mode, without gradients, training flags restored.

Tracing (the hooks tracer), layout probing, the trial of a plan and `verify` all run models; this
module is the one place that knows how example inputs become arguments and where they go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import RunError

__all__ = ["ExampleInputs", "attributes_kept", "device_of", "dummy_inputs", "first_line", "run_in_eval",
           "split_inputs"]

ExampleInputs = torch.Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any] | None


def run_in_eval(module: nn.Module, inputs: Any) -> Any:
    """Run ``module`` once on example inputs in eval mode without gradients; every submodule's
    training flag and attributes are put back afterwards (`attributes_kept`: a Hugging Face Swin
    resizes its windows to the last input it saw, and would fail on the next one).

    Raises
    ------
    RunError
        If the forward pass raises (the model rejects the inputs' shape, type or device): the
        message names the model's class and the first line of the error.
    """
    args, kwargs = split_inputs(inputs, device_of(module))
    with attributes_kept(module):  # the training flags too: they are attributes
        try:
            module.eval()
            with torch.no_grad():
                return module(*args, **kwargs)
        except Exception as exc:
            raise RunError(f"running {type(module).__name__} on the example inputs failed: "
                           f"{type(exc).__name__}: {first_line(exc)}") from exc


@contextlib.contextmanager
def attributes_kept(module: nn.Module) -> Iterator[None]:
    """Put every attribute of ``module`` and its submodules back after the block (which
    parameters, buffers and children they hold too; the values inside tensors are not copied).

    A forward may change its module: symbolic tracing leaves proxies where a forward caches a
    value (Meta's LLaMA: ``self.freqs_cis = self.freqs_cis.to(h.device)``), and some models
    adapt themselves to the input they see. Running a model to learn about it must not.
    """
    tables = ("_parameters", "_buffers", "_modules")
    saved = [(m, dict(vars(m)), [dict(getattr(m, t)) for t in tables]) for m in module.modules()]
    try:
        yield
    finally:
        for m, attributes, contents in saved:
            vars(m).clear()
            vars(m).update(attributes)
            for name, before in zip(tables, contents):
                table: dict[str, Any] = getattr(m, name)
                table.clear()
                table.update(before)


def dummy_inputs(module: nn.Module) -> Any:
    """Hugging Face models carry ``dummy_inputs``; use them when the user gave none."""
    dummy = getattr(module, "dummy_inputs", None)
    if isinstance(dummy, Mapping) and all(isinstance(v, torch.Tensor) for v in dummy.values()):
        return dict(dummy)
    return None


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first tensor (CPU for a module without tensors)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def split_inputs(inputs: Any, device: torch.device) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments from example inputs, tensors moved to ``device``."""
    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) else value

    if isinstance(inputs, torch.Tensor):
        return (move(inputs),), {}
    if isinstance(inputs, Mapping):
        return (), {k: move(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(move(v) for v in inputs), {}
    return (inputs,), {}


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters."""
    return (str(exc).splitlines() or [""])[0][:200]
