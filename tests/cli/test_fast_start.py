"""``cogvx --help``, ``--version`` and a subcommand's help start at once: nothing loads torch until a command runs.

Checked on real processes through ``python -X importtime`` (every module imported, nothing assumed); how long
they take is in BENCHMARKS.md ("CLI start-up"), never asserted here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

HEAVY = {"torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "PIL", "safetensors"}
SRC = str(ROOT / "src")


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def _imported(importtime: str) -> set[str]:
    """The top-level packages of every module that ``-X importtime`` says was imported."""
    rows = [line.split("|")[-1].strip() for line in importtime.splitlines() if line.startswith("import time:")]
    return {row.split(".")[0] for row in rows[1:]}  # the first row is the header


def test_importing_the_cli_loads_no_tensor_library():
    names = ",".join(repr(n) for n in sorted(HEAVY))
    code = f"import cogvx.cli, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {{{names}}}))"
    result = _python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "args, says",
    [
        (["--help"], "preprocess"),
        (["--version"], "cogvx "),
        (["shards", "verify", "--help"], "--deep"),
        (["train", "--help"], "--checkpointing"),
    ],
    ids=" ".join,
)
def test_help_and_version_run_without_loading_a_tensor_library(args: list[str], says: str):
    result = _python("-X", "importtime", "-m", "cogvx", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert says in result.stdout
    imported = _imported(result.stderr)
    assert "cogvx" in imported and "typer" in imported  # the scan sees what was loaded
    assert imported & HEAVY == set()


def test_a_command_that_runs_still_loads_its_stage(tmp_path: Path):
    """The other side of lazy: running ``shards verify`` imports the cache package (and its libraries)."""
    result = _python("-X", "importtime", "-m", "cogvx", "shards", "verify", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert "numpy" in _imported(result.stderr)
