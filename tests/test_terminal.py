"""Tests for archalign.terminal: text from plans, models and errors is printed as it is."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from archalign.plan import Match, Plan
from archalign.terminal import PrintableFormatter, print_plan, printable, progress_bar, say

HOSTILE = ["[/]w", "[bold red]x[/]", "\x1b[2J\x1b[31mred", "a\rb", "bell\x07", "\u202eevil",
           "nul\x00", "c1\x9b31m", "line\u2028break"]


def console(*, terminal: bool = True) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=300, force_terminal=terminal, color_system="standard",
                   highlight=False), out


@pytest.mark.parametrize("text", HOSTILE)
def test_printable_leaves_no_control_character(text: str) -> None:
    shown = printable(text)
    assert all(c.isprintable() or c == " " for c in shown), repr(shown)
    assert printable(shown) == shown  # nothing left to escape
    assert "[" not in text or "[" in shown  # markup is not a control: shown as it is


def test_printable_keeps_newlines_only_when_asked() -> None:
    assert printable("a\nb") == "a\\x0ab"
    assert printable("a\nb\x1b", newlines=True) == "a\nb\\x1b"


def test_a_plan_with_hostile_keys_prints_them_verbatim() -> None:
    matches = tuple(Match(src=(k,), dst=(k + ".d",), src_shapes=((1,),), dst_shapes=((1,),),
                          confidence=0.7, costs=(), src_unit=k, dst_unit=k + ".d")
                    for k in HOSTILE)
    con, out = console()
    print_plan(Plan(matches=matches, verification="[/]oops \x1b[2J"), con)
    text = out.getvalue()
    for key in HOSTILE:
        assert printable(key) in text
    assert "\x1b[2J" not in text and "\x07" not in text and "\u202e" not in text
    assert "verification: [/]oops \\x1b[2J" in text


def test_say_shows_markup_as_text_and_keeps_lines() -> None:
    con, out = console(terminal=False)
    say(con, "[red]not red[/]\nsecond \x1b[1m")
    assert out.getvalue() == "[red]not red[/]\nsecond \\x1b[1m\n"


def test_log_records_are_escaped_too() -> None:
    record = logging.LogRecord("archalign", logging.WARNING, __file__, 1, "key %s", ("\x1b[2Jx",),
                               None)
    assert PrintableFormatter("%(message)s").format(record) == "key \\x1b[2Jx"


@pytest.mark.parametrize("terminal", [True, False])
def test_the_progress_bar_draws_on_a_terminal_only(terminal: bool) -> None:
    con, out = console(terminal=terminal)
    with progress_bar(con, "loading") as update:
        for done in range(1, 4):
            update(done, 3)
    assert ("loading" in out.getvalue()) == terminal  # nothing goes to a file or a pipe
