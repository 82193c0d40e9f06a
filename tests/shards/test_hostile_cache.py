"""Crafted caches against the real `cogvx` command: each is refused with exit code 1 and one line naming
the file, in bounded memory and time, and nothing is written outside the folder (issue 10).

Every case changes a copy of the tiny cache the way an attacker or a damaged copy would, and keeps the
manifest consistent with the change (size and sha256) unless the case is about the manifest, so the
reader's own checks are what refuses it. Where memory or blocking is at stake (gzip bomb, /dev/zero, a
FIFO) and for every `cogvx train`, the command runs in a fresh subprocess whose peak RSS is measured and
whose whole process tree is killed on a timeout; the other cases run the same typer app in-process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from cogvx.shards import Manifest, Sample, SampleEntry, ShardRecord, ShardWriter, read_shard
from tests.helpers.commands import Run, cli, cogvx

GIB = 1 << 30
MEMORY_LIMIT_MB = 1500


def train(cache: Path, cwd: Path, *extra: str) -> Run:
    args = ["train", "--shards", str(cache), "--output", str(cwd / "run"), "--model", "tiny", "--workers", "0"]
    return cogvx(*args, "--max-steps", "2", *extra, cwd=cwd)


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (links not followed) with its size and mtime."""
    found = {}
    for path in root.rglob("*"):
        name = str(path.relative_to(root))
        if not name.startswith(skip):
            info = path.lstat()
            found[name] = (info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture
def cache(tiny_cache: Path, tmp_path: Path) -> Path:
    target = tmp_path / "cache"
    shutil.copytree(tiny_cache, target)
    return target


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def _save(cache: Path, manifest: dict) -> None:
    (cache / "manifest.json").write_text(json.dumps(manifest))


def _write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], pax: dict[str, str]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers=pax) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def _relist(cache: Path, name: str, new_name: str | None = None) -> None:
    """Make the manifest agree with the shard file as it now is (size and sha256): an attacker's edit."""
    manifest = _manifest(cache)
    data = (cache / (new_name or name)).read_bytes()
    for shard in manifest["shards"]:
        if shard["name"] == name:
            shard.update(name=new_name or name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    _save(cache, manifest)


def rewrite_shard(cache: Path, change: Callable[[list[tuple[tarfile.TarInfo, bytes]]], list]) -> str:
    """Rewrite the cache's first shard through ``change`` (on its members) and relist it; returns its name."""
    name = _manifest(cache)["shards"][0]["name"]
    path = cache / name
    with tarfile.open(path, "r:") as tar:
        pax = dict(tar.pax_headers)
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    _write_tar(path, change(members), pax)
    _relist(cache, name)
    return name


def edit_sample(cache: Path, position: int | None, tensors=None, meta=None) -> tuple[str, list[str]]:
    """Change the tensors and/or .json of the ``position``-th sample of the first shard (None: of every
    sample); returns the shard's name and the changed keys."""
    keys: list[str] = []

    def change(members):
        out = []
        for info, data in members:
            key, _, ext = info.name.partition(".")
            if key not in keys:
                keys.append(key)
            if position is None or len(keys) - 1 == position:
                if ext == "safetensors" and tensors:
                    data = save_tensors(tensors(dict(load_tensors(data))))
                if ext == "json" and meta:
                    data = json.dumps(meta(json.loads(data))).encode()
            info.size = len(data)
            out.append((info, data))
        return out

    name = rewrite_shard(cache, change)
    return name, keys if position is None else [keys[position]]


def _gzip_bomb(path: Path, claimed: int) -> None:
    """A gzip-compressed tar whose one member claims ``claimed`` zero bytes: about 1 KB per MiB on disk.

    Each MiB of zeros compresses (sync-flushed, in a steady state) to the same bytes, so the stream is
    built from one compressed block repeated. The trailer's CRC is left 0: a reader inflates all of it
    before it could check.
    """
    info = tarfile.TarInfo("k.safetensors")
    info.size = claimed
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    with open(path, "wb") as f:
        f.write(compressor.compress(info.tobuf(tarfile.GNU_FORMAT)) + compressor.flush(zlib.Z_SYNC_FLUSH))
        first = compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
        steady = compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
        f.write(first + steady * (claimed // len(zeros) - 1))
        f.write(compressor.compress(bytes(2 * 512)) + compressor.flush(zlib.Z_FINISH))


@pytest.fixture
def bomb(cache: Path) -> tuple[Path, str]:
    """The cache with its shard replaced by a 3 MB gzip bomb claiming 3 GiB, relisted consistently."""
    name = _manifest(cache)["shards"][0]["name"]
    _gzip_bomb(cache / name, 3 * GIB)
    assert (cache / name).stat().st_size < 8 << 20
    _relist(cache, name)
    return cache, name


def test_gzip_bomb_is_refused_by_verify_in_bounded_memory(bomb: tuple[Path, str], tmp_path: Path):
    cache, name = bomb
    before = snapshot(tmp_path)
    verify = cogvx("shards", "verify", str(cache), cwd=tmp_path)
    line = verify.error_line()
    assert "gzip-compressed" in verify.stderr
    assert name in line and "--repair" in line  # the shard to move out, then what to run
    assert verify.peak_mb < MEMORY_LIMIT_MB, f"verify peaked at {verify.peak_mb:.0f} MB"
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_gzip_bomb_is_refused_by_train_in_bounded_memory(bomb: tuple[Path, str], tmp_path: Path):
    cache, name = bomb
    before = snapshot(tmp_path)
    trained = train(cache, tmp_path)
    line = trained.error_line()
    assert name in line and "gzip-compressed" in line
    assert trained.peak_mb < MEMORY_LIMIT_MB, f"train peaked at {trained.peak_mb:.0f} MB"
    assert snapshot(tmp_path, skip=("run",)) == before


def _list_as(cache: Path, hostile: str) -> None:
    manifest = _manifest(cache)
    manifest["shards"][0]["name"] = hostile
    _save(cache, manifest)


def test_dev_zero_fifo_and_device_links_are_refused_without_blocking(cache: Path, tmp_path: Path):
    _list_as(cache, "/dev/zero")
    line = cogvx("shards", "verify", str(cache), cwd=tmp_path, timeout=60).error_line()
    assert "manifest.json" in line and "'/dev/zero'" in line and "plain file names" in line
    # Inside the folder: a FIFO (nothing ever writes to it) and a link to /dev/zero under shard names.
    os.mkfifo(cache / "pipe.tar")
    (cache / "zero.tar").symlink_to("/dev/zero")
    for hostile in ("pipe.tar", "zero.tar"):
        _list_as(cache, hostile)
        verify = cogvx("shards", "verify", str(cache), cwd=tmp_path, timeout=60)
        assert hostile in verify.error_line() and "not a regular file" in verify.stderr


@pytest.mark.slow
def test_training_refuses_a_fifo_shard_without_blocking(cache: Path, tmp_path: Path):
    os.mkfifo(cache / "pipe.tar")  # a reader that opened it plainly would wait forever
    _list_as(cache, "pipe.tar")
    line = train(cache, tmp_path).error_line()
    assert "pipe.tar is not a regular file" in line


@pytest.mark.parametrize("hostile", ["../outside.tar", "/etc/passwd", "sub/shard.tar"])
def test_shard_names_that_leave_the_folder_are_refused(cache: Path, tmp_path: Path, hostile: str):
    outside = tmp_path / "outside.tar"
    shutil.copy(cache / _manifest(cache)["shards"][0]["name"], outside)  # a real shard, to be tempting
    manifest = _manifest(cache)
    manifest["shards"][0]["name"] = hostile
    _save(cache, manifest)
    before = snapshot(tmp_path)
    line = cli("shards", "verify", str(cache)).error_line()
    assert str(cache / "manifest.json") in line and repr(hostile) in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "member",
    [
        pytest.param((tarfile.SYMTYPE, "k0.jpg", "/etc/passwd"), id="symlink"),
        pytest.param((tarfile.LNKTYPE, "k0.jpg", "../../outside"), id="hardlink"),
        pytest.param((tarfile.CHRTYPE, "k0.jpg", ""), id="device"),
        pytest.param((tarfile.REGTYPE, "../escape.json", ""), id="dot-dot-name"),
        pytest.param((tarfile.REGTYPE, "/abs.json", ""), id="absolute-name"),
    ],
)
def test_members_that_are_not_regular_files_or_plain_names_are_refused(
    cache: Path, tmp_path: Path, member: tuple[bytes, str, str]
):
    kind, member_name, target = member

    def add(members):
        info = tarfile.TarInfo(member_name)
        info.type, info.linkname = kind, target
        return members + [(info, b"{}" if kind == tarfile.REGTYPE else b"")]

    name = rewrite_shard(cache, add)
    before = snapshot(tmp_path)
    verify = cli("shards", "verify", str(cache))
    verify.error_line()
    bad = [line for line in verify.stderr.splitlines() if line.startswith("bad")]
    assert len(bad) == 1 and name in bad[0] and repr(member_name) in bad[0]
    assert snapshot(tmp_path) == before  # nothing extracted, linked or created anywhere
    assert not (tmp_path / "escape.json").exists() and not Path("/abs.json").exists()


def test_lying_json_is_found_by_verify(cache: Path):
    # The sample claims another bucket (one that exists in the cache), so a batch of two would stack
    # tensors of different shapes.
    buckets = [s["bucket"] for s in _manifest(cache)["shards"][0]["samples"]]
    other = next(b for b in buckets if b != buckets[0])
    name, (key,) = edit_sample(cache, 0, meta=lambda meta: {**meta, "bucket": other})
    verify = cli("shards", "verify", str(cache))
    assert name in verify.error_line() and f"Sample {key} in {cache / name}: its .json says bucket" in verify.stdout


@pytest.mark.slow
def test_training_refuses_lying_json_before_batching_it(cache: Path, tmp_path: Path):
    # Before this was checked, a batch of two stacked it with a sample of the bucket it claims: a raw
    # RuntimeError at some step. It must be refused before it is batched, naming shard and key.
    buckets = [s["bucket"] for s in _manifest(cache)["shards"][0]["samples"]]
    other = next(b for b in buckets if b != buckets[0])
    name, (key,) = edit_sample(cache, 0, meta=lambda meta: {**meta, "bucket": other})
    trained = train(cache, tmp_path, "--batch-size", "2", "--max-steps", "8")
    line = trained.error_line()
    assert name in line and key in line and f"says bucket '{other}'" in line


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda t: {**t, "moments": t["moments"][:6]}, id="channels"),
        pytest.param(lambda t: {**t, "prompt_embeds": t["prompt_embeds"].to(torch.float16)}, id="dtype"),
        pytest.param(lambda t: {"moments": t["moments"]}, id="missing-tensor"),
        pytest.param(lambda t: {**t, "moments": t["moments"].index_fill(0, torch.tensor([0]), float("nan"))}, id="nan"),
        pytest.param(lambda t: {**t, "prompt_embeds": t["prompt_embeds"] / 0.0}, id="inf"),
    ],
)
def test_samples_training_cannot_use_are_found_by_verify(cache: Path, tmp_path: Path, damage):
    name, (key,) = edit_sample(cache, 1, tensors=damage)
    verify = cli("shards", "verify", str(cache))
    line = verify.error_line()
    bad = [line for line in verify.stderr.splitlines() if line.startswith("bad")]
    assert len(bad) == 1 and name in bad[0] and key in bad[0]
    # The repair: move the shard out, then re-encode its clips.
    assert "move them out of the folder, then run `cogvx preprocess --data " in line and f"{cache} --repair`" in line


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["channels", "nan"])
def test_training_refuses_a_bad_sample_with_one_line_naming_shard_and_key(cache: Path, tmp_path: Path, damage: str):
    # Every sample is damaged: training decodes only the samples it uses, and must refuse the first one.
    if damage == "channels":
        name, keys = edit_sample(cache, None, tensors=lambda t: {**t, "moments": t["moments"][:6]})
    else:
        name, keys = edit_sample(cache, None, tensors=lambda t: {**t, "moments": t["moments"] * float("nan")})
    line = train(cache, tmp_path).error_line()
    assert name in line and any(key in line for key in keys)
    assert "NaN" in line if damage == "nan" else "moments float32 [6, " in line


def test_duplicate_keys_in_a_shard_and_across_the_cache(cache: Path, tmp_path: Path):
    name = _manifest(cache)["shards"][0]["name"]
    copy = "shard-r09-000000.tar"
    shutil.copy(cache / name, cache / copy)  # the same samples listed twice
    manifest = _manifest(cache)
    manifest["shards"].append({**manifest["shards"][0], "name": copy})
    _save(cache, manifest)
    verify = cli("shards", "verify", str(cache))
    verify.error_line()
    assert "also served by" in verify.stderr and copy in verify.stderr

    manifest["shards"].pop()
    _save(cache, manifest)
    (cache / copy).unlink()
    first_key = _manifest(cache)["shards"][0]["samples"][0]["key"]
    rewrite_shard(cache, lambda members: members + [m for m in members if m[0].name.startswith(first_key + ".")])
    verify = cli("shards", "verify", str(cache))
    verify.error_line()
    assert f"holds sample key {first_key} twice" in verify.stderr and name in verify.stderr


@pytest.mark.parametrize(
    "field, value",
    [
        ("version", 1.0),
        ("version", True),
        ("version", "1"),
        ("version", 2),
        ("shards", {"a": 1}),
        ("producer", None),
        ("created", "yesterday"),
        ("shards.0.bytes", "12"),
        ("shards.0.sample_count", True),
        ("shards.0.samples.0.bucket", 13),
        ("shards.0.samples.0.key", "a.b"),
        ("shards.0.layouts", [1]),
        ("shards.0.excluded", [1]),
        ("shards.0.sha256", "0" * 63),
        ("extras.validation.file", "../x.safetensors"),
    ],
)
def test_wrongly_typed_manifest_fields_are_one_line_errors_naming_the_manifest(cache: Path, field: str, value):
    """In-process (no subprocess): parsing only, nothing here can block or use memory."""
    manifest = _manifest(cache)
    *path, last = field.split(".")
    target = manifest
    for part in path:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    target[last] = value
    _save(cache, manifest)
    for command in (["shards", "verify", str(cache)], ["shards", "inspect", str(cache)]):
        out = cli(*command)
        assert str(cache / "manifest.json") in out.error_line() and len(out.stdout.strip().splitlines()) == 1


def _cache_with_header(cache: Path, target: Path) -> Manifest:
    """The tiny cache's samples rewritten with a writer header, over several shards and two "runs" (the
    second re-encodes one clip, so the first run's sample of it is excluded)."""
    old = Manifest.load(cache)
    header = {"producer": old.producer, "params": old.params, "schema": old.schema}
    manifest = Manifest(old.producer, old.params, old.schema)
    samples = [sample for record in old.shards for sample in read_shard(cache, record)]
    entries = {entry.key: entry for entry in old.live_entries()}

    def commit(record: ShardRecord) -> None:
        manifest.add_shard(record)
        manifest.save(target)

    writer = ShardWriter(target, "shard-r00", commit, max_samples=2, header=header)
    for sample in samples:
        writer.write(sample, entries[sample.key])
    writer.flush()
    again = samples[0]  # the same source, re-encoded under a new key by a later run (another rank)
    entry = SampleEntry("re0encoded0", entries[again.key].source, "new-hash", entries[again.key].bucket)
    meta = {k: v for k, v in again.meta.items() if k not in ("index", "content_hash")}
    writer = ShardWriter(target, "shard-r01", commit, header=header)
    writer.write(Sample(entry.key, again.tensors, meta, again.extras), entry)
    writer.flush()
    return Manifest.load(target)


@pytest.mark.slow
def test_rebuild_manifest_round_trip_then_train(cache: Path, tmp_path: Path):
    folder = tmp_path / "headed"
    original = _cache_with_header(cache, folder)
    assert original.excluded_count == 1 and len(original.shards) == 4
    (folder / "manifest.json").unlink()

    assert f"`cogvx shards rebuild-manifest {folder}`" in cli("shards", "verify", str(folder)).error_line()
    rebuilt = cogvx("shards", "rebuild-manifest", str(folder), cwd=tmp_path, timeout=60)
    assert rebuilt.code == 0, rebuilt.stderr
    assert "4 shards, 6 samples (1 replaced)" in rebuilt.stderr
    again = Manifest.load(folder)
    assert {r.name: r for r in again.shards} == {r.name: r for r in original.shards}  # every field of every record
    assert (again.producer, again.params, again.schema) == (original.producer, original.params, original.schema)

    refused = cli("shards", "rebuild-manifest", str(folder)).error_line()
    assert "manifest.json exists" in refused
    remote = cli("shards", "rebuild-manifest", "s3://key:secret@bucket/cache").error_line()
    assert "works on a local folder, not s3://bucket/cache" in remote and "secret" not in remote
    trained = train(folder, tmp_path)
    assert trained.code == 0, trained.stderr[-3000:]
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def _small_shard(folder: Path, prefix: str, header: dict | None) -> ShardRecord:
    records: list[ShardRecord] = []
    writer = ShardWriter(folder, prefix, records.append, header=header)
    tensors = {"moments": torch.zeros(2, 1, 2, 2), "prompt_embeds": torch.zeros(3, 4)}
    writer.write(Sample(f"{prefix}-k", tensors, {}), SampleEntry(f"{prefix}-k", f"{prefix}.mp4", "h", "1x16x16"))
    writer.flush()
    return records[0]


@pytest.mark.parametrize("second", [None, {"producer": {}, "params": {"fps": 4}, "schema": {}}])
def test_rebuild_manifest_refuses_shards_without_a_header_or_with_another_one(tmp_path: Path, second):
    header = {"producer": {}, "params": {"fps": 8}, "schema": {}}
    _small_shard(tmp_path, "a", header)
    _small_shard(tmp_path, "b", second)
    line = cli("shards", "rebuild-manifest", str(tmp_path)).error_line()
    expected = "records no cogvx header" if second is None else "written with different settings"
    assert expected in line and "b-000000.tar" in line
    assert not (tmp_path / "manifest.json").exists()
