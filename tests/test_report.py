"""Tests for archalign.report: the load report's fields and its printed summary."""

from __future__ import annotations

import dataclasses

import pytest

from archalign.report import LISTED, Adapted, LoadReport, Skipped


def full_report() -> LoadReport:
    return LoadReport(
        loaded=("fc1.weight", "fc1.bias"),
        skipped=(Skipped("fc2.weight", "enc.2.weight", "confidence 0.30 < min_confidence 0.50"),
                 Skipped("fc3.weight", "enc.4.weight", "shape mismatch: (8, 10) vs (5, 10)")),
        missing=("fc2.weight", "fc3.weight", "head.weight", "head.bias"),
        unexpected=("enc.2.weight", "enc.9.bias"),
        tied=(("lm_head.weight", "wte.weight"),),
        adapted=(Adapted("fc1.weight", "enc.0.weight", "transpose"),),
    )


EXPECTED = """\
loaded 2 tensors (1 adapted), skipped 2, 4 destination tensors left untouched, 2 source tensors unused
  adapted fc1.weight <- enc.0.weight: transpose
  skipped fc2.weight <- enc.2.weight: confidence 0.30 < min_confidence 0.50
  skipped fc3.weight <- enc.4.weight: shape mismatch: (8, 10) vs (5, 10)
  untouched (no counterpart in the source): head.weight, head.bias
  unused source tensors: enc.2.weight, enc.9.bias
  tied: lm_head.weight = wte.weight"""


def test_str_lists_adapted_skipped_untouched_unused_and_tied():
    assert str(full_report()) == EXPECTED


def test_str_of_a_complete_load_is_one_line():
    report = LoadReport(loaded=("a", "b"), skipped=(), missing=(), unexpected=())
    assert str(report) == ("loaded 2 tensors (0 adapted), skipped 0, 0 destination tensors left "
                           "untouched, 0 source tensors unused")


def test_skipped_keys_are_not_listed_again_as_untouched():
    report = LoadReport(loaded=(), skipped=(Skipped("x", "y", "why"),), missing=("x",),
                        unexpected=())
    assert str(report).splitlines() == [
        "loaded 0 tensors (0 adapted), skipped 1, 1 destination tensors left untouched, "
        "0 source tensors unused",
        "  skipped x <- y: why",
    ]


@pytest.mark.parametrize(
    ("field", "value", "line"),
    [
        ("missing", ("a", "b"), "  untouched (no counterpart in the source): a, b"),
        ("unexpected", ("s.w",), "  unused source tensors: s.w"),
        ("tied", (("a", "b"), ("c", "d")), "  tied: a = b, c = d"),
        ("skipped", (Skipped("d", "s1, s2", "r"),), "  skipped d <- s1, s2: r"),
        ("adapted", (Adapted("d", "q, k", "concat[2, 2]"),), "  adapted d <- q, k: concat[2, 2]"),
    ],
)
def test_each_section_appears_only_when_it_has_entries(field, value, line):
    empty = LoadReport(loaded=(), skipped=(), missing=(), unexpected=())
    assert line not in str(empty)
    report = dataclasses.replace(empty, **{field: value})
    assert line in str(report).splitlines()


@pytest.mark.parametrize(
    ("missing", "complete"),
    [((), True), (("a",), False)],
)
def test_complete(missing, complete):
    report = LoadReport(loaded=("b",), skipped=(), missing=missing, unexpected=("x",))
    assert report.complete is complete


def test_report_is_frozen_value():
    report = full_report()
    assert report == full_report()
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.loaded = ()  # type: ignore[misc]
    assert report.tied == (("lm_head.weight", "wte.weight"),)


def test_adapted_fields():
    a = Adapted("dst.key", "src.key", "transpose")
    assert (a.dst, a.src, a.how) == ("dst.key", "src.key", "transpose")


def test_skipped_fields():
    s = Skipped("dst.key", "src.key", "reason")
    assert (s.dst, s.src, s.reason) == ("dst.key", "src.key", "reason")
    assert s == ("dst.key", "src.key", "reason")


def test_long_lists_are_cut_to_a_few_names_and_a_count():
    missing = tuple(f"layer3.{i}.weight" for i in range(300))
    skipped = tuple(Skipped(k, k, "confidence 0.10 < min_confidence 0.50") for k in missing[:20])
    text = str(LoadReport(loaded=(), skipped=skipped, missing=missing,
                          unexpected=tuple(f"u{i}" for i in range(13))))
    lines = text.splitlines()
    assert lines[LISTED + 1] == "  ... and 8 more skipped"
    assert lines[LISTED + 2] == ("  untouched (no counterpart in the source): " +
                                 ", ".join(missing[20:20 + LISTED]) + " and 268 more")
    assert lines[-1] == "  unused source tensors: " + ", ".join(f"u{i}" for i in range(12)) + \
        " and 1 more"
    assert len(text) < 2500
