"""The review: a plan's matches as rows, in one order and one format, for every renderer.

`build_review` turns a plan into a `Review`: the header lines, one `ReviewRow` per match (lowest
rounded confidence first, then by destination keys) and the lines for what is not loaded. The text
table (`format_plan`, which ``str(plan)`` prints), the Jupyter table (`format_plan_html`), the
command line's table (`archalign.terminal.print_plan`) and the HTML page (`archalign.html`) all render
these rows, so that they agree on the order, the shape format and the highlighting: a row's colour
is its `Band`, and it stands out (bold, or tagged) when apply skips it by default, when it is
adapted, when its source holds NaN/Inf, or when it carries a `Flag`.

Flags mark rows whose confidence rests on weaker ground than it seems, found from the plan's own
data (no model is needed, so a saved plan shows them too):

- `Flag.ORDER_ONLY`: neither side's order is an execution order (tracers ``registration``,
  ``state_dict`` or ``sorted``) and another destination layer of the same shapes was a rival,
  so the order of registration or of names decided between them;
- `Flag.PRIOR`: a convention decided, not the structure: a cost term ``same_name`` (where the
  alignment could not tell, the very same name did) or any term whose name starts with
  ``prior`` (the convention for named priors); the flag's note names the priors
  (`describe_prior`: ``prior_layout_in_out`` reads "layout from the checkpoint's convention
  (in_out)");
- `Flag.INDEX_SHIFT`: among the matches of one pair of key templates (``blocks.#.fc`` <-
  ``layers.#.mlp``), ordered by the destination's block indices, the source's indices of this
  row go backwards against a neighbour's: a swap or a misplaced block.

A match confirmed by the output check (a ``verified`` cost term) carries no flag: running both
models proved it.
"""

from __future__ import annotations

import enum
import html
import itertools
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .confidence import DEFAULT_MIN_CONFIDENCE, HIGH_CONFIDENCE, LOW_CONFIDENCE, trust_in
from .graph import Tracer

if TYPE_CHECKING:
    from .plan import Match, Plan

__all__ = ["COLUMNS", "FLAGS_COLUMN", "Band", "Flag", "Review", "ReviewRow", "band_of",
           "build_review", "describe_header", "describe_leftovers", "describe_prior", "find_flags",
           "flag_note", "format_plan", "format_plan_html", "format_shape"]

COLUMNS = ("conf", "destination", "source", "shape", "adaptation")  # every table's columns
FLAGS_COLUMN = "flags"  # the column added after `COLUMNS` when some row carries a `Flag`


class Band(str, enum.Enum):
    """How sure a match is, as every review colours it (the bounds live in `archalign.confidence`)."""

    LOW = "low"  # below LOW_CONFIDENCE (and NaN): red, not loaded by default
    MID = "mid"  # below HIGH_CONFIDENCE: amber, loaded but worth a look
    HIGH = "high"  # from HIGH_CONFIDENCE up: green, certain


_BAND_COLOURS = {Band.LOW: "#fdd", Band.MID: "#ffc", Band.HIGH: "#efe"}  # Jupyter row backgrounds


class Flag(str, enum.Enum):
    """Why a row's confidence may rest on weaker ground than it seems (see the module)."""

    ORDER_ONLY = "order-only"  # same-shaped rivals told apart by registration or name order
    PRIOR = "prior"  # decided by a convention (the same name in a tie, a named prior)
    INDEX_SHIFT = "index-shift"  # its block indices go backwards against a neighbour's

    @property
    def note(self) -> str:
        """What the flag means and what to do, for the line under a table."""
        return _FLAG_NOTES[self]


_FLAG_NOTES = {
    Flag.ORDER_ONLY: "no execution order on both sides: registration or name order chose among "
                     "layers of the same shapes; pass example inputs, or check the outputs",
    Flag.PRIOR: "a convention decided (the same name where the structure could not tell)",
    Flag.INDEX_SHIFT: "its block indices go backwards against its neighbours' (a swap or a "
                      "misplaced block); pin the right pair or check the outputs",
}


def band_of(confidence: float) -> Band:
    """The review band of a confidence; NaN counts as low.

    >>> band_of(0.3).value, band_of(0.6).value, band_of(0.9).value, band_of(float("nan")).value
    ('low', 'mid', 'high', 'low')
    """
    if not confidence >= LOW_CONFIDENCE:
        return Band.LOW
    return Band.MID if confidence < HIGH_CONFIDENCE else Band.HIGH


@dataclass(frozen=True)
class ReviewRow:
    """One match as every review shows it."""

    index: int  # the match's position in ``plan.matches`` (destination execution order)
    confidence: float  # the match's confidence as planned, unrounded
    conf: str  # the confidence as shown: two decimals ("0.45"; "nan" when it is not a number)
    dst: tuple[str, ...]  # destination keys, as in the match
    src: tuple[str, ...]  # source keys, as in the match
    shape: str  # the destination shapes, `format_shape` each, space separated: "(4,3)"
    adaptation: str  # the adaptations in order, space separated ("" for a plain copy)
    band: Band  # the colour: LOW, MID or HIGH
    below_default: bool  # confidence < DEFAULT_MIN_CONFIDENCE: `apply` skips it unless told
    adapted: bool  # the tensors are transformed on the way (``match.ops``)
    nonfinite: bool  # a source tensor held NaN/Inf when the plan was made
    flags: tuple[Flag, ...] = ()  # why its confidence may rest on weaker ground (see `Flag`)
    priors: tuple[str, ...] = ()  # the cost terms behind its PRIOR flag (``same_name``,
    # ``prior_*``), in the match's order

    @property
    def cells(self) -> tuple[str, str, str, str, str]:
        """The row's text in `COLUMNS` order."""
        return (self.conf, ", ".join(self.dst), ", ".join(self.src), self.shape, self.adaptation)

    @property
    def flag_text(self) -> str:
        """The row's flags as the `FLAGS_COLUMN` shows them: ``order-only index-shift``."""
        return " ".join(f.value for f in self.flags)

    @property
    def stands_out(self) -> bool:
        """Whether a reviewer should look at this row whatever its band."""
        return self.below_default or self.adapted or self.nonfinite or bool(self.flags)


class Review(NamedTuple):
    """A plan as every review shows it."""

    header: tuple[str, ...]  # the counts and tracers, then the output check and NaN/Inf warning
    rows: tuple[ReviewRow, ...]  # one per match: lowest rounded confidence first, then by dst
    not_loaded: tuple[str, ...]  # one line per near miss (`Mismatch`), with its reason
    unmatched: tuple[str, ...]  # the destination keys without counterpart, the unused source keys
    flag_notes: tuple[str, ...] = ()  # one line per `Flag` some row carries: count and meaning

    @property
    def flagged(self) -> bool:
        """Whether some row carries a flag (the tables then show `FLAGS_COLUMN`)."""
        return any(row.flags for row in self.rows)


def build_review(plan: Plan) -> Review:
    """The header, rows and leftover lines of a plan, in the order every review shows them.

    Parameters
    ----------
    plan : Plan
        The plan to review.

    Returns
    -------
    Review
        Its rows sorted by ``(round(confidence, 2), dst)``: lowest first, equal rounded
        confidences in name order.
    """
    bad = set(plan.nonfinite)
    order = sorted(range(len(plan.matches)),
                   key=lambda i: (round(plan.matches[i].confidence, 2), plan.matches[i].dst))
    flags = find_flags(plan)
    rows = tuple(_row(i, plan.matches[i], bad, flags[i]) for i in order)
    counts = Counter(f for row in rows for f in row.flags)
    notes = tuple(f"{flag.value} ({counts[flag]} row{'s' if counts[flag] > 1 else ''}): "
                  f"{flag_note(flag, rows)}" for flag in Flag if counts[flag])
    return Review(header=tuple(describe_header(plan)), rows=rows,
                  not_loaded=tuple(_describe_mismatches(plan)),
                  unmatched=tuple(_describe_unmatched(plan)), flag_notes=notes)


def flag_note(flag: Flag, rows: Sequence[ReviewRow]) -> str:
    """What ``flag`` means for these rows: its note, and for `Flag.PRIOR` the priors that decided
    (`describe_prior`), each once, in the order the rows give them."""
    if flag is not Flag.PRIOR:
        return flag.note
    named = dict.fromkeys(describe_prior(t) for r in rows if flag in r.flags for t in r.priors
                          if t != "same_name")
    if not named:
        return flag.note
    same = any("same_name" in r.priors for r in rows if flag in r.flags)
    return ("a convention decided: " + "; ".join(named)
            + ("; the same name where the structure could not tell" if same else ""))


_PRIOR_TOPICS = {  # the first word of a ``prior_*`` term, as the notes name it
    "layout": "layout from the checkpoint's convention",
    "fused": "row layout of a fused projection from the checkpoint's format",
}


def describe_prior(term: str) -> str:
    """A cost term naming a prior, as a reader reads it.

    >>> describe_prior("prior_layout_in_out"), describe_prior("prior_rotary_half")
    ("layout from the checkpoint's convention (in_out)", 'rotary half (a named prior)')
    >>> describe_prior("same_name")
    'the same name where the structure could not tell'
    """
    if term == "same_name":
        return "the same name where the structure could not tell"
    words = term.removeprefix("prior").strip("_").split("_")
    topic, rest = words[0], "_".join(words[1:])
    if topic in _PRIOR_TOPICS:
        return _PRIOR_TOPICS[topic] + (f" ({rest})" if rest else "")
    return (" ".join(w for w in words if w) or "prior") + " (a named prior)"


def _is_prior(term: str) -> bool:
    return term == "same_name" or term.startswith("prior")


def find_flags(plan: Plan) -> list[tuple[Flag, ...]]:
    """The flags of each match of ``plan``, in ``plan.matches`` order (see the module).

    Parameters
    ----------
    plan : Plan
        The plan; only its own data is read (tracers, keys, shapes, cost terms).

    Returns
    -------
    list of tuple of Flag
        One tuple per match, in `Flag` order; empty for a match the output check confirmed.
    """
    order_only = _order_only(plan)
    shifted = _index_shifts(plan)
    out: list[tuple[Flag, ...]] = []
    for i, m in enumerate(plan.matches):
        terms = m.cost_terms
        if "verified" in terms:
            out.append(())
            continue
        found = []
        if i in order_only:
            found.append(Flag.ORDER_ONLY)
        if any(_is_prior(t) for t in terms):
            found.append(Flag.PRIOR)
        if i in shifted:
            found.append(Flag.INDEX_SHIFT)
        out.append(tuple(found))
    return out


def _order_only(plan: Plan) -> set[int]:
    """Matches whose destination layer had a same-shaped rival, when no side's order executes."""
    try:
        trust = trust_in(Tracer(plan.src_tracer), Tracer(plan.dst_tracer))
    except ValueError:  # a hand-made plan that names no tracer: nothing to say
        return set()
    if trust.order_trust >= 1.0:
        return set()
    shapes: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for m in plan.matches:
        shapes[m.dst_unit].extend(m.dst_shapes)
    signature = {unit: tuple(sorted(s)) for unit, s in shapes.items()}
    alike = Counter(signature.values())
    return {i for i, m in enumerate(plan.matches)
            if "pinned" not in m.cost_terms and alike[signature[m.dst_unit]] > 1}


_DIGITS = re.compile(r"\d+")


def _index_shifts(plan: Plan) -> set[int]:
    """Matches whose source block indices go backwards against a neighbour's, among the layer
    pairs of the same key templates ordered by their destination indices."""
    groups: dict[tuple[str, str], dict[str, tuple[int, ...]]] = defaultdict(dict)
    for m in plan.matches:
        if not _DIGITS.search(m.dst_unit) or not _DIGITS.search(m.src_unit):
            continue
        key = (_DIGITS.sub("#", m.dst_unit), _DIGITS.sub("#", m.src_unit))
        groups[key].setdefault(m.dst_unit, tuple(int(d) for d in _DIGITS.findall(m.src_unit)))
    backwards: set[str] = set()
    for units in groups.values():
        ordered = sorted(units, key=lambda u: tuple(int(d) for d in _DIGITS.findall(u)))
        for a, b in itertools.pairwise(ordered):
            if units[a] > units[b]:
                backwards.update((a, b))
    return {i for i, m in enumerate(plan.matches) if m.dst_unit in backwards}


def describe_header(plan: Plan) -> list[str]:
    """The lines above a review table: the counts and tracers, the output check (when it ran),
    and a warning naming the source keys that held NaN/Inf (when there are some)."""
    adapted = sum(m.adapted for m in plan.matches)
    lines = [f"Plan: {len(plan.matches)} matches ({adapted} adapted), "
             f"{len(plan.mismatches)} shape mismatches, "
             f"{len(plan.unmatched_dst)} destination keys unmatched "
             f"(tracers: source {plan.src_tracer}, destination {plan.dst_tracer})"]
    if plan.verification:
        lines.append(f"verification: {plan.verification}")
    if plan.nonfinite:
        lines.append(f"WARNING: NaN/Inf in {len(plan.nonfinite)} source tensors (loaded as they "
                     f"are): {', '.join(plan.nonfinite)}")
    return lines


def describe_leftovers(plan: Plan) -> list[str]:
    """Lines for what the plan does not load: mismatches with their reasons, then the
    destination keys without counterpart and the source keys nothing uses."""
    return [*_describe_mismatches(plan), *_describe_unmatched(plan)]


def format_shape(shape: Sequence[int]) -> str:
    """A tensor shape as every review writes it: ``(8,10)``, ``(4)``, ``()`` for a scalar."""
    return "(" + ",".join(map(str, shape)) + ")"


def format_plan(plan: Plan, *, limit: int | None = None) -> str:
    """The review table as text (``str(plan)``): the header, one row per match, lowest confidence
    first (at most ``limit`` rows, then how many more), then what was left out."""
    review = build_review(plan)
    rows = review.rows if limit is None else review.rows[:limit]
    columns: tuple[str, ...] = COLUMNS
    body: list[tuple[str, ...]] = [row.cells for row in rows]
    if review.flagged:
        columns = (*COLUMNS, FLAGS_COLUMN)
        body = [(*row.cells, row.flag_text) for row in rows]
    widths = [max(len(r[k]) for r in [columns, *body]) for k in range(len(columns))]
    lines = list(review.header)
    lines.append("  ".join(h.ljust(w) for h, w in zip(columns, widths)).rstrip())
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body)
    if limit is not None and len(review.rows) > limit:
        lines.append(f"... {len(review.rows) - limit} more")
    lines.extend(review.flag_notes)
    lines.extend(review.not_loaded)
    lines.extend(review.unmatched)
    return "\n".join(lines)


def format_plan_html(plan: Plan) -> str:
    """The review table as an HTML fragment (``Plan._repr_html_``, which Jupyter shows): the text
    table's lines and rows, each row coloured by its band, bold when it stands out."""
    review = build_review(plan)
    head = "".join(f"<p>{html.escape(line)}</p>" for line in review.header)
    names = (*COLUMNS, FLAGS_COLUMN) if review.flagged else COLUMNS
    columns = "".join(f"<th>{c}</th>" for c in names)
    cells = "".join(
        f"<tr data-band='{r.band.value}' style='background:{_BAND_COLOURS[r.band]}"
        f"{';font-weight:bold' if r.stands_out else ''}'>"
        + "".join(f"<td>{html.escape(c)}</td>"
                  for c in ((*r.cells, r.flag_text) if review.flagged else r.cells)) + "</tr>"
        for r in review.rows)
    tail = "".join(f"<p>{html.escape(line)}</p>"
                   for line in (*review.flag_notes, *review.not_loaded, *review.unmatched))
    return f"{head}<table><tr>{columns}</tr>{cells}</table>{tail}"


def _row(index: int, m: Match, nonfinite: set[str], flags: tuple[Flag, ...]) -> ReviewRow:
    return ReviewRow(index=index, confidence=m.confidence, conf=f"{m.confidence:.2f}",
                     dst=m.dst, src=m.src, shape=" ".join(format_shape(s) for s in m.dst_shapes),
                     adaptation=" ".join(map(str, m.ops)), band=band_of(m.confidence),
                     below_default=m.confidence < DEFAULT_MIN_CONFIDENCE, adapted=m.adapted,
                     nonfinite=any(k in nonfinite for k in m.src), flags=flags,
                     priors=tuple(t for t, _ in m.costs if _is_prior(t)) if Flag.PRIOR in flags
                     else ())


def _describe_mismatches(plan: Plan) -> list[str]:
    return [f"not loaded: {', '.join(mm.dst)} <- {', '.join(mm.src)}: {mm.reason}"
            for mm in plan.mismatches]


def _describe_unmatched(plan: Plan) -> list[str]:
    lines = []
    mismatched = {k for mm in plan.mismatches for k in mm.dst}
    lonely = [k for k in plan.unmatched_dst if k not in mismatched]
    if lonely:
        lines.append(f"unmatched destination keys ({len(lonely)}): {', '.join(lonely)}")
    used = {k for mm in plan.mismatches for k in mm.src}
    spare = [k for k in plan.unmatched_src if k not in used]
    if spare:
        lines.append(f"unused source keys ({len(spare)}): {', '.join(spare)}")
    return lines
