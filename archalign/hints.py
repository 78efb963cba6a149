"""Reviewer hints: pin a pair, forbid a pair, drop a destination layer; then re-solve.

Hints name keys or glob patterns (``"blocks.*.attn"``), of units or of tensors; a pattern that
names a container covers the layers inside it. They are plain data (saved in plan files) and are
resolved against the models' units only when `archalign.align` re-solves with them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from .errors import AlignError, PlanError
from .graph import Unit

__all__ = ["Hints", "ResolvedHints", "covers", "resolve_hints"]


@dataclass(frozen=True)
class Hints:
    """Constraints a reviewer puts on the assignment."""

    pin: tuple[tuple[str, str], ...] = ()  # (source pattern, destination pattern): must match
    forbid: tuple[tuple[str, str], ...] = ()  # (source pattern, destination pattern): must not
    drop: tuple[str, ...] = ()  # destination patterns to leave untouched

    def __bool__(self) -> bool:
        return bool(self.pin or self.forbid or self.drop)

    def to_dict(self) -> dict[str, Any]:
        return {"pin": [list(p) for p in self.pin], "forbid": [list(p) for p in self.forbid],
                "drop": list(self.drop)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Hints:
        """Read hints from their plan-file form.

        Raises
        ------
        PlanError
            If a field is unknown or an entry is not a (source, destination) pair of strings.
        """
        unknown = set(data) - {"pin", "forbid", "drop"}
        if unknown:
            raise PlanError(f"unknown hint fields {sorted(unknown)}; use pin, forbid, drop")
        return cls(pin=_pairs(data.get("pin", ()), "pin"),
                   forbid=_pairs(data.get("forbid", ()), "forbid"),
                   drop=tuple(_string(d, "drop") for d in data.get("drop", ())))


@dataclass(frozen=True)
class ResolvedHints:
    """Hints turned into unit keys of two given models."""

    pins: tuple[tuple[str, str], ...] = ()  # (source unit, destination unit), forced
    forbidden: frozenset[tuple[str, str]] = field(default_factory=frozenset)  # never paired
    dropped: frozenset[str] = field(default_factory=frozenset)  # destination units left alone


def resolve_hints(hints: Hints | None, src_units: Sequence[Unit],
                  dst_units: Sequence[Unit]) -> ResolvedHints:
    """Resolve patterns to units (both lists in execution order).

    A pin whose patterns cover several units pairs them in execution order, k-th with k-th.

    Raises
    ------
    AlignError
        If a pattern covers no unit, a pin's two sides cover different numbers of units, or a unit
        is pinned twice.
    """
    if not hints:
        return ResolvedHints()
    pins: list[tuple[str, str]] = []
    for src_pattern, dst_pattern in hints.pin:
        left = _covered(src_pattern, src_units, "source")
        right = _covered(dst_pattern, dst_units, "destination")
        if len(left) != len(right):
            raise AlignError(
                f"pin {src_pattern!r} -> {dst_pattern!r}: the source pattern covers {len(left)} "
                f"layers ({', '.join(left[:4])}...) and the destination pattern {len(right)} "
                f"({', '.join(right[:4])}...); make them cover the same number")
        pins.extend(zip(left, right))
    for side in (0, 1):
        counts = Counter(p[side] for p in pins)
        twice = sorted(k for k, n in counts.items() if n > 1)
        if twice:
            raise AlignError(f"layers pinned twice: {', '.join(twice)}")
    forbidden = frozenset(
        (s, d) for src_pattern, dst_pattern in hints.forbid
        for s in _covered(src_pattern, src_units, "source")
        for d in _covered(dst_pattern, dst_units, "destination"))
    dropped = frozenset(d for pattern in hints.drop
                        for d in _covered(pattern, dst_units, "destination"))
    return ResolvedHints(pins=tuple(pins), forbidden=forbidden, dropped=dropped)


def covers(pattern: str, unit_key: str, tensors: Sequence[str]) -> bool:
    """Whether a hint pattern names this layer: its key, a container around it, or one of its
    tensors."""
    return (fnmatchcase(unit_key, pattern) or fnmatchcase(unit_key, pattern + ".*")
            or any(fnmatchcase(t, pattern) or fnmatchcase(t, pattern + ".*") for t in tensors))


def _covered(pattern: str, units: Sequence[Unit], role: str) -> list[str]:
    found = [u.key for u in units if covers(pattern, u.key, u.tensors)]
    if not found:
        raise AlignError(f"the {role} pattern {pattern!r} matches no layer or tensor; check the "
                         f"key (e.g. one of {', '.join(u.key for u in units[:3])}, ...)")
    return found


def _pairs(values: Any, what: str) -> tuple[tuple[str, str], ...]:
    out = []
    for value in values:
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise PlanError(f"a {what} hint is a [source, destination] pair, got {value!r}")
        out.append((_string(value[0], what), _string(value[1], what)))
    return tuple(out)


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise PlanError(f"a {what} hint names keys as strings, got {value!r}")
    return value
