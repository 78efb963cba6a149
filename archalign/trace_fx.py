"""The torch.fx tracer: execution order and data flow between units, without running compute.

Every layer (a module owning tensors) and every module without tensors is a leaf; containers are
traced through. The data flow between units is what reaches one unit's leaf from another's through
parameter-free operations; metadata reads (``x.shape``) carry none.
"""

from __future__ import annotations

import logging
from itertools import pairwise

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from .graph import INPUT, OUTPUT, Tracer, Unit, UnitGraph, ordered_graph, units_by_module
from .running import attributes_kept
from .source import TensorSource

__all__ = ["trace_fx"]

logger = logging.getLogger(__name__)


class _UnitTracer(fx.Tracer):
    """Treat every layer (and every module without tensors) as a leaf; trace containers."""

    def __init__(self, layer_owners: frozenset[str], empty: frozenset[str]) -> None:
        super().__init__()
        self.output_leaves = layer_owners | empty

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.output_leaves


def trace_fx(module: nn.Module, units: list[Unit], source: TensorSource) -> UnitGraph:
    """The unit graph of ``module`` by symbolic tracing (tracer `Tracer.FX`).

    Raises
    ------
    Exception
        Whatever torch.fx raises on code it cannot trace (data-dependent control flow, ...):
        the caller falls back to another tracer.
    """
    empty = frozenset(
        path for path, m in module.named_modules()
        if path and next(iter(m.parameters()), None) is None
        and next(iter(m.buffers()), None) is None
    )
    with attributes_kept(module):  # a traced forward may assign proxies to attributes
        graph = _UnitTracer(source.layer_owners, empty).trace(module)
    unit_of_tensor = {t: u.key for u in units for t in u.tensors}
    for alias, primary in source.aliases.items():
        unit_of_tensor[alias] = unit_of_tensor[primary]

    units_inside = units_by_module(units)
    order: list[str] = []
    edges: list[tuple[str, str]] = []
    # frontier[n]: the units whose outputs reach fx node n through parameter-free operations
    frontier: dict[fx.Node, frozenset[str]] = {}
    # a free tensor (get_attr) takes its place where it first meets the data flow, not where
    # Python happened to read the attribute (`self.scale * self.block(x)` reads it first)
    pending: dict[str, None] = {}
    reads: dict[str, int] = {}  # unit -> its layer's first argument, by the node's place
    place = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        feeding: frozenset[str] = frozenset().union(
            *(frontier.get(arg, frozenset()) for arg in node.all_input_nodes))
        if (pending and len(feeding) > 1) or node.op in ("call_module", "output"):
            for key in [k for k in pending if k in feeding]:
                order.append(key)
                del pending[key]
        if node.op == "placeholder":
            frontier[node] = frozenset({INPUT})
        elif _is_metadata(node):
            frontier[node] = frozenset()  # x.shape, x.size(): no data flows through
        elif node.op == "get_attr" and str(node.target) in unit_of_tensor:
            key = unit_of_tensor[str(node.target)]
            if key not in order:
                pending.setdefault(key)
            frontier[node] = frozenset({key})
        elif node.op == "call_module" and (inside := units_inside.get(str(node.target), [])):
            edges.extend((a, inside[0]) for a in feeding)
            edges.extend(pairwise(inside))
            if node.args and isinstance(node.args[0], fx.Node):
                reads.setdefault(inside[0], place[node.args[0]])
            order.extend(inside)
            frontier[node] = frozenset({inside[-1]})
        elif node.op == "output":
            edges.extend((a, OUTPUT) for a in feeding)
        else:
            frontier[node] = feeding
    order.extend(pending)
    used = set(order)
    unused = [u.key for u in units if u.key not in used]
    if unused:
        logger.debug("%d units of %s are not used by forward: %s", len(unused),
                     type(module).__name__, unused[:5])
    result = ordered_graph(units, order, edges, Tracer.FX)
    result.reads = reads
    if nx.is_directed_acyclic_graph(result.graph):
        # keep only the nearest producers: a residual stream would otherwise feed every later
        # layer from every earlier one
        reduced = nx.transitive_reduction(result.graph)
        reduced.add_nodes_from(result.graph.nodes)
        result.graph = reduced
    return result


_METADATA_METHODS = frozenset({"size", "dim", "numel", "type", "get_device", "stride"})
_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda"})


def _is_metadata(node: fx.Node) -> bool:
    """Nodes that read a tensor's metadata, not its values."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1:
            return node.args[1] in _METADATA_ATTRS
        return node.target in (len, torch.numel)
    return False
