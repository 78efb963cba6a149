"""What the command line prints, and how: every text that comes from a plan, a model or an error
is shown as it is, never interpreted.

Keys, reasons and messages can hold anything a checkpoint file or a plan holds: rich markup
(``[/]w``), terminal escape sequences (``\\x1b[2J``), other control characters, Unicode
direction overrides. `printable` writes each of them out as an escape (``\\x1b``), and every
print here passes text as plain `rich.text.Text` (no markup), so that what the terminal shows is
exactly the text, and nothing in it acts on the terminal. Log records get the same treatment
(`PrintableFormatter`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .confidence import DEFAULT_MIN_CONFIDENCE
from .plan import Plan
from .review import COLUMNS, FLAGS_COLUMN, Band, ReviewRow, build_review

__all__ = ["PrintableFormatter", "make_console", "print_plan", "printable", "progress_bar",
           "say"]

# C0 and C1 controls, DEL, and the Unicode characters that reorder or break lines on display
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                          "\u2066-\u2069]")


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\u202e``);
    with ``newlines``, line breaks are kept."""
    def escape(found: re.Match[str]) -> str:
        char = found.group(0)
        if newlines and char == "\n":
            return char
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNPRINTABLE.sub(escape, text)


def make_console(*, stderr: bool = False) -> Console:
    """A console that highlights nothing by itself; 160 columns when not writing to a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False,
                   width=None if stream.isatty() else 160)


def say(console: Console, text: str, style: str = "") -> None:
    """Print ``text`` (lines kept, everything else shown as it is) in ``style``."""
    console.print(Text(printable(text, newlines=True), style=style), soft_wrap=True)


class PrintableFormatter(logging.Formatter):
    """A log formatter whose lines show control characters as escapes (see `printable`)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), newlines=True)


@contextlib.contextmanager
def progress_bar(console: Console, label: str) -> Iterator[Callable[[int, int], None]]:
    """A bar on the terminal (nothing otherwise) for the block; yields ``update(done, total)``."""
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


_BAND_STYLES = {Band.LOW: "red", Band.MID: "yellow", Band.HIGH: ""}  # rich styles of the bands


def print_plan(plan: Plan, console: Console, *, limit: int = 0) -> None:
    """The review table (`archalign.review.build_review`), at most ``limit`` rows (0: all): each
    row in its band's colour, bold when it stands out, with a flags column when some row is
    flagged; then what the flags mean, what is not loaded, and a summary."""
    review = build_review(plan)
    for line in review.header:
        say(console, line)
    table = Table()
    for column in (*COLUMNS, FLAGS_COLUMN) if review.flagged else COLUMNS:
        table.add_column(column, overflow="fold")
    for row in review.rows[:limit or None]:
        cells = (*row.cells, row.flag_text) if review.flagged else row.cells
        table.add_row(*(Text(printable(c)) for c in cells), style=_row_style(row))
    console.print(table)
    if limit and len(review.rows) > limit:
        say(console, f"... {len(review.rows) - limit} more rows (--limit 0 shows all)")
    for line in review.flag_notes:
        say(console, line, "yellow")
    for line in review.not_loaded:
        say(console, line, "red")
    for line in review.unmatched:
        say(console, line)
    below = sum(row.below_default for row in review.rows)
    adapted = sum(row.adapted for row in review.rows)
    say(console, f"{len(review.rows) - below} to load ({adapted} adapted), {below} below "
                 f"confidence {DEFAULT_MIN_CONFIDENCE}, {len(plan.unmatched_dst)} destination "
                 "tensors left untouched", "bold")


def _row_style(row: ReviewRow) -> str:
    """A review row's rich style: its band's colour, bold when it stands out."""
    return " ".join(s for s in (_BAND_STYLES[row.band], "bold" if row.stands_out else "") if s)
