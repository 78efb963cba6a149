"""Ctrl-C (SIGINT) while reading and writing tensors: never lost, never half a write.

Two guards, both only on the main thread (where Python delivers signals) and only when the
handler in place was set from Python:

- `sigint_deferred` holds a Ctrl-C back until a block of writes ends, then delivers it.
- `sigint_watched` lets a Ctrl-C interrupt at once, and remembers that it did: code called from
  native readers can swallow the `KeyboardInterrupt` and raise something else instead (torch
  turns one raised while it builds a tensor from a safetensors buffer into a ``ValueError``), so
  that the caller can tell an interrupted read from a failed one (`Watch.interrupted`) and raise
  `KeyboardInterrupt` rather than report the read as failed. `interrupts_kept` does that for a
  whole block.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

__all__ = ["Watch", "interrupts_kept", "sigint_deferred", "sigint_watched"]


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block ends, so that it never stops a write halfway;
    then deliver it to the handler that was there (usually: KeyboardInterrupt). A second Ctrl-C
    within the block interrupts at once. Only on the main thread (Python delivers signals
    there); elsewhere, or when the handler was not set from Python, nothing changes."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    pending: list[int] = []  # a SIGINT held back, to deliver at the end

    def hold(signum: int, _frame: Any) -> None:
        if pending:  # the second one: the user insists
            pending.clear()
            raise KeyboardInterrupt
        pending.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:  # delivered even if the block failed: a Ctrl-C is never lost
            signal.raise_signal(signal.SIGINT)


@dataclass
class Watch:
    """What `sigint_watched` saw."""

    interrupted: bool = False  # a SIGINT handler raised within the block (a KeyboardInterrupt)


@contextlib.contextmanager
def sigint_watched() -> Iterator[Watch]:
    """Within the block, a Ctrl-C goes to the handler in place as usual, and `Watch.interrupted`
    becomes True when that handler raised. Use it where native code may swallow the interrupt::

        with sigint_watched() as watch:
            try:
                read()
            except Exception as exc:
                if watch.interrupted:
                    raise KeyboardInterrupt from exc
                raise

    Only on the main thread, and when the handler in place was set from Python (otherwise
    ``interrupted`` stays False and nothing changes).
    """
    watch = Watch()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield watch
        return

    def relay(signum: int, frame: FrameType | None) -> Any:
        try:
            return previous(signum, frame)
        except BaseException:
            watch.interrupted = True
            raise

    signal.signal(signal.SIGINT, relay)
    try:
        yield watch
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Within the block, a Ctrl-C always comes out as `KeyboardInterrupt`: an exception raised
    after one interrupted the block (native code swallowed the interrupt and failed otherwise)
    is re-raised as `KeyboardInterrupt` chained to it, and a block that swallowed an interrupt
    and ended normally raises `KeyboardInterrupt` at its end."""
    with sigint_watched() as watch:
        try:
            yield
        except Exception as exc:
            if watch.interrupted:
                raise KeyboardInterrupt(f"interrupted ({type(exc).__name__}: {exc})") from exc
            raise
        if watch.interrupted:
            raise KeyboardInterrupt("interrupted (the interrupt was swallowed inside a read)")
