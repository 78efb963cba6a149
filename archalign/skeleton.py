"""Fit a checkpoint's key tree to the destination's execution order (tracer `Tracer.FITTED`).

A checkpoint carries no execution order: a pickle keeps its model's registration order (a module's
own tensors first, then its children in the order ``__init__`` made them, which is often not the
order they run in), a safetensors file sorted keys. Its key tree still says most of it:

- the tensors of one module are contiguous in any execution order (a module runs as a whole);
- children numbered ``0 .. N`` (a ``ModuleList`` of blocks) run in that order;
- siblings whose names differ only by a trailing number (``norm1``, ``norm2``; ``conv1`` ..
  ``conv3``; ``ln_1``, ``ln_2``) run in the order of that number.

Only the order of the other siblings is open, and there are few of them. `fit_order` closes it
against the destination, whose order is observed: top-down, for every module of the tree, it
picks the order of the children whose signature sequence aligns best with the destination's
execution order (a semi-global alignment of that module's units with the window of the
destination they fall in), ties going to the checkpoint's own order. Families of identical
siblings (every block of a stage) take one decision. The result is an order the matcher can
compare position by position with the destination's; it is borrowed from the destination where
the tree left it open, so the matches it decides stay below certainty (`Tracer.FITTED`'s trust,
`archalign.confidence.trust_in`).

Planning only: pure functions of units and signatures, no tensors.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .chains import Chains
from .features import GAP, name_tokens, unit_signature
from .graph import Tracer, Unit, UnitGraph, chain_graph
from .order_alignment import (
    Costs,
    Item,
    extend_rows,
    first_row,
    in_repeat,
    item_of,
    sequence_cost,
    window_of,
)
from .order_names import (
    name_inversions,
    ordinal_inversions,
    ordinal_spread,
    role_inversions,
    role_of,
    role_spread,
)

__all__ = ["BEAM", "MAX_ARRANGEMENTS", "MAX_SWEEPS", "fit_order"]

logger = logging.getLogger(__name__)

MAX_ARRANGEMENTS = 120  # orders of one module's children tried exhaustively; beyond, a beam
BEAM = 16  # partial orders the beam search keeps
MAX_FREE_MOVES_UNITS = 2000  # above this many units, no single-unit moves (each costs an alignment)
SCORED_MEMBERS = 3  # members of a family of identical modules whose span scores an order
MAX_SWEEPS = 3  # passes over the tree: bottom-up once, then top-down until nothing moves
OWN = "\x00own"  # in an order: where a module's own lone tensor runs (a block's layer scale)


@dataclass
class _Node:
    """One module of the checkpoint's key tree."""

    path: str  # dotted module path ("" for the root)
    unit: Unit | None = None  # the unit whose key is this path (a layer or a lone tensor)
    children: dict[str, _Node] = field(default_factory=dict)  # by name, in checkpoint order
    order: list[str] | None = None  # the children's chosen order (None: checkpoint order)
    turns: tuple[str, str] | None = None  # two children, runs of numbered blocks, that run in
    # turns (block i of the first, then block i of the second: `_interleave_runs`)

    def items(self) -> list[str | None]:
        """The names of what this node holds, in the chosen order: None for its own unit (first,
        unless the order places it: `OWN`)."""
        names = list(self.children if self.order is None else self.order)
        if OWN in names:
            return [None if n == OWN else n for n in names]
        return ([None] if self.unit is not None else []) + list(names)

    def part(self, name: str) -> list[Unit]:
        """The units of one item of an order: a child's, or (`OWN`) the node's own unit."""
        if name == OWN:
            assert self.unit is not None
            return [self.unit]
        return list(self.children[name].units())

    def units(self) -> Iterator[Unit]:
        """Its units in the chosen order, depth first (two children in turns where `turns`
        says so, from where the first of them stands)."""
        for name in self.items():
            if name is None:
                assert self.unit is not None
                yield self.unit
            elif self.turns is None or name not in self.turns:
                yield from self.children[name].units()
            elif name == next(n for n in self.items() if n in self.turns):
                first, second = (self.children[n] for n in self.turns)
                for block in sorted(first.children, key=int):
                    yield from first.children[block].units()
                    yield from second.children[block].units()


def fit_order(src: UnitGraph, dst: UnitGraph) -> UnitGraph:
    """The source's units in the order of its key tree that best fits the destination's.

    Parameters
    ----------
    src : UnitGraph
        A checkpoint's graph (`Tracer.STATE_DICT` or `Tracer.SORTED`): its units in saved order.
    dst : UnitGraph
        The destination's graph in execution order (`Tracer.FX` or `Tracer.HOOKS`).

    Returns
    -------
    UnitGraph
        A chain over the same units, tracer `Tracer.FITTED`.

    Raises
    ------
    ValueError
        If ``dst`` carries no execution order (there is nothing to fit to).
    """
    if not dst.tracer.executes:
        raise ValueError(f"fit_order needs the destination in execution order; its tracer is "
                         f"{dst.tracer.value!r}")
    root = _tree(list(src.units.values()))
    target = [Item(unit_signature(u), in_repeat(u.key), dst.reads.get(u.key))
              for u in dst.units.values()]
    names_at: dict[str, int] = {}  # a name in the destination's keys -> where it first runs
    for rank, key in enumerate(dst.units):
        for part in key.split("."):
            names_at.setdefault(part, rank)
    blocks = _paired_blocks(root, list(dst.units), target)
    _interleave_runs(root, target)  # before the sweeps: their windows need the units in turns
    families = _families(_open_nodes(root))
    # deepest modules first (their context is local), then top-down again with every inner order
    # fitted, until no order changes: a module's order is judged with its children's in place
    for sweep in (families[::-1], *([families] * (MAX_SWEEPS - 1))):
        changed = False
        for members in sweep:
            before = members[0].items()
            _fit_family(root, members, target, names_at, blocks)
            changed |= members[0].items() != before
        if not changed:
            break
    fitted = _swap_by_names(_free_moves(list(root.units()), target), list(dst.units.values()))
    moved = sum(a.key != b.key for a, b in zip(fitted, src.units.values()))
    logger.info("fitted the checkpoint's key tree to the destination's execution order: %d of %d "
                "units moved", moved, len(fitted))
    graph = chain_graph(fitted, Tracer.FITTED)
    graph.reads = dict(src.reads)
    return graph


def _interleave_runs(root: _Node, target: list[Item]) -> None:
    """Let two sibling runs of numbered blocks of one length run in turns (``downsample_layers.i``
    then ``stages.i`` in the original ConvNeXt: two ModuleLists used in turns) where the whole
    sequence aligns better by at least a unit skipped, either run first (`_Node.turns`)."""
    if sum(1 for _ in root.units()) > MAX_FREE_MOVES_UNITS:
        return
    costs = Costs(target)
    best = sequence_cost(list(root.units()), costs)
    queue = [root]
    while queue:
        node = queue.pop(0)
        queue.extend(node.children.values())
        runs = [name for name, c in node.children.items()
                if len(c.children) >= 2 and all(n.isdigit() for n in c.children)]
        for a, b in itertools.combinations(runs, 2):
            if sorted(node.children[a].children) != sorted(node.children[b].children):
                continue
            kept = node.turns
            for turns in ((a, b), (b, a)):
                node.turns = turns
                found = sequence_cost(list(root.units()), costs)
                if found <= best - GAP:
                    kept, best = turns, found
            node.turns = kept


def _swap_by_names(sequence: list[Unit], dst_units: list[Unit]) -> list[Unit]:
    """Swap two equal single units outside any numbered block (an input embedding and an output
    head of one shape) that stand against the order of the destination units their names agree
    with: equal units cost the same anywhere, so the alignment cannot tell them apart."""
    rank = {u.key: r for r, u in enumerate(dst_units)}
    tokens = [(name_tokens(u.key), u.key) for u in dst_units]

    @functools.cache
    def named_at(unit: Unit) -> int | None:
        """Where the destination unit of the closest name runs (None: no name in common)."""
        mine = name_tokens(unit.key)
        score, key = max(((len(mine & t) / max(len(mine | t), 1), k) for t, k in tokens),
                         default=(0.0, ""))
        return rank[key] if score > 0.5 else None

    out = list(sequence)
    lone = [i for i, u in enumerate(out) if not in_repeat(u.key)]
    for i, j in itertools.combinations(lone, 2):  # i < j
        a, b = out[i], out[j]
        if item_of(a) != item_of(b):
            continue
        at_a, at_b = named_at(a), named_at(b)
        if at_a is not None and at_b is not None and at_a > at_b:
            out[i], out[j] = b, a
    return out


def _free_moves(sequence: list[Unit], target: list[Item]) -> list[Unit]:
    """Move single units outside any numbered block (an embedding, a final norm) to the boundary
    between top-level parts where the whole sequence aligns better by at least a unit skipped:
    a checkpoint may keep tensors of one container that do not run together (``base.embed``
    and ``base.norm`` around blocks stored elsewhere)."""
    if len(sequence) > MAX_FREE_MOVES_UNITS:
        return sequence
    costs = Costs(target)
    best = sequence_cost(sequence, costs)
    for unit in [u for u in sequence if not in_repeat(u.key)]:
        rest = [u for u in sequence if u is not unit]
        tops = [u.key.split(".")[0] for u in rest]
        bounds = [i for i in range(len(rest) + 1)
                  if i in (0, len(rest)) or tops[i] != tops[i - 1]
                  or _block_path(rest[i].key) != _block_path(rest[i - 1].key)]
        for at in bounds:
            candidate = [*rest[:at], unit, *rest[at:]]
            found = sequence_cost(candidate, costs)
            if found <= best - GAP:
                sequence, best = candidate, found
    return sequence


# --------------------------------------------------------------------------- the key tree

def _open_nodes(root: _Node) -> list[_Node]:
    """The modules whose order is open (two or more items), top-down (breadth first)."""
    out, queue = [], [root]
    while queue:
        node = queue.pop(0)
        queue.extend(node.children.values())
        if len(node.children) + (node.unit is not None) >= 2:
            out.append(node)
    return out


def _tree(units: Sequence[Unit]) -> _Node:
    """The module tree of the units' keys, children in the order they first appear."""
    root = _Node("")
    for unit in units:
        node = root
        for part in unit.key.split("."):
            path = f"{node.path}.{part}" if node.path else part
            node = node.children.setdefault(part, _Node(path))
        node.unit = unit
    return root


def _block_path(path: str) -> str:
    """The numbered block a module lies in (itself when numbered): ``blk.0.attn`` -> ``blk.0``;
    "" outside any."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[:i + 1])
    return ""


def _paired_blocks(root: _Node, dst_keys: list[str], target: list[Item]
                   ) -> dict[str, tuple[_Node, list[Item]]]:
    """Numbered source blocks (``blk.3``) -> (the block, its destination counterpart's units in
    execution order). Runs of blocks are paired by count and by what they hold (the multiset of
    their units' signatures), block i with block i. A run of another length (ResNet-34's four
    blocks of a stage against ResNet-18's two) cannot be paired block by block: which blocks
    were dropped is open; each of its blocks is then judged against a block of one destination
    run that holds the very same units (`_templates`: the order of a block's children is what
    matters here, and identical blocks share it)."""
    dst_runs: dict[str, dict[str, list[Item]]] = {}  # run -> member -> units, in order
    for key, item in zip(dst_keys, target):
        block = _block_path(key.rpartition(".")[0])
        if block:
            run, _, member = block.rpartition(".")
            dst_runs.setdefault(run, {}).setdefault(member, []).append(item)
    src_runs: dict[str, list[_Node]] = {}
    queue = [root]
    while queue:
        node = queue.pop()
        queue.extend(node.children.values())
        numbered = [c for name, c in node.children.items() if name.isdigit() and c.children]
        if len(numbered) >= 2:
            src_runs[node.path] = sorted(numbered, key=lambda c: int(c.path.rpartition(".")[2]))
    out: dict[str, tuple[_Node, list[Item]]] = {}
    taken: set[str] = set()
    for _, members in sorted(src_runs.items(), key=lambda r: -len(r[1])):
        held = Counter(unit_signature(u) for m in members for u in m.units())
        best, best_overlap = None, 0.5  # at least half of what both hold must agree
        for run, dst_members in dst_runs.items():
            if run in taken or len(dst_members) != len(members):
                continue
            theirs = Counter(i.signature for items in dst_members.values() for i in items)
            overlap = sum((held & theirs).values()) / max(sum((held | theirs).values()), 1)
            if overlap > best_overlap:
                best, best_overlap = run, overlap
        if best is None:
            continue
        taken.add(best)
        dst_members = dst_runs[best]
        for node, member in zip(members, sorted(dst_members, key=int)):
            out[node.path] = (node, dst_members[member])
    for members in src_runs.values():
        if not any(m.path in out for m in members):
            out.update(_templates(members, {r: m for r, m in dst_runs.items() if r not in taken}))
    return out


def _templates(members: list[_Node], dst_runs: dict[str, dict[str, list[Item]]]
               ) -> dict[str, tuple[_Node, list[Item]]]:
    """The blocks of a source run -> (the block, a destination block holding the very same
    units, by signature: the one of its own number where there is one), from the one
    destination run that has such a block for most of them (at least half)."""
    held = {m.path: Counter(unit_signature(u) for u in m.units()) for m in members}
    best: dict[str, tuple[_Node, list[Item]]] = {}
    for dst_members in dst_runs.values():
        contents = [(member, Counter(i.signature for i in items))
                    for member, items in sorted(dst_members.items(), key=lambda kv: int(kv[0]))]
        found: dict[str, tuple[_Node, list[Item]]] = {}
        for node in members:
            number = node.path.rpartition(".")[2]
            same = [member for member, content in contents if content == held[node.path]]
            if same:
                found[node.path] = (node, dst_members[number if number in same else same[0]])
        if len(found) > len(best):
            best = found
    return best if 2 * len(best) >= len(members) else {}


def _families(nodes: list[_Node]) -> list[list[_Node]]:
    """The open modules grouped into families of identical siblings (the blocks of a stage: one
    parent, the same children, the same units relative to the module), in the order given."""
    groups: dict[tuple[object, ...], list[_Node]] = {}
    for node in nodes:
        start = len(node.path) + 1 if node.path else 0
        key = (node.path.rpartition(".")[0], tuple(sorted(node.children)),
               tuple(sorted((u.key[start:], unit_signature(u)) for u in node.units())))
        groups.setdefault(key, []).append(node)
    return list(groups.values())


# --------------------------------------------------------------------------- one module's order

def _fit_family(root: _Node, members: list[_Node], target: list[Item],
                names_at: dict[str, int], blocks: dict[str, tuple[_Node, list[Item]]]) -> None:
    """Give every member of a family the order of children (its own unit stays first) under
    which the first `SCORED_MEMBERS` members, with as many source units on either side as
    context, align best with the part of the destination that span falls in (the context pins
    the alignment's phase: a block cannot win by lining up with its neighbour's half)."""
    first = members[0]
    names = list(first.children if first.order is None else first.order)
    if OWN not in names and all(m.unit is not None and m.unit.type_name == "Parameter"
                                for m in members):
        names = [OWN, *names]  # a lone tensor of the module (a layer scale) runs where it is used
    chains = Chains.of(names, lambda n: tuple(item_of(u) for u in first.part(n))
                        if n == OWN or not first.children[n].children else "module")
    if chains.count() <= 1:  # one order keeps the chains (blocks 0 .. N): numbers, not names
        for node in members:  # (a sorted file keeps "10" before "2")
            node.order = chains.realise(chains.labels)
        return
    scored = members[:SCORED_MEMBERS]
    inside = [blocks.get(_block_path(m.path)) for m in scored]
    spans: list[tuple[_Node, slice, Costs]]  # what to align (a node's units, a slice of them)
    if all(b is not None for b in inside):
        # numbered blocks paired with the destination's: each member's block against its
        # counterpart, end to end (no phase to guess)
        spans = [(b, slice(None), Costs(w)) for b, w in (x for x in inside if x is not None)]
        head: list[Item] = []
    else:
        sequence = list(root.units())
        length = sum(1 for _ in first.units())
        start = _segment_start(sequence, first)
        end = _segment_start(sequence, scored[-1]) + length
        lo, hi = max(0, start - length), min(len(sequence), end + length)
        spans = [(root, slice(lo, hi), Costs(window_of(sequence, lo, hi, target)))]
        head = [item_of(u) for u in sequence[lo:start]]
    if chains.count() <= MAX_ARRANGEMENTS:
        arrangements = list(chains.arrangements())
    else:  # too many to try: the checkpoint's order and the best ones a beam search builds
        costs = spans[0][2]
        lead = head + ([item_of(first.unit)] if first.unit and OWN not in names else [])
        if inside[0] is not None:  # the member's block units before the member
            block_units = list(inside[0][0].units())
            at = _segment_start(block_units, first)
            lead = [item_of(u) for u in block_units[:at]] + lead
        arrangements = [chains.realise(chains.labels),
                        *(_named_in_place(order, first, chains, names_at)
                          for order in _beam(first, chains,
                                             extend_rows(first_row(costs), lead, costs), costs))]
    best, best_key = arrangements[0], (np.inf,) * 6
    for order in arrangements:
        for node in members:
            node.order = list(order)
        cost = round(sum(sequence_cost(list(n.units())[part], c) for n, part, c in spans), 9)
        # equal costs (identical signatures: q, k, v; or a block shifted by one norm): children
        # named as in the destination in its order, then children named for their step in that
        # step's order (q, k, v before o; gate, up before down; before/pre before after/post) and
        # attention's steps together (q with kv), then siblings of one number together (conv1
        # with bn1), then the earlier arrangement (the checkpoint's own)
        key = (cost, name_inversions(order, names_at), role_inversions(order),
               role_spread(order), ordinal_inversions(order), ordinal_spread(order))
        if key < best_key:
            best, best_key = order, key
    for node in members:
        node.order = list(best)


def _beam(node: _Node, chains: Chains, rows: list[np.ndarray], costs: Costs) -> list[list[str]]:
    """Orders of ``node``'s children built child by child, keeping the `BEAM` partial orders whose
    units align best with some beginning of the window (``rows``: the alignment so far)."""
    beam: list[tuple[float, list[str], list[np.ndarray]]] = [(0.0, [], rows)]
    contents_of = {name: tuple(item_of(u) for u in node.part(name))
                   for name in chains.labels_names()}
    for _ in chains.labels:
        grown = []
        for _, order, state in beam:
            for members in chains.ordered.values():
                done = sum(n in order for n in members)
                if done == len(members):
                    continue
                name = members[done]
                after = extend_rows(state, [item_of(u) for u in node.part(name)], costs)
                grown.append((float(after[-1].min()), [*order, name], after))
        # orders that hold the same units in the same places cost the same (q, k, v and o are
        # four equal linears): one of them, the best named, stands for all, so that equal
        # children do not fill the beam with permutations of one another
        grown.sort(key=lambda g: (g[0], role_inversions(g[1])))
        contents: dict[tuple[tuple[Item, ...], ...], tuple[float, list[str], list[np.ndarray]]] = {}
        for entry in grown:
            content = tuple(contents_of[n] for n in entry[1])
            contents.setdefault(content, entry)
        beam = list(contents.values())[:BEAM]
    return [order for _, order, _ in beam]


def _named_in_place(order: list[str], node: _Node, chains: Chains,
                    names_at: dict[str, int]) -> list[str]:
    """``order`` with children of identical content (equal units, so equal costs) swapped into
    the order their names say: destination names in its order, then steps (`_ROLES`), then the
    checkpoint's order; ``order`` itself when that would break a chain (``fc1`` before ``fc2``)."""
    content = {n: tuple(item_of(u) for u in node.part(n)) for n in order}
    rank = {n: i for i, n in enumerate([OWN, *node.children])}
    slots: dict[tuple[Item, ...], list[int]] = {}
    for i, name in enumerate(order):
        slots.setdefault(content[name], []).append(i)
    out = list(order)
    for places in slots.values():
        names = sorted((order[i] for i in places), key=lambda n: (
            names_at.get(n, math.inf), role_of(n) or (math.inf, math.inf), rank[n]))
        for i, name in zip(places, names):
            out[i] = name
    for chain in chains.ordered.values():
        at = [out.index(n) for n in chain]
        if at != sorted(at):
            return order
    return out


def _segment_start(sequence: list[Unit], node: _Node) -> int:
    """Where ``node``'s units begin in the whole sequence (they are contiguous)."""
    first = next(node.units())
    return next(i for i, u in enumerate(sequence) if u.key == first.key)
