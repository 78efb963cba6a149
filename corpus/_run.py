"""Running a corpus model on its inputs, and picking the output that carries its function."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["run_model"]


def run_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call ``model`` on ``inputs`` (a dict is passed as keyword arguments) and return one tensor.

    The tensor is the model's most downstream output, so that every tensor of the model feeds what
    is compared: Hugging Face outputs give their ``logits``, else their ``pooler_output`` (a pooled
    embedding computed from ``last_hidden_state``, by a head whose weights the hidden states would
    leave unchecked), else their first tensor (``image_embeds`` of a projection model,
    ``last_hidden_state``); tuples give their first element.

    Raises
    ------
    TypeError
        If the output holds no tensor.
    """
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    values = list(out.values()) if isinstance(out, Mapping) else out
    if isinstance(values, (tuple, list)):
        for value in values:
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")
