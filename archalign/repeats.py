"""Repeated blocks: run each run of identical children of a ModuleList/Sequential as its first two.

A transformer's layers and an MoE's experts are structurally identical blocks; recording the order
of a hooked forward needs only two of each run: the order of the others is the second one's,
renamed (`collapsed_order`). The fx tracer traces the same cut model (`find_runs`,
`containers_cut`) and expands its order, data flow and reads (`expand_order`, `expand_edges`,
`expand_reads`). Every shortcut is checked against what a full run would have recorded, and
abandoned (the caller runs or traces every block) when a check fails (`Unsafe`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .graph import Unit, units_by_module
from .running import first_line

__all__ = ["Run", "Unsafe", "collapsed_order", "containers_cut", "expand_edges", "expand_order",
           "expand_reads", "find_runs"]

logger = logging.getLogger(__name__)

# a run of at least this many structurally identical children of a ModuleList or Sequential runs
# as its first two children; the order of the others is the second one's, renamed
_MIN_RUN = 4


@dataclasses.dataclass(frozen=True)
class Run:
    """Consecutive, structurally identical children of one container."""

    container: str  # module path of the ModuleList or Sequential ("" for the root)
    start: int  # index of the first child of the run
    stop: int  # one past the index of its last child

    def child(self, index: int) -> str:
        """Module path of child ``index`` of the container."""
        return f"{self.container}.{index}" if self.container else str(index)

    def __str__(self) -> str:
        return f"{self.container or '<root>'}[{self.start}:{self.stop}]"


def collapsed_order(module: nn.Module, modules: Mapping[str, nn.Module], units: Sequence[Unit],
                    record: Callable[[], list[str]]) -> list[str] | None:
    """The order a full hooked run records, from a run in which every run of repeated blocks is cut
    to its first two; None (logged at DEBUG) when there is nothing to cut or a check fails.

    Each container holding runs gets, for the duration of ``record()`` (one hooked forward that
    returns the unit keys in the order they started), a ``_modules`` dict without the children
    after the second of each run (always put back). The recorded order is expanded inside out by
    `expand_order`, which also checks that the shortcut is safe.
    """
    name = type(module).__name__
    inside = units_by_module(units)
    runs = find_runs(modules, inside)
    if not runs:
        return None
    skipped = sum(len(inside.get(run.child(i), ())) for run in runs for i in range(run.start + 2, run.stop))
    try:
        with containers_cut(runs, modules):
            order = record()
    except Exception as exc:
        logger.debug("running %s with its repeated blocks cut to two failed (%s: %s); running "
                     "every block", name, type(exc).__name__, first_line(exc))
        return None
    try:
        expanded = expand_order(order, runs, units, inside)
    except Unsafe as exc:
        logger.debug("repeated blocks of %s not collapsed: %s; running every block", name, exc)
        return None
    logger.debug("ran %s with repeated blocks cut to two (%d of %d units skipped); expanded %s",
                 name, skipped, len(units), ", ".join(map(str, runs)))
    return expanded


class Unsafe(Exception):
    """The run with cut containers cannot stand for a full one (the message says why)."""


@contextlib.contextmanager
def containers_cut(runs: Sequence[Run], modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Within the block, every container holding ``runs`` has a ``_modules`` dict without the
    children after the second of each run, renumbered (`_cut_containers`); always put back."""
    saved: list[tuple[nn.Module, dict[str, nn.Module | None]]] = []
    try:
        for container, kept in _cut_containers(runs, modules):
            saved.append((container, container._modules))
            vars(container)["_modules"] = kept
        yield
    finally:
        for container, children in reversed(saved):
            vars(container)["_modules"] = children


def find_runs(modules: Mapping[str, nn.Module], inside: Mapping[str, list[str]]) -> list[Run]:
    """Runs of at least `_MIN_RUN` structurally identical children (whose first holds units) of
    every ``ModuleList`` and ``Sequential`` named ``0..n-1``, outer containers first. Containers
    inside a child that will not run are not looked at: the renamed copy of their run covers them."""
    cache: dict[int, _Signature] = {}
    runs: list[Run] = []
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


def _runs_of(container: str, signatures: Sequence[_Signature]) -> list[Run]:
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
            runs.append(Run(container, start, stop))
        start = stop
    return runs


def _cut_containers(runs: Sequence[Run], modules: Mapping[str, nn.Module]
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


def expand_order(order: list[str], runs: Sequence[Run], units: Sequence[Unit],
                 inside: Mapping[str, list[str]]) -> list[str]:
    """Put the skipped blocks of every run into the order recorded with the runs cut, innermost
    runs first: the second block's keys, renamed, right after them.

    Raises
    ------
    Unsafe
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
            raise Unsafe(f"the blocks {first} and {second} did not both run, one after the other")
        segment = order[b[0]:b[-1] + 1]
        if [_renamed(order[i], first, second) for i in a] != segment:
            raise Unsafe(f"the blocks {first} and {second} ran differently")
        relative = {k[len(second):] for k in inside.get(second, ())}
        copies: list[str] = []
        for index in range(run.start + 2, run.stop):
            path = run.child(index)
            if {k[len(path):] for k in inside.get(path, ())} != relative:
                raise Unsafe(f"the block {path} holds other units than {second}")
            copies.extend(_renamed(k, second, path) for k in segment)
        order = [*order[:b[-1] + 1], *copies, *order[b[-1] + 1:]]
    if len(set(order)) != len(order):
        raise Unsafe("a block cut from its container ran")
    in_runs = {k for run in runs for i in range(run.start, run.stop) for k in inside.get(run.child(i), ())}
    reached = set(order)
    missed = [u.key for u in units if u.key not in reached and u.key not in in_runs]
    if missed:
        raise Unsafe(f"{len(missed)} units outside the blocks did not run ({missed[0]}, ...)")
    return order


def _depth(path: str) -> int:
    return path.count(".") + 1 if path else 0


def _is_under(key: str, path: str) -> bool:
    """Whether unit ``key`` is the module at ``path`` or inside it."""
    return key.startswith(path) and (len(key) == len(path) or key[len(path)] == ".")


def _renamed(key: str, old: str, new: str) -> str:
    """``key`` under module path ``old`` moved under ``new``."""
    return new + key[len(old):]


def expand_edges(edges: Sequence[tuple[str, str]], runs: Sequence[Run]) -> list[tuple[str, str]]:
    """The data flow of the full model, from the transitive reduction of the cut one's, innermost
    runs first. Each later block gets the second block's edges inside it and from outside,
    renamed. Blocks in a chain (the first feeds the second: a transformer's layers) get an edge
    from the block before for each edge from the first block into the second, and what the
    second block feeds after the run, the last block feeds. Parallel blocks (an MoE's experts,
    all feeding one sum) all feed what both the first and the second feed.

    Raises
    ------
    Unsafe
        If the blocks of a chain feed something outside the run from the first block (a skip
        past the second: from the first block only, or from every one?), parallel blocks feed
        different things, the second block feeds the first, or the edges inside the two blocks
        differ once renamed.
    """
    out = list(edges)
    for run in sorted(runs, key=lambda r: _depth(r.container), reverse=True):
        first, second = run.child(run.start), run.child(run.start + 1)
        last = run.child(run.stop - 1)
        kept: list[tuple[str, str]] = []
        inner0: set[tuple[str, str]] = set()
        inner1, cross, into, from0, from1 = [], [], [], [], []
        for a, b in out:
            where = (0 if _is_under(a, first) else 1 if _is_under(a, second) else None,
                     0 if _is_under(b, first) else 1 if _is_under(b, second) else None)
            if where == (1, 0):
                raise Unsafe(f"an edge {a} -> {b} goes from the block {second} back to {first}")
            if where == (1, None):
                from1.append((a, b))
                continue
            kept.append((a, b))
            if where == (0, 0):
                inner0.add((_renamed(a, first, second), _renamed(b, first, second)))
            elif where == (1, 1):
                inner1.append((a, b))
            elif where == (0, 1):
                cross.append((a, b))
            elif where == (None, 1):
                into.append((a, b))
            elif where == (0, None):
                from0.append((_renamed(a, first, second), b))
        if inner0 != set(inner1):
            raise Unsafe(f"the data flow inside the blocks {first} and {second} differs")
        if from0 and (cross or set(from0) != set(from1)):
            a, b = from0[0]
            raise Unsafe(f"an edge {_renamed(a, second, first)} -> {b} leaves the block {first} "
                         f"past {second}")
        for index in range(run.start + 2, run.stop):
            path, previous = run.child(index), run.child(index - 1)
            kept.extend((_renamed(a, second, path), _renamed(b, second, path)) for a, b in inner1)
            kept.extend((_renamed(a, first, previous), _renamed(b, second, path)) for a, b in cross)
            kept.extend((a, _renamed(b, second, path)) for a, b in into)
            if from0:  # parallel blocks: every one feeds what the first two feed
                kept.extend((_renamed(a, second, path), b) for a, b in from1)
        if from0:
            kept.extend(from1)
        else:
            kept.extend((_renamed(a, second, last), b) for a, b in from1)
        out = kept
    return out


def expand_reads(reads: Mapping[str, int], runs: Sequence[Run]) -> dict[str, int]:
    """What each unit's layer read first, for the full model (equal values: the very same tensor),
    innermost runs first: a later block's unit reads what the second block's reads when others
    outside the second block read it too (a tensor every block reads), otherwise a tensor of its
    own block, shared with the block's units that read the same in the second block (negative
    ids, never a node's place)."""
    out = dict(reads)
    fresh = -1
    for run in sorted(runs, key=lambda r: _depth(r.container), reverse=True):
        second = run.child(run.start + 1)
        model = {k: v for k, v in out.items() if _is_under(k, second)}
        outside = {v for k, v in out.items() if not _is_under(k, second)}
        for index in range(run.start + 2, run.stop):
            path = run.child(index)
            ids: dict[int, int] = {}
            for key, value in model.items():
                if value not in outside and value not in ids:
                    ids[value], fresh = fresh, fresh - 1
                out[_renamed(key, second, path)] = value if value in outside else ids[value]
    return out
