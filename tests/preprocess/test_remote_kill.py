"""``cogvx preprocess --output s3://...`` killed with SIGKILL at each point of its publish sequence.

docs/preprocess.md ("Writing the cache to object storage") promises that a run killed anywhere leaves a
bucket the next run completes with every clip exactly once, and that nothing published is encoded again.
Each run here is a real process against moto's S3 server on localhost, which kills itself with SIGKILL
(from inside, so the moment is exact) just before its k-th write to the bucket: every PUT and DELETE of
the lock, the manifest, a part record, a shard or a side file is a point. Runs are chained (killed, killed
again while recovering, ...) before one that finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cogvx.shards import Manifest
from tests.conftest import property_examples
from tests.helpers.preprocessing import captioned_clip

CLIPS = 2  # one clip a shard. Writes: the lock, the start's manifest, a record and a shard per clip,
WRITES = 2 + 2 * CLIPS + 4  # skipped.jsonl, the manifest, the part record's deletion, the lock's deletion

# A process that runs one preprocess itself (into a local folder: the imports and first-use work), then
# forks one child per run asked for on its stdin (a JSON line: the config, the write to die before, 0 for
# none, and where to log and record the counts), and answers each with the child's exit status. The child
# counts its writes to any remote store and SIGKILLs itself just before the asked one. Forking saves every
# run the seconds of starting; torch computes on one thread here, so no thread pool is forked half-held.
LAUNCHER = """
import contextlib, json, os, signal, sys, traceback

import torch

from cogvx.preprocess.run import PreprocessConfig, run
from cogvx.shards import store

torch.set_num_threads(1)


def counted(method, kill_before, writes):
    def write(self, *args, **kwargs):
        writes.append(method.__name__)
        if len(writes) == kill_before:
            os.kill(os.getpid(), signal.SIGKILL)
        return method(self, *args, **kwargs)

    return write


def child(asked):
    with open(asked["log"], "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    writes = []
    for name in ("put_file", "put_bytes", "delete"):
        method = getattr(store.FsspecStore, name)
        setattr(store.FsspecStore, name, counted(method, asked["kill_before"], writes))
    try:
        result = run(PreprocessConfig(**asked["config"]))
        with open(asked["result"], "w") as out:
            json.dump({"encoded": result.encoded, "already_cached": result.already_cached}, out)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


with contextlib.redirect_stdout(sys.stderr):
    run(PreprocessConfig(**json.loads(sys.argv[1])))
for line in sys.stdin:
    asked = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(asked)
    status = os.waitpid(pid, 0)[1]
    print(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
"""


def _config(data: Path, output: Path | str, **more) -> dict:
    return dict(data=str(data), output=str(output), model="tiny", dtype="fp32", workers=0, frame_buckets=[9],
                shard_max_samples=1, **more)  # fmt: skip


@pytest.fixture
def launcher(s3, tmp_path: Path):
    """``launch(data, url, kill_before)``: a real preprocess process, killed just before its ``kill_before``-th
    write to the bucket (never for 0, or when it makes fewer); its exit status (-9 when killed) and counts."""
    warm = tmp_path / "warm"
    captioned_clip(warm / "data", "clip.mp4", frames=15)
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-u", str(script), json.dumps(_config(warm / "data", warm / "cache"))]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    log, counts = tmp_path / "runs.log", tmp_path / "counts.json"

    def launch(data: Path, url: str, kill_before: int, **more) -> tuple[int, dict | None]:
        counts.unlink(missing_ok=True)
        asked = {
            "config": _config(data, url, **more),
            "kill_before": kill_before,
            "log": str(log),
            "result": str(counts),
        }
        process.stdin.write(json.dumps(asked) + "\n")
        process.stdin.flush()
        answer = process.stdout.readline()
        assert answer, "the launcher died"
        returncode = int(answer)
        assert returncode in (0, -signal.SIGKILL), log.read_text()[-3000:]
        return returncode, json.loads(counts.read_text()) if returncode == 0 else None

    try:
        yield launch
    finally:
        process.stdin.close()
        process.wait(timeout=60)


class Bucket:
    """One cache in the test's bucket, as a reader sees it."""

    def __init__(self, s3, prefix: str):
        self.client, self.bucket, self.prefix = s3.client, s3.bucket, prefix
        self.url = f"s3://{s3.bucket}/{prefix}"

    def names(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/").get("Contents", [])
        return sorted(item["Key"].removeprefix(f"{self.prefix}/") for item in listed)

    def get(self, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")["Body"].read()

    def shards(self) -> dict[str, str]:
        """Every shard object, by name: its sha256."""
        return {n: hashlib.sha256(self.get(n)).hexdigest() for n in self.names() if n.endswith(".tar")}

    def manifest(self, into: Path) -> Manifest | None:
        """The manifest, checked as a reader checks it, and every shard it lists there with its size and sha256."""
        if "manifest.json" not in self.names():
            return None
        into.mkdir(parents=True, exist_ok=True)
        (into / "manifest.json").write_bytes(self.get("manifest.json"))
        manifest = Manifest.load(into)
        shards = self.shards()
        for record in manifest.shards:
            assert shards.get(record.name) == record.sha256, f"the manifest lists {record.name}: missing or changed"
        for label, extra in manifest.extras.items():
            if isinstance(extra, dict) and "sha256" in extra:
                found = hashlib.sha256(self.get(extra["file"])).hexdigest()
                assert found == extra["sha256"], f"the manifest's {label} names {extra['file']}, which was changed"
        return manifest


# The writes of one clean run: 1 the lock, 2 the manifest (start), 3 shard 0's part record, 4 shard 0, 5 and
# 6 shard 1's, 7 skipped.jsonl, 8 the manifest, 9 the part record's deletion, 10 the lock's deletion.
@settings(max_examples=property_examples(1))
@example(kills=[4, 3])  # after a part record, before its shard; then after recovery's manifest, before its cleanup
@example(kills=[9])  # after the final manifest, before the part records are deleted
@given(kills=st.lists(st.integers(1, WRITES), min_size=1, max_size=2))
def test_killed_at_any_write_then_run_again_every_clip_once_and_nothing_published_encoded_again(
    s3, launcher, tmp_path: Path, kills: list[int]
):
    data = tmp_path / "data"
    if not data.exists():
        for i in range(CLIPS):
            captioned_clip(data, f"clip {i}.mp4", frames=15, seed=i)
    case = tmp_path / uuid.uuid4().hex[:8]
    bucket = Bucket(s3, case.name)
    published: dict[str, str] = {}  # every shard a killed run left in the bucket: its sha256
    for n, k in enumerate(kills):
        returncode, _ = launcher(data, bucket.url, k)  # a run after a kill may make fewer writes: it finishes
        if n == 0:
            assert returncode == -signal.SIGKILL, f"the run made fewer than {k} writes: WRITES is out of date"
        bucket.manifest(case / f"after-kill-{k}")  # whole, and what it lists is there
        published |= bucket.shards()

    _, counts = launcher(data, bucket.url, 0)
    final = bucket.manifest(case / "final")
    listed = {record.name: record.sha256 for record in final.shards}
    assert published.items() <= listed.items(), "a shard in the bucket before the kill was encoded again or lost"
    assert counts == {"encoded": CLIPS - len(published), "already_cached": len(published)}
    sources = [entry.source for record in final.shards for entry in record.samples]
    assert sorted(sources) == [f"clip {i}.mp4" for i in range(CLIPS)], "every clip exactly once"
    names = bucket.names()
    assert {n for n in names if n.endswith(".tar")} == set(listed), "every shard in the bucket is listed"
    assert not [n for n in names if n.startswith((".parts/", ".lock"))], names


def test_new_validation_prompts_killed_while_published_never_leave_a_manifest_naming_other_bytes(
    s3, launcher, tmp_path: Path
):
    """The manifest names the validation prompts file with its sha256, and one PUT replaces one object: a run
    with new prompts publishes the manifest without them, then the file, then the manifest with them."""
    data = tmp_path / "data"
    captioned_clip(data, "clip 0.mp4", frames=15)
    bucket = Bucket(s3, "prompts")
    assert launcher(data, bucket.url, 0, validation_prompts=["a red disc"])[0] == 0
    # Writes of a run with new prompts and no new clip: 1 the lock, 2 the manifest (start), 3 skipped.jsonl,
    # 4 the manifest without the prompts, 5 the prompts, 6 the manifest.
    for k in (5, 6):
        assert launcher(data, bucket.url, k, validation_prompts=["a blue square"])[0] == -signal.SIGKILL
        bucket.manifest(tmp_path / f"after-kill-{k}")  # every file it names holds what it says
    assert launcher(data, bucket.url, 0, validation_prompts=["a blue square"])[0] == 0
    assert launcher(data, bucket.url, 0)[0] == 0  # a run without the flag keeps them
    final = bucket.manifest(tmp_path / "final")
    assert final.extras["validation"]["prompts"] == ["a blue square"]
