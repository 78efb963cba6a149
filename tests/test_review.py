"""Tests for archalign.review: the one review-row model, the text table (byte for byte as it has
always printed), and that every renderer (text, Jupyter, command line, HTML page) shows its rows."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import re
from html.parser import HTMLParser
from typing import Any

import pytest
from rich.console import Console

from archalign.confidence import DEFAULT_MIN_CONFIDENCE, HIGH_CONFIDENCE, LOW_CONFIDENCE
from archalign.html import render_html
from archalign.ops import Op
from archalign.plan import Match, Mismatch, Plan
from archalign.review import (
    COLUMNS,
    Band,
    Flag,
    ReviewRow,
    band_of,
    build_review,
    describe_leftovers,
    format_plan,
    format_plan_html,
    format_shape,
)
from archalign.terminal import print_plan

COSTS = (("type", 0.0), ("position", 0.125), ("name", 0.2), ("regret", 2.3))


def match(src: str | tuple[str, ...], dst: str | tuple[str, ...], conf: float,
          src_shapes: tuple[tuple[int, ...], ...], dst_shapes: tuple[tuple[int, ...], ...],
          ops: tuple[Op, ...] = (), src_unit: str = "", dst_unit: str = "") -> Match:
    src = (src,) if isinstance(src, str) else src
    dst = (dst,) if isinstance(dst, str) else dst
    return Match(src=src, dst=dst, src_shapes=src_shapes, dst_shapes=dst_shapes, confidence=conf,
                 costs=COSTS, src_unit=src_unit or src[0].rsplit(".", 1)[0],
                 dst_unit=dst_unit or dst[0].rsplit(".", 1)[0], ops=ops)


def two_tensor_plan() -> Plan:
    """One layer, its bias below the default threshold, a near miss and leftovers."""
    mm = Mismatch(src=("enc.2.weight",), dst=("fc2.weight",), src_shapes=((5, 4),),
                  dst_shapes=((2, 4),), reason="shape mismatch: source (5, 4) vs destination (2, 4)")
    return Plan(matches=(match("enc.0.weight", "fc1.weight", 0.9, ((4, 3),), ((4, 3),)),
                         match("enc.0.bias", "fc1.bias", 0.45, ((4,),), ((4,),))),
                mismatches=(mm,), unmatched_src=("enc.2.weight", "enc.2.bias"),
                unmatched_dst=("fc2.weight", "fc2.bias"), tied_src=(("head.weight", "emb.weight"),),
                src_tracer="fx", dst_tracer="hooks")


def layered_plan() -> Plan:
    """Every kind of row: adapted (transpose, concat, reshape), a scalar, NaN/Inf in the source,
    confidences on both sides of a band bound that print alike, a near miss and leftovers."""
    qkv = match(("attn.q.weight", "attn.k.weight", "attn.v.weight"), "attn.qkv.weight", 0.86,
                ((4, 4),) * 3, ((12, 4),), (Op("concat", sizes=(4, 4, 4)),),
                src_unit="attn.q+attn.k+attn.v", dst_unit="attn.qkv")
    return Plan(
        matches=(
            match("enc.0.weight", "fc1.weight", 0.999, ((3, 4),), ((4, 3),), (Op("transpose"),)),
            match("enc.0.bias", "fc1.bias", 0.996, ((4,),), ((4,),)),
            qkv,
            match("pos", "embed.pos", 0.704, ((1, 8),), ((8,),),
                  (Op("reshape", shape=(8,), from_shape=(1, 8)),)),
            match("scale", "norm.scale", 0.696, ((),), ((),)),
            match("head.weight", "classifier.weight", 0.5, ((2, 4),), ((2, 4),)),
            match("head.bias", "classifier.bias", 0.4999, ((2,),), ((2,),)),
            match("tok", "embed.tok", 0.12, ((16, 4),), ((16, 4),)),
        ),
        mismatches=(Mismatch(src=("enc.2.weight",), dst=("fc2.weight",), src_shapes=((5, 4),),
                             dst_shapes=((2, 4),), confidence=0.7,
                             reason="shape mismatch: source (5, 4) vs destination (2, 4)"),),
        unmatched_src=("enc.2.weight", "enc.2.bias", "extra"),
        unmatched_dst=("fc2.weight", "fc2.bias"),
        tied_src=(("lm.weight", "tok"),),
        src_tracer="fx", dst_tracer="hooks",
        verification="outputs agree: max |src - dst| = 0",
        nonfinite=("scale",),
    )


def split_plan() -> Plan:
    """A one-to-many split (two shapes in one cell) and a long key that widens its column."""
    return Plan(matches=(
        match("blocks.0.attention.query_key_value.weight", ("q.weight", "k.weight"), 0.93,
              ((8, 4),), ((4, 4), (4, 4)), (Op("split", sizes=(4, 4)),), dst_unit="q+k"),
        match("blocks.0.mlp.w", "mlp.weight", 0.93, ((6, 4),), ((6, 4),)),
    ), src_tracer="registration", dst_tracer="fx")


PLANS = {"two_tensor": two_tensor_plan, "layered": layered_plan, "split": split_plan,
         "empty": lambda: Plan(matches=())}

# The text table as `Plan.__str__` printed it before the review rows existed (README and docs
# show this format; it must not change).
TEXT = {
    "two_tensor": """\
Plan: 2 matches (0 adapted), 1 shape mismatches, 2 destination keys unmatched (tracers: source fx, \
destination hooks)
conf  destination  source        shape  adaptation
0.45  fc1.bias     enc.0.bias    (4)
0.90  fc1.weight   enc.0.weight  (4,3)
not loaded: fc2.weight <- enc.2.weight: shape mismatch: source (5, 4) vs destination (2, 4)
unmatched destination keys (1): fc2.bias
unused source keys (1): enc.2.bias""",
    "layered": """\
Plan: 8 matches (3 adapted), 1 shape mismatches, 2 destination keys unmatched (tracers: source fx, \
destination hooks)
verification: outputs agree: max |src - dst| = 0
WARNING: NaN/Inf in 1 source tensors (loaded as they are): scale
conf  destination        source                                       shape   adaptation
0.12  embed.tok          tok                                          (16,4)
0.50  classifier.bias    head.bias                                    (2)
0.50  classifier.weight  head.weight                                  (2,4)
0.70  embed.pos          pos                                          (8)     reshape(8,)
0.70  norm.scale         scale                                        ()
0.86  attn.qkv.weight    attn.q.weight, attn.k.weight, attn.v.weight  (12,4)  concat[4, 4, 4]
1.00  fc1.bias           enc.0.bias                                   (4)
1.00  fc1.weight         enc.0.weight                                 (4,3)   transpose
not loaded: fc2.weight <- enc.2.weight: shape mismatch: source (5, 4) vs destination (2, 4)
unmatched destination keys (1): fc2.bias
unused source keys (2): enc.2.bias, extra""",
    "split": """\
Plan: 2 matches (1 adapted), 0 shape mismatches, 0 destination keys unmatched (tracers: source \
registration, destination fx)
conf  destination         source                                     shape        adaptation
0.93  mlp.weight          blocks.0.mlp.w                             (6,4)
0.93  q.weight, k.weight  blocks.0.attention.query_key_value.weight  (4,4) (4,4)  split[4, 4]""",
    "empty": """\
Plan: 0 matches (0 adapted), 0 shape mismatches, 0 destination keys unmatched (tracers: source , \
destination )
conf  destination  source  shape  adaptation""",
}

LAYERED_LIMIT_3 = """\
Plan: 8 matches (3 adapted), 1 shape mismatches, 2 destination keys unmatched (tracers: source fx, \
destination hooks)
verification: outputs agree: max |src - dst| = 0
WARNING: NaN/Inf in 1 source tensors (loaded as they are): scale
conf  destination        source       shape   adaptation
0.12  embed.tok          tok          (16,4)
0.50  classifier.bias    head.bias    (2)
0.50  classifier.weight  head.weight  (2,4)
... 5 more
not loaded: fc2.weight <- enc.2.weight: shape mismatch: source (5, 4) vs destination (2, 4)
unmatched destination keys (1): fc2.bias
unused source keys (2): enc.2.bias, extra"""


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize(("confidence", "band"), [
    (0.0, Band.LOW), (math.nextafter(LOW_CONFIDENCE, 0.0), Band.LOW), (LOW_CONFIDENCE, Band.MID),
    (math.nextafter(HIGH_CONFIDENCE, 0.0), Band.MID), (HIGH_CONFIDENCE, Band.HIGH), (1.0, Band.HIGH),
    (math.nan, Band.LOW),
])
def test_bands_are_bounded_by_the_confidence_module(confidence: float, band: Band) -> None:
    assert band_of(confidence) is band


def test_a_row_says_what_makes_it_stand_out() -> None:
    rows = {row.dst: row for row in build_review(layered_plan()).rows}
    bias = rows[("classifier.bias",)]  # 0.4999: prints as 0.50 but apply skips it by default
    assert (bias.conf, bias.band, bias.below_default, bias.stands_out) == ("0.50", Band.LOW, True, True)
    weight = rows[("classifier.weight",)]  # 0.5: the default threshold itself loads
    assert (weight.band, weight.below_default, weight.stands_out) == (Band.MID, False, False)
    assert weight.confidence == DEFAULT_MIN_CONFIDENCE
    pos = rows[("embed.pos",)]
    assert (pos.adapted, pos.adaptation, pos.shape, pos.stands_out) == (True, "reshape(8,)", "(8)", True)
    scale = rows[("norm.scale",)]
    assert (scale.nonfinite, scale.shape, scale.adapted, scale.stands_out) == (True, "()", False, True)
    qkv = rows[("attn.qkv.weight",)]
    assert qkv.cells == ("0.86", "attn.qkv.weight", "attn.q.weight, attn.k.weight, attn.v.weight",
                         "(12,4)", "concat[4, 4, 4]")
    assert rows[("fc1.bias",)].band is Band.HIGH and not rows[("fc1.bias",)].stands_out


def test_rows_sort_by_rounded_confidence_then_destination() -> None:
    base = two_tensor_plan().matches[0]
    matches = tuple(dataclasses.replace(base, dst=(d,), confidence=c)
                    for d, c in [("b", 0.7), ("z", 0.1), ("a", 0.704), ("c", 0.696), ("m", 1.0)])
    rows = build_review(Plan(matches=matches)).rows
    assert [(r.conf, r.dst[0]) for r in rows] == [
        ("0.10", "z"), ("0.70", "a"), ("0.70", "b"), ("0.70", "c"), ("1.00", "m")]
    assert [r.index for r in rows] == [1, 2, 0, 3, 4]  # each row knows its match


@pytest.mark.parametrize("shape, text", [((8, 10), "(8,10)"), ((4,), "(4)"), ((), "()")])
def test_one_shape_format(shape: tuple[int, ...], text: str) -> None:
    assert format_shape(shape) == text


def test_the_header_and_leftovers_split_what_is_not_loaded() -> None:
    review = build_review(layered_plan())
    assert review.header[1:] == ("verification: outputs agree: max |src - dst| = 0",
                                 "WARNING: NaN/Inf in 1 source tensors (loaded as they are): scale")
    assert review.not_loaded == (
        "not loaded: fc2.weight <- enc.2.weight: shape mismatch: source (5, 4) vs destination (2, 4)",)
    assert review.unmatched == ("unmatched destination keys (1): fc2.bias",
                                "unused source keys (2): enc.2.bias, extra")
    assert describe_leftovers(layered_plan()) == [*review.not_loaded, *review.unmatched]


@pytest.mark.parametrize("name", [n for n in PLANS if n != "empty"])
def test_a_plan_and_its_json_round_trip_give_the_same_rows(name: str) -> None:
    plan = PLANS[name]()
    again = Plan.from_json(plan.to_json())
    assert build_review(again) == build_review(plan)
    assert format_plan_html(again) == format_plan_html(plan)
    assert render_html(again) == render_html(plan)


# --------------------------------------------------------------------------- the text table


@pytest.mark.parametrize("name", list(PLANS))
def test_the_text_table_is_byte_identical_to_what_it_always_printed(name: str) -> None:
    plan = PLANS[name]()
    assert format_plan(plan) == str(plan) == TEXT[name]


def test_the_text_table_limit() -> None:
    assert format_plan(layered_plan(), limit=3) == LAYERED_LIMIT_3
    assert format_plan(layered_plan(), limit=8) == TEXT["layered"]
    lines = format_plan(two_tensor_plan(), limit=0).splitlines()
    assert lines[1:3] == ["conf  destination  source  shape  adaptation", "... 2 more"]


# --------------------------------------------------------------------------- every renderer


Shown = tuple[tuple[str, ...], Band, bool]  # a row's cells, band and whether it stands out


def rows_of_text(plan: Plan) -> list[tuple[str, ...]]:
    """The cells of the text table's rows, cut at the header's column starts."""
    review = build_review(plan)
    lines = format_plan(plan).splitlines()
    head = lines[len(review.header)]
    starts = [head.index(c) for c in COLUMNS] + [None]
    body = lines[len(review.header) + 1:len(review.header) + 1 + len(review.rows)]
    return [tuple(line[a:b].strip() for a, b in itertools.pairwise(starts)) for line in body]


class _Table(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[dict[str, str | None], list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append((dict(attrs), []))
        elif tag == "td":
            self.cell = []

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self.cell is not None:
            self.rows[-1][1].append("".join(self.cell))
            self.cell = None


def rows_of_jupyter(plan: Plan) -> list[Shown]:
    parser = _Table()
    parser.feed(plan._repr_html_())
    body = [(attrs, cells) for attrs, cells in parser.rows if cells]  # the first <tr> holds <th>
    return [(tuple(cells), Band(attrs["data-band"]), "font-weight:bold" in str(attrs["style"]))
            for attrs, cells in body]


def rows_of_cli(plan: Plan) -> list[Shown]:
    """The table rows `archalign show` prints, with the band and emphasis read from their SGR codes."""
    out = io.StringIO()
    print_plan(plan, Console(file=out, width=400, force_terminal=True, color_system="standard",
                             highlight=False))
    shown = []
    for line in out.getvalue().splitlines():
        plain = re.sub(r"\x1b\[[\d;]*m", "", line)
        if not plain.startswith("\u2502"):  # body rows of rich's box; headers use a heavy bar
            continue
        codes = {c for group in re.findall(r"\x1b\[([\d;]*)m", line) for c in group.split(";")}
        band = Band.LOW if "31" in codes else Band.MID if "33" in codes else Band.HIGH
        cells = tuple(c.strip() for c in plain.strip("\u2502").split("\u2502"))
        shown.append((cells, band, "1" in codes))
    return shown


def page_data(plan: Plan) -> dict[str, Any]:
    page = render_html(plan)
    found = re.search(r'<script type="application/json" id="plan-data">(.*?)</script>', page, re.S)
    assert found is not None
    return json.loads(found.group(1))


def rows_of_page(plan: Plan) -> list[list[dict[str, Any]]]:
    """The review rows the page holds, line by line (a line stands for its rows)."""
    return [link["items"] for link in page_data(plan)["links"] if link["kind"] == "match"]


@pytest.mark.parametrize("name", list(PLANS))
def test_every_renderer_shows_the_same_rows_in_the_same_order(name: str) -> None:
    plan = PLANS[name]()
    review = build_review(plan)
    expected: list[Shown] = [(row.cells, row.band, row.stands_out) for row in review.rows]
    assert rows_of_text(plan) == [cells for cells, _, _ in expected]
    assert rows_of_jupyter(plan) == expected
    assert rows_of_cli(plan) == expected
    # the page draws lines in destination order; each line lists its rows in the review's order
    position = {row.dst: n for n, row in enumerate(review.rows)}
    by_dst = {row.dst: row for row in review.rows}
    lines = rows_of_page(plan)
    assert sorted(tuple(it["dst"]) for items in lines for it in items) == sorted(position)
    for items in lines:
        assert [position[tuple(it["dst"])] for it in items] == sorted(
            position[tuple(it["dst"])] for it in items)
        for it in items:
            row: ReviewRow = by_dst[tuple(it["dst"])]
            assert (it["conf"], tuple(it["src"]), " ".join(it["dst_shapes"]), it["adaptation"],
                    it["band"], it["nonfinite"]) == (
                row.conf, row.src, row.shape, row.adaptation, row.band.value, row.nonfinite)


def test_a_page_line_takes_the_band_of_its_least_sure_row() -> None:
    (classifier,) = [items for items in rows_of_page(layered_plan())
                     if items[0]["dst"] == ["classifier.bias"]]
    assert [it["band"] for it in classifier] == ["low", "mid"]
    line = next(li for li in page_data(layered_plan())["links"]
                if li["items"][0]["dst"] == ["classifier.bias"])
    assert (line["conf"], line["band"], line["confidence"]) == ("0.50", "low", 0.4999)


def test_the_jupyter_table_has_the_text_tables_lines() -> None:
    text = format_plan_html(layered_plan())
    review = build_review(layered_plan())
    for line in (*review.header, *review.not_loaded, *review.unmatched):
        assert f"<p>{line.replace('<', '&lt;').replace('>', '&gt;')}</p>" in text
    hostile = Plan(matches=(match("<b>", "<i>&", 0.7, ((1,),), ((1,),)),), verification="<x>")
    assert "<b>" not in format_plan_html(hostile) and "&lt;i&gt;&amp;" in format_plan_html(hostile)


# --------------------------------------------------------------------------- flags


def flagged_plan() -> Plan:
    """Registration order on both sides (order-only evidence), blocks 1 and 2 swapped (an index
    shift), a tie settled by the same name (a prior), a pinned pair and a unique layer."""
    def block(i: int, j: int, conf: float, extra: tuple[tuple[str, float], ...] = ()) -> list[Match]:
        return [dataclasses.replace(
            match(f"layers.{j}.fc.{t}", f"blocks.{i}.fc.{t}", conf, (s,), (s,)),
            costs=(*COSTS, *extra)) for t, s in (("weight", (4, 4)), ("bias", (4,)))]

    head = dataclasses.replace(match("out.weight", "head.weight", 0.95, ((3, 4),), ((3, 4),)))
    pinned = dataclasses.replace(match("emb.weight", "embed.weight", 1.0, ((4, 4),), ((4, 4),)),
                                 costs=(("pinned", 1.0), ("regret", 0.0)))
    return Plan(matches=(pinned, *block(0, 0, 0.8), *block(1, 2, 0.7), *block(2, 1, 0.7),
                         *block(3, 3, 0.6, (("same_name", 1.0),)), head),
                src_tracer="registration", dst_tracer="state_dict")


def test_rows_are_flagged_from_the_plan_alone() -> None:
    rows = {row.dst[0]: row.flags for row in build_review(flagged_plan()).rows}
    assert rows["blocks.0.fc.weight"] == (Flag.ORDER_ONLY,)  # same shapes as the other blocks
    assert rows["blocks.1.fc.bias"] == rows["blocks.2.fc.weight"] == (Flag.ORDER_ONLY,
                                                                     Flag.INDEX_SHIFT)
    assert rows["blocks.3.fc.weight"] == (Flag.ORDER_ONLY, Flag.PRIOR)
    assert rows["head.weight"] == ()  # no rival of its shapes
    assert rows["embed.weight"] == ()  # pinned by a reviewer
    assert Plan.from_json(flagged_plan().to_json()) == flagged_plan()  # a saved plan keeps them
    assert build_review(Plan.from_json(flagged_plan().to_json())) == build_review(flagged_plan())


def test_execution_order_or_a_passed_output_check_clears_the_order_flags() -> None:
    executed = dataclasses.replace(flagged_plan(), src_tracer="fx", dst_tracer="hooks")
    rows = {row.dst[0]: row.flags for row in build_review(executed).rows}
    assert rows["blocks.0.fc.weight"] == () and rows["blocks.3.fc.weight"] == (Flag.PRIOR,)
    assert rows["blocks.1.fc.weight"] == (Flag.INDEX_SHIFT,)  # the order of indices still says so
    verified = dataclasses.replace(flagged_plan(), matches=tuple(
        dataclasses.replace(m, costs=(*m.costs, ("verified", 1.0))) for m in flagged_plan().matches))
    assert not build_review(verified).flagged


def test_a_named_prior_is_a_cost_term_starting_with_prior() -> None:
    plan = Plan(matches=(dataclasses.replace(
        match("a.weight", "b.weight", 0.8, ((2, 3),), ((2, 3),)),
        costs=(("prior_layout_in_out", 0.1), ("regret", 1.0))),), src_tracer="fx", dst_tracer="fx")
    assert build_review(plan).rows[0].flags == (Flag.PRIOR,)


def test_flags_get_a_column_and_a_note_in_every_table() -> None:
    plan = flagged_plan()
    review = build_review(plan)
    text = format_plan(plan).splitlines()
    assert text[1] == "conf  destination         source              shape  adaptation  flags"
    assert "0.70  blocks.1.fc.bias    layers.2.fc.bias    (4)                order-only index-shift" in text
    assert review.flag_notes[0].startswith("order-only (8 rows): no execution order on both sides")
    assert review.flag_notes[1].startswith("prior (2 rows): a convention decided")
    assert review.flag_notes[2].startswith("index-shift (4 rows): its block indices go backwards")
    assert text[-3:] == list(review.flag_notes)
    assert all(row.stands_out for row in review.rows if row.flags)
    jupyter = rows_of_jupyter(plan)
    assert [cells[-1] for cells, _, _ in jupyter] == [row.flag_text for row in review.rows]
    cli = rows_of_cli(plan)
    assert [cells[-1] for cells, _, _ in cli] == [row.flag_text for row in review.rows]
    assert [(cells[:-1], band, bold) for cells, band, bold in cli] == [
        (row.cells, row.band, row.stands_out) for row in review.rows]
    page = [it for items in rows_of_page(plan) for it in items]
    by_dst = {row.dst: row for row in review.rows}
    assert all(it["flags"] == [f.value for f in by_dst[tuple(it["dst"])].flags] for it in page)


def test_prior_note_names_the_prior():
    from archalign.plan import Match, Plan
    from archalign.review import build_review, describe_prior

    match = Match(src=("a.weight",), dst=("b.weight",), src_shapes=((4, 4),),
                  dst_shapes=((4, 4),), confidence=0.7,
                  costs=(("shape", 0.0), ("prior_layout_in_out", 0.1)), src_unit="a",
                  dst_unit="b")
    plan = Plan(matches=(match,), src_tracer="fx", dst_tracer="fx")
    note = "layout from the checkpoint's convention (in_out)"
    assert describe_prior("prior_layout_in_out") == note
    assert describe_prior("prior_rotary_half") == "rotary half (a named prior)"
    review = build_review(plan)
    assert review.rows[0].priors == ("prior_layout_in_out",)
    assert any(line.startswith("prior (1 row)") and note in line for line in review.flag_notes)
    assert note in str(plan)
    from archalign.html import render_html

    assert f"a convention decided: {note}" in render_html(plan)
