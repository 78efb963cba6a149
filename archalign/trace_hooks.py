"""The hooks tracer: the execution order recorded by forward pre-hooks during one eval forward.

For models torch.fx cannot trace (data-dependent control flow, most Hugging Face models). Runs of
identical blocks run as their first two when that is safe (`archalign.repeats`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .activations import first_tensor
from .graph import Tracer, Unit, UnitGraph, chain_graph
from .repeats import collapsed_order
from .running import run_in_eval

__all__ = ["place_unreached", "record_order", "trace_hooks"]


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
    reads: dict[str, int] = {}

    def record() -> list[str]:
        reads.clear()
        return record_order(module, modules, owners, inputs, reads)

    order = collapsed_order(module, modules, units, record) if collapse_repeats else None
    if order is None:
        order = record()
    by_key = {u.key: u for u in units}
    ordered = [by_key[k] for k in place_unreached(list(dict.fromkeys(order)), units)]
    graph = chain_graph(ordered, Tracer.HOOKS)
    graph.reads = _copied_reads(reads, [u.key for u in ordered if u.type_name != "Parameter"])
    return graph


def place_unreached(order: list[str], units: list[Unit]) -> list[str]:
    """``order`` with the units that never started put in: one inside a layer that ran (an
    ``nn.MultiheadAttention``'s ``out_proj``, whose weight its parent reads, never calling it)
    right after that layer, as a traced call of the layer places it (`archalign.trace_fx`);
    any other last, in registration order."""
    seen = set(order)
    after: dict[str, list[str]] = {}
    last: list[str] = []
    for unit in units:
        if unit.key in seen:
            continue
        parts = unit.key.split(".")
        ancestors = (".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1))  # nearest first
        host = next((a for a in ancestors if a in seen), None)
        (last if host is None else after.setdefault(host, [])).append(unit.key)
    placed = [k for key in order for k in (key, *after.get(key, ()))]
    return placed + last


def record_order(module: nn.Module, modules: Mapping[str, nn.Module],
                 owners: Mapping[str, list[str]], inputs: Any,
                 reads: dict[str, int] | None = None) -> list[str]:
    """Run ``module`` once with a pre-hook on every owner of units; the unit keys in the order
    their owners first start. ``reads`` (when given) receives, for the first unit of each layer,
    an id of the first tensor the layer was called with: equal ids, the very same tensor."""
    order: list[str] = []
    seen: dict[int, torch.Tensor] = {}  # keeps every tensor read alive, so ids are not reused
    handles = []
    for owner, keys in owners.items():
        target = modules.get(owner)
        if target is None:
            continue
        handles.append(target.register_forward_pre_hook(_recorder(order, keys, reads, seen)))
    try:
        run_in_eval(module, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))


def _recorder(order: list[str], keys: list[str], reads: dict[str, int] | None,
              seen: dict[int, torch.Tensor]) -> Callable[[nn.Module, Any], None]:
    def hook(_module: nn.Module, args: Any) -> None:
        order.extend(keys)
        if reads is not None and keys[0] not in reads:
            tensor = first_tensor(args)
            if tensor is not None:
                seen[id(tensor)] = tensor
                reads[keys[0]] = id(tensor)

    return hook


def _copied_reads(reads: dict[str, int], layers: list[str]) -> dict[str, int]:
    """``reads`` for every layer: one that did not run (a block cut from a run of repeated
    blocks) reads as the last recorded layer of its name, numbers aside, did, within its own
    block (``layers.7.attn.k`` reads what ``layers.7.attn.q`` reads, as in ``layers.1``)."""
    out = dict(reads)
    template = {re.sub(r"\d+", "#", k): k for k in reads}
    fresh = -1  # copies get negative ids: never an object's
    block_ids: dict[tuple[tuple[int, ...], int], int] = {}
    for key in layers:
        if key in out:
            continue
        model = template.get(re.sub(r"\d+", "#", key))
        if model is None:
            continue
        block = tuple(int(n) for n in re.findall(r"\d+", key))
        slot = (block, reads[model])
        if slot not in block_ids:
            block_ids[slot] = fresh
            fresh -= 1
        out[key] = block_ids[slot]
    return out
