"""Units (the tensors that move together) and the data-flow graph between them.

A *unit* is what the matcher matches: all direct tensors of one layer (a Linear's weight and bias,
a BatchNorm's four tensors), or a single free tensor owned by a container (ViT's ``cls_token``).
A `UnitGraph` orders units by execution and links them by data flow (networkx ``DiGraph``), with
two sentinel nodes for the model's inputs and outputs.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import networkx as nx

from .source import TensorSource

__all__ = ["INPUT", "OUTPUT", "Unit", "UnitGraph", "build_units", "chain_graph", "natural_key",
           "ordered_graph", "size_order"]

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


@dataclass
class UnitGraph:
    """Units in execution order and the data flow between them."""

    units: dict[str, Unit]  # unit key -> Unit, in execution (or registration) order
    graph: nx.DiGraph  # edges between unit keys, plus the INPUT and OUTPUT sentinels
    tracer: str  # how the order was obtained: "fx", "hooks", "registration" or "state_dict"

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


def chain_graph(units: Sequence[Unit], tracer: str) -> UnitGraph:
    """A graph that knows only an order: each unit feeds the next one."""
    graph = nx.DiGraph()
    keys = [INPUT, *(u.key for u in units), OUTPUT]
    graph.add_nodes_from(keys)
    graph.add_edges_from(itertools.pairwise(keys))
    return UnitGraph(units={u.key: u for u in units}, graph=graph, tracer=tracer)


def ordered_graph(
    units: Sequence[Unit], order: Iterable[str], edges: Iterable[tuple[str, str]], tracer: str
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
