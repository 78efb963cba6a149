"""Trace a model into a `UnitGraph`: torch.fx first, forward hooks next, registration order last.

``torch.fx`` gives the truth (the order in which layers run and what feeds what) without running
any compute. Models it cannot trace (data-dependent control flow, most Hugging Face models) are run
once on ``example_inputs`` (or the model's own ``dummy_inputs``) with forward pre-hooks that record
the order in which layers start; runs of identical blocks (a transformer's layers, an MoE's
experts) run as their first two, and the order of the others is copied from the second
(`_collapsed_order`). Without either, the registration order is all there is, and the
graph says so in its ``tracer`` field.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from .graph import INPUT, OUTPUT, Unit, UnitGraph, build_units, chain_graph, natural_key, ordered_graph
from .source import TensorSource

__all__ = ["ExampleInputs", "device_of", "dummy_inputs", "harmonise_graphs", "probe_layouts",
           "run_in_eval", "split_inputs", "trace_graph"]

logger = logging.getLogger(__name__)

ExampleInputs = torch.Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any] | None

_ORDER_ONLY = ("registration", "state_dict")


def trace_graph(source: TensorSource, example_inputs: ExampleInputs = None) -> UnitGraph:
    """Build the unit graph of a source, with the best tracer that works on it.

    Parameters
    ----------
    source : TensorSource
        What `read_source` returned for the model or state_dict.
    example_inputs : Tensor, tuple, list, dict or None
        Inputs the model accepts; used only when torch.fx cannot trace it.

    Returns
    -------
    UnitGraph
        Its ``tracer`` names the method used: "fx", "hooks", "registration", "state_dict" (a
        state_dict in registration order) or "sorted" (a state_dict whose order means nothing).
    """
    units = build_units(source)
    module = source.module
    if module is not None:
        units = probe_layouts(module, units)
    if module is None:
        return chain_graph(units, "state_dict" if source.ordered else "sorted")
    try:
        return _trace_fx(module, units, source)
    except Exception as exc:  # fx raises many kinds of errors on untraceable code
        logger.info("torch.fx cannot trace %s (%s: %s); trying forward hooks",
                    type(module).__name__, type(exc).__name__, _first_line(exc))
    inputs = example_inputs if example_inputs is not None else dummy_inputs(module)
    if inputs is not None:
        try:
            return _trace_hooks(module, units, source, inputs)
        except Exception as exc:
            logger.warning("running %s on the example inputs failed (%s: %s); falling back to "
                           "registration order", type(module).__name__, type(exc).__name__, exc)
    else:
        logger.warning("%s cannot be traced by torch.fx and no example_inputs were given; "
                       "using registration order (pass example_inputs=... for a better "
                       "alignment)", type(module).__name__)
    return chain_graph(units, "registration")


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters."""
    return (str(exc).splitlines() or [""])[0][:200]


def harmonise_graphs(src: UnitGraph, dst: UnitGraph, src_units: Sequence[Unit],
                     dst_units: Sequence[Unit]) -> tuple[UnitGraph, UnitGraph]:
    """Bring two graphs to the same kind of evidence so that their features compare.

    Registration order cannot be compared with execution order, and a hooks graph has order but
    no data flow: both sides are reduced to the weaker of the two. A source whose key order means
    nothing (tracer "sorted": a ``.safetensors`` file) puts both sides in natural key order.

    Parameters
    ----------
    src, dst : UnitGraph
        What `trace_graph` returned for each side.
    src_units, dst_units : sequence of Unit
        Each side's units in registration order (`build_units`).
    """
    tracers = {src.tracer, dst.tracer}
    if "sorted" in tracers:
        return (chain_graph(sorted(src_units, key=lambda u: natural_key(u.key)), "sorted"),
                chain_graph(sorted(dst_units, key=lambda u: natural_key(u.key)), "sorted"))
    if len(tracers) == 1 or tracers <= set(_ORDER_ONLY):
        return src, dst
    if tracers & set(_ORDER_ONLY):
        return (chain_graph(list(src_units), src.tracer if src.tracer in _ORDER_ONLY
                            else "registration"),
                chain_graph(list(dst_units), dst.tracer if dst.tracer in _ORDER_ONLY
                            else "registration"))
    # one side "hooks", the other "fx": keep each order, drop the fx data flow
    return (chain_graph(list(src.units.values()), src.tracer),
            chain_graph(list(dst.units.values()), dst.tracer))


# classes known to store their weight as (in, out), for when probing cannot tell (meta, square)
_TRANSPOSED_TYPES = frozenset({"Conv1D"})


def probe_layouts(module: nn.Module, units: Sequence[Unit]) -> list[Unit]:
    """Mark weights stored ``(in, out)`` (Hugging Face ``Conv1D``) by calling their layer once.

    A square matrix has the same shape either way; only how the layer uses it tells. Each custom
    layer class with a 2-d ``weight`` is run on a small random input and compared with
    ``F.linear``; on the meta device (no values), shapes decide, then the class name.
    """
    modules = dict(module.named_modules())
    cache: dict[tuple[str, tuple[int, ...]], bool] = {}
    out = []
    for unit in units:
        layer = modules.get(unit.key) if unit.type_name not in ("", "Parameter") else None
        names = unit.local_names()
        if layer is None or "weight" not in names or type(layer).__module__.startswith("torch."):
            out.append(unit)
            continue
        index = names.index("weight")
        shape = unit.shapes[index]
        if len(shape) != 2:
            out.append(unit)
            continue
        key = (unit.type_name, shape)
        if key not in cache:
            # a copy in eval mode: a probe must not update buffers, and dropout must not decide
            probe = copy.deepcopy(layer).eval()
            cache[key] = _stores_in_out(probe, unit.type_name)
        flags = tuple(i == index and cache[key] for i in range(len(unit.tensors)))
        out.append(dataclasses.replace(unit, transposed=flags) if any(flags) else unit)
    return out


def _stores_in_out(layer: nn.Module, type_name: str) -> bool:
    weight = layer.weight
    bias = getattr(layer, "bias", None)
    if not isinstance(weight, torch.Tensor):
        return False
    rows, cols = weight.shape
    try:
        with torch.no_grad():
            if weight.device.type == "meta" or rows == cols:
                if weight.device.type == "meta" and rows != cols:
                    x = torch.zeros(2, rows, device="meta", dtype=weight.dtype)
                    return tuple(layer(x).shape) == (2, cols)
                if weight.device.type == "meta":
                    return type_name in _TRANSPOSED_TYPES
            gen = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(2, rows, generator=gen).to(weight)
            y = layer(x)
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != (2, cols):
                return False
            expected = x @ weight + (bias if isinstance(bias, torch.Tensor) else 0)
            return bool(torch.allclose(y, expected, rtol=1e-3, atol=1e-4)) and not (
                rows == cols and torch.allclose(y, torch.nn.functional.linear(x, weight, bias),
                                                rtol=1e-3, atol=1e-4))
    except Exception:  # a layer that does not take one (batch, features) tensor
        return type_name in _TRANSPOSED_TYPES


class _UnitTracer(fx.Tracer):
    """Treat every layer (and every module without tensors) as a leaf; trace containers."""

    def __init__(self, layer_owners: frozenset[str], empty: frozenset[str]) -> None:
        super().__init__()
        self._leaves = layer_owners | empty

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self._leaves


def _trace_fx(module: nn.Module, units: list[Unit], source: TensorSource) -> UnitGraph:
    empty = frozenset(
        path for path, m in module.named_modules()
        if path and next(iter(m.parameters()), None) is None
        and next(iter(m.buffers()), None) is None
    )
    graph = _UnitTracer(source.layer_owners, empty).trace(module)
    unit_of_tensor = {t: u.key for u in units for t in u.tensors}
    for alias, primary in source.aliases.items():
        unit_of_tensor[alias] = unit_of_tensor[primary]

    units_inside = _units_by_module(units)
    order: list[str] = []
    edges: list[tuple[str, str]] = []
    # frontier[n]: the units whose outputs reach fx node n through parameter-free operations
    frontier: dict[fx.Node, frozenset[str]] = {}
    # a free tensor (get_attr) takes its place where it first meets the data flow, not where
    # Python happened to read the attribute (`self.scale * self.block(x)` reads it first)
    pending: dict[str, None] = {}
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
    result = ordered_graph(units, order, edges, "fx")
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


def _units_by_module(units: list[Unit]) -> dict[str, list[str]]:
    """Module path -> the units it owns (itself and its children), in registration order: layers
    first, then free tensors inside it. One pass over the units and their ancestors."""
    layers: dict[str, list[str]] = {}
    free: dict[str, list[str]] = {}
    for u in units:
        parts = u.key.split(".")
        is_free = u.type_name == "Parameter"
        # a layer belongs to itself and its ancestors; a free tensor to its owner's ancestors
        for depth in range(1, len(parts) + (0 if is_free else 1)):
            (free if is_free else layers).setdefault(".".join(parts[:depth]), []).append(u.key)
    return {path: layers.get(path, []) + free.get(path, []) for path in {*layers, *free}}


def _trace_hooks(module: nn.Module, units: list[Unit], source: TensorSource,
                 inputs: Any) -> UnitGraph:
    owners: dict[str, list[str]] = {}
    for u in units:
        owner = u.key if u.type_name != "Parameter" else u.key.rpartition(".")[0]
        owners.setdefault(owner, []).append(u.key)
    modules = dict(module.named_modules())
    order = _collapsed_order(module, modules, units, owners, inputs) if _COLLAPSE_REPEATS else None
    if order is None:
        order = _record_order(module, modules, owners, inputs)
    by_key = {u.key: u for u in units}
    seen: dict[str, None] = dict.fromkeys(order)
    ordered = [by_key[k] for k in seen]
    ordered += [u for u in units if u.key not in seen]
    return chain_graph(ordered, "hooks")


def _record_order(module: nn.Module, modules: Mapping[str, nn.Module], owners: Mapping[str, list[str]],
                  inputs: Any) -> list[str]:
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


# --------------------------------------------------------------------------- repeated blocks

# a run of at least this many structurally identical children of a ModuleList or Sequential runs
# as its first two children; the order of the others is the second one's, renamed
_MIN_RUN = 4
# off: always run every block (the tests compare both ways)
_COLLAPSE_REPEATS = True


@dataclasses.dataclass(frozen=True)
class _Run:
    """Consecutive, structurally identical children of one container."""

    container: str  # module path of the ModuleList or Sequential ("" for the root)
    start: int  # index of the first child of the run
    stop: int  # one past the index of its last child

    def child(self, index: int) -> str:
        """Module path of child ``index`` of the container."""
        return f"{self.container}.{index}" if self.container else str(index)

    def __str__(self) -> str:
        return f"{self.container or '<root>'}[{self.start}:{self.stop}]"


def _collapsed_order(module: nn.Module, modules: Mapping[str, nn.Module], units: list[Unit],
                     owners: Mapping[str, list[str]], inputs: Any) -> list[str] | None:
    """The order a full hooked run records, from a run in which every run of repeated blocks is cut
    to its first two; None (logged at DEBUG) when there is nothing to cut or a check fails.

    Each container holding runs gets, for the duration of the forward, a ``_modules`` dict without
    the children after the second of each run (always put back). The recorded order is expanded
    inside out by `_expand_runs`, which also checks that the shortcut is safe.
    """
    name = type(module).__name__
    inside = _units_by_module(units)
    runs = _find_runs(modules, inside)
    if not runs:
        return None
    skipped = sum(len(inside.get(run.child(i), ())) for run in runs for i in range(run.start + 2, run.stop))
    saved: list[tuple[nn.Module, dict[str, nn.Module | None]]] = []
    try:
        for container, kept in _cut_containers(runs, modules):
            saved.append((container, container._modules))
            vars(container)["_modules"] = kept
        order = _record_order(module, modules, owners, inputs)
    except Exception as exc:
        logger.debug("running %s with its repeated blocks cut to two failed (%s: %s); running "
                     "every block", name, type(exc).__name__, _first_line(exc))
        return None
    finally:
        for container, children in reversed(saved):
            vars(container)["_modules"] = children
    try:
        expanded = _expand_runs(order, runs, units, inside)
    except _Unsafe as exc:
        logger.debug("repeated blocks of %s not collapsed: %s; running every block", name, exc)
        return None
    logger.debug("ran %s with repeated blocks cut to two (%d of %d units skipped); expanded %s",
                 name, skipped, len(units), ", ".join(map(str, runs)))
    return expanded


class _Unsafe(Exception):
    """The run with cut containers cannot stand for a full one (the message says why)."""


def _find_runs(modules: Mapping[str, nn.Module], inside: Mapping[str, list[str]]) -> list[_Run]:
    """Runs of at least `_MIN_RUN` structurally identical children (whose first holds units) of
    every ``ModuleList`` and ``Sequential`` named ``0..n-1``, outer containers first. Containers
    inside a child that will not run are not looked at: the renamed copy of their run covers them."""
    cache: dict[int, _Signature] = {}
    runs: list[_Run] = []
    dropped: set[str] = set()
    for path, container in modules.items():  # named_modules() order: outer first
        children = container._modules
        if (not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(children) < _MIN_RUN
                or _has_ancestor(path, dropped)
                or list(children) != [str(i) for i in range(len(children))]
                or not all(isinstance(c, nn.Module) for c in children.values())):
            continue
        signatures = [_signature(child, cache) for child in children.values() if child is not None]
        for run in _runs_of(path, signatures):
            if inside.get(run.child(run.start)):
                runs.append(run)
                dropped.update(run.child(i) for i in range(run.start + 2, run.stop))
    return runs


def _has_ancestor(path: str, paths: set[str]) -> bool:
    """Whether ``path`` or one of its ancestors is in ``paths``."""
    while path:
        if path in paths:
            return True
        path = path.rpartition(".")[0]
    return False


_Signature = tuple[tuple[Any, ...], tuple[int, ...]]


def _signature(block: nn.Module, cache: dict[int, _Signature]) -> _Signature:
    """What must agree for two blocks to run alike, as (structure, integer attributes).

    The structure holds the block's class, the names, shapes and dtypes of its direct parameters
    and buffers, its forward hook counts, its other attributes, and the same for its children by
    name, recursively. Integer attributes are kept apart: one that follows the block's index
    (``layer_idx``) does not make blocks differ (`_runs_of`). Each module is read once (``cache``).
    """
    known = cache.get(id(block))
    if known is not None:
        return known
    local, ints = _local_signature(block)
    children: list[tuple[str, tuple[Any, ...] | None]] = []
    for name, child in block._modules.items():
        if child is None:
            children.append((name, None))
            continue
        structure, more = _signature(child, cache)
        children.append((name, structure))
        ints += more
    signature = cache[id(block)] = ((local, tuple(children)), ints)
    return signature


def _local_signature(module: nn.Module) -> _Signature:
    """`_signature` of one module without its children."""
    tensors = tuple((kind, name, None if t is None else (tuple(t.shape), t.dtype))
                    for kind, group in (("p", module._parameters), ("b", module._buffers))
                    for name, t in group.items())
    attributes = []
    ints = []
    for name, value in vars(module).items():
        if name[0] == "_" or name == "training":
            continue
        if type(value) is int:
            attributes.append((name, int))
            ints.append(value)
        else:
            attributes.append((name, _plain(value)))
    hooks = (len(module._forward_pre_hooks), len(module._forward_hooks))
    return (type(module), tensors, tuple(attributes), hooks), tuple(ints)


def _plain(value: Any, depth: int = 0) -> Any:
    """A comparable stand-in for an attribute: scalars themselves, tensors by shape and dtype,
    small containers element by element, anything else by its type."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if depth < 3 and isinstance(value, (tuple, list)) and len(value) <= 64:
        return (type(value), tuple(_plain(v, depth + 1) for v in value))
    if depth < 3 and isinstance(value, dict) and len(value) <= 64:
        return (dict, tuple((_plain(k, depth + 1), _plain(v, depth + 1)) for k, v in value.items()))
    return type(value)


def _runs_of(container: str, signatures: Sequence[_Signature]) -> list[_Run]:
    """Maximal runs of at least `_MIN_RUN` consecutive children with one structure, in which every
    integer attribute either keeps one value or equals the child's index."""
    runs = []
    start = 0
    while start < len(signatures):
        structure, first = signatures[start]
        constant = [True] * len(first)
        follows = [v == start for v in first]
        stop = start + 1
        while stop < len(signatures) and signatures[stop][0] == structure:
            ints = signatures[stop][1]
            still_constant = [c and v == v0 for c, v, v0 in zip(constant, ints, first)]
            still_follows = [f and v == stop for f, v in zip(follows, ints)]
            if not all(c or f for c, f in zip(still_constant, still_follows)):
                break
            constant, follows = still_constant, still_follows
            stop += 1
        if stop - start >= _MIN_RUN:
            runs.append(_Run(container, start, stop))
        start = stop
    return runs


def _cut_containers(runs: Sequence[_Run], modules: Mapping[str, nn.Module]
                    ) -> list[tuple[nn.Module, dict[str, nn.Module | None]]]:
    """Each container with runs, and its children without those after the second of each run,
    renumbered ``0..k-1`` (a ModuleList indexes and slices by position)."""
    cut: dict[str, set[int]] = {}
    for run in runs:
        cut.setdefault(run.container, set()).update(range(run.start + 2, run.stop))
    out = []
    for path, indices in cut.items():
        container = modules[path]
        kept = [child for i, child in enumerate(container._modules.values()) if i not in indices]
        out.append((container, {str(i): child for i, child in enumerate(kept)}))
    return out


def _expand_runs(order: list[str], runs: Sequence[_Run], units: Sequence[Unit],
                 inside: Mapping[str, list[str]]) -> list[str]:
    """Put the skipped blocks of every run into the order recorded with the runs cut, innermost
    runs first: the second block's keys, renamed, right after them.

    Raises
    ------
    _Unsafe
        Unless the keys of each run's first two blocks are contiguous, in order, and the same after
        renaming; every later block holds the same units as the second, renamed; and every unit
        outside the runs was reached (a unit that only a skipped block's index would have reached,
        as in ``if i == 5: x = self.extra(x)``, is not).
    """
    for run in sorted(runs, key=lambda r: _depth(r.container), reverse=True):
        first, second = run.child(run.start), run.child(run.start + 1)
        a = [i for i, k in enumerate(order) if _is_under(k, first)]
        b = [i for i, k in enumerate(order) if _is_under(k, second)]
        if not a or len(a) != len(b) or a[-1] - a[0] + 1 != len(a) or b[-1] - b[0] + 1 != len(b) \
                or a[-1] > b[0]:
            raise _Unsafe(f"the blocks {first} and {second} did not both run, one after the other")
        segment = order[b[0]:b[-1] + 1]
        if [_renamed(order[i], first, second) for i in a] != segment:
            raise _Unsafe(f"the blocks {first} and {second} ran differently")
        relative = {k[len(second):] for k in inside.get(second, ())}
        copies: list[str] = []
        for index in range(run.start + 2, run.stop):
            path = run.child(index)
            if {k[len(path):] for k in inside.get(path, ())} != relative:
                raise _Unsafe(f"the block {path} holds other units than {second}")
            copies.extend(_renamed(k, second, path) for k in segment)
        order = [*order[:b[-1] + 1], *copies, *order[b[-1] + 1:]]
    if len(set(order)) != len(order):
        raise _Unsafe("a block cut from its container ran")
    in_runs = {k for run in runs for i in range(run.start, run.stop) for k in inside.get(run.child(i), ())}
    reached = set(order)
    missed = [u.key for u in units if u.key not in reached and u.key not in in_runs]
    if missed:
        raise _Unsafe(f"{len(missed)} units outside the blocks did not run ({missed[0]}, ...)")
    return order


def _depth(path: str) -> int:
    return path.count(".") + 1 if path else 0


def _is_under(key: str, path: str) -> bool:
    """Whether unit ``key`` is the module at ``path`` or inside it."""
    return key.startswith(path) and (len(key) == len(path) or key[len(path)] == ".")


def _renamed(key: str, old: str, new: str) -> str:
    """``key`` under module path ``old`` moved under ``new``."""
    return new + key[len(old):]


def run_in_eval(module: nn.Module, inputs: Any) -> Any:
    """Run ``module`` once on example inputs in eval mode without gradients; every submodule's
    training flag is put back afterwards."""
    args, kwargs = split_inputs(inputs, device_of(module))
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            return module(*args, **kwargs)
    finally:
        for m, mode in modes:
            m.training = mode


def _recorder(order: list[str], keys: list[str]) -> Callable[[nn.Module, Any], None]:
    def hook(_module: nn.Module, _args: Any) -> None:
        order.extend(keys)

    return hook


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
