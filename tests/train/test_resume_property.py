"""Exact resume searched over the settings users pick (hypothesis; COGVX_PROPERTY_EXAMPLES=200 goes further).

Two properties, cheap first:
- the stream: a loader resumed after ``n`` consumed batches serves exactly the batches an uninterrupted
  loader serves from batch ``n`` on, for 0-3 DataLoader workers, batch sizes 1-3 and 1-2 processes;
- the loop: a run interrupted anywhere (an exception after a step, SIGKILL after a step, SIGKILL in the
  middle of a checkpoint write) and resumed with ``--resume auto`` trains the uninterrupted run's
  samples with its losses (to 1e-6), for workers 0-3, batch size 1-3, accumulation 1-3 and checkpoint
  intervals 1-5.
"""

from __future__ import annotations

import math
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

from cogvx.runs import read_metrics
from cogvx.shards import Manifest
from cogvx.train.data import ShardStream, make_loader
from cogvx.train.loop import run as train
from tests.conftest import property_examples
from tests.helpers.training import Stop, resume_config, stop_after, train_until_killed

# 3 workers on a 2-core machine are a tested setting here, not a mistake torch needs to warn about.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _keys(cache: Path, workers: int, batch_size: int, rank: int, world: int, skip: int, count: int) -> list:
    stream = ShardStream(
        cache, Manifest.load(cache).shards, batch_size, seed=7, rank=rank, world_size=world, random_flip=0.0,
        shuffle_buffer=4, skip_batches=skip,
    )  # fmt: skip
    batches = iter(make_loader(stream, workers, pin_memory=False))
    return [next(batches)["keys"] for _ in range(count)]


@settings(max_examples=property_examples(12))
@given(
    workers=st.integers(0, 3),
    batch_size=st.integers(1, 3),
    world_rank=st.sampled_from([(1, 0), (2, 0), (2, 1)]),
    consumed=st.integers(0, 9),
    more=st.integers(1, 5),
)
@example(workers=2, batch_size=1, world_rank=(1, 0), consumed=3, more=4)  # issue 9.2: odd count, 2 workers
def test_a_resumed_stream_serves_the_uninterrupted_batches(tiny_cache: Path, workers, batch_size, world_rank,
                                                          consumed, more):  # fmt: skip
    world, rank = world_rank
    uninterrupted = _keys(tiny_cache, workers, batch_size, rank, world, 0, consumed + more)
    assert _keys(tiny_cache, workers, batch_size, rank, world, consumed, more) == uninterrupted[consumed:]


_references: dict[tuple, list[dict]] = {}


def _reference(cache: Path, data: dict, folders) -> list[dict]:
    """metrics.jsonl of the uninterrupted run with these settings (one run per setting)."""
    key = tuple(sorted(data.items()))
    if key not in _references:
        output = folders.mktemp("reference")
        train(resume_config(cache, output, **data))
        _references[key] = read_metrics(output)
    return _references[key]


@st.composite
def _runs(draw):
    data = {
        "workers": draw(st.integers(0, 3)),
        "batch_size": draw(st.integers(1, 3)),
        "gradient_accumulation": draw(st.integers(1, 3)),
        "checkpoint_every": draw(st.integers(1, 5)),
        "max_steps": 5,
    }
    checkpoints = math.ceil(data["max_steps"] / data["checkpoint_every"])
    how = draw(st.sampled_from(["exception", "sigkill", "sigkill-in-write"]))
    # A checkpoint write is at least 7 durable writes (4 files, the staging folder, the rename, the folder).
    last = 7 * checkpoints if how == "sigkill-in-write" else data["max_steps"] - 1
    return data, how, draw(st.integers(1, last))


# Few cases in CI (each is two or three runs, a SIGKILL case a process of its own); the SIGKILL inside a
# checkpoint write with the default workers is also tests/train/test_resume.py's own test.
@settings(max_examples=property_examples(2))
@given(case=_runs())
# 3 workers, accumulation 2, stopped after step 3: the checkpoint at step 2 holds 4 batches, 4 % 3 = 1.
@example(case=({"workers": 3, "batch_size": 2, "gradient_accumulation": 2, "checkpoint_every": 2, "max_steps": 5},
               "exception", 3))  # fmt: skip
def test_a_run_interrupted_anywhere_resumes_to_the_uninterrupted_losses(tiny_cache: Path, tmp_path_factory, case):
    data, how, at = case
    note(f"{data}, {how} at {at}")
    full = _reference(tiny_cache, data, tmp_path_factory)
    with tempfile.TemporaryDirectory(prefix="interrupted-") as folder:
        output = Path(folder) / "run"
        cfg = resume_config(tiny_cache, output, **data)
        if how == "exception":
            with pytest.raises(Stop):
                train(cfg, on_step=stop_after(at))
        else:
            code = train_until_killed(cfg, "step" if how == "sigkill" else "write", at, Path(folder))
            assert code == -signal.SIGKILL
        train(resume_config(tiny_cache, output, resume="auto", **data))

        records = read_metrics(output)
        assert [r["step"] for r in records] == [r["step"] for r in full]
        assert [r["samples"] for r in records] == [r["samples"] for r in full]
        assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in full], rel=1e-6, abs=0)
        assert not list(output.glob(".checkpoint-*"))
