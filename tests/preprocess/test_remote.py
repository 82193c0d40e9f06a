"""``cogvx preprocess --output s3://...`` against a real S3-compatible server on localhost (moto).

What is checked is what a reader of the bucket sees: the objects listed, the manifest, and the shards
downloaded and verified against it. Nothing in the clients is patched; the killed runs are real
processes killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
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
from tests.helpers.preprocessing import captioned_clip, tiny_config

TRAIN = dict(max_steps=2, rank=4, alpha=4, mixed_precision="fp32", checkpoint_every=0, seed=3, workers=0)


def _clips(folder: Path, count: int, start: int = 0) -> Path:
    for i in range(start, start + count):
        captioned_clip(folder, f"clip {i:02d}.mp4", frames=15, seed=i)
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


def test_two_ranks_killed_while_uploading_then_rerun_then_repaired_then_trained_from(s3, tmp_path: Path, capfd):
    """The ranks of a run share nothing but the bucket (each stages in a folder of its own) and the
    launcher's barriers, as ranks on two machines would. The whole launch is killed with SIGKILL once
    the first shard is in the bucket; a single process then finishes the cache from what the bucket holds."""
    data = _clips(tmp_path / "data", 4)
    (data / "broken.mp4").write_bytes(b"not a video")
    (tmp_path / "small.toml").write_text("shard_max_samples = 1\n")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "cogvx", "preprocess", "--data", str(data), "--output", str(s3), "--model", "tiny",
        "--dtype", "fp32", "--workers", "0", "--frame-bucket", "9", "--config", str(tmp_path / "small.toml"),
    ]  # fmt: skip
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        deadline = time.time() + 240
        while not any(name.endswith(".tar") for name in s3.names()):
            if launcher.poll() is not None or time.time() > deadline:
                _kill_tree(launcher)
                pytest.fail("the run ended (or hung) before its first shard was uploaded:\n" + log.read_text())
            time.sleep(0.01)
        _kill_tree(launcher)
    names = s3.names()
    uploaded = [name for name in names if name.endswith(".tar")]
    assert json.loads(s3.get("manifest.json"))["shards"] == [], "the start published the empty manifest, no more"
    assert any(n.startswith(".parts/shards.r") for n in names) and ".lock" in names, names

    result = run(tiny_config(data, s3, shard_max_samples=1))  # the lock's owner is gone: taken over at once
    assert result.already_cached >= len(uploaded), "shards in the bucket before the kill are listed, not redone"
    assert result.encoded + result.already_cached == 4
    assert _sources_once(s3, tmp_path / "after") == [f"clip {i:02d}.mp4" for i in range(4)]
    assert [json.loads(line)["source"] for line in s3.get("skipped.jsonl").splitlines()] == ["broken.mp4"]
    staging = remote.staging_folder(s3, 0).parent
    assert not list(staging.glob("r00/*.tar*")), "staging keeps no uploaded shard"

    # One more clip, and a shard changed in the bucket (same size): --repair hashes every shard as it
    # streams, renames that one NAME.damaged (never deleted) and encodes its clip again with the new one.
    _clips(data, 1, start=4)
    tampered = json.loads(s3.get("manifest.json"))["shards"][0]["name"]
    raw = bytearray(s3.get(tampered))
    raw[len(raw) // 2] ^= 0xFF
    s3.put(tampered, bytes(raw))
    repaired = run(tiny_config(data, s3, shard_max_samples=1, repair=True))
    assert repaired.dropped_shards == [tampered]
    assert (repaired.encoded, repaired.already_cached) == (2, 3), "only the new clip and the damaged one's"
    assert s3.get(tampered + ".damaged") == bytes(raw)
    assert _sources_once(s3, tmp_path / "repaired") == [f"clip {i:02d}.mp4" for i in range(5)]

    from cogvx.train.config import TrainConfig
    from cogvx.train.loop import run as train

    trained = train(TrainConfig(shards=str(s3), output=tmp_path / "run", **TRAIN))
    assert len(trained.losses) == TRAIN["max_steps"] and all(map(math.isfinite, trained.losses))
    captured = capfd.readouterr()
    _no_secret(s3, staging, tmp_path / "run", texts=(log.read_text(), captured.out, captured.err))


def test_two_ranks_write_one_remote_cache(s3, tmp_path: Path):
    """A multi-GPU (or multi-node: the ranks share only the bucket and the launcher) run that finishes:
    each rank's shards are in the bucket, the one manifest lists them all, every clip once."""
    data = _clips(tmp_path / "data", 4)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "cogvx", "preprocess", "--data", str(data), "--output", str(s3), "--model", "tiny",
        "--dtype", "fp32", "--workers", "0", "--frame-bucket", "9",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert _sources_once(s3, tmp_path / "after") == [f"clip {i:02d}.mp4" for i in range(4)]
    ranks = {name.split("-")[1] for name in s3.names() if name.endswith(".tar")}
    assert ranks == {"r00", "r01"}, "each rank uploads its own shards"


def _kill_tree(launcher: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank it started (they may be in sessions of their own)."""
    import psutil

    procs = [*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    launcher.wait()


def test_a_live_lock_refuses_a_second_writer_and_a_dead_or_silent_one_does_not(s3, tmp_path: Path):
    import socket

    from cogvx.errors import CacheError

    now = time.time()
    live = {"host": socket.gethostname(), "pid": os.getpid(), "token": "other", "started": now, "renewed": now}
    s3.put(".lock", json.dumps(live).encode())
    with pytest.raises(CacheError, match=r"Another `cogvx preprocess` .* delete s3://.*/\.lock"):
        run(tiny_config(tmp_path, s3))
    assert s3.names() == [".lock"], "a refused run writes nothing"
    assert json.loads(s3.get(".lock"))["token"] == "other", "nor takes the lock"

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert remote._stale({**live, "pid": dead.pid}), "this host, a process that is gone (kill -9)"
    assert not remote._stale({**live, "host": "elsewhere"}), "another machine, renewed just now"
    assert remote._stale({**live, "host": "elsewhere", "renewed": now - remote.LOCK_STALE_SECONDS - 1})
