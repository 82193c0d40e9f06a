"""``cogvx.shards.rebuild``: a shard's record rebuilt from the shard alone, or a refusal naming it.

Each test pins a value docs/cache-format.md states (a limit, a count, a file name, a message that names
the file and the fix), so a changed comparison, constant or string in the module fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cogvx.shards import CacheError, Sample, ShardRecord
from tests.helpers.shardcache import (
    sample_and_entry,
    tar_bytes,
    written_cache,
)


def test_read_indexed_shard_rebuilds_the_record_and_refuses_what_it_cannot_use(tmp_path: Path):
    from cogvx.shards.rebuild import index_shard, read_indexed_shard

    manifest = written_cache(tmp_path, samples=2)
    record = manifest.shards[0]
    indexed = read_indexed_shard(tmp_path, record.name)
    assert indexed.record == record and indexed.header is None and indexed.opened > 1.7e18
    # Bytes after the tar's end marker are part of the file, so of its sha256.
    with open(tmp_path / record.name, "ab") as f:
        f.write(b"trailing" * 100_000)
    again = read_indexed_shard(tmp_path, record.name).record
    assert again.bytes == record.bytes + 800_000
    assert again.sha256 == __import__("hashlib").sha256((tmp_path / record.name).read_bytes()).hexdigest()
    with pytest.raises(CacheError) as err:
        index_shard(tmp_path, record.name, header={"a": 1})
    assert str(err.value) == (
        f"Shard {tmp_path / record.name} was written with other settings than this run's (none recorded); it "
        "cannot join this cache."
    )
    with pytest.raises(CacheError, match="Shard name '../x.tar' is not a plain file name inside"):
        read_indexed_shard(tmp_path, "../x.tar")
    for pax, message in [
        ({"cogvx.header": "[1]"}, "has a cogvx header that is a list, not an object."),
        ({"cogvx.header": "{"}, "has an unreadable cogvx header ("),
        ({"cogvx.opened": "soon"}, "has an unreadable cogvx header ("),
    ]:
        (tmp_path / "h.tar").write_bytes(tar_bytes([], pax=pax))
        with pytest.raises(CacheError) as err:
            read_indexed_shard(tmp_path, "h.tar")
        assert str(err.value).startswith(f"Shard {tmp_path / 'h.tar'} {message}")
    (tmp_path / "h.tar").write_bytes(tar_bytes([], pax={"cogvx.header": '{"b": 1, "a": 2}', "cogvx.opened": "12"}))
    assert read_indexed_shard(tmp_path, "h.tar").header == {"a": 2, "b": 1}
    assert read_indexed_shard(tmp_path, "h.tar").opened == 12
    assert index_shard(tmp_path, "h.tar", header={"a": 2, "b": 1}).sample_count == 0
    (tmp_path / "h.tar").write_bytes(tar_bytes([("k.safetensors", b""), ("k.json", b"{}")]))
    with pytest.raises(CacheError) as err:
        read_indexed_shard(tmp_path, "h.tar")
    assert "cannot be parsed" in str(err.value)


def test_empty_members_and_members_of_whole_blocks_are_read_through_the_hash(tmp_path: Path):
    from cogvx.shards import ShardWriter
    from cogvx.shards.rebuild import read_indexed_shard

    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append)
    sample, entry = sample_and_entry(0)
    writer.write(Sample("k0", sample.tensors, sample.meta, {"empty": b"", "block": bytes(512)}), entry)
    writer.flush()
    indexed = read_indexed_shard(tmp_path, records[0].name)
    assert indexed.record == records[0]


def test_index_shard_says_when_the_header_differs(tmp_path: Path):
    from cogvx.shards.rebuild import index_shard

    written_cache(tmp_path, samples=1, header={"b": 1, "a": {"d": 2, "c": 3}})
    assert index_shard(tmp_path, "shard-r00-000000.tar", header={"a": {"c": 3, "d": 2}, "b": 1}).sample_count == 1
    with pytest.raises(CacheError) as err:
        index_shard(tmp_path, "shard-r00-000000.tar", header={"a": 1})
    assert str(err.value) == (
        f"Shard {tmp_path / 'shard-r00-000000.tar'} was written with other settings than this run's (its header "
        "differs); it cannot join this cache."
    )


def test_read_indexed_shard_refusals_name_the_shard_and_say_to_move_it_out(tmp_path: Path):
    import tarfile

    from safetensors.torch import save

    from cogvx.shards.rebuild import read_indexed_shard

    path = tmp_path / "s.tar"
    fix = f"Move it out of {tmp_path} (a later `cogvx preprocess` re-encodes its clips)."
    blob = save({"x": torch.ones(2)})

    def refusal(members: list[tuple[str, bytes]]) -> str:
        path.write_bytes(tar_bytes(members))
        with pytest.raises(CacheError) as err:
            read_indexed_shard(tmp_path, "s.tar")
        return str(err.value)

    line = {"source": "y", "content_hash": "h", "bucket": "b"}
    meta = {"bucket": "b", "source": "x", "content_hash": "h", "index": line}
    assert refusal([("k.safetensors", blob), ("k.json", json.dumps(meta).encode())]) == (
        f"Sample k in {path}: its .json says source 'x', the manifest's index says 'y': the shard or the manifest "
        f"was changed. {fix}"
    )
    meta = {"bucket": "b", "index": {"source": "y", "bucket": "b"}}
    assert refusal([("k.safetensors", blob), ("k.json", json.dumps(meta).encode())]) == (
        f"Sample k: its .json index line has no content_hash. (shard {path}) {fix}"
    )
    meta = {"bucket": "b", "source": "y", "content_hash": "h"}
    wide = save({"x": torch.ones(3)})
    members = [("a.safetensors", blob), ("a.json", json.dumps(meta).encode())]
    assert refusal(members + [("c.safetensors", wide), ("c.json", json.dumps(meta).encode())]) == (
        f"Sample c in {path} holds x float32 [3], but bucket b is x float32 [2]; training cannot batch it. {fix}"
    )
    assert refusal([("k.safetensors", b"xx"), ("k.json", b"{}")]).startswith(f"Sample k in {path} cannot be parsed")
    assert refusal([("k.j/son", b"")]).endswith(f"this one was not written by cogvx or was changed. {fix}")
    header = tarfile.TarInfo("k.safetensors")  # no layout recorded here: only the file's size bounds it
    header.size = 3 << 30
    path.write_bytes(header.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
    with pytest.raises(CacheError, match="has a member 'k.safetensors' of 3221225472 bytes, more than the file holds"):
        read_indexed_shard(tmp_path, "s.tar")


def test_a_shard_without_an_opened_time_was_opened_at_0(tmp_path: Path):
    import io
    import tarfile

    from cogvx.shards.rebuild import read_indexed_shard

    record = written_cache(tmp_path, samples=2).shards[0]
    with (
        tarfile.open(tmp_path / record.name) as source,
        tarfile.open(tmp_path / "plain.tar", "w", format=tarfile.USTAR_FORMAT) as plain,
    ):  # the same members without the writer's pax global header
        for info in source.getmembers():
            plain.addfile(info, io.BytesIO(source.extractfile(info).read()))
    indexed = read_indexed_shard(tmp_path, "plain.tar")
    assert (indexed.opened, indexed.header, [e.key for e in indexed.record.samples]) == (0, None, ["k0", "k1"])
