"""The visual review report: a plan as one self-contained HTML page.

The page shows the source and destination layers side by side, one row per unit (a layer and its
tensors), in execution order, with a line between the two columns for every matched unit pair:
coloured by confidence, labelled with its adaptation when it has one, dashed for a near miss
(`Mismatch`). Unmatched keys are shown, highlighted, among the rows of their side. A summary on top
gives the counts, the tracers and the output check; a slider filters by confidence, a search box
finds a key, and hovering (or clicking) a line shows its tensors, shapes, cost terms and confidence.

The page needs no network: CSS and JavaScript are inline and the plan is embedded as JSON in a
``<script type="application/json">`` element, escaped so that no key can end the element. The
layout (which tensors form a row, in which order, which rows a line joins) is computed here, in
Python, so the same plan always gives the same bytes, also after a round trip through
`Plan.save` / `load_plan`.

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

import html
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .confidence import HIGH_CONFIDENCE, LOW_CONFIDENCE
from .graph import natural_key
from .plan import Match, Mismatch, Plan

__all__ = ["render_html", "save_html"]


Shape = tuple[int, ...]


def render_html(plan: Plan, *, title: str = "archalign plan") -> str:
    """The plan as a self-contained HTML page (inline CSS and JavaScript, no network access).

    Parameters
    ----------
    plan : Plan
        The plan to show, as returned by `archalign.align` or `archalign.load_plan`.
    title : str
        The page title and heading.

    Returns
    -------
    str
        The page, ASCII only (every other character is escaped), deterministic for a given plan.
    """
    data = _report_data(plan, title)
    fields = {"TITLE": _html_text(title), "DATA": _script_json(data)}
    # one pass, so that text inserted for one placeholder is never scanned for the other
    return re.sub(r"@@(TITLE|DATA)@@", lambda m: fields[m.group(1)], _TEMPLATE)


def save_html(plan: Plan, path: str | os.PathLike[str], *, title: str = "archalign plan") -> None:
    """Write `render_html` of the plan to ``path``.

    Parameters
    ----------
    plan : Plan
        The plan to show.
    path : str or os.PathLike
        The file to write (overwritten if it exists).
    title : str
        The page title and heading.
    """
    Path(path).write_text(render_html(plan, title=title), encoding="ascii")


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
                        tensor["shape"] = list(shape)
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
                               "shape": None if shape is None else list(shape), "state": state})


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

    for m in plan.matches:
        dst_row = dst.add_unit(m.dst_unit, m.dst, m.dst_shapes)
        src_row = src.add_unit(m.src_unit, m.src, m.src_shapes)
        link(src_row, dst_row, "match")["items"].append(_match_item(m))
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

    src_rows, dst_rows = src.finish(), dst.finish()
    out_links = []
    for li in links:
        items = li["items"]
        confs = [it["confidence"] for it in items if it.get("confidence") is not None]
        finite = [c for c in confs if isinstance(c, float)]
        ops = list(dict.fromkeys(" ".join(it["ops"]) for it in items if it.get("ops")))
        out_links.append({
            "kind": li["kind"], "src": li["src_row"]["index"], "dst": li["dst_row"]["index"],
            "confidence": min(finite) if finite else (confs[0] if confs else None),
            "ops": ops, "items": items,
        })
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
    return {"title": title, "low": LOW_CONFIDENCE, "high": HIGH_CONFIDENCE, "summary": summary,
            "src": src_rows, "dst": dst_rows, "links": out_links}


def _match_item(m: Match) -> dict[str, Any]:
    return {"src": list(m.src), "dst": list(m.dst),
            "src_shapes": [list(s) for s in m.src_shapes],
            "dst_shapes": [list(s) for s in m.dst_shapes],
            "confidence": _number(m.confidence),
            "costs": [[k, _number(v)] for k, v in m.costs],
            "ops": [str(op) for op in m.ops]}


def _mismatch_item(mm: Mismatch) -> dict[str, Any]:
    return {"src": list(mm.src), "dst": list(mm.dst),
            "src_shapes": [list(s) for s in mm.src_shapes],
            "dst_shapes": [list(s) for s in mm.dst_shapes],
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

_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="archalign">
<title>@@TITLE@@</title>
<script>
/* Count every script error, so that a headless check can read it from the DOM. */
window.archalignErrors = [];
function archalignReportError(message) {
  window.archalignErrors.push(String(message));
  var s = document.getElementById("status");
  if (s) { s.setAttribute("data-errors", String(window.archalignErrors.length)); }
}
window.addEventListener("error", function (e) { archalignReportError(e.message || "error"); });
window.addEventListener("unhandledrejection", function (e) { archalignReportError(e.reason); });
(function () {
  var original = console.error;
  console.error = function () {
    archalignReportError(Array.prototype.join.call(arguments, " "));
    return original.apply(console, arguments);
  };
})();
</script>
<style>
:root {
  --green: #2b8a3e; --amber: #d48a00; --red: #d6336c; --miss: #7048e8;
  --ink: #1f2328; --muted: #59636e; --line: #d0d7de; --bg: #f6f8fa; --card: #ffffff;
  --gap: 260px;
  --mono: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, Consolas, monospace;
  --sans: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Roboto, sans-serif;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); font: 14px/1.4 var(--sans); }
header { padding: 14px 24px 10px; background: var(--card); border-bottom: 1px solid var(--line); }
h1 { margin: 0 0 10px; font-size: 19px; font-weight: 650; }
h1 small { font-weight: 400; color: var(--muted); font-size: 13px; margin-left: 8px; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; margin-bottom: 8px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 5px 12px; background: var(--bg);
        min-width: 96px; }
.card b { display: block; font-size: 20px; line-height: 1.2; }
.card span { color: var(--muted); font-size: 12px; }
.card.warn { border-color: #f1aeb5; background: #fff5f7; }
.card.warn b { color: var(--red); }
.meta { color: var(--muted); font-size: 12.5px; display: flex; flex-wrap: wrap; gap: 4px 18px; }
.meta code { font-family: var(--mono); color: var(--ink); background: var(--bg); padding: 0 4px;
             border-radius: 4px; }
.meta .ok { color: var(--green); } .meta .bad { color: var(--red); font-weight: 600; }
details.tied { font-size: 12.5px; color: var(--muted); margin-top: 4px; }
details.tied li { font-family: var(--mono); }
.controls { position: sticky; top: 0; z-index: 5; display: flex; flex-wrap: wrap; align-items: center;
            gap: 8px 18px; padding: 8px 24px; background: rgba(255,255,255,.96);
            border-bottom: 1px solid var(--line); font-size: 13px; }
.controls input[type=search] { width: 300px; padding: 4px 8px; border: 1px solid var(--line);
                               border-radius: 6px; font: 13px var(--mono); }
.controls input[type=range] { width: 160px; vertical-align: middle; }
.controls .count { color: var(--muted); }
.legend { display: flex; gap: 12px; margin-left: auto; color: var(--muted); font-size: 12px; }
.legend i { display: inline-block; width: 22px; height: 0; border-top: 3px solid; vertical-align: middle;
            margin-right: 4px; }
.legend i.dash { border-top-style: dashed; }
.legend i.box { width: 14px; height: 12px; border: 1px dashed var(--red); background: #fff5f7; }
.heads, .board { display: grid; grid-template-columns: minmax(0,1fr) var(--gap) minmax(0,1fr);
                 padding: 0 24px; }
.heads { padding-top: 12px; font-size: 12px; text-transform: uppercase; letter-spacing: .06em;
         color: var(--muted); font-weight: 600; }
.heads div:last-child { padding-left: 2px; }
.board { position: relative; padding-bottom: 40px; }
.col { min-width: 0; position: relative; z-index: 2; }
.row { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 4px 9px;
       margin: 6px 0; }
#src .row { border-right: 4px solid var(--c, var(--line)); }
#dst .row { border-left: 4px solid var(--c, var(--line)); }
.unit { font: 600 12.5px var(--mono); word-break: break-all; }
.tensors { font: 11.5px var(--mono); color: var(--muted); word-break: break-all; }
.tensor { white-space: nowrap; display: inline-block; margin-right: 16px; }
.tensor .shape { color: #8c959f; }
.tensor.unmatched, .tensor.mismatch { color: var(--red); font-weight: 600; }
.tensor.mismatch { color: var(--miss); }
.tag { display: inline-block; font: 600 10.5px var(--sans); padding: 0 6px; border-radius: 9px;
       margin-left: 6px; vertical-align: 1px; text-transform: uppercase; letter-spacing: .03em; }
.tag.lonely { background: #ffe3ea; color: var(--red); }
.tag.miss { background: #eee6ff; color: var(--miss); }
.tag.op { background: #fff4db; color: #8a5a00; text-transform: none; font-family: var(--mono); }
.row.unmatched { background: #fff8fa; border-style: dashed; border-color: #f1aeb5; }
.row.has-miss { background: #faf8ff; }
.row.dim { opacity: .35; }
.row.hit { outline: 2px solid #0969da; outline-offset: 1px; }
.row.current { box-shadow: 0 0 0 4px rgba(9,105,218,.25); }
.row.focus { box-shadow: 0 0 0 2px #0969da; }
svg#wires { position: absolute; left: 0; top: 0; width: 100%; height: 100%; overflow: visible;
            pointer-events: none; z-index: 1; }
svg#wires .link { fill: none; stroke-width: 2.2; opacity: .9; }
svg#wires .link.mismatch { stroke-dasharray: 7 5; stroke: var(--miss); }
svg#wires .grab { fill: none; stroke: transparent; stroke-width: 12; pointer-events: stroke;
                  cursor: pointer; }
svg#wires .label rect { fill: #fff; stroke-width: 1; }
svg#wires .label text { font: 10.5px var(--mono); fill: var(--ink); }
svg#wires .label.mismatch text { fill: var(--miss); }
svg#wires .faded { opacity: .07; }
svg#wires .hidden { display: none; }
svg#wires .link.hot { stroke-width: 4; opacity: 1; }
.board.focusing svg#wires .link:not(.hot), .board.focusing svg#wires .label:not(.hot) { opacity: .35; }
#tip { position: fixed; z-index: 10; max-width: 600px; background: #fff; border: 1px solid var(--line);
       border-radius: 8px; box-shadow: 0 8px 24px rgba(31,35,40,.18); padding: 10px 12px;
       font-size: 12.5px; display: none; }
#tip.pinned { border-color: #0969da; }
#tip h3 { margin: 0 0 6px; font-size: 13px; font-family: var(--mono); overflow-wrap: anywhere;
          font-weight: 600; }
#tip .conf { font-weight: 700; }
#tip .items { margin-top: 6px; max-height: 50vh; overflow: auto; }
#tip .item { padding: 4px 0; border-top: 1px solid #eaeef2; }
#tip .k { font: 11.5px var(--mono); overflow-wrap: anywhere; }
#tip .k.more { padding-left: 1.35em; }
#tip .k b { font-weight: 600; }
#tip .k.src { color: var(--muted); }
#tip .shape { color: #8c959f; }
#tip .info { font-size: 11.5px; color: var(--muted); margin-top: 1px; }
#tip .costs { font-size: 11.5px; color: var(--muted); border-top: 1px solid #eaeef2; padding-top: 5px; }
#tip .costs .lbl { margin-right: 10px; }
#tip .costs .term { margin-right: 12px; font-family: var(--mono); }
#tip .costs b { color: var(--ink); font-weight: 600; }
#tip .reason { color: var(--miss); font-weight: 600; font-size: 12px; }
#tip .hint { color: var(--muted); font-size: 11px; margin-top: 6px; }
.empty { padding: 20px 24px; color: var(--muted); }
</style>
</head>
<body>
<div id="status" hidden data-state="loading" data-errors="0" data-lines="0" data-mismatch-lines="0"
     data-visible="0" data-src-rows="0" data-dst-rows="0"></div>
<noscript><p class="empty">This report is drawn by JavaScript; please enable it.</p></noscript>
<header>
  <h1 id="title"></h1>
  <div class="cards" id="cards"></div>
  <div class="meta" id="meta"></div>
  <div id="tied"></div>
</header>
<div class="controls">
  <label>find <input type="search" id="q" placeholder="key or layer (Enter: next)" autocomplete="off"></label>
  <span class="count" id="hits"></span>
  <label>min confidence <input type="range" id="min" min="0" max="1" step="0.01" value="0">
    <output id="minv">0.00</output></label>
  <label><input type="checkbox" id="below"> only below</label>
  <span class="count" id="shown"></span>
  <span class="legend" id="legend"></span>
</div>
<div class="heads"><div>source</div><div></div><div>destination</div></div>
<div class="board" id="board">
  <div class="col" id="src"></div>
  <div></div>
  <div class="col" id="dst"></div>
  <svg id="wires" aria-hidden="true"></svg>
</div>
<div id="tip" role="tooltip"></div>
<script type="application/json" id="plan-data">@@DATA@@</script>
<script>
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("plan-data").textContent);
  var S = data.summary;
  var status = document.getElementById("status");
  var board = document.getElementById("board");
  var svg = document.getElementById("wires");
  var NS = svg.namespaceURI;
  var tip = document.getElementById("tip");
  var pinned = null;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function sv(tag, attrs) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) { e.setAttribute(k, attrs[k]); }
    return e;
  }
  function num(x) { return typeof x === "number" ? x : Number(x); }
  function fmt(x, d) { return typeof x === "number" ? x.toFixed(d) : String(x); }
  function shape(s) {
    if (!s) { return ""; }
    return s.length ? s.join("\u00d7") : "scalar";
  }
  function colour(c) {
    if (c === null || c === undefined) { return "var(--line)"; }
    c = num(c);
    if (!(c >= data.low)) { return "var(--red)"; }
    return c < data.high ? "var(--amber)" : "var(--green)";
  }
  function missLabel(it) {
    var a = it.src_shapes.map(shape).join(", "), b = it.dst_shapes.map(shape).join(", ");
    return /^shape mismatch/.test(it.reason) && a !== b ? "shape " + a + " \u2260 " + b : it.reason;
  }
  function plural(n, word) { return n + " " + word + (n === 1 ? "" : (/(s|ch)$/.test(word) ? "es" : "s")); }

  /* ------------------------------------------------------------ summary */
  document.getElementById("title").textContent = data.title;
  var small = el("small", null, "archalign review report");
  document.getElementById("title").appendChild(small);
  var cards = document.getElementById("cards");
  function card(n, label, warn) {
    var c = el("div", "card" + (warn && n > 0 ? " warn" : ""));
    c.appendChild(el("b", null, n));
    c.appendChild(el("span", null, label));
    cards.appendChild(c);
  }
  var lowCount = 0;
  data.links.forEach(function (l) {
    if (l.kind === "match") {
      l.items.forEach(function (it) { if (!(num(it.confidence) >= data.low)) { lowCount++; } });
    }
  });
  card(S.matches, "matches");
  card(S.adapted, "adapted");
  card(lowCount, "below " + data.low.toFixed(2), true);
  card(S.mismatches, "mismatches", true);
  card(S.unmatched_dst, "unmatched destination", true);
  card(S.unmatched_src, "unmatched source", false);
  card(data.dst.length + " / " + data.src.length, "layers dst / src");
  var meta = document.getElementById("meta");
  function metaItem(label, value, cls) {
    var d = el("span", null, label + " ");
    var c = el("code", cls, value === "" ? "\u2014" : value);
    d.appendChild(c);
    meta.appendChild(d);
  }
  metaItem("source tracer", S.src_tracer);
  metaItem("destination tracer", S.dst_tracer);
  if (S.verification) {
    var v = String(S.verification);
    metaItem("verification", v, /^outputs agree/i.test(v) ? "ok" : (/differ/i.test(v) ? "bad" : null));
  } else {
    metaItem("verification", "not run");
  }
  if (S.nonfinite && S.nonfinite.length) {
    metaItem("NaN/Inf in the source", S.nonfinite.join(", "), "bad");
  }
  var tiedBox = document.getElementById("tied");
  if (S.tied_src.length || S.tied_dst.length) {
    var det = el("details", "tied");
    det.appendChild(el("summary", null, "tied tensors: " + S.tied_src.length + " source, " +
                       S.tied_dst.length + " destination (the alias loads through its primary)"));
    var ul = el("ul");
    [["source", S.tied_src], ["destination", S.tied_dst]].forEach(function (side) {
      side[1].forEach(function (t) { ul.appendChild(el("li", null, side[0] + " " + t[0] + " = " + t[1])); });
    });
    det.appendChild(ul);
    tiedBox.appendChild(det);
  }
  var legend = document.getElementById("legend");
  [["var(--green)", "\u2265 " + data.high.toFixed(2), ""],
   ["var(--amber)", "\u2265 " + data.low.toFixed(2), ""],
   ["var(--red)", "< " + data.low.toFixed(2), ""],
   ["var(--miss)", "not loaded", "dash"],
   [null, "unmatched", "box"]].forEach(function (x) {
    var s = el("span");
    var i = el("i", x[2]);
    if (x[0]) { i.style.borderTopColor = x[0]; }
    s.appendChild(i);
    s.appendChild(document.createTextNode(x[1]));
    legend.appendChild(s);
  });

  /* ------------------------------------------------------------ rows */
  var rowEls = { src: [], dst: [] };
  var rowLinks = { src: [], dst: [] };
  function buildColumn(side) {
    var col = document.getElementById(side);
    data[side].forEach(function (row, i) {
      var r = el("div", "row " + row.state);
      r.setAttribute("data-side", side);
      r.setAttribute("data-index", String(i));
      var head = el("div", "unit", row.title);
      head.title = row.unit;
      if (row.state === "unmatched" && row.tensors.every(function (t) { return t.state === "mismatch"; })) {
        head.appendChild(el("span", "tag miss", "not loaded"));
      } else if (row.state !== "matched") {
        head.appendChild(el("span", "tag lonely", (row.state === "partial" ? "partly " : "") +
          (side === "dst" ? "unmatched" : "unused")));
      }
      r.appendChild(head);
      var ts = el("div", "tensors");
      row.tensors.forEach(function (t) {
        var s = el("span", "tensor " + t.state);
        s.title = t.key + ({ matched: "", mismatch: "  (not loaded)", unmatched: "  (unmatched)" })[t.state];
        s.appendChild(document.createTextNode(t.label));
        if (t.shape) { s.appendChild(el("span", "shape", " " + shape(t.shape))); }
        ts.appendChild(s);
      });
      r.appendChild(ts);
      r.addEventListener("mouseenter", function () { focusRow(side, i, true); });
      r.addEventListener("mouseleave", function () { focusRow(side, i, false); });
      col.appendChild(r);
      rowEls[side].push(r);
      rowLinks[side].push([]);
    });
  }
  buildColumn("src");
  buildColumn("dst");

  /* ------------------------------------------------------------ lines */
  var wires = [];
  var nMatch = 0, nMiss = 0;
  data.links.forEach(function (l, i) {
    var g = sv("g", { "class": "wire", "data-index": String(i) });
    var path = sv("path", { "class": "link " + l.kind, "data-kind": l.kind });
    if (l.kind === "match") {
      path.style.stroke = colour(l.confidence);
      nMatch++;
    } else {
      nMiss++;
    }
    var grab = sv("path", { "class": "grab" });
    g.appendChild(path);
    g.appendChild(grab);
    var label = null;
    var text = l.kind === "match" ? l.ops.join(" | ") : "\u2715 " + missLabel(l.items[0]);
    if (text) {
      if (text.length > 34) { text = text.slice(0, 33) + "\u2026"; }
      label = sv("g", { "class": "label " + l.kind });
      var rect = sv("rect", { rx: "4", ry: "4" });
      rect.style.stroke = l.kind === "match" ? colour(l.confidence) : "var(--miss)";
      var t = sv("text", { "text-anchor": "middle", "dominant-baseline": "central" });
      t.textContent = text;
      label.appendChild(rect);
      label.appendChild(t);
      g.appendChild(label);
    }
    if (l.kind === "match") {
      var srcRow = rowEls.src[l.src], dstRow = rowEls.dst[l.dst];
      var c = colour(l.confidence);
      [srcRow, dstRow].forEach(function (r) {
        var prev = r.getAttribute("data-conf");
        if (prev === null || num(l.confidence) < num(prev)) {
          r.setAttribute("data-conf", String(l.confidence));
          r.style.setProperty("--c", c);
        }
      });
      if (l.ops.length) {
        dstRow.querySelector(".unit").appendChild(el("span", "tag op", l.ops.join(" | ")));
      }
    } else {
      [rowEls.src[l.src], rowEls.dst[l.dst]].forEach(function (r) {
        r.classList.add("has-miss");
        if (!r.style.getPropertyValue("--c")) { r.style.setProperty("--c", "var(--miss)"); }
      });
    }
    grab.addEventListener("mouseenter", function (e) {
      if (pinned === null) { showTip(i, e.clientX, e.clientY); }
      hot(i, true);
    });
    grab.addEventListener("mousemove", function (e) {
      if (pinned === null) { placeTip(e.clientX, e.clientY); }
    });
    grab.addEventListener("mouseleave", function () {
      if (pinned === null) { hideTip(); }
      if (pinned !== i) { hot(i, false); }
    });
    grab.addEventListener("click", function (e) { e.stopPropagation(); pin(i, e.clientX, e.clientY); });
    svg.appendChild(g);
    rowLinks.src[l.src].push(i);
    rowLinks.dst[l.dst].push(i);
    wires.push({ g: g, path: path, grab: grab, label: label, link: l });
  });

  function layout() {
    var b = board.getBoundingClientRect();
    wires.forEach(function (w) {
      var a = rowEls.src[w.link.src].getBoundingClientRect();
      var z = rowEls.dst[w.link.dst].getBoundingClientRect();
      var x1 = a.right - b.left, y1 = a.top + a.height / 2 - b.top;
      var x2 = z.left - b.left, y2 = z.top + z.height / 2 - b.top;
      var dx = Math.max(40, (x2 - x1) / 2);
      var d = "M" + x1 + "," + y1 + " C" + (x1 + dx) + "," + y1 + " " +
        (x2 - dx) + "," + y2 + " " + x2 + "," + y2;
      w.path.setAttribute("d", d);
      w.grab.setAttribute("d", d);
      if (w.label) {
        var mx = (x1 + x2) / 2, my = (y1 + y2) / 2;
        var t = w.label.lastChild, r = w.label.firstChild;
        t.setAttribute("x", String(mx));
        t.setAttribute("y", String(my));
        var len = t.getComputedTextLength ? t.getComputedTextLength() : t.textContent.length * 6.5;
        r.setAttribute("x", String(mx - len / 2 - 5));
        r.setAttribute("y", String(my - 8));
        r.setAttribute("width", String(len + 10));
        r.setAttribute("height", "16");
      }
    });
  }

  /* ------------------------------------------------------------ tooltip */
  function costLine(costs) {
    var line = el("div", "costs");
    line.appendChild(el("span", "lbl", "costs"));
    costs.forEach(function (kv) {
      var term = el("span", "term", kv[0] + " ");
      term.appendChild(el("b", null, fmt(kv[1], 3)));
      line.appendChild(term);
    });
    if (!costs.length) { line.appendChild(document.createTextNode("\u2014")); }
    return line;
  }
  function showTip(i, x, y) {
    var l = data.links[i];
    tip.textContent = "";
    tip.appendChild(el("h3", null, data.dst[l.dst].title + "  \u2190  " + data.src[l.src].title));
    if (l.kind === "match") {
      var p = el("div", null, "confidence ");
      var c = el("span", "conf", fmt(l.confidence, 3));
      c.style.color = colour(l.confidence);
      p.appendChild(c);
      p.appendChild(document.createTextNode("  \u00b7  " + plural(l.items.length, "tensor") +
        (l.ops.length ? "  \u00b7  adapted: " + l.ops.join(" | ") : "")));
      tip.appendChild(p);
    } else {
      tip.appendChild(el("div", null, "not loaded (near miss) \u00b7 " + plural(l.items.length, "tensor")));
    }
    var sigs = l.items.map(function (it) { return JSON.stringify(it.costs || []); });
    var shared = sigs.every(function (x) { return x === sigs[0]; });
    var list = el("div", "items");
    l.items.forEach(function (it) {
      var item = el("div", "item");
      it.dst.forEach(function (k, j) {
        var line = el("div", "k");
        line.appendChild(el("b", null, k));
        line.appendChild(el("span", "shape", " " + shape(it.dst_shapes[j])));
        item.appendChild(line);
      });
      it.src.forEach(function (k, j) {
        var line = el("div", "k src" + (j ? " more" : ""), (j ? "" : "\u2190 ") + k);
        line.appendChild(el("span", "shape", " " + shape(it.src_shapes[j])));
        item.appendChild(line);
      });
      if (l.kind === "match") {
        var info = el("div", "info", "confidence ");
        var c = el("span", "conf", fmt(it.confidence, 3));
        c.style.color = colour(it.confidence);
        info.appendChild(c);
        if (it.ops.length) { info.appendChild(el("span", "tag op", it.ops.join(" "))); }
        item.appendChild(info);
        if (!shared) { item.appendChild(costLine(it.costs)); }
      } else {
        item.appendChild(el("div", "reason", it.reason));
      }
      list.appendChild(item);
    });
    tip.appendChild(list);
    if (l.kind === "match" && shared) { tip.appendChild(costLine(l.items[0].costs)); }
    tip.appendChild(el("div", "hint", pinned === null ? "click the line to pin it" :
      "pinned \u00b7 click elsewhere or press Esc to close"));
    tip.style.display = "block";
    placeTip(x, y);
  }
  function placeTip(x, y) {
    var w = tip.offsetWidth, h = tip.offsetHeight;
    var left = Math.min(x + 16, window.innerWidth - w - 8);
    var top = y + 16 + h > window.innerHeight ? y - h - 12 : y + 16;
    tip.style.left = Math.max(8, left) + "px";
    tip.style.top = Math.max(8, top) + "px";
  }
  function hideTip() { tip.style.display = "none"; tip.classList.remove("pinned"); }
  function hot(i, on) {
    var w = wires[i];
    w.path.classList.toggle("hot", on);
    if (w.label) { w.label.classList.toggle("hot", on); }
    board.classList.toggle("focusing", on || pinned !== null);
    rowEls.src[w.link.src].classList.toggle("focus", on);
    rowEls.dst[w.link.dst].classList.toggle("focus", on);
  }
  function pin(i, x, y) {
    if (pinned !== null) { hot(pinned, false); }
    pinned = i;
    hot(i, true);
    showTip(i, x, y);
    tip.classList.add("pinned");
    writeHash();
  }
  function unpin() {
    if (pinned === null) { return; }
    var i = pinned;
    pinned = null;
    hot(i, false);
    hideTip();
    writeHash();
  }
  document.addEventListener("click", function (e) { if (!tip.contains(e.target)) { unpin(); } });
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") { unpin(); } });
  function focusRow(side, i, on) {
    rowLinks[side][i].forEach(function (j) {
      wires[j].path.classList.toggle("hot", on || j === pinned);
      if (wires[j].label) { wires[j].label.classList.toggle("hot", on || j === pinned); }
    });
    board.classList.toggle("focusing", (on && rowLinks[side][i].length > 0) || pinned !== null);
  }

  /* ------------------------------------------------------------ filter */
  var minInput = document.getElementById("min");
  var belowInput = document.getElementById("below");
  function applyFilter() {
    var t = Number(minInput.value), below = belowInput.checked;
    document.getElementById("minv").textContent = t.toFixed(2);
    var visible = 0, tensors = 0, total = 0;
    var live = { src: {}, dst: {} };
    wires.forEach(function (w) {
      var l = w.link;
      var show = true;
      if (l.kind === "match") {
        var c = num(l.confidence);
        show = below ? !(c >= t) : (c >= t || !(c === c));
        total += l.items.length;
        if (show) { tensors += l.items.length; }
      }
      w.g.classList.toggle("hidden", !show);
      if (show) { visible++; live.src[l.src] = true; live.dst[l.dst] = true; }
    });
    ["src", "dst"].forEach(function (side) {
      rowEls[side].forEach(function (r, i) {
        r.classList.toggle("dim", rowLinks[side][i].length > 0 && !live[side][i]);
      });
    });
    document.getElementById("shown").textContent = tensors + " of " + plural(total, "match") + " shown" +
      (below ? "" : "  \u00b7  apply(min_confidence=" + t.toFixed(2) + ") loads " + tensors);
    status.setAttribute("data-visible", String(visible));
    writeHash();
  }
  minInput.addEventListener("input", applyFilter);
  belowInput.addEventListener("change", applyFilter);

  /* ------------------------------------------------------------ search */
  var q = document.getElementById("q");
  var hits = [], current = -1;
  function search(jump) {
    var needle = q.value.trim().toLowerCase();
    hits.forEach(function (r) { r.classList.remove("hit", "current"); });
    hits = [];
    current = -1;
    if (needle) {
      ["src", "dst"].forEach(function (side) {
        data[side].forEach(function (row, i) {
          var found = row.unit.toLowerCase().indexOf(needle) >= 0 ||
            row.tensors.some(function (t) { return t.key.toLowerCase().indexOf(needle) >= 0; });
          if (found) { hits.push(rowEls[side][i]); }
        });
      });
      hits.sort(function (a, b) { return a.getBoundingClientRect().top - b.getBoundingClientRect().top; });
      hits.forEach(function (r) { r.classList.add("hit"); });
    }
    document.getElementById("hits").textContent = needle ? plural(hits.length, "hit") : "";
    status.setAttribute("data-hits", String(hits.length));
    if (jump && hits.length) { next(); }
    writeHash();
  }
  function next() {
    if (!hits.length) { return; }
    if (current >= 0) { hits[current].classList.remove("current"); }
    current = (current + 1) % hits.length;
    hits[current].classList.add("current");
    hits[current].scrollIntoView({ block: "center" });
    document.getElementById("hits").textContent = (current + 1) + " / " + plural(hits.length, "hit");
  }
  q.addEventListener("input", function () { search(true); });
  q.addEventListener("keydown", function (e) { if (e.key === "Enter") { e.preventDefault(); next(); } });

  /* ------------------------------------------------------------ state in the URL */
  /* #q=<search>&min=<threshold>&below=1&pin=<line>: read on load, kept up to date */
  var ready = false;
  function writeHash() {
    if (!ready || !window.history || !history.replaceState) { return; }
    var parts = [];
    if (q.value) { parts.push("q=" + encodeURIComponent(q.value)); }
    if (Number(minInput.value) > 0) { parts.push("min=" + minInput.value); }
    if (belowInput.checked) { parts.push("below=1"); }
    if (pinned !== null) { parts.push("pin=" + pinned); }
    var url = parts.length ? "#" + parts.join("&") : location.pathname + location.search;
    try { history.replaceState(null, "", url); } catch (err) { /* a convenience only */ }
  }
  function readHash() {
    var state = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var k = kv.split("=")[0];
      if (k) { try { state[k] = decodeURIComponent(kv.slice(k.length + 1)); } catch (err) { state[k] = ""; } }
    });
    if (state.min !== undefined && !isNaN(Number(state.min))) { minInput.value = state.min; }
    if (state.below === "1") { belowInput.checked = true; }
    if (state.q) { q.value = state.q; }
    return state;
  }

  var initial = readHash();
  if (!data.links.length && !data.src.length && !data.dst.length) {
    board.appendChild(el("p", "empty", "The plan is empty."));
  }
  layout();
  applyFilter();
  search(Boolean(initial.q));
  var pinIndex = initial.pin === undefined ? NaN : parseInt(initial.pin, 10);
  if (pinIndex >= 0 && pinIndex < wires.length) {
    var box = wires[pinIndex].path.getBoundingClientRect();
    pin(pinIndex, box.left + box.width / 2, box.top + box.height / 2);
  }
  var scheduled = false;
  function relayout() {
    if (scheduled) { return; }
    scheduled = true;
    window.requestAnimationFrame(function () { scheduled = false; layout(); });
  }
  window.addEventListener("resize", relayout);
  if (window.ResizeObserver) { new ResizeObserver(relayout).observe(board); }
  if (document.fonts && document.fonts.ready) { document.fonts.ready.then(relayout); }
  ready = true;
  status.setAttribute("data-lines", String(nMatch));
  status.setAttribute("data-mismatch-lines", String(nMiss));
  status.setAttribute("data-src-rows", String(data.src.length));
  status.setAttribute("data-dst-rows", String(data.dst.length));
  status.setAttribute("data-errors", String(window.archalignErrors.length));
  status.setAttribute("data-state", "ready");
})();
</script>
</body>
</html>
"""
