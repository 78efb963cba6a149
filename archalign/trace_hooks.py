"""The hooks tracer: the execution order recorded by forward pre-hooks during one eval forward.

For models torch.fx cannot trace (data-dependent control flow, most Hugging Face models). Runs of
identical blocks run as their first two when that is safe (`archalign.repeats`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .graph import Tracer, Unit, UnitGraph, chain_graph
from .repeats import collapsed_order
from .running import run_in_eval

__all__ = ["record_order", "trace_hooks"]


def trace_hooks(module: nn.Module, units: list[Unit], inputs: Any, *,
                collapse_repeats: bool = True) -> UnitGraph:
    """The unit graph of ``module`` in the order its layers start on ``inputs`` (`Tracer.HOOKS`).

    With ``collapse_repeats``, runs of identical blocks run as their first two and the others'
    order is copied (`archalign.repeats.collapsed_order`); without it, or when that is not safe,
    every block runs.

    Raises
    ------
    Exception
        Whatever the model raises on ``inputs``: the caller falls back to another tracer.
    """
    owners: dict[str, list[str]] = {}
    for u in units:
        owner = u.key if u.type_name != "Parameter" else u.key.rpartition(".")[0]
        owners.setdefault(owner, []).append(u.key)
    modules = dict(module.named_modules())
    def record() -> list[str]:
        return record_order(module, modules, owners, inputs)

    order = collapsed_order(module, modules, units, record) if collapse_repeats else None
    if order is None:
        order = record()
    by_key = {u.key: u for u in units}
    seen: dict[str, None] = dict.fromkeys(order)
    ordered = [by_key[k] for k in seen]
    ordered += [u for u in units if u.key not in seen]
    return chain_graph(ordered, Tracer.HOOKS)


def record_order(module: nn.Module, modules: Mapping[str, nn.Module],
                 owners: Mapping[str, list[str]], inputs: Any) -> list[str]:
    """Run ``module`` once with a pre-hook on every owner of units; the unit keys in the order
    their owners first start."""
    order: list[str] = []
    handles = []
    for owner, keys in owners.items():
        target = modules.get(owner)
        if target is None:
            continue
        handles.append(target.register_forward_pre_hook(_recorder(order, keys)))
    try:
        run_in_eval(module, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))


def _recorder(order: list[str], keys: list[str]) -> Callable[[nn.Module, Any], None]:
    def hook(_module: nn.Module, _args: Any) -> None:
        order.extend(keys)

    return hook
