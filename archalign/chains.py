"""A module's children as chains: the orders of them that keep numbered siblings in order.

A checkpoint's key tree says that siblings of one stem run in their numbers' order (``norm1``
before ``norm2``; blocks ``0 .. N``); every other order is open. `Chains` holds the children as
such chains and enumerates the orders that keep them (`archalign.skeleton` picks one).

Pure functions of names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .order_names import ORDINAL

__all__ = ["Chains"]


@dataclass(frozen=True)
class Chains:
    """A module's children as chains: siblings of one stem in their numbers' order (``norm1``,
    ``norm2``; ``0 .. N``), every other child a chain of its own."""

    labels: tuple[str, ...]  # each child's chain, in the checkpoint's order
    ordered: dict[str, tuple[str, ...]]  # chain -> its children in order

    @staticmethod
    def of(names: Sequence[str], content: Callable[[str], object] | None = None) -> Chains:
        """The chains of ``names``; with ``content`` (a layer's units, compared; a container's
        name), numbered layers chain only with equal ones: ``w1``, ``w3`` (gate, up) of Meta's
        feed-forward chain, its ``w2`` (down, run last) is free; numbered containers (stages
        ``layer1 .. layer4``, blocks ``0 .. N``) always chain."""
        chains: dict[str, list[tuple[int, str]]] = {}
        labels = []
        kinds: dict[object, int] = {}
        for name in names:
            match = ORDINAL.fullmatch(name)
            stem = f"#{match.group(1)}" if match else name
            if match and match.group(1) and content is not None:
                stem += f"#{kinds.setdefault(content(name), len(kinds))}"
            chains.setdefault(stem, []).append((int(match.group(2)) if match else 0, name))
            labels.append(stem)
        return Chains(tuple(labels), {s: tuple(n for _, n in sorted(c)) for s, c in chains.items()})

    def labels_names(self) -> list[str]:
        """Every child of every chain."""
        return [n for chain in self.ordered.values() for n in chain]

    def count(self) -> int:
        """How many orders keep every chain in order (a multinomial coefficient)."""
        return math.factorial(len(self.labels)) // math.prod(
            math.factorial(len(c)) for c in self.ordered.values())

    def realise(self, labels: Sequence[str]) -> list[str]:
        """The children in the order of a sequence of chain labels."""
        taken = dict.fromkeys(self.ordered, 0)
        out = []
        for stem in labels:
            out.append(self.ordered[stem][taken[stem]])
            taken[stem] += 1
        return out

    def arrangements(self) -> Iterator[list[str]]:
        """Every order that keeps the chains, the checkpoint's (chains sorted) first."""
        for labels in _multiset_permutations(list(self.labels)):
            yield self.realise(labels)


def _multiset_permutations(items: list[str]) -> Iterator[list[str]]:
    """Distinct permutations of a multiset, the given order first (lexicographic in its ranks)."""
    rank = {v: i for i, v in enumerate(dict.fromkeys(items))}
    values = sorted(items, key=rank.__getitem__)
    counts = {v: values.count(v) for v in dict.fromkeys(values)}
    # the given order is not the first lexicographic one in general: start from it, then the rest
    first = list(items)
    yield first

    def rec(prefix: list[str]) -> Iterator[list[str]]:
        if len(prefix) == len(values):
            yield list(prefix)
            return
        for v in counts:
            if counts[v]:
                counts[v] -= 1
                prefix.append(v)
                yield from rec(prefix)
                prefix.pop()
                counts[v] += 1

    for perm in rec([]):
        if perm != first:
            yield perm
