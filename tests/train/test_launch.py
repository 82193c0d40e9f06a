"""A launch's own timeline, and the launch's shortcuts training the same model as before.

The timeline is read from real ``cogvx train`` processes; the shortcuts (the transformer read straight onto its
device, ``--checkpointing auto`` planned on the model's shapes before any weight is read) are checked against
the plain way, bit for bit. That the loader started early resumes the same stream is the resume tests' business.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import torch

from cogvx import runs
from cogvx.pipeline import lora, memory, models
from cogvx.pipeline.speed import float8, swap
from cogvx.shards import Manifest


def _train(*args: str) -> float:
    """``cogvx train ARGS`` in a process of its own; the seconds it lived at most (from before its start to exit)."""
    began = time.time()
    done = subprocess.run([sys.executable, "-m", "cogvx", "train", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return time.time() - began


def test_the_first_step_of_each_launch_records_its_timeline(tiny_cache, tmp_path):
    run = tmp_path / "run"
    common = ["--shards", str(tiny_cache), "--output", str(run), "--mixed-precision", "fp32", "--checkpoint-every", "1"]
    lifetimes = [_train(*common, "--max-steps", "2"), _train(*common, "--max-steps", "3", "--resume", "auto")]
    records = runs.read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [runs.LAUNCH in r for r in records] == [True, False, True]  # each launch's first step, the resumed one too
    for record, lifetime in zip((records[0], records[2]), lifetimes, strict=True):
        launch = record[runs.LAUNCH]
        assert tuple(launch) == runs.LAUNCH_PHASES  # every phase, in the order reached: the loader before the weights
        seconds = list(launch.values())
        assert seconds == sorted(seconds)
        assert seconds[0] > 0 and seconds[-1] < lifetime


def test_setup_reads_the_manifest_alone_so_a_damaged_shard_is_refused_by_the_stream(tiny_cache, tmp_path):
    # Setup's cost must not grow with the cache: shards are hashed by the training stream when first drawn
    # (docs/cache-format.md), so a run whose every shard is damaged gets past setup and the build first.
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    for shard in Manifest.load(cache).shards:
        (cache / shard.name).write_bytes(bytes(shard.bytes))  # the recorded size, none of the recorded bytes
    done = subprocess.run(
        [sys.executable, "-m", "cogvx", "train", "--shards", str(cache), "--output", str(tmp_path / "run")]
        + ["--max-steps", "1", "--checkpointing", "auto", "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "--checkpointing auto:" in done.stdout  # the build's plan, made after setup
    assert "does not match the manifest" in done.stderr


def _with_lora(transformer: torch.nn.Module) -> torch.nn.Module:
    lora.add_lora(transformer, 4, 4.0, ("to_q", "to_k", "to_v", "to_out.0"), 0.0)
    return transformer


def test_the_transformer_loads_as_before_and_auto_plans_on_its_shapes_alike():
    from diffusers import CogVideoXTransformer3DModel

    info = models.ModelInfo.read("tiny")
    for dtype in (torch.float32, torch.bfloat16):
        loaded = info.load_transformer(dtype, "cpu")
        # The plain way: read into CPU memory, then moved to the device.
        plain = CogVideoXTransformer3DModel.from_pretrained(info.source, subfolder="transformer", torch_dtype=dtype)
        plain = plain.to("cpu")
        ours, theirs = loaded.state_dict(), plain.state_dict()
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
        shapes = _with_lora(info.load_transformer(dtype, "meta"))
        assert all(t.is_meta for t in shapes.state_dict().values())  # no weight read
        loaded = _with_lora(loaded)
        read = {key: value for key, value in loaded.config.items() if key != "_name_or_path"}  # where it was read
        assert dict(shapes.config) == read
        # Every number --checkpointing auto plans with.
        assert memory.static_bytes(shapes) == memory.static_bytes(loaded)
        assert float8.fp8_saving(shapes) == float8.fp8_saving(loaded)
        assert swap.swap_saving(shapes, fp8=True) == swap.swap_saving(loaded, fp8=True)
        assert swap.swap_saving(shapes) == swap.swap_saving(loaded)
