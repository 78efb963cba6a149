"""The visual review report: a plan as one self-contained HTML page.

The page shows the source and destination layers side by side, one row per unit (a layer and its
tensors), in execution order, with a line between the two columns for every matched unit pair:
coloured by its lowest review band, labelled with its adaptation when it has one, dashed for a
near miss (`Mismatch`). Unmatched keys are shown, highlighted, among the rows of their side. A
summary on top names what is compared (the source and destination, when given) and gives the
counts, the tracers and the output check. Every matched destination tensor shows its confidence
in its band's colour, and rows whose review rows carry a flag (`archalign.review.Flag`:
order-only evidence, a prior, an index shift) are marked and counted. A slider filters by
confidence; it starts at the default threshold (`DEFAULT_MIN_CONFIDENCE`) and says how many
tensors ``apply(min_confidence=...)`` loads at its value. A search box finds a key, and hovering
(or clicking) a line shows its review rows (`archalign.review`: confidence, band, shapes,
adaptation and flags as every review shows them, in the review's order) with their cost terms.

The page needs no network. Its markup, CSS and JavaScript are package files
(``archalign/assets/report.html``, ``report.css``, ``report.js``, read with `importlib.resources`)
inlined into one page, and the plan is embedded as JSON in a ``<script type="application/json">``
element, escaped so that no key can end the element. The layout (which tensors form a row, in
which order, which rows a line joins) is computed here, in Python, so the same plan always gives
the same bytes, also after a round trip through `Plan.save` / `load_plan`.

Row order
---------
Destination rows follow ``plan.matches`` (destination execution order); source rows follow the
first appearance of their unit in ``plan.matches``. A plan does not record where its unmatched keys
sit in that order, so each is placed among the rows of its side by name: with the row of its own
module when there is one, otherwise next to the matched rows sharing the longest dotted prefix
with it, in natural order among them (``features.4`` between ``features.3`` and ``features.5``,
``fc1`` before ``fc2``), and at the end when no name is related. Unmatched keys keep their order.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .confidence import DEFAULT_MIN_CONFIDENCE, HIGH_CONFIDENCE, LOW_CONFIDENCE
from .graph import natural_key
from .plan import Match, Mismatch, Plan
from .review import Flag, ReviewRow, build_review, flag_note, format_shape

__all__ = ["render_html", "save_html"]


Shape = tuple[int, ...]


def render_html(plan: Plan, *, title: str = "archalign plan", source: str = "",
                destination: str = "") -> str:
    """The plan as a self-contained HTML page (inline CSS and JavaScript, no network access).

    Parameters
    ----------
    plan : Plan
        The plan to show, as returned by `archalign.align` or `archalign.load_plan`.
    title : str
        The page title and heading.
    source, destination : str
        What is compared, shown under the title: e.g. the source checkpoint's file name and the
        destination model's name (a plan does not record them).

    Returns
    -------
    str
        The page, ASCII only (every other character is escaped), deterministic for a given plan
        and names.
    """
    data = _report_data(plan, title)
    data["summary"].update(source=source, destination=destination)
    fields = {"TITLE": _html_text(title), "DATA": _script_json(data),
              "STYLE": _asset("report.css"), "SCRIPT": _asset("report.js")}
    # one pass, so that text inserted for one placeholder is never scanned for another
    return re.sub(r"@@(TITLE|DATA|STYLE|SCRIPT)@@", lambda m: fields[m.group(1)],
                  _asset("report.html"))


def save_html(plan: Plan, path: str | os.PathLike[str], *, title: str = "archalign plan",
              source: str = "", destination: str = "") -> None:
    """Write `render_html` of the plan to ``path``.

    Parameters
    ----------
    plan : Plan
        The plan to show.
    path : str or os.PathLike
        The file to write (overwritten if it exists).
    title : str
        The page title and heading.
    source, destination : str
        What is compared (see `render_html`).
    """
    Path(path).write_text(render_html(plan, title=title, source=source, destination=destination),
                          encoding="ascii")


# --------------------------------------------------------------------------- layout


class _Column:
    """The rows of one side: units in order, each with its tensors.

    Matched units (`add_unit`, called first) are the landmarks, in the order given. Unmatched keys
    (`add_loose`) join the row of their module, or get a row in a gap between two landmarks,
    after the rows already put in that gap.
    """

    def __init__(self) -> None:
        self._anchors: list[dict[str, Any]] = []
        self._gaps: dict[int, list[dict[str, Any]]] = {}  # gap g: just before landmark g
        self._by_unit: dict[str, dict[str, Any]] = {}
        self._by_member: dict[str, dict[str, Any]] = {}  # a member of a "a+b" group -> its row
        self._row_of_key: dict[str, dict[str, Any]] = {}
        self._index: _Landmarks | None = None

    def add_unit(self, unit: str, keys: Sequence[str], shapes: Sequence[Shape]) -> dict[str, Any]:
        """Add matched tensors to the row of ``unit``, creating it after the others."""
        row = self._by_unit.get(unit)
        if row is None:
            row = self._new_row(unit)
            self._anchors.append(row)
            self._index = None
        for key, shape in zip(keys, shapes):
            self._add_tensor(row, key, shape, "matched")
        return row

    def add_loose(self, key: str, shape: Shape | None, state: str) -> dict[str, Any]:
        """Add an unmatched (``state`` "unmatched" or "mismatch") tensor where its name puts it."""
        if key in self._row_of_key:
            row = self._row_of_key[key]
            for tensor in row["tensors"]:
                if tensor["key"] == key and state == "mismatch":
                    tensor["state"] = state
                    if shape is not None:
                        tensor["shape"] = format_shape(shape)
            return row
        unit = _owner(key)
        found = self._by_unit.get(unit) or self._by_member.get(unit)
        if found is not None:
            row = found
        else:
            if self._index is None:
                self._index = _Landmarks([r["unit"] for r in self._anchors])
            row = self._new_row(unit)
            self._gaps.setdefault(self._index.gap(unit), []).append(row)
        self._add_tensor(row, key, shape, state)
        return row

    def finish(self) -> list[dict[str, Any]]:
        """The rows in order, numbered, each with its state: "matched", "partial" or "unmatched"."""
        rows: list[dict[str, Any]] = []
        for g in range(len(self._anchors) + 1):
            rows.extend(self._gaps.get(g, ()))
            if g < len(self._anchors):
                rows.append(self._anchors[g])
        for i, row in enumerate(rows):
            row["index"] = i
            states = {t["state"] for t in row["tensors"]}
            row["state"] = ("matched" if states == {"matched"} else
                            "partial" if "matched" in states else "unmatched")
        return rows

    def row_of(self, key: str) -> dict[str, Any]:
        return self._row_of_key[key]

    def _new_row(self, unit: str) -> dict[str, Any]:
        row: dict[str, Any] = {"unit": unit, "title": _title(unit), "tensors": []}
        self._by_unit[unit] = row
        for member in unit.split("+"):
            self._by_member.setdefault(member, row)
        return row

    def _add_tensor(self, row: dict[str, Any], key: str, shape: Shape | None, state: str) -> None:
        if key in self._row_of_key:  # one source tensor feeding two destinations: shown once
            return
        self._row_of_key[key] = row
        row["tensors"].append({"key": key, "label": _label(key, row["unit"]),
                               "shape": None if shape is None else format_shape(shape),
                               "state": state})


class _Landmarks:
    """Where an unmatched unit goes among the matched ones, judged by name.

    Its relatives are the matched units sharing the longest dotted prefix with it (found in a trie
    of their paths); it goes after the last relative that sorts before it in natural order, or
    just before the first relative. Without a shared prefix only siblings count (``fc1`` for
    ``fc2``: the same name up to the first digit); with none, it goes at the end.
    """

    def __init__(self, units: Sequence[str]) -> None:
        self.count = len(units)
        self.trie: dict[str, Any] = {}  # part -> (child trie, landmark numbers under it)
        self.stems: dict[str, list[int]] = {}
        self.natural: list[tuple[tuple[int, int | str], ...]] = []
        for n, unit in enumerate(units):
            members = unit.split("+")
            self.natural.append(min(natural_key(m) for m in members))
            for member in members:
                stem = self.stems.setdefault(_stem(member), [])
                if not stem or stem[-1] != n:
                    stem.append(n)
                node = self.trie
                for part in member.split("."):
                    child, under = node.setdefault(part, ({}, []))
                    if not under or under[-1] != n:
                        under.append(n)
                    node = child

    def gap(self, unit: str) -> int:
        """The gap (0: before the first landmark, ``count``: after the last) for ``unit``."""
        kin: list[int] = []
        node = self.trie
        for part in unit.split("."):
            if part not in node:
                break
            node, kin = node[part]
        if not kin:
            stem = _stem(unit)
            kin = self.stems.get(stem, []) if stem else []
            if not kin:
                return self.count
        mine = natural_key(unit)
        for n in reversed(kin):
            if self.natural[n] <= mine:
                return n + 1
        return kin[0]


def _report_data(plan: Plan, title: str) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data (rows of both sides, lines, summary)."""
    src, dst = _Column(), _Column()
    links: list[dict[str, Any]] = []
    by_pair: dict[tuple[int, int, str], dict[str, Any]] = {}

    def link(src_row: dict[str, Any], dst_row: dict[str, Any], kind: str) -> dict[str, Any]:
        ident = (id(src_row), id(dst_row), kind)
        if ident not in by_pair:
            by_pair[ident] = {"kind": kind, "src_row": src_row, "dst_row": dst_row, "items": []}
            links.append(by_pair[ident])
        return by_pair[ident]

    review = build_review(plan).rows
    review_row = {row.index: row for row in review}
    for i, m in enumerate(plan.matches):  # the layout follows the plan (destination order)
        dst_row = dst.add_unit(m.dst_unit, m.dst, m.dst_shapes)
        src_row = src.add_unit(m.src_unit, m.src, m.src_shapes)
        link(src_row, dst_row, "match")["items"].append(review_row[i])
    shapes_src: dict[str, Shape] = {}
    shapes_dst: dict[str, Shape] = {}
    for mm in plan.mismatches:
        shapes_src.update(zip(mm.src, mm.src_shapes))
        shapes_dst.update(zip(mm.dst, mm.dst_shapes))
    mismatched_src = {k for mm in plan.mismatches for k in mm.src}
    mismatched_dst = {k for mm in plan.mismatches for k in mm.dst}
    for key in plan.unmatched_dst:
        dst.add_loose(key, shapes_dst.get(key), "mismatch" if key in mismatched_dst else "unmatched")
    for key in plan.unmatched_src:
        src.add_loose(key, shapes_src.get(key), "mismatch" if key in mismatched_src else "unmatched")
    for mm in plan.mismatches:  # keys missing from the unmatched lists (a hand-made plan)
        for key in mm.dst:
            dst.add_loose(key, shapes_dst.get(key), "mismatch")
        for key in mm.src:
            src.add_loose(key, shapes_src.get(key), "mismatch")
    for mm in plan.mismatches:
        if mm.src and mm.dst:
            link(src.row_of(mm.src[0]), dst.row_of(mm.dst[0]), "mismatch")["items"].append(
                _mismatch_item(mm))

    for row in review:  # each matched destination tensor shows its row's confidence and flags
        for key in row.dst:
            for tensor in dst.row_of(key)["tensors"]:
                if tensor["key"] == key:
                    tensor.update(conf=row.conf, band=row.band.value,
                                  flags=[f.value for f in row.flags])
    src_rows, dst_rows = src.finish(), dst.finish()
    out_links = []
    position = {row.index: n for n, row in enumerate(review)}
    for li in links:
        out: dict[str, Any] = {"kind": li["kind"], "src": li["src_row"]["index"],
                               "dst": li["dst_row"]["index"]}
        if li["kind"] == "match":  # a line stands for its review rows, in the review's order
            rows = sorted(li["items"], key=lambda r: position[r.index])
            finite = [r for r in rows if math.isfinite(r.confidence)]
            worst = min(finite, key=lambda r: r.confidence) if finite else rows[0]
            out.update(confidence=_number(worst.confidence), conf=worst.conf,
                       band=worst.band.value,
                       ops=list(dict.fromkeys(r.adaptation for r in rows if r.adaptation)),
                       flags=[f.value for f in Flag if any(f in r.flags for r in rows)],
                       items=[_match_item(r, plan.matches[r.index]) for r in rows])
        else:
            out.update(confidence=None, ops=[], flags=[], items=li["items"])
        out_links.append(out)
    adapted = sum(m.adapted for m in plan.matches)
    summary = {
        "matches": len(plan.matches),
        "adapted": adapted,
        "mismatches": len(plan.mismatches),
        "unmatched_src": len(plan.unmatched_src),
        "unmatched_dst": len(plan.unmatched_dst),
        "src_tracer": plan.src_tracer,
        "dst_tracer": plan.dst_tracer,
        "verification": plan.verification,
        "tied_src": [list(t) for t in plan.tied_src],
        "tied_dst": [list(t) for t in plan.tied_dst],
        "nonfinite": list(plan.nonfinite),
    }
    counts = {f.value: sum(f in r.flags for r in review) for f in Flag}
    return {"title": title, "low": LOW_CONFIDENCE, "high": HIGH_CONFIDENCE,
            "default": DEFAULT_MIN_CONFIDENCE, "summary": summary,
            "flags": [{"flag": f.value, "rows": counts[f.value], "note": flag_note(f, review)}
                      for f in Flag if counts[f.value]],
            "src": src_rows, "dst": dst_rows, "links": out_links}


def _match_item(row: ReviewRow, m: Match) -> dict[str, Any]:
    """A review row as the page shows it (with each key's shape, and the match's cost terms)."""
    return {"conf": row.conf, "confidence": _number(row.confidence), "band": row.band.value,
            "dst": list(row.dst), "src": list(row.src),
            "dst_shapes": [format_shape(s) for s in m.dst_shapes],
            "src_shapes": [format_shape(s) for s in m.src_shapes],
            "adaptation": row.adaptation, "nonfinite": row.nonfinite,
            "flags": [f.value for f in row.flags],
            "costs": [[k, _number(v)] for k, v in m.costs]}


def _mismatch_item(mm: Mismatch) -> dict[str, Any]:
    return {"src": list(mm.src), "dst": list(mm.dst),
            "src_shapes": [format_shape(s) for s in mm.src_shapes],
            "dst_shapes": [format_shape(s) for s in mm.dst_shapes],
            "reason": mm.reason}


def _number(x: float) -> float | str:
    """A JSON-safe number: non-finite values ("nan", "inf") become strings."""
    x = float(x)
    return round(x, 6) if math.isfinite(x) else str(x)


def _owner(key: str) -> str:
    """The unit an unmatched key most likely belongs to: its module path, or the key itself."""
    return key.rsplit(".", 1)[0] if "." in key.strip(".") else key


def _label(key: str, unit: str) -> str:
    """The tensor's name within its row: the key without the unit's path (or the group's prefix)."""
    members = unit.split("+")
    if len(members) > 1:
        prefix = _group_prefix(members)
        return key[len(prefix):] if prefix and key.startswith(prefix) and key != prefix else key
    if key.startswith(unit + ".") and len(key) > len(unit) + 1:
        return key[len(unit) + 1:]
    return key.rsplit(".", 1)[-1] if key == unit and "." in key else key


def _title(unit: str) -> str:
    """A row's heading: the unit, a group ``a.x+a.y`` written ``a.{x + y}``."""
    members = unit.split("+")
    prefix = _group_prefix(members) if len(members) > 1 else ""
    if not prefix:
        return unit
    return prefix + "{" + " + ".join(m[len(prefix):] for m in members) + "}"


def _group_prefix(members: Sequence[str]) -> str:
    """The dotted path shared by all members of a group, with its trailing dot ("" if none)."""
    parts = [m.split(".") for m in members]
    n = min(_common_prefix(parts[0], p) for p in parts[1:])
    n = min(n, *(len(p) - 1 for p in parts))  # leave every member a name of its own
    return ".".join(parts[0][:n]) + "." if n > 0 else ""


def _stem(unit: str) -> str:
    """A path's first component up to its first digit: ``fc`` for ``fc1.x`` and ``fc1b``."""
    return re.sub(r"\d.*", "", unit.split(".", 1)[0])


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------- escaping


def _html_text(text: str) -> str:
    """Text for an HTML element: markup characters escaped, non-ASCII as character references."""
    return html.escape(text, quote=True).encode("ascii", "xmlcharrefreplace").decode("ascii")


def _script_json(data: Any) -> str:
    """JSON that can sit inside ``<script type="application/json">``: no ``<``, ``>`` or ``&``."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# --------------------------------------------------------------------------- the page


@functools.cache
def _asset(name: str) -> str:
    """A file of the page (``archalign/assets/``), read once from the installed package."""
    return (importlib.resources.files("archalign") / "assets" / name).read_text(encoding="ascii")
