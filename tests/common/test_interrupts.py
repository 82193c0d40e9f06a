"""A Ctrl-C is never lost, even when Python swallows its KeyboardInterrupt inside a ``__del__``."""

from __future__ import annotations

import gc
import os
import signal
import sys

import pytest

from cogvx import interrupts


class _FreesSlowly:
    """An object whose ``__del__`` is where the Ctrl-C lands (as in a decoder freeing its handle)."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # delivered while __del__ runs: Python prints it and drops it
        for _ in range(10_000):  # a few bytecodes for the signal to be handled inside __del__
            pass


def test_a_ctrl_c_swallowed_in_a_del_is_raised_at_the_next_check(monkeypatch):
    dropped = []  # what Python reports as "Exception ignored in ..." and goes on
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    with interrupts.catching():
        interrupts.check()  # nothing pressed: nothing raised
        _FreesSlowly()
        gc.collect()
        assert dropped == [KeyboardInterrupt]  # the Ctrl-C landed in __del__ and Python dropped it
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()  # the loop's next clip or step stops the run
    interrupts.check()  # once the command is left, nothing is pending
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_delivered_at_once_is_a_keyboard_interrupt_as_before():
    with pytest.raises(KeyboardInterrupt), interrupts.catching():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000_000):  # the handler runs at the next bytecode boundary
            pass
    interrupts.check()  # delivered: not raised again


def test_cogvx_preprocess_stops_on_a_ctrl_c_that_python_dropped(tmp_path, monkeypatch):
    """Through the real command: a Ctrl-C landing in a ``__del__`` while the first clip is encoded is dropped by
    Python, and the run still stops at the next clip (exit 130, the kept samples said) instead of finishing."""
    from cogvx.preprocess import encoding
    from tests.conftest import CLIPS
    from tests.helpers.commands import cli

    original, calls = encoding.VaeBatcher.add, []

    def add_then_drop_a_ctrl_c(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not calls:
            _FreesSlowly()  # the Ctrl-C lands in its __del__ and Python drops it
            gc.collect()
        calls.append(1)

    monkeypatch.setattr(encoding.VaeBatcher, "add", add_then_drop_a_ctrl_c)
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)  # Python's report of the dropped one
    out = tmp_path / "out"
    result = cli("preprocess", "--data", str(CLIPS), "--output", str(out), "--model", "tiny", "--workers", "0")
    assert result.code == 130, result.stdout[-3000:]
    assert "interrupted" in result.stdout
    assert len(calls) == 1  # stopped at the next clip: the other clips were never encoded
