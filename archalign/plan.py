"""The plan: plain, reviewable data saying which source tensors go where, and how sure we are.

A `Plan` is produced by `archalign.align` and touches no weights. It prints as a review table
(lowest confidence first; `review.py` builds it), compares equal by value, and round-trips through
JSON. Applying it is `apply.py`'s job; `Plan.apply` only forwards there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .confidence import DEFAULT_MIN_CONFIDENCE
from .errors import PlanError
from .hints import Hints, covers
from .ops import Op, as_shape, invert_ops

if TYPE_CHECKING:
    from torch import nn

    from .report import LoadReport
    from .source import TensorSource

__all__ = ["PLAN_VERSION", "Match", "Mismatch", "Plan",
           "load_plan"]

PLAN_VERSION = 1

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Match:
    """Source tensor(s) that load into destination tensor(s)."""

    src: tuple[str, ...]  # source keys; one for a plain copy
    dst: tuple[str, ...]  # destination keys; one for a plain copy
    src_shapes: tuple[Shape, ...]  # shapes of `src`, same order
    dst_shapes: tuple[Shape, ...]  # shapes of `dst`, same order
    confidence: float  # in [0, 1]; low when the structure disagrees or a runner-up is as good
    costs: tuple[tuple[str, float], ...]  # the cost terms behind it, and "regret" (the margin)
    src_unit: str  # the source layer (unit) this tensor moves with ("a+b" for a fused group)
    dst_unit: str  # the destination layer (unit) this tensor moves with ("a+b" for a fused group)
    ops: tuple[Op, ...] = ()  # adaptations applied on the way (transpose, reshape, concat, ...)

    @property
    def adapted(self) -> bool:
        return bool(self.ops)

    @property
    def cost_terms(self) -> dict[str, float]:
        return dict(self.costs)


@dataclass(frozen=True)
class Mismatch:
    """A destination layer whose counterpart was found but does not fit; nothing is loaded."""

    src: tuple[str, ...]  # source keys of the counterpart
    dst: tuple[str, ...]  # destination keys left untouched
    src_shapes: tuple[Shape, ...]  # shapes of `src`
    dst_shapes: tuple[Shape, ...]  # shapes of `dst`
    reason: str  # why it was not loaded, e.g. "shape mismatch: (8, 10) vs (5, 10)"
    confidence: float = 0.0  # that these are counterparts (a shape policy loads only above min)


@dataclass(frozen=True)
class Plan:
    """Everything `align` proposes, as plain data.

    Attributes
    ----------
    matches : tuple of Match
        Proposed copies, in destination state_dict order.
    mismatches : tuple of Mismatch
        Destination layers whose counterpart does not fit (reported, not loaded).
    unmatched_src, unmatched_dst : tuple of str
        Keys that take part in no match (mismatched keys included).
    tied_src, tied_dst : tuple of (alias, primary)
        Tied tensors: the alias is the primary and is loaded through it.
    verification : str
        What running both models on one input showed while aligning ("" when it was not run).
    src_tracer, dst_tracer : str
        How each side's structure was obtained: "fx", "hooks", "registration", "state_dict" or
        "sorted" (a file whose key order means nothing, compared in natural key order).
    nonfinite : tuple of str
        Source keys whose tensors held NaN or Inf when `align` scanned them (in-memory sources
        only: a checkpoint read lazily is scanned when applied). Applying loads them as they
        are, with a warning.
    """

    matches: tuple[Match, ...]
    mismatches: tuple[Mismatch, ...] = ()
    unmatched_src: tuple[str, ...] = ()
    unmatched_dst: tuple[str, ...] = ()
    tied_src: tuple[tuple[str, str], ...] = ()
    tied_dst: tuple[tuple[str, str], ...] = ()
    src_tracer: str = ""
    dst_tracer: str = ""
    verification: str = ""  # what running both models on an input showed ("" when not run)
    hints: Hints = field(default_factory=Hints)  # the reviewer's pins, forbids and drops
    nonfinite: tuple[str, ...] = ()  # source keys holding NaN/Inf when aligned (in-memory sources)
    source: TensorSource | None = field(default=None, compare=False, repr=False, hash=False)

    # ---------------------------------------------------------------- applying
    def apply(self, dst: nn.Module, src: Any = None, *, min_confidence: float = DEFAULT_MIN_CONFIDENCE,
              strict: bool = False, shape_policy: str | Mapping[str, str] | None = None,
              atomic: bool = True, check_finite: bool = True,
              progress: Callable[[int, int], None] | None = None) -> LoadReport:
        """Load the planned tensors into ``dst``; see `archalign.apply.apply_plan`."""
        from .apply import apply_plan

        return apply_plan(self, dst, src, min_confidence=min_confidence, strict=strict,
                          shape_policy=shape_policy, atomic=atomic, check_finite=check_finite,
                          progress=progress)

    # ---------------------------------------------------------------- reviewing
    def pin(self, src: str, dst: str) -> Plan:
        """A copy of the plan with the hint "``src`` goes to ``dst``" (keys or glob patterns).

        The assignment itself changes only when re-solved: ``archalign.align(src_model,
        dst_model, hints=plan.hints)``; a pinned pair then also re-anchors its neighbours.
        """
        return dataclasses.replace(self, hints=dataclasses.replace(
            self.hints, pin=(*self.hints.pin, (src, dst))))

    def forbid(self, src: str, dst: str) -> Plan:
        """A copy of the plan with the hint "never match ``src`` with ``dst``" (see `pin`)."""
        return dataclasses.replace(self, hints=dataclasses.replace(
            self.hints, forbid=(*self.hints.forbid, (src, dst))))

    def drop(self, dst: str) -> Plan:
        """A copy of the plan with the hint "leave ``dst`` untouched" (see `pin`).

        Also removes the matches of ``dst`` from this plan right away, so that applying it
        without re-solving already leaves those tensors alone.
        """
        gone = [covers(dst, m.dst_unit, m.dst) for m in self.matches]
        keep = tuple(m for m, g in zip(self.matches, gone) if not g)
        dropped = tuple(k for m, g in zip(self.matches, gone) if g for k in m.dst)
        return dataclasses.replace(
            self, matches=keep, unmatched_dst=(*self.unmatched_dst, *dropped),
            hints=dataclasses.replace(self.hints, drop=(*self.hints.drop, dst)))

    # ---------------------------------------------------------------- reading
    def __len__(self) -> int:
        return len(self.matches)

    def mapping(self) -> dict[str, str]:
        """``dst key -> src key`` for every one-to-one match."""
        return {m.dst[0]: m.src[0] for m in self.matches if len(m.src) == len(m.dst) == 1}

    def __str__(self) -> str:
        """The review table; see `archalign.review.format_plan`."""
        from .review import format_plan

        return format_plan(self)

    def inverse(self) -> Plan:
        """The plan that converts back: destination tensors into the source's layout.

        Every adaptation is inverted (split <-> concat, transposes, reshapes, regroups), so
        applying a plan and then its inverse returns the original tensors bit for bit.
        """
        return Plan(
            matches=tuple(
                Match(src=m.dst, dst=m.src, src_shapes=m.dst_shapes, dst_shapes=m.src_shapes,
                      confidence=m.confidence, costs=m.costs, src_unit=m.dst_unit,
                      dst_unit=m.src_unit, ops=invert_ops(m.ops, m.src_shapes))
                for m in self.matches),
            mismatches=tuple(
                Mismatch(src=mm.dst, dst=mm.src, src_shapes=mm.dst_shapes,
                         dst_shapes=mm.src_shapes, reason=mm.reason, confidence=mm.confidence)
                for mm in self.mismatches),
            unmatched_src=self.unmatched_dst, unmatched_dst=self.unmatched_src,
            tied_src=self.tied_dst, tied_dst=self.tied_src,
            src_tracer=self.dst_tracer, dst_tracer=self.src_tracer,
        )

    # ---------------------------------------------------------------- exporting
    def to_key_mapping(self, *, min_confidence: float = 0.0) -> dict[str, str]:
        """A transformers ``key_mapping``; see `archalign.exports.to_key_mapping`."""
        from .exports import to_key_mapping

        return to_key_mapping(self, min_confidence=min_confidence)

    def to_python(self, *, min_confidence: float = 0.0) -> str:
        """A standalone converter's source; see `archalign.exports.to_python`."""
        from .exports import to_python

        return to_python(self, min_confidence=min_confidence)

    def to_conversion_rules(self, *, min_confidence: float = 0.0,
                            destination: str = "DestinationModel") -> str:
        """transformers v5 conversion rules' source; see `archalign.exports.to_conversion_rules`."""
        from .exports import to_conversion_rules

        return to_conversion_rules(self, min_confidence=min_confidence, destination=destination)

    def to_html(self, path: str | os.PathLike[str], *, title: str = "archalign plan",
                source: str = "", destination: str = "") -> None:
        """Write the visual review report (``source``, ``destination``: what is compared, shown
        under the title); see `archalign.html.save_html`."""
        from .html import save_html

        save_html(self, path, title=title, source=source, destination=destination)

    def convert_checkpoint(self, src: Any, out: str | os.PathLike[str], *,
                           min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                           max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False,
                           writers: int | None = None,
                           progress: Callable[[int, int], None] | None = None) -> list[Path]:
        """Write the converted checkpoint as (sharded) safetensors without building the model;
        see `archalign.convert.convert_checkpoint` (``writers``: its default when None)."""
        from .convert import DEFAULT_WRITERS, convert_checkpoint

        return convert_checkpoint(self, src, out, min_confidence=min_confidence,
                                  max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                                  writers=DEFAULT_WRITERS if writers is None else writers,
                                  progress=progress)

    def to_records(self) -> list[dict[str, Any]]:
        """One flat dict per match (for ``pandas.DataFrame(plan.to_records())``); ``nonfinite``
        says whether a source tensor of the match held NaN/Inf when aligned, ``flags`` the
        review's flags of the row, space separated ("order-only prior"; see
        `archalign.review.Flag`)."""
        bad = set(self.nonfinite)
        return [{"dst": ", ".join(m.dst), "src": ", ".join(m.src),
                 "dst_shape": " ".join(map(str, m.dst_shapes)),
                 "src_shape": " ".join(map(str, m.src_shapes)),
                 "confidence": m.confidence, "ops": " ".join(map(str, m.ops)),
                 "dst_unit": m.dst_unit, "src_unit": m.src_unit,
                 "nonfinite": any(k in bad for k in m.src),
                 "flags": " ".join(f.value for f in flags), **dict(m.costs)}
                for m, flags in zip(self.matches, self._flags())]

    def _flags(self) -> list[tuple[Any, ...]]:
        """The review's flags of every match (`archalign.review.find_flags`), in match order."""
        from .review import find_flags

        return find_flags(self)

    def _repr_html_(self) -> str:
        """The review table as HTML (Jupyter shows it); see `archalign.review.format_plan_html`."""
        from .review import format_plan_html

        return format_plan_html(self)

    # ---------------------------------------------------------------- saving
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the plan file schema, version `PLAN_VERSION`).

        A match flagged by the review (`archalign.review.find_flags`) carries its flags
        (``"flags": ["order-only", "prior"]``): derived from the plan's own data, for readers of
        the file; `from_dict` checks their form and derives them again.
        """
        flags = self._flags()
        return {
            "archalign_plan": PLAN_VERSION,
            "src_tracer": self.src_tracer,
            "dst_tracer": self.dst_tracer,
            "verification": self.verification,
            "hints": self.hints.to_dict(),
            "matches": [
                {"src": list(m.src), "dst": list(m.dst),
                 "src_shapes": [list(s) for s in m.src_shapes],
                 "dst_shapes": [list(s) for s in m.dst_shapes],
                 "confidence": _round(m.confidence),
                 "costs": {k: _round(v) for k, v in m.costs},
                 "src_unit": m.src_unit, "dst_unit": m.dst_unit,
                 **({"ops": [op.to_dict() for op in m.ops]} if m.ops else {}),
                 **({"flags": [f.value for f in f_]} if f_ else {})}
                for m, f_ in zip(self.matches, flags)
            ],
            "mismatches": [
                {"src": list(m.src), "dst": list(m.dst),
                 "src_shapes": [list(s) for s in m.src_shapes],
                 "dst_shapes": [list(s) for s in m.dst_shapes], "reason": m.reason,
                 "confidence": _round(m.confidence)}
                for m in self.mismatches
            ],
            "unmatched_src": list(self.unmatched_src),
            "unmatched_dst": list(self.unmatched_dst),
            "tied_src": [list(t) for t in self.tied_src],
            "tied_dst": [list(t) for t in self.tied_dst],
            **({"nonfinite": list(self.nonfinite)} if self.nonfinite else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON (deterministic: the same plan gives the same bytes)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Rebuild a plan from `to_dict` output.

        Raises
        ------
        PlanError
            If the schema version is unknown or a field is missing or malformed.
        """
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - _PLAN_FIELDS
        if unknown:
            raise PlanError(f"unknown plan fields {sorted(unknown)}; known: {sorted(_PLAN_FIELDS)}")
        version = data.get("archalign_plan")
        if version != PLAN_VERSION:
            raise PlanError(f"plan schema version {version!r} is not supported; this archalign "
                            f"reads version {PLAN_VERSION}: re-run `align` to make a new plan")
        try:
            if not isinstance(data["matches"], Sequence) or isinstance(data["matches"], str):
                raise PlanError("malformed plan: \"matches\" must be a list")
            for m in data["matches"]:
                if not isinstance(m, Mapping) or set(m) - _MATCH_FIELDS:
                    extra = sorted(set(m) - _MATCH_FIELDS) if isinstance(m, Mapping) else m
                    raise PlanError(f"malformed plan: match entry with unknown fields {extra!r:.200}")
                _flag_values(m.get("flags", []))  # derived: checked, then derived again
            matches = tuple(
                Match(src=_keys(m["src"]), dst=_keys(m["dst"]),
                      src_shapes=_shapes(m["src_shapes"], m["src"]),
                      dst_shapes=_shapes(m["dst_shapes"], m["dst"]),
                      confidence=_number(m["confidence"]),
                      costs=tuple((_text(k), _number(v)) for k, v in m["costs"].items()),
                      src_unit=_text(m["src_unit"]), dst_unit=_text(m["dst_unit"]),
                      ops=tuple(Op.from_dict(op) for op in _list(m.get("ops", ()))))
                for m in data["matches"])
            mismatches = tuple(
                Mismatch(src=_keys(m["src"]), dst=_keys(m["dst"]),
                         src_shapes=_shapes(m["src_shapes"], m["src"]),
                         dst_shapes=_shapes(m["dst_shapes"], m["dst"]),
                         reason=_text(m["reason"]), confidence=_number(m.get("confidence", 0.0)))
                for m in _list(data.get("mismatches", ())))
            plan = cls(
                matches=matches, mismatches=mismatches,
                unmatched_src=_keys(data.get("unmatched_src", ())),
                unmatched_dst=_keys(data.get("unmatched_dst", ())),
                tied_src=tuple((_text(a), _text(b)) for a, b in _list(data.get("tied_src", ()))),
                tied_dst=tuple((_text(a), _text(b)) for a, b in _list(data.get("tied_dst", ()))),
                src_tracer=_text(data.get("src_tracer", "")),
                dst_tracer=_text(data.get("dst_tracer", "")),
                verification=_text(data.get("verification", "")),
                hints=Hints.from_dict(data.get("hints", {})),
                nonfinite=_keys(data.get("nonfinite", ())),
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError,
                RecursionError) as exc:
            raise PlanError(f"malformed plan: {type(exc).__name__}: {exc!s:.300}") from exc
        written = Counter(k for m in plan.matches for k in m.dst)
        twice = sorted(k for k, n in written.items() if n > 1)
        if twice:
            raise PlanError(f"the plan writes these destination keys twice: {', '.join(twice)}")
        entries: tuple[Match | Mismatch, ...] = (*plan.matches, *plan.mismatches)
        for entry in entries:
            if (not entry.src or not entry.dst or len(entry.src_shapes) != len(entry.src)
                    or len(entry.dst_shapes) != len(entry.dst)
                    or not 0.0 <= entry.confidence <= 1.0):
                raise PlanError(f"malformed {type(entry).__name__.lower()} {entry.dst}: it names "
                                "source and destination keys, one shape per key, and a "
                                "confidence in [0, 1]; fix the plan file or re-run align")
        return plan

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """Rebuild a plan from `to_json` output (UTF-8 when given bytes).

        Raises
        ------
        PlanError
            If ``text`` is not JSON (or not UTF-8), nests deeper than Python can parse, or is not
            a plan (see `from_dict`).
        """
        try:
            if isinstance(text, (bytes, bytearray)):
                text = bytes(text).decode("utf-8")
            data = json.loads(text)
        except UnicodeDecodeError as exc:
            raise PlanError(f"a plan file is UTF-8 text; byte {exc.start} is not: {exc.reason}"
                            ) from exc
        except RecursionError as exc:
            raise PlanError("a plan file must be JSON a few levels deep; this one nests deeper "
                            "than Python can parse") from exc
        except ValueError as exc:  # JSONDecodeError, and integers of more than 4300 digits
            raise PlanError(f"a plan file must be JSON: {exc!s:.300}") from exc
        return cls.from_dict(data)


_PLAN_FIELDS = frozenset({"archalign_plan", "src_tracer", "dst_tracer", "verification", "hints",
                          "matches", "mismatches", "unmatched_src", "unmatched_dst", "tied_src",
                          "tied_dst", "nonfinite"})
_MATCH_FIELDS = frozenset({"src", "dst", "src_shapes", "dst_shapes", "confidence", "costs",
                           "src_unit", "dst_unit", "ops", "flags"})


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan saved with `Plan.save`.

    Raises
    ------
    PlanError
        If the file is not a plan of a supported schema version (the message names the file).
    OSError
        If the file cannot be read (naming it).
    """
    try:
        return Plan.from_json(Path(path).read_bytes())
    except PlanError as exc:
        raise PlanError(f"{str(path)!r}: {exc}") from exc


def _flag_values(values: Any) -> None:
    """Check a match's ``flags`` field: a list of known flag names (their value is derived)."""
    from .review import Flag

    known = {f.value for f in Flag}
    for value in _list(values):
        if _text(value) not in known:
            raise ValueError(f"unknown flag {value!r:.100}; known: {sorted(known)}")


def _round(x: float) -> float:
    return round(float(x), 6) if math.isfinite(x) else float(x)


def _list(values: Any) -> Sequence[Any]:
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise TypeError(f"expected a list, got {values!r:.200}")
    return values


def _text(value: Any) -> str:
    """A string of the plan file; one that UTF-8 cannot encode (a lone surrogate, which JSON
    escapes allow) would fail later, when printed or written."""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r:.200}")
    if not value.isascii():
        value.encode("utf-8")  # UnicodeEncodeError: a ValueError, reported as malformed
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r:.200}")
    return float(value)  # OverflowError for integers beyond a float's range


def _keys(values: Any) -> tuple[str, ...]:
    if isinstance(values, str) or not all(isinstance(v, str) for v in _list(values)):
        raise TypeError(f"expected a list of keys, got {values!r:.200}")
    return tuple(_text(v) for v in values)


def _shapes(values: Any, keys: Any) -> tuple[Shape, ...]:
    """The shapes of ``keys``, in order (checked against them later)."""
    names = list(keys) if isinstance(keys, list) else []
    return tuple(as_shape(s, f"the shape of {names[i]!r}" if i < len(names) else f"shape {i}")
                 for i, s in enumerate(_list(values)))
