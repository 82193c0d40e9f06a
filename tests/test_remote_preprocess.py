"""``cogvx preprocess --output s3://...`` against a real S3-compatible server on localhost (moto).

What is checked is what a reader of the bucket sees: the objects listed, the manifest, and the shards
downloaded and verified against it. Nothing in the clients is patched; the killed runs are real
processes killed with SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cogvx.preprocess import remote
from cogvx.preprocess.run import run
from cogvx.shards import Manifest, read_shard, verify

from . import s3server
from .conftest import run_launcher
from .test_preprocess import make_clip, tiny

s3 = s3server.s3  # the fixture: moto's server on localhost, a bucket, and the client settings pointing at it


def _clips(folder: Path, count: int, start: int = 0) -> Path:
    for i in range(start, start + count):
        make_clip(folder, f"clip {i:02d}.mp4", frames=15, seed=i)
    return folder


def _download(s3, into: Path) -> Manifest:
    """The remote cache as a reader sees it, copied to ``into``: the manifest, and each shard it lists,
    checked against the manifest's size and sha256 as the bytes come from the server."""
    into.mkdir()
    (into / "manifest.json").write_bytes(s3.get("manifest.json"))
    manifest = Manifest.load(into)
    for record in manifest.shards:
        data = s3.get(record.name)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (record.bytes, record.sha256), record.name
        (into / record.name).write_bytes(data)
    assert verify(into, manifest.shards) == []
    return manifest


def _sources_once(s3, into: Path) -> list[str]:
    manifest = _download(s3, into)
    sources = [s.meta["source"] for record in manifest.shards for s in read_shard(into, record)]
    assert len(sources) == len(set(sources)), "a clip is served twice"
    names = s3.names()
    shards = {name for name in names if name.endswith(".tar")}
    assert shards == {r.name for r in manifest.shards}, "every shard remote is listed, every listed one remote"
    assert not [n for n in names if n.startswith((".parts/", ".lock")) or ".tmp" in n or ".part" in n], names
    return sorted(sources)


def _no_secret(s3, *folders: Path, texts: tuple[str, ...] = ()) -> None:
    secret = s3.secret.encode()
    for name in s3.names():
        assert secret not in s3.get(name), f"the secret is in the remote {name}"
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert secret not in path.read_bytes(), f"the secret is in {path}"
    for text in texts:
        assert s3.secret not in text


def test_two_ranks_write_one_s3_cache_then_a_new_clip_is_all_a_rerun_encodes(s3, tmp_path: Path, caplog):
    """Ranks share nothing but the bucket (each stages in its own folder) and the launcher's barriers,
    as ranks on two machines would; rank 0 merges the other's part records from the bucket."""
    data = _clips(tmp_path / "data", 4)
    (data / "broken.mp4").write_bytes(b"not a video")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "cogvx", "preprocess", "--data", str(data), "--output", str(s3), "--model", "tiny",
        "--dtype", "fp32", "--workers", "0", "--frame-bucket", "9", "--config", str(tmp_path / "small.toml"),
    ]  # fmt: skip
    (tmp_path / "small.toml").write_text("shard_max_samples = 1\n")
    done = run_launcher(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "encoded now" in done.stderr and "4 clips" in done.stderr, "rank 0 prints the totals of all ranks"
    assert s3 in done.stderr, "the summary names the bucket, not the staging folder"
    manifest = Manifest.from_dict(json.loads(s3.get("manifest.json")), "manifest.json")
    assert {r.name.split("-")[1] for r in manifest.shards} == {"r00", "r01"}, "each rank uploads its own shards"
    assert _sources_once(s3, tmp_path / "first") == [f"clip {i:02d}.mp4" for i in range(4)]
    assert [json.loads(line)["source"] for line in s3.get("skipped.jsonl").splitlines()] == ["broken.mp4"]
    staging = remote.staging_folder(s3, 0).parent
    assert sorted(p.name for p in staging.iterdir()) == ["r00", "r01"]
    assert not list(staging.rglob("*.tar*")), "staging keeps no uploaded shard"

    _clips(data, 1, start=4)
    again = run(tiny(data, s3, shard_max_samples=1))
    assert (again.encoded, again.already_cached) == (1, 4), "only the new clip is encoded"
    assert _sources_once(s3, tmp_path / "second") == [f"clip {i:02d}.mp4" for i in range(5)]
    _no_secret(s3, staging, texts=(caplog.text, done.stdout, done.stderr))


def test_kill_9_during_upload_then_rerun_gives_every_clip_exactly_once(s3, tmp_path: Path):
    data = _clips(tmp_path / "data", 4)
    code = (
        "from cogvx.preprocess.run import PreprocessConfig, run\n"
        f"run(PreprocessConfig(data={str(data)!r}, output={str(s3)!r}, model='tiny', dtype='fp32', workers=0,"
        " frame_buckets=(9,), shard_max_samples=1))\n"
    )
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not any(name.endswith(".tar") for name in s3.names()):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("the run ended (or hung) before its first shard was uploaded:\n" + log.read_text())
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    names = s3.names()
    assert "manifest.json" in names, "the start of the run publishes the (empty) manifest"
    listed = json.loads(s3.get("manifest.json"))["shards"]
    assert len(listed) == 0 and any(n.startswith(".parts/") for n in names) and ".lock" in names, names

    result = run(tiny(data, s3, shard_max_samples=1))  # the lock's process is gone: taken over
    uploaded = sum(name.endswith(".tar") for name in names)
    assert result.already_cached >= uploaded >= 1, "shards uploaded before the kill are listed, not encoded again"
    assert result.encoded + result.already_cached == 4
    assert _sources_once(s3, tmp_path / "after") == [f"clip {i:02d}.mp4" for i in range(4)]

    # A shard changed in the bucket (same size): --repair hashes every shard as it streams, refuses that one
    # (renamed NAME.damaged, never deleted) and encodes its clip again.
    tampered = json.loads(s3.get("manifest.json"))["shards"][0]["name"]
    raw = bytearray(s3.get(tampered))
    raw[len(raw) // 2] ^= 0xFF
    s3.put(tampered, bytes(raw))
    repaired = run(tiny(data, s3, shard_max_samples=1, repair=True))
    assert repaired.dropped_shards == [tampered] and repaired.encoded == 1
    assert s3.get(tampered + ".damaged") == bytes(raw)
    assert _sources_once(s3, tmp_path / "repaired") == [f"clip {i:02d}.mp4" for i in range(4)]
    _no_secret(s3, remote.staging_folder(s3, 0).parent, texts=(log.read_text(),))
