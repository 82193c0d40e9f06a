"""Preprocessing killed with SIGKILL and run again, and preprocessing split over ranks with torchrun.

Both run real subprocesses: the guarantees under test (atomic shards, a manifest replaced atomically,
per-rank parts merged once) are about what survives a process, not about functions.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cogvx.preprocess.run import run
from cogvx.shards import Manifest, read_shard, verify
from tests.conftest import run_launcher
from tests.helpers.preprocessing import captioned_clip, tiny_config
from tests.helpers.processes import ENV, interrupt_when, interrupted_rows, listed_shards, start, wait_for

CLIP_COUNT = 12


@pytest.fixture
def twelve(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for i in range(CLIP_COUNT):
        captioned_clip(data, f"clip {i:02d}.mp4", frames=15, seed=i)
    return data


def _sources_once(out: Path) -> list[str]:
    manifest = Manifest.load(out)
    sources = [s.meta["source"] for record in manifest.shards for s in read_shard(out, record)]
    assert len(sources) == len(set(sources)), "a clip is served twice"
    assert verify(out, manifest.shards) == []
    assert not list(out.glob("*.tmp")) and not (out / ".parts").exists()
    listed = {r.name for r in manifest.shards}
    assert {p.name for p in out.glob("*.tar")} == listed, "only listed shards remain"
    return sorted(sources)


def _spawn(data: Path, out: Path) -> subprocess.Popen:
    code = (
        "from cogvx.preprocess.run import PreprocessConfig, run\n"
        f"run(PreprocessConfig(data={str(data)!r}, output={str(out)!r}, model='tiny', dtype='fp32', workers=0,"
        " frame_buckets=(9,), shard_max_samples=2))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# Injected into both ranks (as sitecustomize): rank 1 pauses right after it first finds no manifest.json,
# until rank 0 has created it; rank 0 creates it only once rank 1 has looked. Without the pause the
# window is microseconds wide; with it, a check that looks twice sees "none" and then "there" every time.
RACE_HOOK = """
import os, time
from pathlib import Path

MARK = os.environ["COGVX_TEST_RACE_MARK"]


def _wait(condition):
    deadline = time.time() + 10
    while not condition() and time.time() < deadline:
        time.sleep(0.01)


if os.environ.get("RANK") == "1":
    def _slowed(method):
        def probe(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except FileNotFoundError:
                if self.name == "manifest.json" and not os.path.exists(MARK):
                    open(MARK, "w").close()
                    _wait(lambda: os.path.exists(self))
                    time.sleep(0.5)
                raise
        return probe

    Path.stat = _slowed(Path.stat)  # is_file() and exists() look through stat()
    Path.open = _slowed(Path.open)  # read_text() and read_bytes() open through this
elif os.environ.get("RANK") == "0":
    _replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == "manifest.json":
            _wait(lambda: os.path.exists(MARK))
        return _replace(src, dst, *args, **kwargs)

    os.replace = replace
"""


@pytest.mark.parametrize("moment", ["first shard half written", "after the second shard was listed"])
def test_kill_9_then_rerun_gives_every_clip_exactly_once(twelve: Path, tmp_path: Path, moment: str):
    out = tmp_path / "out"
    proc = _spawn(twelve, out)
    if moment == "first shard half written":
        wait_for(lambda: any(out.glob("*.tar.tmp")), proc)
    else:
        wait_for(lambda: listed_shards(out) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    before = Manifest.load(out).sample_count if (out / "manifest.json").exists() else 0
    assert before < CLIP_COUNT, "the killed run finished: nothing was tested"
    if before:
        assert verify(out, Manifest.load(out).shards) == [], "what a killed run left listed must be whole"

    result = run(tiny_config(twelve, out, shard_max_samples=2))
    assert result.encoded == CLIP_COUNT - before and result.already_cached == before
    assert _sources_once(out) == sorted(f"clip {i:02d}.mp4" for i in range(CLIP_COUNT))


def test_torchrun_two_ranks_write_their_own_shards_and_one_manifest(twelve: Path, tmp_path: Path):
    """Also the race of two ranks starting on a fresh folder: rank 1 looks for the manifest while rank 0
    creates it (paused there by RACE_HOOK), and must not fail with "No manifest.json". Launched the way
    docs/preprocess.md advises for compiled encoders, ``--virtual-local-rank``: every rank's LOCAL_RANK is 0, so
    nothing may tell ranks apart by it."""
    (twelve / "broken.mp4").write_bytes(b"not a video")
    (twelve / "broken.txt").write_text("a ball")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--virtual-local-rank",
        "-m", "cogvx", "preprocess", "--data", str(twelve), "--output", str(out), "--model", "tiny",
        "--dtype", "fp32", "--workers", "0", "--frame-bucket", "9",
    ]  # fmt: skip
    hook, mark = tmp_path / "hook", tmp_path / "rank1-looked"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RACE_HOOK)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "COGVX_TEST_RACE_MARK": str(mark)}
    done = run_launcher(command, env=env)
    assert mark.exists(), "rank 1 never looked for the manifest before rank 0 created it: the race was not run"
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = Manifest.load(out)
    assert {r.name.split("-")[1] for r in manifest.shards} == {"r00", "r01"}, "each rank writes its own shards"
    assert _sources_once(out) == sorted(f"clip {i:02d}.mp4" for i in range(CLIP_COUNT))
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [row["source"] for row in skipped] == ["broken.mp4"]
    assert "encoded now" in done.stderr and "12 clips" in done.stderr, "rank 0 prints the totals of all ranks"
    assert "on 2 ranks" in done.stderr and "loading the encoders" in done.stderr

    again = run(tiny_config(twelve, out))
    assert (again.encoded, again.already_cached) == (0, CLIP_COUNT)


def test_shards_a_killed_rank_finished_are_adopted_not_encoded_again(twelve: Path, tmp_path: Path):
    """A distributed run killed before its final merge leaves finished shards in part files only."""
    from dataclasses import asdict

    from cogvx.shards import write_json_atomic

    out = tmp_path / "out"
    run(tiny_config(twelve, out, shard_max_samples=5))
    manifest = Manifest.load(out)
    records, manifest.shards = manifest.shards, []
    manifest.save(out)
    write_json_atomic(out / ".parts" / "shards.r01.json", [asdict(r) for r in records])
    (out / "shard-r01-000099.tar").write_bytes(b"renamed into place, never listed")  # unreadable: set aside
    (out / "shard-r01-000100.tar.tmp").write_bytes(b"half written")  # never complete: deleted
    result = run(tiny_config(twelve, out, shard_max_samples=5))
    assert (result.encoded, result.already_cached) == (0, CLIP_COUNT)
    assert _sources_once(out) == sorted(f"clip {i:02d}.mp4" for i in range(CLIP_COUNT))
    assert (out / "shard-r01-000099.tar.damaged").read_bytes() == b"renamed into place, never listed"


def test_ctrl_c_keeps_the_samples_of_the_open_shard_and_the_printed_command_encodes_only_the_rest(
    twelve: Path, tmp_path: Path
):
    """Ctrl-C of the CLI while the first shard is being written (one shard holds all twelve clips): it is
    finished early and listed, the block says so, and the command it prints encodes each other clip once."""
    out = tmp_path / "out"
    args = ["preprocess", "--data", str(twelve), "--output", str(out), "--model", "tiny", "--dtype", "fp32"]
    args += ["--workers", "0", "--frame-bucket", "9"]
    proc = start([sys.executable, "-m", "cogvx", *args], tmp_path)
    code, stderr = interrupt_when(proc, lambda: any(out.glob("*.tar.tmp")))  # a clip is in the open shard
    assert code == 130, stderr[-3000:]
    manifest = Manifest.load(out)
    kept = manifest.sample_count
    assert len(manifest.shards) == 1 and 0 < kept < CLIP_COUNT, "the interrupt did not land mid-shard"
    assert verify(out, manifest.shards) == [] and not list(out.glob("*.tmp"))
    rows = interrupted_rows(stderr)
    assert rows["kept"] == f"{kept} sample{'s' * (kept > 1)} in 1 shard in {out}"
    assert shlex.split(rows["continue"])[-len(args) :] == args  # the same command

    done = subprocess.run(shlex.split(rows["continue"]), cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(rf"encoded now\s*│\s*{CLIP_COUNT - kept} clips", done.stderr), done.stderr[-3000:]
    assert re.search(rf"already in cache\s*│\s*{kept}\s", done.stderr), done.stderr[-3000:]
    assert _sources_once(out) == sorted(f"clip {i:02d}.mp4" for i in range(CLIP_COUNT))
