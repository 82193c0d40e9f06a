"""Exact resume: a run stopped after step k and resumed gives the uninterrupted run's losses for k+1...

Also: a process killed (SIGKILL) in the middle of a checkpoint write resumes the same way,
metrics.jsonl holds every step once, a resume with other data settings warns, and a non-finite loss
stops the run without writing non-finite weights. tests/train/test_resume_property.py searches the space.
"""

from __future__ import annotations

import io
import json
import signal
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from cogvx.errors import RunError
from cogvx.runs import read_metrics
from cogvx.shards import Manifest
from cogvx.train.loop import run as train
from cogvx.train.step import TrainingDiverged
from tests.helpers.training import Stop, resume_config, stop_after, train_until_killed


def _metric_steps(output: Path) -> list[int]:
    return [r["step"] for r in read_metrics(output)]


@pytest.fixture(scope="module")
def reference(tiny_cache: Path, tmp_path_factory):
    """The uninterrupted run, one per data setting."""
    runs = {}

    def get(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in runs:
            output = tmp_path_factory.mktemp("reference")
            runs[key] = (train(resume_config(tiny_cache, output, **overrides)), output)
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
        train(resume_config(tiny_cache, tmp_path, **data), on_step=stop_after(3))
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-000002"]
    assert _metric_steps(tmp_path) == [1, 2, 3]
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()

    resumed = train(resume_config(tiny_cache, tmp_path, resume="auto", **data))
    assert resumed.resumed_from == 2
    assert resumed.losses == full.losses[2:]  # exactly: same data, noise, dropout, optimizer and LR state
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == full.losses
    assert [r["samples"] for r in records] == [r["samples"] for r in read_metrics(full_dir)]
    ours = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    theirs = load_file(full_dir / "pytorch_lora_weights.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # --keep-checkpoints 2, and a final checkpoint: resuming a finished run trains nothing more.
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-000004", "checkpoint-000006"]
    again = train(resume_config(tiny_cache, tmp_path, resume="auto", **data))
    assert again.resumed_from == 6 and again.losses == []
    assert _metric_steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_resume_after_sigkill_in_the_middle_of_a_checkpoint_write(reference, tiny_cache: Path, tmp_path: Path):
    # The default 2 data workers, and a checkpoint after an odd number of batches (issue 9.2).
    data = {"workers": 2, "checkpoint_every": 3}
    full, _ = reference(**data)
    output = tmp_path / "run"
    # checkpoint-000003 takes durable writes 1-7 (4 files, the staging folder, the rename, the run
    # folder); write 13 is checkpoint-000006's rename: its staging folder is complete, not yet in place.
    assert train_until_killed(resume_config(tiny_cache, output, **data), "write", 13, tmp_path) == -signal.SIGKILL
    assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-000003"]
    (staging,) = output.glob(".checkpoint-000006.*.partial")
    assert sorted(p.name for p in staging.iterdir()) == ["lora.safetensors", "lr_schedule.pt", "optimizer.pt",
                                                         "state.json"]  # fmt: skip
    assert not (output / "pytorch_lora_weights.safetensors").exists()
    assert _metric_steps(output) == [1, 2, 3, 4, 5, 6]
    # A line cut short by a kill must not break the resume either.
    with open(output / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.')

    resumed = train(resume_config(tiny_cache, output, resume="auto", **data))
    assert resumed.resumed_from == 3
    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-6, abs=0)
    records = read_metrics(output)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == pytest.approx(full.losses, rel=1e-6, abs=0)
    assert not list(output.glob(".checkpoint-*"))  # the killed run's staging folder is gone


def test_resume_with_other_data_settings_warns_that_the_order_changes(tiny_cache: Path, tmp_path: Path, capsys):
    train(resume_config(tiny_cache, tmp_path, max_steps=2))
    capsys.readouterr()
    train(resume_config(tiny_cache, tmp_path, max_steps=3, resume="auto"))
    assert "[warning]" not in capsys.readouterr().out  # same settings: no warning

    train(resume_config(tiny_cache, tmp_path, max_steps=4, resume="auto", seed=1, workers=2))
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "[warning]" in line]
    assert str(tmp_path / "checkpoint-000003") in line
    assert "seed" in line and "processes x data workers 1x0 -> 1x2" in line and "data order differs" in line
    assert "batch_size" not in line and "gradient_accumulation" not in line


def _poison(cache: Path, key: str) -> None:
    """Make one sample's moments overflow the loss, rewriting its shard and the manifest's size and sha256.

    The value is finite (the reader refuses NaN and Inf in a cache), but its square is not in float32.
    """
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
                    tensors["moments"][:, :, 0, 0] = 1e30
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


def test_a_non_finite_loss_stops_the_run_and_writes_no_non_finite_weights(reference, tiny_cache: Path, tmp_path: Path):
    import shutil

    _, full_dir = reference()
    records = read_metrics(full_dir)
    key = records[2]["samples"][0][0]  # first trained at step 3 (or earlier)
    first = next(r["step"] for r in records if key in r["samples"][0])
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    _poison(cache, key)

    output = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=rf"step {first}\b.*loss (nan|inf).*{key}.*learning-rate"):
        train(resume_config(cache, output, checkpoint_every=1, keep_checkpoints=10))
    assert _metric_steps(output) == list(range(1, first))
    assert not (output / "pytorch_lora_weights.safetensors").exists()
    saved = sorted(output.glob("checkpoint-*"))
    assert [p.name for p in saved] == [f"checkpoint-{s:06d}" for s in range(1, first)]
    for folder in saved:
        assert all(torch.isfinite(t).all() for t in load_file(folder / "lora.safetensors").values())
    if saved:
        assert json.loads((saved[-1] / "state.json").read_text())["step"] == first - 1


def test_a_new_run_refuses_a_folder_with_checkpoints(tiny_cache: Path, tmp_path: Path):
    train(resume_config(tiny_cache, tmp_path, max_steps=2))
    with pytest.raises(RunError, match=r"already holds a run \(.*checkpoint-000002\).*--resume auto"):
        train(resume_config(tiny_cache, tmp_path, max_steps=2))
    with pytest.raises(RunError, match="not a complete cogvx checkpoint"):
        train(resume_config(tiny_cache, tmp_path, resume=str(tmp_path / "nowhere")))
