"""Exact resume: a run stopped after step k and resumed gives the uninterrupted run's losses for k+1...

Also: a killed process (SIGKILL) resumes the same way, metrics.jsonl holds every step once, and a
non-finite loss stops the run without writing non-finite weights.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from cogvx import config as configfile
from cogvx.shards import Manifest
from cogvx.train.config import TrainConfig
from cogvx.train.loop import TrainingDiverged
from cogvx.train.loop import run as train
from cogvx.train.report import read_metrics


class Stop(Exception):
    pass


def _config(shards: Path, output: Path, **overrides) -> TrainConfig:
    # Dropout, warm-up and a cosine schedule make every piece of state matter for the next step's loss.
    settings = dict(
        shards=shards, output=output, max_steps=6, rank=4, alpha=8, lora_dropout=0.1, learning_rate=5e-3,
        lr_scheduler="cosine", lr_warmup_steps=2, mixed_precision="no", workers=0, checkpoint_every=2,
        keep_checkpoints=2, shuffle_buffer=4,
    )  # fmt: skip
    return TrainConfig(**(settings | overrides))


def _stop_after(step: int):
    def hook(record):
        if record["step"] == step:
            raise Stop

    return hook


def _metric_steps(output: Path) -> list[int]:
    return [r["step"] for r in read_metrics(output / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tiny_cache: Path, tmp_path_factory):
    """The uninterrupted run, one per data setting."""
    runs = {}

    def get(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in runs:
            output = tmp_path_factory.mktemp("reference")
            runs[key] = (train(_config(tiny_cache, output, **overrides)), output)
        return runs[key]

    return get


@pytest.mark.parametrize(
    "data",
    [{}, {"workers": 2, "gradient_accumulation": 2, "batch_size": 2}],
    ids=["in-process-data", "2-workers-accumulation-batch2"],
)
def test_resume_after_an_exception_repeats_the_uninterrupted_run(data, reference, tiny_cache: Path, tmp_path: Path):
    full, full_dir = reference(**data)
    assert len(set(full.losses)) == len(full.losses) == 6

    with pytest.raises(Stop):
        train(_config(tiny_cache, tmp_path, **data), on_step=_stop_after(3))
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-000002"]
    assert _metric_steps(tmp_path) == [1, 2, 3]
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()

    resumed = train(_config(tiny_cache, tmp_path, resume="auto", **data))
    assert resumed.resumed_from == 2
    assert resumed.losses == full.losses[2:]  # exactly: same data, noise, dropout, optimizer and LR state
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == full.losses
    assert [r["samples"] for r in records] == [r["samples"] for r in read_metrics(full_dir / "metrics.jsonl")]
    ours = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    theirs = load_file(full_dir / "pytorch_lora_weights.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # --keep-checkpoints 2, and a final checkpoint: resuming a finished run trains nothing more.
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-000004", "checkpoint-000006"]
    again = train(_config(tiny_cache, tmp_path, resume="auto", **data))
    assert again.resumed_from == 6 and again.losses == []
    assert _metric_steps(tmp_path) == [1, 2, 3, 4, 5, 6]


_KILLABLE = """
import sys, time
from cogvx import config as configfile
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run

def hold(record):
    if record["step"] == 5:
        print("at step 5", flush=True)
        time.sleep(600)

run(configfile.build(TrainConfig, sys.argv[1]), on_step=hold)
"""


def test_resume_after_sigkill(reference, tiny_cache: Path, tmp_path: Path):
    full, _ = reference()
    output = tmp_path / "run"
    (tmp_path / "run.toml").write_text(configfile.to_toml(_config(tiny_cache, output)))
    (tmp_path / "killable.py").write_text(_KILLABLE)
    child = subprocess.Popen(
        [sys.executable, str(tmp_path / "killable.py"), str(tmp_path / "run.toml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "at step 5", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert (output / "checkpoint-000004").is_dir() and not (output / "pytorch_lora_weights.safetensors").exists()
    # A line cut short by the kill must not break the resume either.
    with open(output / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.')

    resumed = train(_config(tiny_cache, output, resume="auto"))
    assert resumed.resumed_from == 4
    assert resumed.losses == pytest.approx(full.losses[4:], rel=1e-6, abs=0)
    records = read_metrics(output / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == pytest.approx(full.losses, rel=1e-6, abs=0)


def _poison(cache: Path, key: str) -> None:
    """Put a NaN into one sample's moments, rewriting its shard and the manifest's size and sha256."""
    import hashlib

    manifest = Manifest.load(cache)
    for record in manifest.shards:
        path = cache / record.name
        members = []
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name == f"{key}.safetensors":
                    tensors = load_tensors(data)
                    tensors["moments"][0, 0, 0, 0] = float("nan")
                    data = save_tensors(tensors)
                members.append((member.name, data))
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        record.bytes = path.stat().st_size
        record.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest.save(cache)


def test_a_nan_loss_stops_the_run_and_writes_no_nan_weights(reference, tiny_cache: Path, tmp_path: Path):
    import shutil

    _, full_dir = reference()
    records = read_metrics(full_dir / "metrics.jsonl")
    key = records[2]["samples"][0][0]  # first trained at step 3 (or earlier)
    first = next(r["step"] for r in records if key in r["samples"][0])
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    _poison(cache, key)

    output = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=rf"step {first}\b.*loss nan.*{key}.*learning-rate"):
        train(_config(cache, output, checkpoint_every=1, keep_checkpoints=10))
    assert _metric_steps(output) == list(range(1, first))
    assert not (output / "pytorch_lora_weights.safetensors").exists()
    saved = sorted(output.glob("checkpoint-*"))
    assert [p.name for p in saved] == [f"checkpoint-{s:06d}" for s in range(1, first)]
    for folder in saved:
        assert all(torch.isfinite(t).all() for t in load_file(folder / "lora.safetensors").values())
    if saved:
        assert json.loads((saved[-1] / "state.json").read_text())["step"] == first - 1


def test_a_new_run_refuses_a_folder_with_checkpoints(tiny_cache: Path, tmp_path: Path):
    train(_config(tiny_cache, tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume auto"):
        train(_config(tiny_cache, tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="not a complete cogvx checkpoint"):
        train(_config(tiny_cache, tmp_path, resume=str(tmp_path / "nowhere")))
