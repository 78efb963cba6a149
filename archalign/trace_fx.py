"""The torch.fx tracer: execution order and data flow between units, without running compute.

Every layer (a module owning tensors) and every module without tensors is a leaf; containers are
traced through. The data flow between units is what reaches one unit's leaf from another's through
parameter-free operations; metadata reads (``x.shape``) carry none. Runs of identical blocks are
traced as their first two and expanded (`archalign.repeats`), as the hooks tracer runs them.
"""

from __future__ import annotations

import logging
from itertools import pairwise
from typing import NamedTuple

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from .graph import INPUT, OUTPUT, Tracer, Unit, UnitGraph, ordered_graph, units_by_module
from .repeats import Run, Unsafe, containers_cut, expand_edges, expand_order, expand_reads, find_runs
from .running import attributes_kept, first_line
from .source import TensorSource

__all__ = ["trace_fx"]

logger = logging.getLogger(__name__)


class _UnitTracer(fx.Tracer):
    """Treat every layer (and every module without tensors) as a leaf; trace containers."""

    def __init__(self, layer_owners: frozenset[str], empty: frozenset[str],
                 paths: dict[int, str]) -> None:
        super().__init__()
        self.output_leaves = layer_owners | empty
        self.paths = paths  # id of each module -> its path in the whole model

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.output_leaves

    def path_of_module(self, mod: nn.Module) -> str:
        """The module's path in the whole model, also while its containers are cut."""
        path = self.paths.get(id(mod))
        return super().path_of_module(mod) if path is None else path


def trace_fx(module: nn.Module, units: list[Unit], source: TensorSource, *,
             collapse_repeats: bool = True) -> UnitGraph:
    """The unit graph of ``module`` by symbolic tracing (tracer `Tracer.FX`).

    With ``collapse_repeats``, every run of identical blocks (`archalign.repeats.find_runs`) is
    traced as its first two and the others' order, data flow and reads are copied from the
    second; when that fails or a check does not pass, the whole model is traced (logged at DEBUG).

    Raises
    ------
    Exception
        Whatever torch.fx raises on code it cannot trace (data-dependent control flow, ...):
        the caller falls back to another tracer.
    """
    modules = dict(module.named_modules())
    empty = frozenset(path for path, m in modules.items()
                      if path and next(iter(m.parameters()), None) is None
                      and next(iter(m.buffers()), None) is None)
    paths = {id(m): path for path, m in modules.items()}
    unit_of_tensor = {t: u.key for u in units for t in u.tensors}
    for alias, primary in source.aliases.items():
        unit_of_tensor[alias] = unit_of_tensor[primary]
    units_inside = units_by_module(units)
    tracer = _UnitTracer(source.layer_owners, empty, paths)
    runs = find_runs(modules, units_inside) if collapse_repeats else []
    walk = (_collapsed(module, modules, runs, tracer, units, unit_of_tensor, units_inside)
            if runs else None)
    if walk is None:
        with attributes_kept(module):  # a traced forward may assign proxies to attributes
            graph = tracer.trace(module)
        walk = _walk(graph, unit_of_tensor, units_inside, reduce=True)
        if walk is None:  # a unit reached twice (a shared module): the data flow may have cycles
            walk = _walk(graph, unit_of_tensor, units_inside, reduce=False)
            assert walk is not None
    order, edges, reads, reduced = walk
    used = set(order)
    unused = [u.key for u in units if u.key not in used]
    if unused:
        logger.debug("%d units of %s are not used by forward: %s", len(unused),
                     type(module).__name__, unused[:5])
    result = ordered_graph(units, order, edges, Tracer.FX)
    result.reads = reads
    if not reduced and nx.is_directed_acyclic_graph(result.graph):
        # keep only the nearest producers: a residual stream would otherwise feed every later
        # layer from every earlier one
        reduced_graph = nx.transitive_reduction(result.graph)
        reduced_graph.add_nodes_from(result.graph.nodes)
        result.graph = reduced_graph
    return result


def _collapsed(module: nn.Module, modules: dict[str, nn.Module], runs: list[Run],
               tracer: _UnitTracer, units: list[Unit], unit_of_tensor: dict[str, str],
               units_inside: dict[str, list[str]]) -> _Walk | None:
    """The walk of the whole model from a trace with every run cut to its first two blocks
    (`archalign.repeats.containers_cut`), expanded; None (logged at DEBUG) when tracing the cut
    model fails, a unit is reached twice, or the expansion is not safe."""
    name = type(module).__name__
    try:
        with attributes_kept(module), containers_cut(runs, modules):
            graph = tracer.trace(module)
            # fx names a tensor read as an attribute by its path in the cut model
            cut = {path: tracer.paths[id(m)] for path, m in module.named_modules()
                   if tracer.paths.get(id(m), path) != path}
        for node in graph.nodes:
            if node.op == "get_attr":
                owner, _, leaf = str(node.target).rpartition(".")
                if owner in cut:
                    node.target = f"{cut[owner]}.{leaf}" if cut[owner] else leaf
        walk = _walk(graph, unit_of_tensor, units_inside, reduce=True)
        if walk is None:
            raise Unsafe("a unit is reached twice")
        expanded = _Walk(expand_order(walk.order, runs, units, units_inside),
                         expand_edges(walk.edges, runs), expand_reads(walk.reads, runs),
                         reduced=True)
    except Exception as exc:
        logger.debug("tracing %s with its repeated blocks cut to two failed (%s: %s); tracing "
                     "every block", name, type(exc).__name__, first_line(exc))
        return None
    logger.debug("traced %s with repeated blocks cut to two; expanded %s", name,
                 ", ".join(map(str, runs)))
    return expanded


class _Walk(NamedTuple):
    """What one pass over the fx nodes found."""

    order: list[str]  # unit keys in execution order (a key may repeat: its first place counts)
    edges: list[tuple[str, str]]  # data flow between units (and the sentinels)
    reads: dict[str, int]  # layer unit key -> the place of the fx node its layer read first
    reduced: bool = False  # whether `edges` is already the transitive reduction


def _walk(graph: fx.Graph, unit_of_tensor: dict[str, str], units_inside: dict[str, list[str]],
          *, reduce: bool) -> _Walk | None:
    """Order, edges and reads of the units, from one pass over the fx nodes.

    With ``reduce``, every layer gets edges only from the *nearest* of its feeding units (those
    that reach no other feeding unit), which is the transitive reduction of the full data flow
    when every unit is reached once: then each layer's edges are all added when it is first
    reached, a later edge never joins two units that existed before it, and dropping an edge
    ``a -> v`` where ``a`` reaches another producer of ``v`` keeps what reaches what. Finding the
    nearest looks back only as far as the earliest feeding unit (`_nearest`), so a residual
    stream costs the size of one block, not of the model. Returns None when a unit is reached a
    second time (a shared module), the case it does not cover.
    """
    order: list[str] = []
    edges: list[tuple[str, str]] = []
    # frontier[n]: the units whose outputs reach fx node n through parameter-free operations
    frontier: dict[fx.Node, frozenset[str]] = {}
    # nearest[n]: the frontier without the units that reach another of its units
    nearest: dict[fx.Node, frozenset[str]] = {}
    preds: dict[str, list[str]] = {}  # the reduced edges so far, by target
    born: dict[str, int] = {INPUT: -1}  # unit -> when it was first seen: a topological order
    # a free tensor (get_attr) takes its place where it first meets the data flow, not where
    # Python happened to read the attribute (`self.scale * self.block(x)` reads it first)
    pending: dict[str, None] = {}
    reads: dict[str, int] = {}  # unit -> its layer's first argument, by the node's place
    place = {node: i for i, node in enumerate(graph.nodes)}
    empty: frozenset[str] = frozenset()
    for node in graph.nodes:
        inputs = node.all_input_nodes
        feeding: frozenset[str] = empty.union(*(frontier.get(arg, empty) for arg in inputs))
        if (pending and len(feeding) > 1) or node.op in ("call_module", "output"):
            for key in [k for k in pending if k in feeding]:
                order.append(key)
                del pending[key]
        near = empty
        if reduce:
            near = _nearest(empty.union(*(nearest.get(arg, empty) for arg in inputs)),
                            preds, born)
        if node.op == "placeholder":
            frontier[node] = nearest[node] = frozenset({INPUT})
            continue
        if _is_metadata(node):
            frontier[node] = nearest[node] = empty  # x.shape, x.size(): no data flows through
            continue
        if node.op == "get_attr" and str(node.target) in unit_of_tensor:
            key = unit_of_tensor[str(node.target)]
            if key not in order:
                pending.setdefault(key)
            born.setdefault(key, len(born))
            frontier[node] = nearest[node] = frozenset({key})
            continue
        if node.op == "call_module" and (inside := units_inside.get(str(node.target), [])):
            if reduce:
                if any(k in born for k in inside):
                    return None
                for k in inside:
                    born[k] = len(born)
                preds[inside[0]] = list(near)
                preds.update((b, [a]) for a, b in pairwise(inside))
            edges.extend((a, inside[0]) for a in (near if reduce else feeding))
            edges.extend(pairwise(inside))
            if node.args and isinstance(node.args[0], fx.Node):
                reads.setdefault(inside[0], place[node.args[0]])
            order.extend(inside)
            frontier[node] = nearest[node] = frozenset({inside[-1]})
        elif node.op == "output":
            edges.extend((a, OUTPUT) for a in (near if reduce else feeding))
        else:
            frontier[node], nearest[node] = feeding, near
    order.extend(pending)
    return _Walk(order, edges, reads, reduced=reduce)


def _nearest(keys: frozenset[str], preds: dict[str, list[str]], born: dict[str, int]
             ) -> frozenset[str]:
    """The units of ``keys`` from which no other unit of ``keys`` can be reached (by ``preds``,
    acyclic, in which a unit is ``born`` after all it can be reached from)."""
    if len(keys) < 2:
        return keys
    earliest = min(born[k] for k in keys)
    stack = [p for k in keys for p in preds.get(k, ()) if born[p] >= earliest]
    seen: set[str] = set()
    while stack:
        key = stack.pop()
        if key not in seen:
            seen.add(key)
            stack.extend(p for p in preds.get(key, ()) if born[p] >= earliest and p not in seen)
    return keys - seen if seen else keys


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
