"""``cogvx.shards.shardfile`` and ``reader``: a listed shard is served only through its sha256, every sample checked.

Each test pins a value docs/cache-format.md states (a limit, a count, a file name, a message that names
the file and the fix), so a changed comparison, constant or string in the module fails here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cogvx.shards import CacheError, SampleEntry, ShardRecord
from cogvx.shards.manifest import describe_layout
from tests.helpers.shardcache import (
    BUCKET,
    LAYOUT,
    refusal_without_blocking,
    tar_bytes,
    written_cache,
)


def test_hashes_stop_at_the_limit_and_refusals_name_the_shard_and_the_fix(tmp_path: Path):
    import hashlib

    from cogvx.shards import open_shard, read_verified
    from cogvx.shards.shardfile import check_shard, file_sha256

    data = bytes(range(256)) * 40000  # 10 MB: more than one 4 MiB block
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    for limit in (0, 5, 5 << 20, len(data) + 1):
        assert file_sha256(tmp_path / "f", limit) == hashlib.sha256(data[:limit]).hexdigest()
    record = ShardRecord("f", 0, len(data), hashlib.sha256(data).hexdigest())
    assert read_verified(tmp_path, record) == data
    with open_shard(tmp_path, record) as f:
        assert f.tell() == 0 and f.read(3) == data[:3]
    assert check_shard(tmp_path, record) == tmp_path / "f"
    changed = bytes([data[0] ^ 1]) + data[1:]
    (tmp_path / "f").write_bytes(changed)
    assert check_shard(tmp_path, record, full=False) == tmp_path / "f"  # size only
    mismatch = (
        f"Shard {tmp_path / 'f'} does not match the manifest ({len(data)} bytes, expected {len(data)}; "
        f"sha256 differs). It was changed or damaged after it was written. Run `cogvx shards verify {tmp_path}` "
        "to list every bad shard and the command that re-encodes their samples."
    )
    for read in (lambda: read_verified(tmp_path, record), lambda: check_shard(tmp_path, record)):
        with pytest.raises(CacheError) as err:
            read()
        assert str(err.value) == mismatch
    (tmp_path / "f").write_bytes(data + b"x")
    with pytest.raises(CacheError, match=f"\\({len(data) + 1} bytes, expected {len(data)};"):
        read_verified(tmp_path, record)
    with pytest.raises(CacheError, match=f"\\({len(data) + 1} bytes, expected"):
        check_shard(tmp_path, record, full=False)
    (tmp_path / "f").unlink()
    missing = (
        f"Shard {tmp_path / 'f'} is listed in the manifest but missing. Restore it, or run `cogvx shards verify "
        f"{tmp_path}` for the command that re-encodes its samples."
    )
    for read in (lambda: read_verified(tmp_path, record), lambda: check_shard(tmp_path, record)):
        with pytest.raises(CacheError) as err:
            read()
        assert str(err.value) == missing
    with pytest.raises(CacheError, match="Shard name '../f' is not a plain file name inside"):
        check_shard(tmp_path, ShardRecord("../f", 0, 0, "0" * 64))


def test_iter_record_samples_checks_each_raw_sample_against_the_index(tmp_path: Path):
    from cogvx.shards import iter_record_samples

    manifest = written_cache(tmp_path, samples=2)
    record = manifest.shards[0]
    data = (tmp_path / record.name).read_bytes()
    origin = str(tmp_path / record.name)
    record.excluded = ["k0"]
    assert [r["__key__"] for r in iter_record_samples(data, record, origin)] == ["k1"]
    raws = list(iter_record_samples(data, record, origin, include_excluded=True))
    assert [r["__key__"] for r in raws] == ["k0", "k1"] and raws[1]["__entry__"] == record.samples[1]
    assert raws[0]["__layouts__"] == {BUCKET: LAYOUT}
    shared: dict = {}
    raws = list(iter_record_samples(data, record, origin, layouts=shared))
    assert raws[0]["__layouts__"] is shared
    fix = f"The shard is unusable; run `cogvx shards verify {tmp_path}` for how to repair it."
    record.samples = record.samples[1:]
    with pytest.raises(CacheError) as err:
        list(iter_record_samples(data, record, origin, include_excluded=True))
    assert str(err.value) == f"Sample k0 in {origin} is not in the manifest's index of that shard. {fix}"
    members = [("k.json", b"{}")]
    bare = ShardRecord("b.tar", 1, 0, "0" * 64)
    for member_list, message in [
        (members, f"Sample k in {origin} has no .safetensors member. {fix}"),
        ([("k.safetensors", b"")], f"Sample k in {origin} has no .json member. {fix}"),
        ([("k.safetensors", b""), ("k.json", b"{")], f"Sample k in {origin}: its .json cannot be parsed ("),
    ]:
        with pytest.raises(CacheError) as err:
            list(iter_record_samples(tar_bytes(member_list), bare, origin))
        assert str(err.value).startswith(message)


def test_decode_sample_names_a_missing_or_unparsable_member_and_learns_an_unrecorded_layout():
    from safetensors.torch import save

    from cogvx.shards import decode_sample

    blob = save({"x": torch.ones(2)})
    meta = json.dumps({"bucket": "b", "source": "v", "content_hash": "h"}).encode()
    with pytest.raises(CacheError) as err:
        decode_sample({"__key__": "k", "safetensors": blob}, "o.tar")
    assert str(err.value) == "Sample k in o.tar has no .json member; the shard is damaged."
    with pytest.raises(CacheError) as err:
        decode_sample({"__key__": "k", "json": meta}, "o.tar")
    assert str(err.value) == "Sample k in o.tar has no .safetensors member; the shard is damaged."
    with pytest.raises(CacheError, match="^Sample k in o.tar cannot be parsed \\(.*\\); the shard is damaged.$"):
        decode_sample({"__key__": "k", "safetensors": b"xx", "json": meta}, "o.tar")
    with pytest.raises(CacheError) as err:
        decode_sample({"__key__": "k", "safetensors": blob, "json": b"[1]"}, "o.tar")
    assert str(err.value) == "Sample k in o.tar: its .json is a list, not an object."
    layouts: dict = {}
    raw = {"__key__": "k", "__url__": "u", "safetensors": blob, "json": meta, "jpg": b"j", "__entry__": None}
    sample = decode_sample({**raw, "__layouts__": layouts}, "o.tar")
    assert layouts == {"b": {"x": {"dtype": "float32", "shape": [2]}}} and sample.extras == {"jpg": b"j"}
    assert sample.meta == {"bucket": "b", "source": "v", "content_hash": "h"} and torch.equal(
        sample.tensors["x"], torch.ones(2)
    )
    entry = SampleEntry("k", "v", "h", "b2")  # the index line's bucket wins over the .json's
    with pytest.raises(CacheError, match="its .json says bucket 'b', the manifest's index says 'b2'"):
        decode_sample({**raw, "__entry__": entry, "__layouts__": {}}, "o.tar")
    other = {"x": {"dtype": "float32", "shape": [3]}}
    with pytest.raises(CacheError, match="holds x float32 \\[2\\], but bucket b is x float32 \\[3\\]"):
        decode_sample({**raw, "__layouts__": {"b": other}}, "o.tar")
    no_bucket = {**raw, "json": b"{}", "__layouts__": {}}
    with pytest.raises(CacheError, match="its .json has no bucket"):
        decode_sample(no_bucket, "o.tar")


def test_read_verified_refuses_a_fifo_as_a_shard(tmp_path: Path):
    from cogvx.shards import read_verified, verify

    os.mkfifo(tmp_path / "p.tar")
    err = refusal_without_blocking(
        tmp_path / "p.tar", lambda: read_verified(tmp_path, ShardRecord("p.tar", 0, 0, "0" * 64))
    )
    assert str(err).startswith(f"Shard {tmp_path / 'p.tar'} is not a regular file")
    assert verify(tmp_path / "none", []) == []


def test_read_verified_refuses_a_file_longer_than_an_empty_record(tmp_path: Path):
    import hashlib

    from cogvx.shards import read_verified

    empty = ShardRecord("e.tar", 0, 0, hashlib.sha256(b"").hexdigest())
    (tmp_path / "e.tar").write_bytes(b"")
    assert read_verified(tmp_path, empty) == b""
    (tmp_path / "e.tar").write_bytes(b"grown")
    with pytest.raises(CacheError, match="\\(5 bytes, expected 0; sha256 differs\\)"):
        read_verified(tmp_path, empty)


def test_file_hashing_refuses_a_fifo_as_a_file(tmp_path: Path):
    from cogvx.shards.shardfile import file_sha256

    os.mkfifo(tmp_path / "p")
    err = refusal_without_blocking(tmp_path / "p", lambda: file_sha256(tmp_path / "p"))
    assert (
        str(err) == f"File {tmp_path / 'p'} is not a regular file (a device, FIFO or folder); cogvx reads only files."
    )


def test_a_shard_that_cannot_be_opened_says_why(tmp_path: Path):
    from cogvx.shards import read_verified

    (tmp_path / "loop.tar").symlink_to(tmp_path / "loop.tar")  # a link to itself
    with pytest.raises(CacheError) as err:
        read_verified(tmp_path, ShardRecord("loop.tar", 0, 0, "0" * 64))
    assert str(err.value) == f"Shard {tmp_path / 'loop.tar'} cannot be opened (Too many levels of symbolic links)."


def test_iter_record_samples_refuses_before_yielding_with_where_and_fix(tmp_path: Path):
    import dataclasses

    from cogvx.shards import iter_record_samples

    record = written_cache(tmp_path, samples=2).shards[0]
    data = (tmp_path / record.name).read_bytes()
    origin = str(tmp_path / record.name)
    fix = f"The shard is unusable; run `cogvx shards verify {tmp_path}` for how to repair it."
    moved = dataclasses.replace(
        record, samples=[dataclasses.replace(record.samples[0], source="w0")] + record.samples[1:]
    )
    with pytest.raises(CacheError) as err:
        next(iter_record_samples(data, moved, origin))
    assert str(err.value) == (
        f"Sample k0 in {origin}: its .json says source 'v0', the manifest's index says 'w0': the shard or the "
        f"manifest was changed. {fix}"
    )
    with pytest.raises(CacheError) as err:
        next(iter_record_samples(data, dataclasses.replace(record, layouts={"other": LAYOUT}), origin))
    assert str(err.value) == (
        f"Sample k0 in {origin}: its bucket {BUCKET} has no layout in the manifest's record of the shard. {fix}"
    )


def test_read_shard_passes_on_excluded_and_layouts_and_names_the_shard(tmp_path: Path):
    from cogvx.shards import read_shard

    record = written_cache(tmp_path, samples=2).shards[0]
    record.excluded = ["k0"]
    assert [s.key for s in read_shard(tmp_path, record)] == ["k1"]
    assert [s.key for s in read_shard(tmp_path, record, include_excluded=True)] == ["k0", "k1"]
    other = {"moments": {"dtype": "float32", "shape": [2, 1, 2, 2]}}
    with pytest.raises(CacheError) as err:
        list(read_shard(tmp_path, record, layouts={BUCKET: other}))
    assert str(err.value) == (
        f"Sample k1 in {tmp_path / record.name} holds {describe_layout(LAYOUT)}, but bucket {BUCKET} is "
        f"{describe_layout(other)}; training cannot batch it. The shard is unusable; run `cogvx shards verify "
        f"{tmp_path}` for how to repair it."
    )
