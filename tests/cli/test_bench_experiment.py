"""bench/experiment.py runs its cogvx side end to end on the CPU with the tiny model: no GPU time spent on a crash."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import CLIPS, ROOT

BENCH = ROOT / "bench"


@pytest.mark.slow
def test_experiment_times_cogvx_from_the_command_to_the_lora(tmp_path):
    out = tmp_path / "experiment.json"
    command = [sys.executable, str(BENCH / "experiment.py"), "--model", "tiny", "--device", "cpu", "--clips", "2"]
    command += ["--steps", "4", "--validate-at", "2", "4", "--sampling-steps", "2", "--skip-seed"]
    command += ["--clips-from", str(CLIPS), "--work", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"torch", "diffusers", "device", "date"} <= set(report["environment"])
    assert "experiment.py --model tiny" in report["command"]
    assert report["settings"] | {"steps": 4, "validate_at": [2, 4], "clips": 2} == report["settings"]

    cogvx = report["cogvx"]
    # Both commands ran through the real CLI, and the whole experiment is their sum.
    assert [c.split()[2:4] for c in cogvx["commands"]] == [["cogvx", "preprocess"], ["cogvx", "train"]]
    phases = cogvx["phases"]
    assert report["cogvx_wall_s"] == cogvx["wall_s"] >= phases["preprocess_wall_s"] + phases["train_wall_s"]
    assert 0 < cogvx["lora_written_s"] <= cogvx["wall_s"] and cogvx["lora_tensors"] > 0
    assert phases["preprocess_loading_encoders_s"] > 0 and phases["train_steps_s"] > 0
    assert 0 < phases["train_first_step_s"] < phases["train_wall_s"]
    assert cogvx["steps_done"] == 4 and cogvx["validated_at"] == [2, 4]
    # The seed was skipped: its fields are there, empty.
    assert report["seed"] is None and report["seed_wall_s"] is None and "ratio_seed_to_cogvx" not in report
    assert done.stdout.strip().splitlines()[-1].startswith("cogvx ")
    # The clips came from --clips-from (the GPU machine has no imageio-ffmpeg to make them), captions with them.
    copied = sorted(p.name for p in (tmp_path / "work" / "clips").iterdir())
    assert copied == sorted(p.name for p in CLIPS.iterdir())[:4]


def test_the_seed_validates_at_the_epochs_closest_to_the_asked_steps(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import experiment

    # 32 clips, batch 1: an epoch is 32 steps; 200 steps end in epoch 7 at step 200.
    assert experiment.seed_validation_epochs([100, 200], 200, 32) == (3, [96, 192])
    assert experiment.seed_validation_epochs([200], 200, 32) == (7, [200])
    assert experiment.seed_validation_epochs([2], 2, 2) == (1, [2])
    assert experiment.cogvx_validation_every([100, 200], 200) == 100
    with pytest.raises(SystemExit, match="every N steps"):
        experiment.cogvx_validation_every([100, 150], 200)
