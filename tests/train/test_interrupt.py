"""Ctrl-C (SIGINT) of ``cogvx train``: one block says what the run folder keeps and the command that goes
on, and the exit code is 130.

Real processes get a real SIGINT while they work; the command they print is then run exactly as printed.
(``cogvx preprocess`` interrupted and continued: tests/preprocess/test_resume.py.)
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from cogvx import runs
from tests.helpers.processes import ENV, interrupt_when, interrupted_rows, start

TRAIN = ["--workers", "0", "--mixed-precision", "no", "--validation-every", "0", "--rank", "4"]


def test_ctrl_c_of_train_says_what_the_run_folder_keeps_and_the_command_that_goes_on(tiny_cache: Path, tmp_path: Path):
    """First before any checkpoint (nothing to resume: the same command), then after one (--resume auto)."""
    args = ["train", "--shards", str(tiny_cache), "--output", "run", "--max-steps", "40", "--checkpoint-every", "15"]
    args += [*TRAIN, "--resume", "auto"]  # given already: the command printed must not repeat it
    run = tmp_path / "run"

    code, stderr = interrupt_when(start([sys.executable, "-m", "cogvx", *args], tmp_path), runs.metrics(run).is_file)
    assert code == 130, stderr[-3000:]
    assert not runs.checkpoints(run), "a checkpoint was written before the interrupt: the case was not tested"
    rows = interrupted_rows(stderr)
    held = ", ".join(sorted(p.name for p in run.iterdir() if not p.name.startswith(".")))
    assert runs.METRICS in held and runs.CONFIG_JSON in held
    assert rows["kept"] == f"no checkpoint yet: nothing to resume, the run folder run holds {held}"
    assert shlex.split(rows["again"])[-len(args) :] == args and "step 0" in rows["note"]

    code, stderr = interrupt_when(start(shlex.split(rows["again"]), tmp_path), lambda: bool(runs.checkpoints(run)))
    assert code == 130, stderr[-3000:]
    newest = runs.checkpoints(run)[-1]
    step = runs.checkpoint_step(newest)
    assert step < 40, "the run had finished: nothing was interrupted"
    rows = interrupted_rows(stderr)
    assert rows["kept"] == f"run/{newest.name} (step {step}), the newest checkpoint"
    words = shlex.split(rows["continue"])
    assert words.count("--resume") == 1 and words[-2:] == ["--resume", "auto"]
    assert words[words.index("train") :][:-2] == args[:-2]  # the rest as it was given

    continued = subprocess.run(
        shlex.split(rows["continue"]), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert f"Resuming from run/{newest.name} (step {step})." in continued.stdout
    assert "trained 40 steps" in continued.stderr
