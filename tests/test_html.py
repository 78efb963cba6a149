"""Tests for archalign.html: the self-contained review page, its escaping and layout, and (when
Chromium is installed) how it renders in a real headless browser."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import archalign
from archalign.html import render_html, save_html
from archalign.ops import Op
from archalign.plan import Match, Mismatch, Plan, load_plan

COSTS = (("type", 0.0), ("position", 0.125), ("context", 0.0), ("name", 0.2), ("regret", 2.3))
HOSTILE = '</script><b>bold</b><!-- "q" & \'a\' <script>alert(1)</script> \u2028 \u00e9 @@DATA@@ @@TITLE@@'
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")


def match(src: str, dst: str, src_unit: str, dst_unit: str, conf: float = 1.0,
          shape: tuple[int, ...] = (4,), ops: tuple[Op, ...] = (),
          costs: tuple[tuple[str, float], ...] = COSTS) -> Match:
    return Match(src=(src,), dst=(dst,), src_shapes=(shape,), dst_shapes=(shape,),
                 confidence=conf, costs=costs, src_unit=src_unit, dst_unit=dst_unit, ops=ops)


def layer(src_unit: str, dst_unit: str, conf: float = 1.0, ops: tuple[Op, ...] = ()) -> list[Match]:
    """weight and bias of one layer."""
    return [match(f"{src_unit}.weight", f"{dst_unit}.weight", src_unit, dst_unit, conf, (4, 4), ops),
            match(f"{src_unit}.bias", f"{dst_unit}.bias", src_unit, dst_unit, conf)]


def small_plan() -> Plan:
    mm = Mismatch(src=("enc.2.weight",), dst=("fc2.weight",), src_shapes=((5, 4),),
                  dst_shapes=((2, 4),), reason="shape mismatch: source (5, 4) vs destination (2, 4)")
    return Plan(
        matches=(*layer("enc.0", "fc1", 0.95), *layer("enc.1", "fc1b", 0.6, (Op("transpose"),)),
                 match("tok", "embed.weight", "tok", "embed", 0.3, (8, 4))),
        mismatches=(mm,),
        unmatched_src=("enc.2.weight", "enc.2.bias", "extra"),
        unmatched_dst=("fc2.weight", "fc2.bias"),
        tied_src=(("head.weight", "tok"),),
        src_tracer="fx", dst_tracer="hooks",
        verification="outputs agree: max |src - dst| = 0",
    )


def embedded(page: str) -> dict[str, Any]:
    """The plan data the page embeds (non-finite numbers would make this raise)."""
    found = re.search(r'<script type="application/json" id="plan-data">(.*?)</script>', page, re.S)
    assert found is not None
    return json.loads(found.group(1), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))


def keys_of(rows: list[dict[str, Any]]) -> list[str]:
    return [t["key"] for row in rows for t in row["tensors"]]


# --------------------------------------------------------------------------- the page


def test_page_is_self_contained() -> None:
    page = render_html(small_plan())
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|img|link|iframe|source)\b[^>]*\b(src|href)\s*=", page, re.I)
    assert "url(" not in page and "@import" not in page
    assert page.isascii()


def test_page_holds_every_key_of_both_sides() -> None:
    plan = small_plan()
    data = embedded(render_html(plan))
    dst_keys = {k for m in plan.matches for k in m.dst} | set(plan.unmatched_dst)
    src_keys = {k for m in plan.matches for k in m.src} | set(plan.unmatched_src)
    assert sorted(keys_of(data["dst"])) == sorted(dst_keys)
    assert sorted(keys_of(data["src"])) == sorted(src_keys)
    page = render_html(plan)
    for key in dst_keys:
        assert json.dumps(key) in page


def test_hostile_keys_titles_and_reasons_are_escaped() -> None:
    plan = Plan(
        matches=(match("src." + HOSTILE, "dst." + HOSTILE, "src", HOSTILE + "+x", 0.7,
                       costs=((HOSTILE, 1.0),)),),
        mismatches=(Mismatch(src=(HOSTILE,), dst=("<b>",), src_shapes=((2,),), dst_shapes=((3,),),
                             reason=HOSTILE),),
        unmatched_src=(HOSTILE,), unmatched_dst=("<b>",),
        src_tracer=HOSTILE, verification=HOSTILE)
    page = render_html(plan, title=HOSTILE)
    assert page.count("</script>") == 3  # the error counter, the JSON and the page script
    assert page.count("<script") == 3
    assert "<b>" not in page and "<!--" not in page and "alert(1)" in page  # as inert text
    assert "<title>&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;&lt;!-- &quot;q&quot; &amp;" in page
    data = embedded(page)
    assert data["title"] == HOSTILE
    assert "dst." + HOSTILE in keys_of(data["dst"]) and "<b>" in keys_of(data["dst"])
    assert {HOSTILE, "src." + HOSTILE} <= set(keys_of(data["src"]))
    assert data["links"][1]["items"][0]["reason"] == HOSTILE
    assert data["summary"]["verification"] == HOSTILE


def test_lone_surrogates_and_control_characters_do_not_break_the_page(tmp_path: Path) -> None:
    odd = "a\ud800b\x00c\u2029"
    plan = Plan(matches=(match(odd, odd, odd, odd),), unmatched_dst=(odd + ".x",))
    path = tmp_path / "odd.html"
    save_html(plan, path, title=odd)
    page = path.read_text(encoding="ascii")
    assert keys_of(embedded(page)["dst"]) == [odd, odd + ".x"]


def test_non_finite_numbers_stay_valid_json() -> None:
    plan = Plan(matches=(match("a", "b", "a", "b", math.nan, costs=(("regret", math.inf),)),))
    link = embedded(render_html(plan))["links"][0]
    assert link["confidence"] == "nan"
    assert link["items"][0]["costs"] == [["regret", "inf"]]


def test_every_page_asset_is_inlined_and_ships_with_the_package() -> None:
    tomllib = pytest.importorskip("tomllib")
    assets = Path(archalign.__file__).parent / "assets"
    names = sorted(p.name for p in assets.iterdir() if not p.name.startswith("."))
    assert names == ["report.css", "report.html", "report.js"]
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["archalign"]
    assert all(any(fnmatch.fnmatch(f"assets/{n}", g) for g in shipped) for n in names)
    page = render_html(small_plan())
    for name in ("report.css", "report.js"):
        text = (assets / name).read_text(encoding="ascii")
        assert text in page and "@@" not in text  # inlined verbatim, no placeholder of its own
    assert "@@" not in page


def test_same_plan_same_page_also_through_a_plan_file(tmp_path: Path) -> None:
    plan = small_plan()
    plan.save(tmp_path / "plan.json")
    assert render_html(plan) == render_html(plan) == render_html(load_plan(tmp_path / "plan.json"))
    save_html(plan, tmp_path / "report.html", title="t")
    assert (tmp_path / "report.html").read_text(encoding="ascii") == render_html(plan, title="t")


# --------------------------------------------------------------------------- the layout


def test_a_layer_is_one_row_and_a_unit_pair_one_line() -> None:
    data = embedded(render_html(small_plan()))
    assert [r["unit"] for r in data["dst"]] == ["fc1", "fc1b", "fc2", "embed"]  # fc2 by name
    assert [r["unit"] for r in data["src"]] == ["enc.0", "enc.1", "enc.2", "tok", "extra"]
    assert [t["label"] for t in data["dst"][0]["tensors"]] == ["weight", "bias"]
    lines = [(data["src"][li["src"]]["unit"], data["dst"][li["dst"]]["unit"], li["kind"])
             for li in data["links"]]
    assert lines == [("enc.0", "fc1", "match"), ("enc.1", "fc1b", "match"), ("tok", "embed", "match"),
                     ("enc.2", "fc2", "mismatch")]
    fc1b = data["links"][1]
    assert fc1b["ops"] == ["transpose"] and len(fc1b["items"]) == 2
    assert fc1b["items"][0]["costs"] == [list(c) for c in COSTS]
    assert data["links"][2]["confidence"] == 0.3
    assert [r["state"] for r in data["dst"]] == ["matched", "matched", "unmatched", "matched"]
    assert [t["state"] for t in data["src"][2]["tensors"]] == ["mismatch", "unmatched"]
    assert data["src"][2]["tensors"][0]["shape"] == "(5,4)"  # the review's one shape format
    summary = data["summary"]
    assert (summary["matches"], summary["adapted"], summary["mismatches"]) == (5, 1, 1)
    assert (summary["unmatched_src"], summary["unmatched_dst"]) == (3, 2)
    assert (summary["src_tracer"], summary["dst_tracer"]) == ("fx", "hooks")
    assert summary["tied_src"] == [["head.weight", "tok"]]
    assert summary["nonfinite"] == []
    flagged = dataclasses.replace(small_plan(), nonfinite=("enc.0.weight",))
    assert embedded(render_html(flagged))["summary"]["nonfinite"] == ["enc.0.weight"]


def test_a_line_takes_the_lowest_confidence_of_its_tensors() -> None:
    plan = Plan(matches=(match("a.w", "b.w", "a", "b", 0.9), match("a.v", "b.v", "a", "b", 0.4)))
    assert embedded(render_html(plan))["links"][0]["confidence"] == 0.4


def test_source_rows_follow_their_first_appearance_in_destination_order() -> None:
    plan = Plan(matches=(*layer("s.late", "d.first"), *layer("s.early", "d.second")))
    data = embedded(render_html(plan))
    assert [r["unit"] for r in data["src"]] == ["s.late", "s.early"]


def test_unmatched_keys_sit_next_to_their_relatives_by_name() -> None:
    plan = Plan(
        matches=(*layer("features.3", "features.3"), *layer("features.5", "features.5"),
                 *layer("fc2", "fc2")),
        unmatched_dst=("features.3.running_mean", "features.4.weight", "features.4.bias",
                       "fc1.weight", "zzz"),
        unmatched_src=("features.4a.conv.weight", "features.4a.bn.weight"))
    data = embedded(render_html(plan))
    assert [r["unit"] for r in data["dst"]] == [
        "features.3", "features.4", "features.5", "fc1", "fc2", "zzz"]
    assert [r["state"] for r in data["dst"]][:2] == ["partial", "unmatched"]
    assert [t["label"] for t in data["dst"][1]["tensors"]] == ["weight", "bias"]
    # unmatched keys of one gap keep their given (state_dict) order
    assert [r["unit"] for r in data["src"]] == [
        "features.3", "features.4a.conv", "features.4a.bn", "features.5", "fc2"]


def test_fused_groups_get_a_short_heading_and_short_tensor_names() -> None:
    unit = "m.attn.q_proj+m.attn.k_proj+m.attn.v_proj"
    fused = Match(src=("m.attn.q_proj.weight", "m.attn.k_proj.weight", "m.attn.v_proj.weight"),
                  dst=("m.attn.qkv.weight",), src_shapes=((4, 4),) * 3, dst_shapes=((12, 4),),
                  confidence=0.95, costs=(), src_unit=unit, dst_unit="m.attn.qkv",
                  ops=(Op("concat", sizes=(4, 4, 4)),))
    data = embedded(render_html(Plan(matches=(fused,), unmatched_src=("m.attn.k_proj.bias",))))
    (row,) = data["src"]
    assert row["unit"] == unit and row["title"] == "m.attn.{q_proj + k_proj + v_proj}"
    assert [t["label"] for t in row["tensors"]] == [
        "q_proj.weight", "k_proj.weight", "v_proj.weight", "k_proj.bias"]
    assert data["links"][0]["ops"] == ["concat[4, 4, 4]"]


def test_an_empty_plan_renders() -> None:
    data = embedded(render_html(Plan(matches=())))
    assert data["src"] == data["dst"] == data["links"] == []


# --------------------------------------------------------------------------- a real browser


def run_chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
               "--enable-logging=stderr", "--v=0", *extra, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def render_in_browser(tmp_path: Path, page: Path, fragment: str = "") -> tuple[dict[str, str], str]:
    """Open the page headless; the status element's attributes and the DOM after the script ran."""
    done = run_chromium(tmp_path, page.as_uri() + fragment, "--dump-dom")
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], "\n".join(console)  # the page logs nothing unless something failed
    found = re.search(r'<div id="status"([^>]*)>', done.stdout)
    assert found is not None, done.stdout[:2000]
    status = dict(re.findall(r'([\w-]+)="([^"]*)"', found.group(1)))
    assert status["data-state"] == "ready", status
    assert status["data-errors"] == "0", status
    return status, done.stdout


@pytest.fixture(scope="module")
def vit_plan() -> Plan:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    import archalign

    torch.manual_seed(0)
    src = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                               num_heads=4, hidden_dim=64, mlp_dim=128,
                                               num_classes=10)
    dst = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                        num_heads=4, mlp_ratio=2.0, num_classes=10,
                                        global_pool="token")
    return archalign.align(src, dst, check_outputs=False)  # the structural plan: doubtful rows


@needs_chromium
def test_real_report_renders_one_line_per_matched_layer(tmp_path: Path, vit_plan: Plan) -> None:
    page = tmp_path / "report.html"
    save_html(vit_plan, page, title="torchvision ViT -> timm ViT")
    status, dom = render_in_browser(tmp_path, page)
    pairs = {(m.src_unit, m.dst_unit) for m in vit_plan.matches}
    assert len(pairs) == 17  # patch embedding, 2 tokens, 2 x 6 block layers, final norm, head
    assert int(status["data-lines"]) == len(pairs)
    assert int(status["data-visible"]) == len(pairs)
    assert status["data-mismatch-lines"] == "0"
    assert len(re.findall(r'<path class="link match"', dom)) == len(pairs)
    assert int(status["data-dst-rows"]) == len({m.dst_unit for m in vit_plan.matches})
    assert dom.count('class="row ') == int(status["data-src-rows"]) + int(status["data-dst-rows"])
    for m in vit_plan.matches:  # every tensor is on the page as text
        assert all(f">{k.rsplit('.', 1)[-1]}<" in dom for k in m.dst)

    shot = tmp_path / "report.png"
    run_chromium(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1400,900",
                 "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # not a blank page


@needs_chromium
def test_filter_search_and_pin_come_from_the_url(tmp_path: Path, vit_plan: Plan) -> None:
    page = tmp_path / "report.html"
    save_html(vit_plan, page)
    status, dom = render_in_browser(tmp_path, page, "#min=0.9&q=attn.qkv&pin=0")
    confident = {(m.src_unit, m.dst_unit) for m in vit_plan.matches}
    doubtful = {(m.src_unit, m.dst_unit) for m in vit_plan.matches if m.confidence < 0.9}
    assert doubtful  # the fused-in-place attention projections (0.86)
    assert int(status["data-visible"]) == len(confident) - len(doubtful)
    assert status["data-hits"] == "2"  # blocks.0.attn.qkv and blocks.1.attn.qkv
    assert len(re.findall(r'class="row [^"]*\bhit\b', dom)) == 2
    assert 'id="tip" role="tooltip" class="pinned"' in dom and "confidence" in dom


@needs_chromium
def test_hostile_keys_render_as_text(tmp_path: Path) -> None:
    plan = Plan(
        matches=(match("s." + HOSTILE, "d." + HOSTILE, "s", HOSTILE, 0.7, ops=(Op("transpose"),)),),
        mismatches=(Mismatch(src=("x.w",), dst=("y.w",), src_shapes=((2,),), dst_shapes=((3,),),
                             reason=HOSTILE),),
        unmatched_src=("x.w",), unmatched_dst=("y.w", "<b>"))
    page = tmp_path / "hostile.html"
    save_html(plan, page, title=HOSTILE)
    status, dom = render_in_browser(tmp_path, page, "#pin=1")
    assert (status["data-lines"], status["data-mismatch-lines"]) == ("1", "1")
    assert "<b>bold" not in dom and "alert(1)</script>" not in dom
    assert "&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;" in dom


@needs_chromium
def test_the_browser_check_does_catch_script_errors(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    html = render_html(small_plan())
    page.write_text(html.replace("</body>", '<script>console.error("boom")</script></body>'),
                    encoding="ascii")
    with pytest.raises(AssertionError, match="boom"):
        render_in_browser(tmp_path, page)
    page.write_text(html.replace('"use strict";', '"use strict"; null.boom;'), encoding="ascii")
    with pytest.raises(AssertionError, match="Uncaught TypeError"):
        render_in_browser(tmp_path, page)


# --------------------------------------------------------------------------- what a reviewer needs


def test_the_page_names_what_it_compares_and_shows_every_confidence() -> None:
    plan = small_plan()
    data = embedded(render_html(plan, source="ckpt/old.pt", destination="timm resnet50"))
    assert (data["summary"]["source"], data["summary"]["destination"]) == ("ckpt/old.pt",
                                                                         "timm resnet50")
    assert data["default"] == archalign.confidence.DEFAULT_MIN_CONFIDENCE
    shown = {t["key"]: (t["conf"], t["band"]) for row in data["dst"] for t in row["tensors"]
             if t["state"] == "matched"}
    assert shown == {k: (f"{m.confidence:.2f}", archalign.review.band_of(m.confidence).value)
                     for m in plan.matches for k in m.dst}
    assert embedded(render_html(plan))["summary"]["source"] == ""  # a plan does not know them


def test_flagged_rows_are_marked_on_the_page() -> None:
    plan = Plan(matches=(*layer("enc.0", "blocks.0"), *layer("enc.2", "blocks.1"),
                         *layer("enc.1", "blocks.2")),
                src_tracer="registration", dst_tracer="registration")
    data = embedded(render_html(plan))
    flags = {t["key"]: t["flags"] for row in data["dst"] for t in row["tensors"]}
    assert flags["blocks.0.weight"] == ["order-only"]
    assert flags["blocks.1.weight"] == flags["blocks.2.bias"] == ["order-only", "index-shift"]
    assert [f["flag"] for f in data["flags"]] == ["order-only", "index-shift"]
    assert [f["rows"] for f in data["flags"]] == [6, 4]
    assert [li["flags"] for li in data["links"]] == [["order-only"], ["order-only", "index-shift"],
                                                     ["order-only", "index-shift"]]


@pytest.fixture(scope="module")
def weak_plan():  # type: ignore[no-untyped-def]
    """A ResNet-34 -> ResNet-18 plan from a state_dict (which blocks of each stage were dropped,
    structure cannot tell): some rows are flagged, and some fall below the default threshold;
    with what a default apply loads."""
    torch = pytest.importorskip("torch")
    from corpus import get_pair

    pair = get_pair("tv_resnet34->tv_resnet18")
    src = pair.make_src()
    plan = archalign.align(src.state_dict(), pair.make_dst())
    return plan, len(plan.apply(pair.make_dst(), src.state_dict()).loaded), torch


@needs_chromium
def test_the_slider_starts_at_the_default_and_counts_what_apply_loads(tmp_path: Path,
                                                                      weak_plan) -> None:  # type: ignore[no-untyped-def]
    plan, loads, _ = weak_plan
    review = archalign.review.build_review(plan)
    below = sum(len(r.dst) for r in review.rows if r.below_default)
    flagged = sum(bool(r.flags) for r in review.rows)
    assert below and flagged and loads == sum(len(m.dst) for m in plan.matches) - below
    page = tmp_path / "weak.html"
    save_html(plan, page, source="resnet34.pt (torchvision)", destination="resnet18")
    status, dom = render_in_browser(tmp_path, page)
    assert status["data-loads"] == str(loads)  # apply(min_confidence=0.50) loads exactly these
    matched = sum(len(m.dst) for m in plan.matches)  # a fused source feeds several tensors
    assert f"apply(min_confidence=0.50) loads {loads} of {matched} matched tensors " \
           "(the default)" in dom
    assert '<output id="minv">0.50</output>' in dom
    assert 'class="wire faded"' in dom  # what a default apply skips is drawn faded
    assert ">resnet34.pt (torchvision)</span>" in dom and ">resnet18</span>" in dom
    assert status["data-flagged"] == str(flagged)
    assert dom.count('class="tag flag"') >= 1
    rows = re.findall(r'<div class="row [^"]*\bsuspect\b', dom)
    assert rows and len(rows) <= len(review.rows)
    for row in review.rows[:5]:  # confidences are on the page, not only in a tooltip
        assert f'<span class="conf {row.band.value}">{row.conf}</span>' in dom
    status, dom = render_in_browser(tmp_path, page, "#min=0&flagged=1")
    assert status["data-loads"] == str(sum(len(m.dst) for m in plan.matches))
    assert int(status["data-visible"]) == len({(m.src_unit, m.dst_unit) for m, r in
                                               zip(plan.matches, archalign.review.find_flags(plan))
                                               if r})


@needs_chromium
def test_only_below_draws_the_lines_a_default_apply_skips(tmp_path: Path, weak_plan) -> None:  # type: ignore[no-untyped-def]
    plan, _, _ = weak_plan
    page = tmp_path / "weak.html"
    save_html(plan, page)
    status, dom = render_in_browser(tmp_path, page, "#below=1")
    skipped = {(m.src_unit, m.dst_unit) for m in plan.matches if m.confidence < 0.5}
    lines = {}
    for m in plan.matches:  # a line is below when its least sure row is
        key = (m.src_unit, m.dst_unit)
        lines[key] = min(lines.get(key, 1.0), m.confidence)
    assert skipped and int(status["data-visible"]) == sum(c < 0.5 for c in lines.values())
    assert 'class="wire faded"' not in dom
