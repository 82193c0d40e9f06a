"""``cogvx.shards.writer``: shards capped by bytes and samples, published whole, never over an existing name.

Each test pins a value docs/cache-format.md states (a limit, a count, a file name, a message that names
the file and the fix), so a changed comparison, constant or string in the module fails here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cogvx.shards import CacheError, Sample, SampleEntry, ShardRecord
from tests.helpers.shardcache import (
    BUCKET,
    refusal_without_blocking,
    sample_and_entry,
)


def _one_sample_bytes() -> int:
    """What the writer counts for one ``_sample`` (each member's bytes plus 1024 for its headers)."""
    from cogvx.shards.codec import encode_sample
    from cogvx.shards.codec import with_index as _with_index

    sample, entry = sample_and_entry(0)
    members = encode_sample(type(sample)(sample.key, sample.tensors, _with_index(sample, entry), sample.extras))
    return sum(len(data) + 1024 for _, data in members)


@pytest.mark.parametrize("extra, per_shard", [(0, [1, 1]), (1, [2])])
def test_a_shard_is_finished_when_it_reaches_max_bytes(tmp_path: Path, extra: int, per_shard: list[int]):
    from cogvx.shards import ShardWriter

    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append, max_bytes=_one_sample_bytes() + extra)
    for i in range(2):
        writer.write(*sample_and_entry(i))
    writer.flush()
    writer.flush()  # nothing open: nothing more
    assert [r.sample_count for r in records] == per_shard


def test_the_writer_never_takes_an_existing_name_and_resets_after_abandon(tmp_path: Path):
    import tarfile

    from cogvx.shards import ShardWriter
    from cogvx.shards.codec import HEADER_KEY, OPENED_KEY
    from cogvx.shards.shardfile import file_sha256

    (tmp_path / "s-000003.tar").write_bytes(b"someone's")
    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append, max_samples=2, first_index=3)
    writer.write(*sample_and_entry(0))
    writer.abandon()
    writer.abandon()  # nothing open: nothing to do
    other = Sample("k9", {"x": torch.ones(2, dtype=torch.int16)}, {}, {})
    writer.write(other, SampleEntry("k9", "v9", "h9", "b9"))
    writer.write(*sample_and_entry(1))
    assert [r.name for r in records] == ["s-000004.tar"]
    (record,) = records
    assert [e.key for e in record.samples] == ["k9", "k1"] and sorted(record.layouts) == [BUCKET, "b9"]
    path = tmp_path / record.name
    assert (record.bytes, record.sha256) == (path.stat().st_size, file_sha256(path))
    with tarfile.open(path) as tar:
        assert HEADER_KEY not in tar.pax_headers and int(tar.pax_headers[OPENED_KEY]) > 1.7e18
        members = tar.getmembers()
    assert {(m.mode, type(m.mtime)) for m in members} == {(0o644, int)}
    assert writer.index == 5 and sorted(p.name for p in tmp_path.iterdir()) == ["s-000003.tar", "s-000004.tar"]


def test_metadata_that_contradicts_its_index_line_is_refused_by_the_writer():
    from cogvx.shards.codec import with_index as _with_index

    sample, entry = sample_and_entry(0)
    sample.meta["content_hash"] = "other"
    with pytest.raises(ValueError) as err:
        _with_index(sample, entry)
    assert str(err.value) == "Sample k0: its metadata says content_hash 'other', its index line 'h0'."


def test_abandon_tolerates_a_vanished_temporary_and_counts_bytes_from_zero_again(tmp_path: Path):
    from cogvx.shards import ShardWriter

    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append, max_bytes=_one_sample_bytes() + 1)
    writer.write(*sample_and_entry(0))
    (tmp_path / "s-000000.tar.tmp").unlink()  # e.g. removed by a cleanup after a failure
    writer.abandon()
    writer.write(*sample_and_entry(1))
    assert records == [], "one sample after an abandon is still under max_bytes"
    writer.write(*sample_and_entry(2))
    assert [[e.key for e in r.samples] for r in records] == [["k1", "k2"]]


def test_last_io_survivors(tmp_path: Path):
    import hashlib

    from cogvx.shards import ShardWriter, check_sample
    from cogvx.shards.shardfile import check_shard, file_sha256

    data = bytes(range(256)) * (((1 << 22) + 300) // 256)
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f", (1 << 22) + 1) == hashlib.sha256(data[: (1 << 22) + 1]).hexdigest()
    os.mkfifo(tmp_path / "p.tar")
    err = refusal_without_blocking(
        tmp_path / "p.tar", lambda: check_shard(tmp_path, ShardRecord("p.tar", 0, 0, "0" * 64))
    )
    assert str(err).startswith(f"Shard {tmp_path / 'p.tar'} is not a regular file")
    bare = Sample("k", {}, {"bucket": "b"})
    with pytest.raises(CacheError, match="^Sample k in o holds no tensors, but bucket b is x int8 \\[1\\]; training"):
        check_sample(bare, None, {"x": {"dtype": "int8", "shape": [1]}}, "o")
    with pytest.raises(CacheError, match="^Sample k in o holds x int8 \\[1\\], but bucket b is empty; training"):
        check_sample(Sample("k", {"x": torch.ones(1, dtype=torch.int8)}, {"bucket": "b"}), None, {}, "o")
    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path / "a" / "b", "s", records.append, max_bytes=_one_sample_bytes() + 1)
    for i in range(3):  # two samples reach max_bytes; the third starts again from zero
        writer.write(*sample_and_entry(i))
    assert [[e.key for e in r.samples] for r in records] == [["k0", "k1"]]
