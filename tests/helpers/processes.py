"""Real subprocesses driven from a test: started with SIGINT live, interrupted or killed at a chosen moment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ENV = {**os.environ, "COLUMNS": "2000", "OMP_NUM_THREADS": "1"}  # no wrapping: one row, one line


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    """Start ``command`` with SIGINT at its default (a shell without job control leaves it ignored)."""
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def interrupt_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> tuple[int, str]:
    """Send SIGINT once ``ready()`` holds; the exit code and everything the process wrote to stderr."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run ended (or hung) before the moment this test interrupts it at:\n{proc.stderr.read()}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def interrupted_rows(stderr: str) -> dict[str, str]:
    """The rows of the block printed after a Ctrl-C, by label."""
    lines = stderr.splitlines()
    assert "interrupted (Ctrl-C)" in lines, stderr[-3000:]
    block = lines[lines.index("interrupted (Ctrl-C)") + 1 :]
    assert block and all(line.startswith("  ") for line in block), "the block is the last thing printed"
    return {label: text for label, text in (line.strip().split(maxsplit=1) for line in block)}


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Return once ``condition()`` holds; fail (killing ``proc``) if the process ends or time runs out first."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the run ended (or hung) before the moment this test kills it at")
        time.sleep(0.005)


def listed_shards(out: Path) -> int:
    """How many shards the manifest in ``out`` lists now (0 while there is none, or it is being replaced)."""
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0
