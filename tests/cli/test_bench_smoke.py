"""The GPU benchmark scripts run end to end on the CPU with the tiny model, so GPU time is never spent on a crash."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from cogvx.train import evaluation, heldout
from tests.conftest import ROOT

BENCH = ROOT / "bench"


@pytest.mark.slow
def test_eval_cost_runs_on_the_cpu_and_its_table_renders(tmp_path, monkeypatch):
    out = tmp_path / "eval_cost.json"
    command = [sys.executable, str(BENCH / "eval_cost.py"), "--models", "tiny", "--device", "cpu"]
    command += ["--warmup", "1", "--steps", "1", "--eval-passes", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"torch", "diffusers", "device", "date"} <= set(report["environment"])
    assert "eval_cost.py --models tiny" in report["command"]
    (r,) = report["results"]
    # The default held-out set, scored at the default timesteps, one forward each.
    assert r["forwards_per_pass"] == heldout.DEFAULT_MAX_CLIPS * evaluation.EVAL_TIMESTEPS
    assert r["held_out_samples"] == heldout.DEFAULT_MAX_CLIPS
    # Two passes over one LoRA give one score; two training steps moved it off the base model's.
    first, second = r["eval_losses"]
    assert first == second and math.isfinite(first)
    assert r["base_loss"] != first
    assert r["step_s"] > 0 and r["eval_pass_s"] > 0 and r["base_pass_s"] > 0
    assert "smallest cadence within 5% at 1000 steps" in done.stdout.strip().splitlines()[-1]

    monkeypatch.syspath_prepend(str(BENCH))
    import eval_cost
    import tables

    rows = tables.eval_cost_rows(report).splitlines()
    assert len([row for row in rows if row.startswith("| tiny")]) == len(eval_cost.MAX_STEPS)
    assert f"{eval_cost.cost(r, 100, 1000):.1%}" in rows[2 + eval_cost.MAX_STEPS.index(1000)]


def test_eval_cost_counts_the_last_step_and_the_once_per_run_passes(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import eval_cost

    assert [eval_cost.evals(every, 1000) for every in (250, 300, 1000, 2000)] == [4, 4, 1, 1]
    measured = {"step_s": 1.0, "eval_pass_s": 10.0, "eval_first_pass_s": 12.0, "base_pass_s": 5.0}
    assert eval_cost.cost(measured, 250, 1000) == pytest.approx(47 / 1047)  # 4 passes + base + 2 s of compile
    assert eval_cost.smallest_every(measured, 1000, 0.05) == 250  # 4 passes: 47/1047 < 5%; at 249, 5: 57/1057
