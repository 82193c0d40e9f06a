"""Checkpoint folders and the training stream, unit by unit, with no model: fast enough for mutation testing.

checkpoint.py: save/load/find/keep-last/clean_stale/lock (docs/training.md, "Checkpoints and exact resume"
and "One run per run folder"). data.py: the stream's batches, seeding, resume position and worker errors.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvx.errors import CogvxError, RunError
from cogvx.shards import CacheError, Manifest, Sample, SampleEntry, ShardRecord, ShardWriter
from cogvx.train import checkpoint
from cogvx.train.config import TrainConfig
from cogvx.train.data import ShardStream, _ReportingErrors, _WorkerError, collate, make_loader

# ---------------------------------------------------------------- checkpoint.py


def _lora(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"a.lora_A.weight": torch.full((2, 3), value), "a.lora_B.weight": torch.arange(6.0).reshape(3, 2) * value}


def _optimizer_state() -> dict:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.5)
    param.grad = torch.full((3,), 0.25)
    optimizer.step()
    return optimizer.state_dict()


class _Box:
    """A checkpoint component that holds any state: what it saves, or what load gave it."""

    def __init__(self, state=None):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state) -> None:
        self.state = state


def _state(step: int, lora: dict, info: dict | None = None, **components) -> dict[str, _Box]:
    """One checkpoint state: the LoRA, the progress (state.json) with ``step`` and ``info``, other components."""
    return {
        checkpoint.LORA: _Box(lora),
        **{name: _Box(state) for name, state in components.items()},
        checkpoint.PROGRESS: _Box(_progress(step) | (info or {})),
    }


def _progress(step: int) -> dict:
    """A state.json a run could have written at ``step``."""
    return {"step": step, "batches_consumed": step, "world_size": 1, "workers": 0, "config": {}}


def _load(folder: Path, names: tuple[str, ...] = ("optimizer",)) -> tuple[dict, dict, dict]:
    """(state.json, LoRA weights, named component states) read back through ``checkpoint.load``."""
    boxes = {checkpoint.LORA: _Box(), checkpoint.PROGRESS: _Box(), **{name: _Box() for name in names}}
    checkpoint.load(folder, boxes)
    return boxes[checkpoint.PROGRESS].state, boxes[checkpoint.LORA].state, {n: boxes[n].state for n in names}


def _save(output: Path, step: int, keep: int = 10, value: float = 1.0) -> Path:
    state = _state(step, _lora(value), optimizer=_optimizer_state())
    return checkpoint.save(output, state, keep)


def _names(output: Path) -> list[str]:
    return sorted(p.name for p in output.iterdir())


def test_save_writes_one_complete_folder_that_load_reads_back_exactly(tmp_path: Path):
    states = {"optimizer": _optimizer_state(), "scheduler": {"last_epoch": 7, "lr": [0.5]}}
    info = {"batches_consumed": 14, "world_size": 2, "workers": 3, "config": {"gradient_accumulation": 2, "seed": 0}}
    final = checkpoint.save(tmp_path, _state(7, _lora(2.0), info, **states), keep=3)

    assert final == tmp_path / "checkpoint-000007"
    assert _names(tmp_path) == ["checkpoint-000007"], "the staging folder must be renamed away"
    assert sorted(p.name for p in final.iterdir()) == ["lora.safetensors", "optimizer.pt", "scheduler.pt", "state.json"]
    assert json.loads((final / "state.json").read_text()) == _progress(7) | info

    read_info, lora, read_states = _load(final, ("optimizer", "scheduler"))
    assert read_info == _progress(7) | info
    assert lora.keys() == _lora().keys()
    for name, tensor in _lora(2.0).items():
        assert torch.equal(lora[name], tensor)
    assert read_states.keys() == {"optimizer", "scheduler"}
    assert read_states["scheduler"] == states["scheduler"]
    saved = states["optimizer"]["state"][0]
    read = read_states["optimizer"]["state"][0]
    assert read.keys() == saved.keys() and all(torch.equal(read[k], saved[k]) for k in saved)
    assert read_states["optimizer"]["param_groups"] == states["optimizer"]["param_groups"]


def test_save_and_load_are_mirror_images_over_real_components(tmp_path: Path):
    def components(seed: int):
        torch.manual_seed(seed)
        layer = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        progress = checkpoint.Progress(world_size=2, workers=3, config={"seed": seed, "gradient_accumulation": 2})
        return layer, optimizer, schedule, progress

    layer, optimizer, schedule, progress = components(0)
    for step in (1, 2):
        layer(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        schedule.step()
        progress.step, progress.batches_consumed = step, 2 * step
    state = {"lora": layer, "optimizer": optimizer, "lr_schedule": schedule, "progress": progress}
    final = checkpoint.save(tmp_path, state, keep=1)
    assert sorted(p.name for p in final.iterdir()) == ["lora.safetensors", "lr_schedule.pt", "optimizer.pt",
                                                       "state.json"]  # fmt: skip
    written = {"step": 2, "batches_consumed": 4, "most_batches_per_step": 2, "world_size": 2, "workers": 3,
               "config": {"seed": 0, "gradient_accumulation": 2}, "held_out": ""}  # fmt: skip
    assert json.loads((final / "state.json").read_text()) == written

    fresh = components(1)
    other = dict(zip(state, fresh, strict=True))
    other["progress"].world_size = 1
    checkpoint.load(final, other)
    restored = fresh[0].state_dict()
    assert all(torch.equal(tensor, restored[name]) for name, tensor in layer.state_dict().items())
    assert fresh[1].state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert fresh[2].state_dict() == schedule.state_dict()
    assert (fresh[3].step, fresh[3].batches_consumed, fresh[3].world_size) == (2, 4, 1)
    assert fresh[3].written_by == written


def test_load_refuses_a_checkpoint_missing_a_component_but_a_scaler_may_be_missing(tmp_path: Path):
    final = _save(tmp_path, 1)
    scaler = _Box("untouched")
    boxes = {checkpoint.LORA: _Box(), checkpoint.PROGRESS: _Box(), "optimizer": _Box(), "scaler": scaler}
    checkpoint.load(final, boxes)  # written without fp16: the scaler starts fresh
    assert scaler.state == "untouched" and boxes["optimizer"].state is not None
    (final / "optimizer.pt").unlink()
    with pytest.raises(RunError) as err:
        _load(final)
    assert str(err.value) == f"The checkpoint {final} has no optimizer.pt: resume from another checkpoint."


def test_load_reads_tensors_onto_the_cpu_and_refuses_pickled_objects(tmp_path: Path, monkeypatch):
    final = _save(tmp_path, 1)
    good = (final / "optimizer.pt").read_bytes()
    torch.save({"hook": print}, final / "optimizer.pt")  # a pickled callable: weights_only must refuse it
    # Even where torch's own default is off (torch < 2.6, or this variable): load asks for weights_only itself.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(RunError, match="[Ww]eights only load failed") as err:
        _load(final)
    assert str(final / "optimizer.pt") in str(err.value) and "\n" not in str(err.value)
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    (final / "optimizer.pt").write_bytes(good)
    assert _load(final)[2]["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"


def test_a_step_number_is_zero_padded_to_six_digits_and_grows_past_them(tmp_path: Path):
    assert _save(tmp_path, 0).name == "checkpoint-000000"
    assert _save(tmp_path, 1234567).name == "checkpoint-1234567"
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["checkpoint-000000", "checkpoint-1234567"]


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_last_leaves_the_newest_checkpoints_and_nothing_else(tmp_path: Path, keep: int):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, keep=keep)
    expected = [f"checkpoint-{s:06d}" for s in (1, 2, 3, 4, 5)][-keep:]
    assert _names(tmp_path) == expected, "no older checkpoint and no .deleting folder may remain"


def test_save_creates_a_missing_run_folder(tmp_path: Path):
    final = _save(tmp_path / "new" / "run", 4)
    assert final == tmp_path / "new" / "run" / "checkpoint-000004" and (final / "state.json").is_file()


def test_keep_last_deletes_through_a_leftover_half_deleted_folder(tmp_path: Path):
    _save(tmp_path, 1)
    leftover = tmp_path / ".checkpoint-000001.deleting"  # a run killed while deleting an older checkpoint-000001
    leftover.mkdir()
    (leftover / "lora.safetensors").write_text("half deleted")
    _save(tmp_path, 2, keep=1)
    assert _names(tmp_path) == ["checkpoint-000002"]


def test_an_old_checkpoint_that_cannot_be_deleted_does_not_stop_the_run(tmp_path: Path):
    old = _save(tmp_path, 1)
    stuck = old / "lora.safetensors"
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("needs chattr +i (root on a filesystem with immutable files)")
    doomed = tmp_path / ".checkpoint-000001.deleting"
    try:
        _save(tmp_path, 2, keep=1)  # rmtree fails on the immutable file: the new checkpoint still stands
        assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["checkpoint-000002"]
        assert (doomed / "lora.safetensors").exists(), "the undeletable folder is renamed away, never listed"
    finally:
        subprocess.run(["chattr", "-i", str(doomed / "lora.safetensors")], capture_output=True)
        subprocess.run(["chattr", "-i", str(stuck)], capture_output=True)
    checkpoint.clean_stale(tmp_path)  # the next run removes it
    assert _names(tmp_path) == ["checkpoint-000002"]


def test_saving_a_step_again_replaces_its_checkpoint(tmp_path: Path):
    _save(tmp_path, 3, value=1.0)
    final = _save(tmp_path, 3, value=5.0)
    assert _names(tmp_path) == ["checkpoint-000003"]
    assert torch.equal(_load(final)[1]["a.lora_A.weight"], torch.full((2, 3), 5.0))


def test_checkpoint_dirs_lists_complete_checkpoints_oldest_first_by_number(tmp_path: Path):
    assert checkpoint.checkpoint_dirs(tmp_path / "missing") == []
    (tmp_path / "file").write_text("")
    assert checkpoint.checkpoint_dirs(tmp_path / "file") == []  # not a folder
    for step in (999999, 10, 1000000, 2):
        _save(tmp_path, step)
    (tmp_path / "checkpoint-000050").mkdir()  # unfinished: no state.json
    (tmp_path / "checkpoint-000060").mkdir()
    (tmp_path / "checkpoint-000060" / "state.json").mkdir()  # state.json that is not a file
    (tmp_path / "checkpoint-12345").mkdir()  # five digits: not ours
    (tmp_path / "checkpoint-12345" / "state.json").write_text("{}")
    (tmp_path / "xcheckpoint-000070").mkdir()
    (tmp_path / "xcheckpoint-000070" / "state.json").write_text("{}")
    (tmp_path / "checkpoint-000080x").mkdir()
    (tmp_path / "checkpoint-000080x" / "state.json").write_text("{}")
    names = [p.name for p in checkpoint.checkpoint_dirs(tmp_path)]
    assert names == ["checkpoint-000002", "checkpoint-000010", "checkpoint-999999", "checkpoint-1000000"]
    assert all(p.parent == tmp_path for p in checkpoint.checkpoint_dirs(tmp_path))


def test_find_auto_takes_the_newest_and_a_path_must_be_complete(tmp_path: Path):
    assert checkpoint.find(tmp_path, "auto") is None
    assert checkpoint.find(tmp_path / "missing", "auto") is None
    _save(tmp_path, 8)
    _save(tmp_path, 9)
    _save(tmp_path, 10)
    assert checkpoint.find(tmp_path, "auto") == tmp_path / "checkpoint-000010"
    explicit = tmp_path / "checkpoint-000009"
    assert checkpoint.find(tmp_path / "elsewhere", str(explicit)) == explicit
    (explicit / "state.json").unlink()
    message = f"--resume {explicit} is not a complete cogvx checkpoint (no state.json)."
    with pytest.raises(RunError) as err:
        checkpoint.find(tmp_path, str(explicit))
    assert str(err.value) == message


def test_clean_stale_removes_staging_and_half_deleted_folders_only(tmp_path: Path):
    checkpoint.clean_stale(tmp_path / "missing")  # nothing to do, no error
    _save(tmp_path, 1)
    staging = tmp_path / ".checkpoint-000002.host-1.partial"
    (staging / "inner").mkdir(parents=True)
    (staging / "inner" / "x").write_text("x")
    (tmp_path / ".checkpoint-000000.deleting").mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / ".lock").write_text("")
    checkpoint.clean_stale(tmp_path)
    assert _names(tmp_path) == [".lock", "checkpoint-000001", "metrics.jsonl"]


def test_clean_stale_never_stops_a_run_on_what_it_cannot_remove(tmp_path: Path):
    _save(tmp_path, 1)
    (tmp_path / ".checkpoint-odd").write_text("a file, not a staging folder: rmtree cannot remove it")
    checkpoint.clean_stale(tmp_path)  # best effort: the run goes on
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["checkpoint-000001"]


def test_a_failed_write_is_one_line_and_leaves_the_earlier_checkpoints(tmp_path: Path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    big = {"w": torch.zeros(2**20)}  # 4 MiB, over the file-size limit below: the write fails with EFBIG
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        with pytest.raises(RunError) as err:
            checkpoint.save(tmp_path, _state(3, big), keep=1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert str(err.value) == (
        f"Could not write the checkpoint {tmp_path / 'checkpoint-000003'}: File too large. Free space there "
        "(or choose a writable --output) and continue with --resume auto: the earlier checkpoints are intact."
    )
    assert isinstance(err.value.__cause__, OSError)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    assert _names(tmp_path) == ["checkpoint-000001", "checkpoint-000002"], "keep=1 must not run after a failure"


def test_an_output_that_cannot_be_a_folder_is_one_line_naming_the_checkpoint(tmp_path: Path):
    (tmp_path / "output").write_text("a file where the run folder should be")
    with pytest.raises(RunError) as err:
        _save(tmp_path / "output" / "sub", 1)
    assert str(err.value).startswith(
        f"Could not write the checkpoint {tmp_path}/output/sub/checkpoint-000001: Not a directory. "
    )
    assert (tmp_path / "output").read_text() == "a file where the run folder should be"


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("a bug, not a disk problem")


def test_a_bug_during_save_keeps_its_traceback_and_removes_the_staging_folder(tmp_path: Path):
    _save(tmp_path, 1)
    with pytest.raises(TypeError, match="a bug, not a disk problem"):
        checkpoint.save(tmp_path, _state(2, _lora(), optimizer={"x": _Unpicklable()}), keep=1)
    assert _names(tmp_path) == ["checkpoint-000001"]


LOCK_PROBE = """
import fcntl, sys, time
handle = open(sys.argv[1], "a")
try:
    fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    print("held", flush=True)
    sys.exit(0)
print("free", flush=True)
if len(sys.argv) > 2:  # hold it until stdin closes
    sys.stdin.read()
"""


def _probe(lock: Path) -> str:
    return subprocess.run([sys.executable, "-c", LOCK_PROBE, str(lock)], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


def test_the_run_folder_lock_is_held_for_the_run_and_released_after(tmp_path: Path):
    output = tmp_path / "new" / "run"
    with checkpoint.lock_run_folder(output):
        # stat only: closing any other handle of .lock in this process would drop a POSIX record lock
        assert (output / ".lock").is_file() and (output / ".lock").stat().st_size == 0
        assert _probe(output / ".lock") == "held"
    assert _probe(output / ".lock") == "free"


def test_a_second_run_in_a_locked_folder_is_refused_in_one_line(tmp_path: Path):
    tmp_path.joinpath(".lock").write_text("")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_PROBE, str(tmp_path / ".lock"), "hold"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "free"
        with pytest.raises(RunError) as err, checkpoint.lock_run_folder(tmp_path):
            pass
        assert str(err.value) == (
            f"Another `cogvx train` is running in {tmp_path}. Wait for it to finish, or use another --output."
        )
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with checkpoint.lock_run_folder(tmp_path):  # the holder is gone: the folder is free again
        pass


def test_an_unwritable_run_folder_is_refused_in_one_line(tmp_path: Path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError) as err, checkpoint.lock_run_folder(tmp_path / "file" / "run"):
        pass
    assert str(err.value).startswith(f"Cannot write to the run folder {tmp_path / 'file' / 'run'}: ")
    assert str(err.value).endswith(". Choose a writable --output.")
    assert "Not a directory" in str(err.value)


# ---------------------------------------------------------------- data.py


def _sample(key: str, bucket: str, value: float, frames: int) -> tuple[Sample, SampleEntry]:
    tensors = {"moments": torch.full((2 * frames, 1, 2, 2), value), "prompt_embeds": torch.full((3, 4), value)}
    meta = {"bucket": bucket, "source": key, "content_hash": key}
    return Sample(key, tensors, meta, {}), SampleEntry(key, key, key, bucket)


def _cache(folder: Path, counts: tuple[int, ...] = (4, 3, 2), buckets: int = 1) -> list[ShardRecord]:
    """Shards of ``counts`` samples: key "s{shard}k{i}", value 10 * shard + i, bucket i % buckets (shapes differ)."""
    records: list[ShardRecord] = []
    for shard, count in enumerate(counts):
        writer = ShardWriter(folder, f"shard-{shard}", records.append, max_samples=count)
        for i in range(count):
            bucket = i % buckets
            writer.write(*_sample(f"s{shard}k{i}", f"b{bucket}", 10.0 * shard + i, frames=bucket + 1))
        writer.flush()
    Manifest(producer={"model": "test"}, params={}, schema={}, shards=records).save(folder)
    return Manifest.load(folder).shards


def _keys(stream, batches: int) -> list[list[str]]:
    it = iter(stream)
    return [next(it)["keys"] for _ in range(batches)]


def test_an_empty_cache_is_refused_in_one_line(tmp_path: Path):
    message = f"The cache in {tmp_path} holds no samples; run `cogvx preprocess` first."
    with pytest.raises(CacheError) as err:
        ShardStream(tmp_path, [], batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=64)
    assert str(err.value) == message
    records = _cache(tmp_path, (2, 1))
    for record in records:
        record.excluded = [s.key for s in record.samples]
    with pytest.raises(CacheError) as err:
        ShardStream(tmp_path, records, batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=64)
    assert str(err.value) == message
    records[1].excluded = records[1].excluded[:-1]  # one live sample is enough
    ShardStream(tmp_path, records, batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=64)


def test_batches_hold_batch_size_samples_of_one_bucket_with_their_tensors(tmp_path: Path):
    records = _cache(tmp_path, (6, 5), buckets=2)
    stream = iter(ShardStream(tmp_path, records, batch_size=3, seed=1, random_flip=0.0, shuffle_buffer=4))
    for _ in range(12):
        batch = next(stream)
        assert set(batch) == {"moments", "prompt_embeds", "keys"}
        assert len(batch["keys"]) == 3
        buckets = {int(key.split("k")[1]) % 2 for key in batch["keys"]}
        assert len(buckets) == 1
        frames = buckets.pop() + 1
        assert batch["moments"].shape == (3, 2 * frames, 1, 2, 2)
        assert batch["prompt_embeds"].shape == (3, 3, 4)
        for row, key in enumerate(batch["keys"]):
            shard, index = (int(part) for part in key[1:].split("k"))
            assert torch.equal(batch["moments"][row], torch.full((2 * frames, 1, 2, 2), 10.0 * shard + index))
            assert torch.equal(batch["prompt_embeds"][row], torch.full((3, 4), 10.0 * shard + index))


def test_collate_of_one_sample_is_a_batch_of_one(tmp_path: Path):
    samples = [_sample("a", "b0", 1.0, 1)[0]]
    batch = collate(samples)
    assert batch["keys"] == ["a"] and batch["moments"].shape == (1, 2, 1, 2, 2)
    assert batch["prompt_embeds"].shape == (1, 3, 4)
    assert batch["moments"].data_ptr() == samples[0].tensors["moments"].data_ptr(), "one sample is not copied"
    two = collate([_sample("a", "b0", 1.0, 1)[0], _sample("b", "b0", 2.0, 1)[0]])
    assert two["keys"] == ["a", "b"] and torch.equal(two["moments"][1], torch.full((2, 1, 2, 2), 2.0))


def test_the_stream_serves_live_samples_only_weighted_by_live_count(tmp_path: Path):
    records = _cache(tmp_path, (4, 3, 2))
    records[0].excluded = ["s0k0", "s0k1", "s0k2", "s0k3"]  # a fully replaced shard is never drawn
    records[1].excluded = ["s1k1"]
    stream = ShardStream(tmp_path, records, batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=1)
    seen = [k for batch in _keys(stream, 60) for k in batch]
    assert set(seen) == {"s1k0", "s1k2", "s2k0", "s2k1"}


# The exact order for fixed settings: a checkpoint written by one version must resume to the same batches
# under the next, so the seeding of each (rank, worker) stream is part of the contract.
GOLDEN = {
    # (seed, rank, world_size, shuffle_buffer): the first 8 single-sample batches; buffer 1 is the draw order
    (0, 0, 1, 1): ["s1k0", "s1k1", "s1k2", "s0k0", "s0k1", "s0k2", "s0k3", "s0k0"],
    (0, 0, 1, 2): ["s1k1", "s1k2", "s0k0", "s1k0", "s0k2", "s0k1", "s0k3", "s0k0"],
    (0, 0, 1, 64): ["s1k2", "s1k2", "s0k3", "s1k0", "s2k0", "s0k3", "s0k2", "s1k0"],
    (3, 0, 1, 64): ["s1k0", "s0k3", "s1k1", "s1k0", "s1k2", "s1k0", "s0k0", "s0k2"],
    # Two processes: rank 0's share is shard 0, rank 1's shards 1 and 2 (issue 12: disjoint shares; the
    # orders of several processes before it were others).
    (0, 1, 2, 64): ["s2k1", "s2k1", "s1k1", "s2k0", "s2k0", "s1k2", "s2k1", "s2k0"],
    (0, 0, 2, 64): ["s0k1", "s0k1", "s0k3", "s0k2", "s0k2", "s0k3", "s0k3", "s0k0"],
    (0, 0, 1, 200): ["s0k2", "s2k1", "s1k2", "s1k2", "s1k1", "s0k0", "s1k0", "s0k0"],  # over webdataset's 100
}


@pytest.mark.parametrize("settings", list(GOLDEN))
def test_the_stream_order_is_fixed_by_seed_rank_and_world_size(tmp_path: Path, settings):
    seed, rank, world_size, buffer = settings
    records = _cache(tmp_path)
    stream = ShardStream(tmp_path, records, batch_size=1, seed=seed, rank=rank, world_size=world_size,
                         random_flip=0.0, shuffle_buffer=buffer)  # fmt: skip
    keys = [k for batch in _keys(stream, 8) for k in batch]
    assert keys == GOLDEN[settings]


def test_the_stream_defaults_are_rank_0_of_1_and_the_shuffle_buffer_is_the_configs(tmp_path: Path):
    records = _cache(tmp_path)
    assert TrainConfig.shuffle_buffer == 64
    stream = ShardStream(
        tmp_path, records, batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=TrainConfig.shuffle_buffer
    )
    keys = [k for batch in _keys(stream, 8) for k in batch]
    assert keys == GOLDEN[(0, 0, 1, 64)]
    with pytest.raises(TypeError, match="shuffle_buffer"):  # no default of its own: TrainConfig's is the one
        ShardStream(tmp_path, records, batch_size=1, seed=0)


# Two workers, seed 2, buffer 4: the first 8 batches of a DataLoader (workers alternate, starting at worker 0),
# each rank within its share (rank 0: shard 0; rank 1: shards 1 and 2).
GOLDEN_WORKERS = {
    0: ["s0k2", "s0k3", "s0k0", "s0k1", "s0k0", "s0k1", "s0k3", "s0k0"],
    1: ["s2k0", "s1k2", "s2k1", "s2k0", "s2k0", "s2k1", "s2k1", "s2k1"],
}


@pytest.mark.parametrize("rank", [0, 1])
def test_the_loader_order_is_fixed_for_each_rank_and_worker(tmp_path: Path, rank: int):
    records = _cache(tmp_path)
    stream = ShardStream(
        tmp_path, records, batch_size=1, seed=2, rank=rank, world_size=2, random_flip=0.0, shuffle_buffer=4
    )
    next(iter(stream))  # in-process as well: mutmut maps the functions a test calls in this process
    keys = [k for batch in _keys(make_loader(stream, workers=2, pin_memory=False), 8) for k in batch]
    assert keys == GOLDEN_WORKERS[rank]


def test_make_loader_settings(tmp_path: Path):
    stream = ShardStream(tmp_path, _cache(tmp_path), batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=64)
    default = make_loader(stream, workers=2, pin_memory=False).loader
    assert (default.num_workers, default.prefetch_factor, default.pin_memory) == (2, 2, False)
    assert default.persistent_workers is False and default.batch_size is None
    assert default.dataset.stream is stream  # workers report user errors as themselves
    tuned = make_loader(stream, workers=3, pin_memory=True, prefetch=5).loader
    assert (tuned.num_workers, tuned.prefetch_factor, tuned.pin_memory) == (3, 5, True)
    assert tuned.persistent_workers is False
    in_process = make_loader(stream, workers=0, pin_memory=False, prefetch=5).loader
    assert in_process.dataset is stream and in_process.prefetch_factor is None and in_process.num_workers == 0


def test_a_sample_that_does_not_fit_its_recorded_layout_is_refused_with_its_shard(tmp_path: Path):
    records = _cache(tmp_path, (3,))
    recorded = records[0].layouts["b0"]
    records[0].layouts = {"b0": {**recorded, "moments": {**recorded["moments"], "shape": [4, 1, 2, 2]}}}
    with pytest.raises(CacheError) as err:
        next(iter(ShardStream(tmp_path, records, batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=1)))
    assert str(err.value).startswith(f"Sample s0k0 in {tmp_path / records[0].name} holds moments float32 [2, 1, 2, 2]")


def test_a_cache_without_layouts_refuses_a_sample_unlike_the_first_of_its_bucket(tmp_path: Path):
    records: list[ShardRecord] = []
    for shard, frames in ((0, 1), (1, 2)):  # same bucket name, other shape (one writer would refuse it)
        writer = ShardWriter(tmp_path, f"shard-{shard}", records.append, max_samples=1)
        writer.write(*_sample(f"k{shard}", "b0", 1.0, frames=frames))
        writer.flush()
    for record in records:
        record.layouts = {}  # an older cache: no recorded layouts
    with pytest.raises(CacheError, match=rf"^Sample k[01] in {tmp_path}/shard-[01]-000000.tar holds moments"):
        _keys(ShardStream(tmp_path, records, batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=1), 30)


@pytest.mark.parametrize("skip", [0, 1, 2, 5])
def test_a_resumed_in_process_stream_continues_after_the_consumed_batches(tmp_path: Path, skip: int):
    records = _cache(tmp_path, buckets=2)
    settings = dict(batch_size=2, seed=4, random_flip=0.0, shuffle_buffer=3)
    whole = _keys(ShardStream(tmp_path, records, **settings), skip + 4)
    resumed = _keys(ShardStream(tmp_path, records, **settings, skip_batches=skip), 4)
    assert resumed == whole[skip:]


@pytest.mark.parametrize("workers", [2, 3])
def test_a_resumed_loader_continues_the_round_robin_of_its_workers(tmp_path: Path, workers: int):
    records = _cache(tmp_path)

    def batches(skip: int, count: int) -> list[list[str]]:
        settings = dict(batch_size=1, seed=2, random_flip=0.0, shuffle_buffer=4)
        stream = ShardStream(tmp_path, records, **settings, skip_batches=skip)
        return _keys(make_loader(stream, workers=workers, pin_memory=False), count)

    # in-process too, for mutmut's test mapping
    next(iter(ShardStream(tmp_path, records, batch_size=1, seed=2, random_flip=0.0, shuffle_buffer=4)))
    whole = batches(0, 10)
    assert whole != batches(0, 1) * 10
    for skip in range(1, workers + 2):
        assert batches(skip, 10 - skip) == whole[skip:], f"resume after {skip} batches with {workers} workers"


def test_a_changed_shard_is_refused_before_any_of_its_samples_is_served(tmp_path: Path):
    records = _cache(tmp_path, (3,))
    path = tmp_path / records[0].name
    data = bytearray(path.read_bytes())
    one = data.index(b"\x00\x00\x80\x3f")  # a float32 1.0 of s0k1 becomes 2.0: same size, still a valid sample
    data[one : one + 4] = b"\x00\x00\x00\x40"
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="does not match the manifest"):
        # buffer 1: the first sample would be served at once, were the shard not hashed on its first draw
        next(iter(ShardStream(tmp_path, records, batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=1)))


def test_a_worker_cache_error_is_raised_as_itself_in_one_line(tmp_path: Path):
    records = _cache(tmp_path, (3,))
    (tmp_path / records[0].name).write_bytes(b"x" * records[0].bytes)
    stream = ShardStream(tmp_path, records, batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=64)
    with pytest.raises(CacheError) as in_process:
        next(iter(stream))
    reported = list(_ReportingErrors(stream))  # what a worker sends: the error's type and message, then no more
    assert len(reported) == 1 and type(reported[0].error()) is CacheError
    assert str(reported[0].error()) == str(in_process.value)
    with pytest.raises(CacheError) as from_worker:
        next(iter(make_loader(stream, workers=2, pin_memory=False)))
    assert type(from_worker.value) is CacheError
    assert str(from_worker.value) == str(in_process.value)
    assert "\n" not in str(from_worker.value) and "DataLoader worker" not in str(from_worker.value)


def test_a_worker_error_whose_type_wants_more_than_a_message_becomes_a_cogvx_error():
    class Picky(CacheError):
        def __init__(self, message: str, shard: str):
            super().__init__(f"{message} ({shard})")

    rebuilt = _WorkerError(Picky("damaged", "shard x")).error()
    assert type(rebuilt) is CogvxError and str(rebuilt) == "damaged (shard x)"
    plain = _WorkerError(CacheError("shard x is damaged")).error()
    assert type(plain) is CacheError and str(plain) == "shard x is damaged"
