"""Units (the tensors that move together) and the data-flow graph between them.

A *unit* is what the matcher matches: all direct tensors of one layer (a Linear's weight and bias,
a BatchNorm's four tensors), or a single free tensor owned by a container (ViT's ``cls_token``).
A `UnitGraph` orders units by execution and links them by data flow (networkx ``DiGraph``), with
two sentinel nodes for the model's inputs and outputs.
"""

from __future__ import annotations

import enum
import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx

from .source import TensorSource

__all__ = ["INPUT", "OUTPUT", "Tracer", "Unit", "UnitGraph", "build_units", "chain_graph",
           "natural_key", "ordered_graph", "size_order", "units_by_module"]

INPUT = "<input>"
OUTPUT = "<output>"

Shape = tuple[int, ...]


def size_order(shape: Shape) -> tuple[int, int]:
    """Sort key that puts a unit's *main* tensor first: the highest rank, then the most elements
    (a weight before its bias; the cost model and the sequence alignment both compare these)."""
    return (-len(shape), -math.prod(shape))


@dataclass(frozen=True)
class Unit:
    """Tensors that move together, as one node of the matching."""

    key: str  # unique name: the owning module's path, or the tensor's key for a lone tensor
    tensors: tuple[str, ...]  # state_dict keys of its tensors, in registration order
    shapes: tuple[Shape, ...]  # shapes of `tensors`, same order
    type_name: str  # owning module's class name; "Parameter" for a lone tensor; "" when unknown
    transposed: tuple[bool, ...] = ()  # per tensor: stored (in, out) where nn.Linear stores (out, in)
    prior: str = ""  # the named prior its layout rests on (`archalign.layouts.infer_layouts`: a
    # checkpoint's convention, no module to probe); "" when probed, shown by shapes, or default

    def is_transposed(self, index: int) -> bool:
        return bool(self.transposed) and self.transposed[index]

    @cached_property
    def canonical_shapes(self) -> tuple[Shape, ...]:
        """Shapes in the ``(out, in)`` convention: a transposed weight is counted as nn.Linear's."""
        return tuple((s[1], s[0], *s[2:]) if self.is_transposed(i) else s
                     for i, s in enumerate(self.shapes))

    @cached_property
    def shape_key(self) -> tuple[Shape, ...]:
        """The sorted canonical shapes: units match without adaptation only when these agree."""
        return tuple(sorted(self.canonical_shapes))

    def local_names(self) -> tuple[str, ...]:
        """Tensor names relative to the unit (``weight``, ``running_mean``, ...)."""
        return self._local_names

    @cached_property
    def _local_names(self) -> tuple[str, ...]:
        prefix = len(self.key) + 1 if self.key and len(self.tensors) > 1 else None
        if prefix is None:
            return tuple(t.rpartition(".")[2] for t in self.tensors)
        return tuple(t[prefix:] for t in self.tensors)


class Tracer(str, enum.Enum):
    """How one side's unit order was obtained, and so what evidence its graph carries."""

    FX = "fx"  # torch.fx: execution order and data flow, without running the model
    HOOKS = "hooks"  # forward pre-hooks during one eval forward: execution order, no data flow
    REGISTRATION = "registration"  # a module's registration order: a guess at execution order
    STATE_DICT = "state_dict"  # a state_dict's key order: the registration order of its model
    SORTED = "sorted"  # a key order that means nothing (a safetensors file): names only
    FITTED = "fitted"  # a checkpoint's key tree put in the order that fits the destination's
    # execution order (`archalign.skeleton`): observed where the tree says it, borrowed elsewhere

    def __str__(self) -> str:
        return self.value

    @property
    def executes(self) -> bool:
        """Whether the order is the order in which layers run (observed, not guessed)."""
        return self in (Tracer.FX, Tracer.HOOKS)

    @property
    def data_flow(self) -> bool:
        """Whether the graph's edges are data flow (otherwise they only chain the order)."""
        return self is Tracer.FX

    @property
    def ordered(self) -> bool:
        """Whether the order carries any structure at all (False: only names are left)."""
        return self is not Tracer.SORTED


@dataclass
class UnitGraph:
    """Units in execution order and the data flow between them."""

    units: dict[str, Unit]  # unit key -> Unit, in execution (or registration) order
    graph: nx.DiGraph  # edges between unit keys, plus the INPUT and OUTPUT sentinels
    tracer: Tracer  # how the order was obtained, and so what the graph can be trusted for
    reads: dict[str, int] = field(default_factory=dict)  # layer unit key -> an id of the tensor
    # its layer read first: layers with one id read the very same tensor (siblings, such as q, k
    # and v); units not seen reading are absent

    @property
    def order(self) -> list[str]:
        return list(self.units)

    def predecessors(self, key: str) -> list[str]:
        return sorted(self.graph.predecessors(key)) if key in self.graph else []

    def successors(self, key: str) -> list[str]:
        return sorted(self.graph.successors(key)) if key in self.graph else []


def build_units(source: TensorSource) -> list[Unit]:
    """Group a source's tensors into units, in registration (state_dict) order.

    Tensors of one layer owner form one unit; tensors owned by anything else stand alone.
    """
    groups: dict[str, list[str]] = {}
    for key in source.specs:
        owner = key.rpartition(".")[0]
        unit_key = owner if owner in source.layer_owners else key
        groups.setdefault(unit_key, []).append(key)
    units = []
    for unit_key, keys in groups.items():
        type_name = source.module_types.get(unit_key, "") if unit_key in source.layer_owners else "Parameter"
        units.append(
            Unit(
                key=unit_key,
                tensors=tuple(keys),
                shapes=tuple(source.specs[k].shape for k in keys),
                type_name=type_name,
            )
        )
    return units


def natural_key(key: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``blocks.2`` before ``blocks.10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.split(r"(\d+)", key) if part)


def chain_graph(units: Sequence[Unit], tracer: Tracer) -> UnitGraph:
    """A graph that knows only an order: each unit feeds the next one."""
    graph = nx.DiGraph()
    keys = [INPUT, *(u.key for u in units), OUTPUT]
    graph.add_nodes_from(keys)
    graph.add_edges_from(itertools.pairwise(keys))
    return UnitGraph(units={u.key: u for u in units}, graph=graph, tracer=tracer)


def ordered_graph(
    units: Sequence[Unit], order: Iterable[str], edges: Iterable[tuple[str, str]], tracer: Tracer
) -> UnitGraph:
    """A graph with the units put in ``order`` (units never reached go last, in registration order)."""
    by_key = {u.key: u for u in units}
    ordered: dict[str, Unit] = {}
    for key in order:
        if key in by_key and key not in ordered:
            ordered[key] = by_key[key]
    for unit in units:
        ordered.setdefault(unit.key, unit)
    graph = nx.DiGraph()
    graph.add_nodes_from([INPUT, *ordered, OUTPUT])
    graph.add_edges_from((a, b) for a, b in edges if a != b)
    return UnitGraph(units=ordered, graph=graph, tracer=tracer)


def units_by_module(units: Sequence[Unit]) -> dict[str, list[str]]:
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
