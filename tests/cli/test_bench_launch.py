"""bench/launch.py runs end to end on the CPU with the tiny model, so GPU time is never spent on a crash."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cogvx import runs
from tests.conftest import ROOT


@pytest.mark.slow
def test_launch_bench_runs_on_the_cpu_and_writes_every_row(tmp_path):
    out = tmp_path / "launch.json"
    command = [sys.executable, str(ROOT / "bench" / "launch.py"), "--models", "tiny", "--device", "cpu"]
    command += ["--clips", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"torch", "diffusers", "device", "date"} <= set(report["environment"])
    assert "launch.py --models tiny" in report["command"]
    rows = report["rows"]
    assert [(r["model"], r["command"], r["compile_cache"]) for r in rows] == [
        ("tiny", "preprocess", "cold"),
        ("tiny", "preprocess", "warm"),
        ("tiny", "train", "cold"),
        ("tiny", "train", "warm"),
        ("tiny", "train", "warm"),  # the plain one
    ]
    assert [r["compile"] for r in rows] == [False] * 5  # cogvx's default on a CPU
    for row in rows:
        first = row["first_sample_s"] if row["command"] == "preprocess" else row["first_step_s"]
        assert 0 < first < row["end_s"]
        if row["command"] == "train":
            assert tuple(row["timeline"]) == runs.LAUNCH_PHASES
            assert first >= row["timeline"][runs.LAUNCH_FIRST_STEP]
        else:
            assert row["timeline"]["first_written"] == first
    assert done.stdout.strip().splitlines()[-1].startswith("tiny   train")  # the table comes last
