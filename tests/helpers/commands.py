"""The real ``cogvx`` command run in a fresh process (its peak memory measured) or in this one, and what it did."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from cogvx.cli import app
from tests.conftest import run_launcher

# Runs a command as its child and writes the child's peak RSS (KiB, Linux) to a file: RUSAGE_CHILDREN of
# a fresh process covers exactly that command and its own children (DataLoader workers included).
MEASURE = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
)


@dataclass
class Run:
    """What one ``cogvx`` command did: its exit code, its output and its peak memory (0 in-process)."""

    code: int
    stdout: str
    stderr: str
    peak_mb: float

    def error_line(self) -> str:
        """The one user-facing error line; fails unless there is exactly one and no traceback."""
        assert self.code == 1, f"exit code {self.code}\n{self.stdout[-2000:]}\n{self.stderr[-4000:]}"
        assert "Traceback" not in self.stderr, self.stderr[-4000:]
        errors = [line for line in self.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, self.stderr[-4000:]
        return errors[0]


def cogvx(*args: str, cwd: Path, timeout: float = 120) -> Run:
    """``cogvx *args`` in a fresh process under ``cwd``, its peak RSS measured; killed whole on a timeout."""
    rss = cwd / ".peak-rss"
    env = {**os.environ, "COLUMNS": "2000", "OMP_NUM_THREADS": "1"}  # no wrapping: one message, one line
    command = [sys.executable, "-c", MEASURE, str(rss), sys.executable, "-m", "cogvx", *args]
    result = run_launcher(command, timeout=timeout, cwd=cwd, env=env)
    peak = int(rss.read_text()) / 1024
    rss.unlink()
    return Run(result.returncode, result.stdout, result.stderr, peak)


RUNNER = CliRunner(env={"COLUMNS": "2000"})


def cli(*args: str) -> Run:
    """The same command in this process (typer's runner): for cases that can neither block nor bloat."""
    out = RUNNER.invoke(app, list(args))
    assert out.exception is None or isinstance(out.exception, SystemExit), out.output
    return Run(out.exit_code, out.output, out.output, 0.0)


def error_of(result) -> str:
    """A typer runner result's one user-facing error, without its ``error:`` mark; fails on a traceback."""
    assert result.exit_code == 1, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output, result.output
    return line.removeprefix("error:").strip()
