"""The records of what happened: what `apply` did (loaded, skipped and why, left untouched, source
tensors not used) and what running both models showed (`Verification`, `Divergence`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["Adapted", "Divergence", "LoadReport", "Skipped", "Verification"]


@dataclass(frozen=True)
class Divergence:
    """The first matched layer whose outputs differ."""

    src: str  # source module path
    dst: str  # destination module path
    max_abs_diff: float  # largest absolute difference of the two layers' outputs


@dataclass(frozen=True)
class Verification:
    """The result of running both models on the same input."""

    ok: bool  # True when every compared output agrees within tolerance
    max_abs_diff: float  # largest absolute difference over all compared outputs (inf: not comparable)
    outputs_compared: int  # how many output tensors were compared
    tolerance: float  # the absolute tolerance used (atol + rtol * max |source output|)
    first_divergence: Divergence | None  # the first matched layer that differs, when found
    problem: str = ""  # why outputs could not be compared, if they could not

    def __str__(self) -> str:
        verdict = "outputs agree" if self.ok else "OUTPUTS DIFFER"
        text = (f"{verdict}: max |src - dst| = {self.max_abs_diff:.3g} over "
                f"{self.outputs_compared} output tensors (tolerance {self.tolerance:.3g})")
        if self.problem:
            text += f"; {self.problem}"
        if self.first_divergence is not None:
            d = self.first_divergence
            text += (f"; first diverging layer: {d.dst} <- {d.src} "
                     f"(max diff {d.max_abs_diff:.3g})")
        return text



class Skipped(NamedTuple):
    """A destination tensor that had a candidate but was not written."""

    dst: str  # destination key, left as it was
    src: str  # the candidate source key(s), comma-separated
    reason: str  # e.g. "confidence 0.31 < min_confidence 0.50", "shape mismatch: (8,10) vs (5,10)"


class Adapted(NamedTuple):
    """A destination tensor written through an adaptation or a shape policy."""

    dst: str  # destination key
    src: str  # source key(s), comma-separated
    how: str  # the operations ("transpose regroup3x12") or the policy ("policy slice: ...")


@dataclass(frozen=True)
class LoadReport:
    """The outcome of applying a plan; nothing is loaded that is not listed in ``loaded``."""

    loaded: tuple[str, ...]  # destination keys written, in plan order
    skipped: tuple[Skipped, ...]  # destination keys with a candidate that were not written
    missing: tuple[str, ...]  # destination keys left at their initialisation (skipped included)
    unexpected: tuple[str, ...]  # source keys that went nowhere
    tied: tuple[tuple[str, str], ...] = ()  # destination (alias, primary): loaded with the primary
    verification: Verification | None = None  # outputs compared after the load, when asked for
    adapted: tuple[Adapted, ...] = ()  # loaded keys that went through an adaptation or a policy
    nonfinite: tuple[str, ...] = ()  # loaded keys whose values hold NaN or Inf (loaded, and warned)
    plan: Plan | None = field(default=None, repr=False)  # the plan applied (its matches'
    # confidences and costs), as plain data: without the source it was made from (source None)

    @property
    def complete(self) -> bool:
        """True when every destination tensor was loaded."""
        return not self.missing

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors ({len(self.adapted)} adapted), "
                 f"skipped {len(self.skipped)}, "
                 f"{len(self.missing)} destination tensors left untouched, "
                 f"{len(self.unexpected)} source tensors unused"]
        lines.extend(_capped([f"  adapted {a.dst} <- {a.src}: {a.how}" for a in self.adapted],
                             "adapted"))
        lines.extend(_capped([f"  skipped {s.dst} <- {s.src}: {s.reason}" for s in self.skipped],
                             "skipped"))
        skipped = {s.dst for s in self.skipped}
        untouched = [k for k in self.missing if k not in skipped]
        if untouched:
            lines.append(f"  untouched (no counterpart in the source): {_listed(untouched)}")
        if self.unexpected:
            lines.append(f"  unused source tensors: {_listed(self.unexpected)}")
        if self.tied:
            lines.append("  tied: " + ", ".join(f"{a} = {p}" for a, p in self.tied))
        if self.nonfinite:
            lines.append(f"  WARNING: NaN/Inf loaded into: {', '.join(self.nonfinite)}")
        if self.verification is not None:
            lines.append(f"  verification: {self.verification}")
        return "\n".join(lines)


LISTED = 12  # keys a report names in one line, lines of one kind it prints, before "and N more"


def _listed(keys: Sequence[str]) -> str:
    """At most `LISTED` keys, comma-separated, then how many more."""
    more = f" and {len(keys) - LISTED} more" if len(keys) > LISTED else ""
    return ", ".join(keys[:LISTED]) + more


def _capped(lines: list[str], kind: str) -> list[str]:
    """At most `LISTED` lines, then one saying how many more of ``kind`` there are."""
    if len(lines) <= LISTED:
        return lines
    return [*lines[:LISTED], f"  ... and {len(lines) - LISTED} more {kind}"]
