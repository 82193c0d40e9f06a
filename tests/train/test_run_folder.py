"""The run folder holds one run: a folder holding a finished or partial run is refused unless resumed, a
finished run without checkpoints is never overwritten, and a failed start leaves no folder it created."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cogvx import runs
from cogvx.cli import app
from tests.helpers.commands import error_of


def _train(tiny_cache: Path, run: Path, *flags: str):
    argv = ["train", "--shards", str(tiny_cache), "--output", str(run), "--rank", "4", "--workers", "0",
            "--mixed-precision", "fp32", "--max-steps", "2", *flags]  # fmt: skip
    return CliRunner().invoke(app, argv)


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_cache: Path, tmp_path_factory) -> Path:
    """A run of 2 steps that wrote no checkpoint."""
    run = tmp_path_factory.mktemp("finished") / "run"
    result = _train(tiny_cache, run, "--checkpoint-every", "0")
    assert result.exit_code == 0, result.output
    assert not runs.checkpoints(run) and runs.lora_weights(run).is_file()
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


@pytest.mark.parametrize("checkpoint_every", ["0", "1"])
def test_a_finished_run_is_not_overwritten_by_a_new_one(finished: Path, tiny_cache: Path, tmp_path: Path,
                                                        checkpoint_every: str):  # fmt: skip
    run = _copy(finished, tmp_path)
    before = _files(run)
    message = error_of(_train(tiny_cache, run, "--checkpoint-every", checkpoint_every, "--learning-rate", "1"))
    assert message == (
        f"{run} already holds a run (config.json, config.toml, metrics.jsonl, pytorch_lora_weights.safetensors). "
        "Continue it with --resume auto, or start a new run with another --output."
    )
    assert _files(run) == before


def test_resuming_a_finished_run_without_checkpoints_does_nothing_or_says_how_to_train_further(
    finished: Path, tiny_cache: Path, tmp_path: Path
):
    run = _copy(finished, tmp_path)
    before = _files(run)
    done = _train(tiny_cache, run, "--checkpoint-every", "0", "--resume", "auto")
    assert done.exit_code == 0, done.output
    said = " ".join(done.output.split())
    assert f"{run} holds a run that finished at step 2 (--max-steps 2): nothing more to train." in said
    assert _files(run) == before

    message = error_of(_train(tiny_cache, run, "--resume", "auto", "--max-steps", "4"))
    assert f"{run} holds a run that finished at step 2 without a checkpoint to continue from" in message
    assert "Start a new run with another --output" in message
    assert _files(run) == before


def test_a_run_stopped_before_its_first_checkpoint_is_refused_and_resume_starts_it_again(
    finished: Path, tiny_cache: Path, tmp_path: Path
):
    run = _copy(finished, tmp_path)
    runs.lora_weights(run).unlink()  # stopped at step 2 of 4, before its first checkpoint
    before = _files(run)
    message = error_of(_train(tiny_cache, run, "--max-steps", "4", "--checkpoint-every", "3"))
    assert "already holds a run (config.json, config.toml, metrics.jsonl)" in message
    assert _files(run) == before

    again = _train(tiny_cache, run, "--max-steps", "4", "--checkpoint-every", "3", "--resume", "auto")
    assert again.exit_code == 0, again.output
    said = " ".join(again.output.split())
    assert f"{run} holds a run stopped before its first checkpoint (metrics.jsonl reaches step 2)" in said
    assert "training starts again at step 0" in said
    assert [r["step"] for r in runs.read_metrics(run)] == [1, 2, 3, 4]


def test_an_empty_folder_or_one_holding_only_a_stale_lock_is_trained_into(tiny_cache: Path, tmp_path: Path):
    for name, setup in (("empty", lambda run: None), ("stale-lock", lambda run: runs.lock(run).touch())):
        run = tmp_path / name
        run.mkdir()
        setup(run)
        result = _train(tiny_cache, run, "--checkpoint-every", "0")
        assert result.exit_code == 0, result.output
        assert runs.lora_weights(run).is_file()


def test_a_failed_start_leaves_no_folder_it_created_and_keeps_every_folder_it_did_not(tmp_path: Path):
    missing = tmp_path / "no-cache"
    created = tmp_path / "new" / "run"
    assert "no-cache" in error_of(_train(missing, created))
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    error_of(_train(missing, existing))
    assert existing.is_dir()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    error_of(_train(missing, mine / "run"))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
