"""What users and machines do to a training run: damaged shards read by workers, two runs into one
folder, a read-only --output, a disk that fills up while checkpointing. Each ends in one line naming
the file and the fix, and nothing already written is lost."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from cogvx import config as configfile
from cogvx.cli import app
from cogvx.errors import CacheError, RunError
from cogvx.runs import read_metrics
from cogvx.shards import Manifest
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train


def _config(shards: Path, output: Path, **overrides) -> TrainConfig:
    settings = dict(
        shards=shards, output=output, max_steps=4, rank=4, alpha=8, learning_rate=1e-3, mixed_precision="no",
        workers=0, checkpoint_every=1,
    )  # fmt: skip
    return TrainConfig(**(settings | overrides))


def _cogvx(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m cogvx ...`` as a user runs it (wide enough that rich never wraps a line)."""
    env = os.environ | {"COLUMNS": "1000", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cogvx", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def _damage(cache: Path) -> Path:
    """Flip one byte in the middle of the first shard: its sha256 no longer matches the manifest."""
    path = cache / Manifest.load(cache).shards[0].name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_shard_read_by_dataloader_workers_is_the_same_one_line_error(tiny_cache: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    shard = _damage(cache)
    with pytest.raises(CacheError) as in_process:
        train(_config(cache, tmp_path / "in-process", workers=0))
    assert shard.name in str(in_process.value) and "\n" not in str(in_process.value)

    # The default --workers 2: the shard is read in DataLoader worker processes.
    done = _cogvx("train", "--shards", str(cache), "--output", str(tmp_path / "run"), "--max-steps", "2",
                  "--rank", "4", "--mixed-precision", "no")  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == f"error: {in_process.value}", done.stderr[-3000:]
    assert not any("Traceback" in line or "DataLoader worker" in line for line in lines)
    assert len(lines) <= 2  # the error, after the progress bar's last state


_HOLDER = """
import sys, time
from pathlib import Path
from cogvx import config as configfile
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run

release = Path(sys.argv[2])

def hold(record):
    if record["step"] == 2:
        print("holding", flush=True)
        while not release.exists():
            time.sleep(0.05)

run(configfile.build(TrainConfig, sys.argv[1]), on_step=hold)
"""


def test_a_second_run_into_a_busy_run_folder_is_refused_and_the_first_loses_nothing(tiny_cache: Path, tmp_path: Path):
    output = tmp_path / "run"
    (tmp_path / "first.toml").write_text(configfile.to_toml(_config(tiny_cache, output)))
    (tmp_path / "holder.py").write_text(_HOLDER)
    release = tmp_path / "release"
    first = subprocess.Popen(
        [sys.executable, str(tmp_path / "holder.py"), str(tmp_path / "first.toml"), str(release)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        said = []  # the run prints other lines first (its checkpointing choice)
        while not said or said[-1] not in ("holding", ""):
            said.append(first.stdout.readline().strip())
        assert said[-1] == "holding", f"the first run ended early: {said}"
        second = _cogvx("train", "--shards", str(tiny_cache), "--output", str(output), "--max-steps", "3",
                        "--rank", "4", "--workers", "0", "--seed", "5", "--mixed-precision", "no")  # fmt: skip
        release.touch()
        first_out, first_err = first.communicate(timeout=300)
    finally:
        first.kill()
        first.wait(timeout=60)
    assert second.returncode == 1
    assert second.stderr.strip() == (
        f"error: Another `cogvx train` is running in {output}. Wait for it to finish, or use another --output."
    )
    assert first.returncode == 0, first_err[-3000:]

    records = read_metrics(output)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert json.loads((output / "config.json").read_text())["seed"] == 0  # the first run's, untouched
    assert sorted(p.name for p in output.glob("checkpoint-*")) == [f"checkpoint-00000{s}" for s in (2, 3, 4)]
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    assert not list(output.glob(".checkpoint-*"))
    # The first run has ended, so the folder is free: a run that continues it starts (and has nothing to do).
    assert train(_config(tiny_cache, output, resume="auto")).resumed_from == 4


@contextlib.contextmanager
def _tmpfs(folder: Path, options: str):
    """A tmpfs mounted at ``folder``; the test is skipped where this machine does not let us mount one."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a read-only or small file system for this test")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_output_is_one_line_naming_the_folder(tiny_cache: Path, tmp_path: Path):
    with _tmpfs(tmp_path / "read-only", "ro,size=1m") as folder:
        out = CliRunner().invoke(app, ["train", "--shards", str(tiny_cache), "--output", str(folder), "--workers", "0"])
        assert out.exit_code == 1
        assert "Traceback" not in out.output
        message = " ".join(out.output.split())
        assert (
            message
            == f"error: Cannot write to the run folder {folder}: Read-only file system. Choose a writable --output."
        )
        assert os.listdir(folder) == []


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until the disk is full (unbuffered: nothing is left to flush at close)."""
    with open(path, "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\0" * 65536)


def test_a_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_earlier_ones(tiny_cache: Path, tmp_path: Path):
    with _tmpfs(tmp_path / "small", "size=2m") as disk:
        output = disk / "run"

        def fill_the_disk_after_step_3(record):
            if record["step"] != 3:
                return
            reserve = disk / "reserve"
            reserve.write_bytes(b"\0" * 8192)  # two pages: room for a metrics line, not for a checkpoint
            _fill(disk / "filler")
            reserve.unlink()

        with pytest.raises(RunError) as failed:
            train(_config(tiny_cache, output, max_steps=6, checkpoint_every=2), on_step=fill_the_disk_after_step_3)
        message = str(failed.value)
        assert message.startswith(
            f"Could not write the checkpoint {output / 'checkpoint-000004'}: No space left on device."
        )
        assert "Free space there" in message and "--resume auto" in message and "\n" not in message
        assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-000002"]
        assert not list(output.glob(".checkpoint-*"))  # the staging folder went with the failure
        earlier = output / "checkpoint-000002"
        assert json.loads((earlier / "state.json").read_text())["step"] == 2
        assert load_file(earlier / "lora.safetensors")

        # With space again, the run continues from the checkpoint that was kept.
        (disk / "filler").unlink()
        resumed = train(_config(tiny_cache, output, max_steps=6, checkpoint_every=2, resume="auto"))
        assert resumed.resumed_from == 2
        assert [r["step"] for r in read_metrics(output)] == [1, 2, 3, 4, 5, 6]


def test_a_disk_that_fills_between_checkpoints_is_one_line_too(tiny_cache: Path, tmp_path: Path):
    with _tmpfs(tmp_path / "small", "size=2m") as disk:
        output = disk / "run"

        def fill_the_disk_after_step_3(record):
            if record["step"] != 3:
                return
            metrics = output / "metrics.jsonl"
            with open(metrics, "a") as f:  # blank lines (readers skip them) up to a page boundary
                f.write("\n" * (-metrics.stat().st_size % 4096))
            _fill(disk / "filler")  # step 4's metrics line finds no room

        with pytest.raises(RunError) as failed:
            train(_config(tiny_cache, output, max_steps=6, checkpoint_every=2), on_step=fill_the_disk_after_step_3)
        message = str(failed.value)
        assert message.startswith(f"Could not write into the run folder {output}: No space left on device.")
        assert "--resume auto" in message and "\n" not in message
        (disk / "filler").unlink()
        resumed = train(_config(tiny_cache, output, max_steps=6, checkpoint_every=2, resume="auto"))
        assert resumed.resumed_from == 2
        assert [r["step"] for r in read_metrics(output)] == [1, 2, 3, 4, 5, 6]
