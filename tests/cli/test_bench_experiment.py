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


def _side(tmp_path, name: str, side: dict, **settings) -> str:
    report = {"environment": {"device": "card", "torch": "t", "date": name}, "command": f"experiment.py {name}"}
    report |= {"settings": {"model": "5b", "steps": 34} | settings, "cogvx": None, "seed": None, **side}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    return str(path)


def test_two_sides_run_apart_merge_and_project_at_each_sides_own_step_rate(tmp_path):
    """``--merge`` joins a seed-only and a cogvx-only result; ``--project-steps`` adds the steps not run at each
    side's own measured rate (the seed's: its steps before its first validation over their time)."""
    seed = {"wall_s": 420.0, "phases": {"training_started_s": 70.0}, "validated_at": [{"step": 32, "began_s": 198.0}]}
    cogvx = {"wall_s": 340.0, "step_s_median": 2.0}
    out = tmp_path / "merged.json"
    command = [sys.executable, str(BENCH / "experiment.py"), "--merge", _side(tmp_path, "a", {"seed": seed})]
    command += [_side(tmp_path, "b", {"cogvx": cogvx}), "--project-steps", "200", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert (report["seed_wall_s"], report["cogvx_wall_s"]) == (420.0, 340.0)
    assert report["ratio_seed_to_cogvx"] == pytest.approx(420 / 340)
    projection = report["projection"]
    assert projection["s_per_step"] == {"cogvx": 2.0, "seed": pytest.approx(4.0)}
    assert projection["seed_wall_s"] == pytest.approx(420 + 166 * 4.0)
    assert projection["cogvx_wall_s"] == pytest.approx(340 + 166 * 2.0)
    assert projection["ratio_seed_to_cogvx"] == pytest.approx(1084 / 672)
    assert [m["command"] for m in report["merged"]] == ["experiment.py a", "experiment.py b"]
    assert "projected to 200 steps" in done.stdout

    # A projection to fewer steps than were run is refused, not subtracted.
    fewer = subprocess.run([*command[:-4], "--project-steps", "20", "--out", str(out)], capture_output=True, text=True)
    assert fewer.returncode != 0 and "fewer than the 34 run" in fewer.stderr

    # Sides of different runs (other settings) are refused, naming both files.
    other = _side(tmp_path, "c", {"cogvx": cogvx}, steps=40)
    command[4] = other
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "differ in settings" in refused.stderr and "c.json" in refused.stderr
