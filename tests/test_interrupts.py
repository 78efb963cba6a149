"""Tests for archalign.interrupts: a Ctrl-C is never lost, also when a native reader swallows it."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import archalign
from archalign.checkpoint import LazySafetensors
from archalign.interrupts import interrupts_kept, sigint_deferred, sigint_watched


def _swallowing_read() -> None:
    """What torch does when a Ctrl-C lands while it builds a tensor from a safetensors buffer:
    the KeyboardInterrupt is caught inside and another exception comes out, with no trace of it."""
    with contextlib.suppress(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")


def test_a_swallowed_interrupt_comes_back_as_keyboard_interrupt() -> None:
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as info, interrupts_kept():
        _swallowing_read()
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(KeyboardInterrupt), interrupts_kept(), contextlib.suppress(ValueError):
        _swallowing_read()  # swallowed twice: the block ends normally, and raises at its end
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_failure_without_interrupt_stays_what_it_is() -> None:
    with pytest.raises(ValueError, match="plain"), interrupts_kept():
        raise ValueError("plain")
    with sigint_watched() as watch:
        pass
    assert watch.interrupted is False


def test_a_deferred_interrupt_is_delivered_at_the_end_and_seen_by_the_watch() -> None:
    with pytest.raises(KeyboardInterrupt), sigint_watched() as watch:
        with sigint_deferred():
            signal.raise_signal(signal.SIGINT)
            done = True  # not interrupted here
        pytest.fail("the deferred interrupt was not delivered")  # pragma: no cover
    assert done and watch.interrupted


def test_apply_returns_keyboard_interrupt_when_the_reader_swallows_it(tmp_path: Path,
                                                                     monkeypatch) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    src, dst = nn.Linear(3, 4), nn.Linear(3, 4)
    path = tmp_path / "src.safetensors"
    save_file(src.state_dict(), str(path))
    plan = archalign.align(src, dst)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    real, reads = LazySafetensors.__getitem__, []

    def reader(self: LazySafetensors, key: str) -> torch.Tensor:
        reads.append(key)
        if len(reads) == 2:  # in the checking pass
            _swallowing_read()
        return real(self, key)

    monkeypatch.setattr(LazySafetensors, "__getitem__", reader)
    with pytest.raises(KeyboardInterrupt):
        plan.apply(dst, path)
    assert len(reads) == 2
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
