"""Caches on object storage, read side: `cogvx train --shards s3://...` (and https://) as from a folder.

A real S3-compatible server (moto's, on localhost) and Python's http.server serve a cache made by
`cogvx preprocess --model tiny`; everything goes through s3fs/boto3 and aiohttp as with a real bucket.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from cogvx.cli import app
from cogvx.errors import CacheError
from cogvx.shards import Manifest
from cogvx.shards.store import LocalStore, Mismatch, display, is_remote, open_store
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train
from tests.conftest import CLIPS

# A small shuffle buffer: a stream without --cache-dir fetches a shard per draw, and the buffer fills first.
STEPS = dict(max_steps=3, rank=4, alpha=4, learning_rate=1e-2, mixed_precision="fp32", checkpoint_every=0, seed=3,
             shuffle_buffer=4)  # fmt: skip


def _settings(tmp_path: Path) -> list[str]:
    """STEPS for `cogvx train`: shuffle_buffer is a config-file setting."""
    path = tmp_path / "steps.toml"
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in STEPS.items()))
    return ["--config", str(path)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The bundled clips with the tiny model, two samples a shard (three shards), with a validation prompt."""
    from cogvx.preprocess.run import PreprocessConfig
    from cogvx.preprocess.run import run as preprocess

    out = tmp_path_factory.mktemp("remote") / "shards"
    cfg = PreprocessConfig(
        data=CLIPS, output=out, model="tiny", dtype="fp32", workers=0, shard_max_samples=2,
        validation_prompts=("a red disc",),
    )  # fmt: skip
    preprocess(cfg)
    assert len(Manifest.load(out).shards) >= 3
    return out


@pytest.fixture(scope="module")
def local_runs(cache: Path, tmp_path_factory) -> dict[int, list[dict]]:
    """The metrics of the same run from the folder, by worker count (trained once per module)."""
    runs = tmp_path_factory.mktemp("local-runs")
    for w in (0, 2):
        train(TrainConfig(shards=cache, output=runs / f"w{w}", workers=w, **STEPS))
    return {w: _metrics(runs / f"w{w}") for w in (0, 2)}


@pytest.fixture(scope="module")
def local_losses(local_runs) -> dict[int, list[float]]:
    return {w: [record["loss"] for record in records] for w, records in local_runs.items()}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _files_holding(folder: Path, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_training_from_s3_equals_training_from_the_folder_and_writes_no_secret(
    cache: Path, local_losses, s3, tmp_path: Path, capfd
):
    url = s3.upload(cache)
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "--shards", url, "--output", str(run), "--workers", "0", "--validation-every", "3",
         "--validation-steps", "1", *_settings(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [record["loss"] for record in _metrics(run)] == local_losses[0]
    assert list((run / "validation").rglob("*.safetensors")), "the validation prompts were read from the bucket"
    assert json.loads((run / "config.json").read_text())["shards"] == url
    assert f'shards = "{url}"' in (run / "config.toml").read_text()
    captured = capfd.readouterr()
    assert s3.secret not in result.output + captured.out + captured.err
    assert _files_holding(run, s3.secret) == []


def test_training_from_a_web_server_with_two_workers_and_a_read_through_cache(
    cache: Path, local_losses, http_server, tmp_path: Path
):
    base = http_server.serve(cache, "cache")
    # Credentials in a URL reach the server, never the run folder: it records the display form.
    url = base.replace("http://", "http://reader:hunter2-secret@")
    kept = tmp_path / "kept"
    first = train(TrainConfig(shards=url, output=tmp_path / "a", workers=2, cache_dir=kept, **STEPS))
    assert first.losses == local_losses[2]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["shards"] == base.rstrip("/")
    assert _files_holding(tmp_path / "a", "hunter2") == []
    manifest = Manifest.load(cache)
    assert sorted(p.name for p in kept.iterdir()) == sorted(f"{s.sha256}.tar" for s in manifest.shards)
    shard_reads = [r for r in http_server.requests if r[0] == "GET" and r[1].endswith(".tar")]
    assert shard_reads, "the first run read its shards from the server"

    http_server.requests.clear()
    second = train(TrainConfig(shards=url, output=tmp_path / "b", workers=2, cache_dir=kept, **STEPS))
    assert second.losses == first.losses
    assert [r for r in http_server.requests if r[1].endswith(".tar")] == [], "the second run read its shards again"


def test_a_tampered_remote_shard_is_refused_with_its_url_or_skipped_when_asked(
    cache: Path, local_runs, s3, tmp_path: Path
):
    url = s3.upload(cache)
    manifest = Manifest.load(cache)
    first = local_runs[0][0]["samples"][0][0]  # the first sample trained on: its shard is read early
    record = next(r for r in manifest.shards if first in {e.key for e in r.samples})
    bad = record.name
    data = bytearray(s3.get(bad))
    data[len(data) // 2] ^= 1
    s3.put(bad, bytes(data))
    with pytest.raises(CacheError, match=rf"Shard {url}/{bad} does not match the manifest.*cogvx shards verify {url}"):
        train(TrainConfig(shards=url, output=tmp_path / "refused", workers=0, **STEPS))

    out = tmp_path / "skipped"
    result = CliRunner().invoke(
        app,
        ["train", "--shards", url, "--output", str(out), "--workers", "0", "--skip-bad-shards", *_settings(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert f"skipped bad shard {url}/{bad}" in " ".join(result.output.split())
    records = _metrics(out)
    assert [r.get("skipped_shards") for r in records if "skipped_shards" in r] == [[f"{url}/{bad}"]]
    bad_keys = {entry.key for entry in record.samples}
    assert not bad_keys & {key for r in records for keys in r["samples"] for key in keys}
    # Skipping is a matter of the shard's bytes: the same run again gives the same losses.
    again = train(TrainConfig(shards=url, output=tmp_path / "again", workers=0, skip_bad_shards=True, **STEPS))
    assert again.losses == [r["loss"] for r in records]
    assert again.skipped_shards == [f"{url}/{bad}"]


def test_shards_verify_and_inspect_read_a_bucket(cache: Path, s3):
    url = s3.upload(cache)
    runner = CliRunner()
    out = runner.invoke(app, ["shards", "verify", url])
    assert out.exit_code == 0 and "ok" in out.output, out.output
    out = runner.invoke(app, ["shards", "inspect", url])
    assert out.exit_code == 0 and "samples" in out.output, out.output
    bad = Manifest.load(cache).shards[1].name
    s3.put(bad, b"not a shard")
    out = runner.invoke(app, ["shards", "verify", url, "--quick"])
    assert out.exit_code == 1 and f"{url}/{bad}" in " ".join(out.output.split()), out.output


def test_a_missing_bucket_is_one_line_naming_it(s3):
    out = CliRunner().invoke(app, ["shards", "inspect", "s3://no-such-bucket-here/cache"])
    assert out.exit_code == 1
    assert "s3://no-such-bucket-here/cache" in out.output and "Traceback" not in out.output, out.output


def test_the_read_through_cache_keeps_only_verified_files(http_server, tmp_path: Path):
    folder = tmp_path / "files"
    folder.mkdir()
    data = b"x" * 1000
    (folder / "a.tar").write_bytes(data)
    good = hashlib.sha256(data).hexdigest()
    kept = tmp_path / "kept"
    store = open_store(http_server.serve(folder, "files"), cache_dir=kept)
    with pytest.raises(Mismatch):  # what the manifest says is not what the server holds: nothing is kept
        store.fetch("a.tar", 1000, "0" * 64)
    with pytest.raises(Mismatch):
        store.fetch("a.tar", 999, good)
    assert list(kept.iterdir()) == []
    with store.fetch("a.tar", 1000, good) as f:
        assert f.read() == data
    assert [p.name for p in kept.iterdir()] == [f"{good}.tar"]
    (kept / f"{good}.tar").write_bytes(b"y" * 1000)  # damaged on disk since: fetched again, not served
    with store.fetch("a.tar", 1000, good) as f:
        assert f.read() == data
    # A store pickles to its location alone (DataLoader workers build their own client).
    clone = pickle.loads(pickle.dumps(store))
    assert clone.read_bytes("a.tar") == data and clone.location == store.location


@given(
    user=st.text("abcXYZ019_-", min_size=1, max_size=8),
    password=st.text("abcXYZ019_-!$", min_size=6, max_size=12),
    query=st.text("abc019=&", min_size=1, max_size=12),
    scheme=st.sampled_from(["s3", "https", "gs", "memory"]),
)
def test_display_never_shows_a_password_or_a_query(user: str, password: str, query: str, scheme: str):
    url = f"{scheme}://{user}:{password}@host.example/prefix/cache?{query}"
    shown = display(url)
    assert is_remote(url) and shown == f"{scheme}://host.example/prefix/cache"
    assert display("/a/local/folder") == "/a/local/folder" and not is_remote(Path("s3://x"))
    assert isinstance(open_store("file:///a/b"), LocalStore) and not is_remote("file:///a/b")


def test_a_store_that_cannot_be_reached_stops_the_stream_even_when_skipping(cache: Path, http_server):
    from cogvx.shards.store import StoreError
    from cogvx.train.data import ShardStream

    url = http_server.serve(cache, "cache")
    store = open_store(url)
    shards = Manifest.load(store).shards
    stream = ShardStream(store, shards, 1, 0, shuffle_buffer=0, random_flip=0.0, skip_bad=True)
    http_server.shutdown()  # gone after the manifest was read: nothing is known about any shard
    with pytest.raises(StoreError, match=rf"Cannot read {url}shard-.*Check the URL and the network"):
        next(iter(stream))
    assert stream.skipped == {}
