"""The cache format: nothing in a shard is ever unpickled, and changed shards are refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_tensors

from cogvx.shards import CacheError, Manifest, Sample, SampleEntry, ShardRecord, ShardWriter, read_shard, verify
from cogvx.train.data import ShardStream


class _Exploit:
    """Unpickling this writes a marker file: if the marker appears, something unpickled shard data."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled!"))


def _tar(members: list[tuple[str, bytes]], path: Path) -> ShardRecord:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    return ShardRecord(path.name, 1, len(data), hashlib.sha256(data).hexdigest(), [SampleEntry("k", "s", "h", "b")])


META = json.dumps({"bucket": "b", "source": "s", "content_hash": "h"}).encode()  # agrees with _tar's index


def _manifest(folder: Path, records: list[ShardRecord]) -> Manifest:
    manifest = Manifest(producer={"model": "test"}, params={}, schema={}, shards=records)
    manifest.save(folder)
    return manifest


@pytest.mark.parametrize("ext", ["pth", "pyd", "pickle", "pkl", "npy", "bin", "cls"])
def test_pickle_payload_under_any_extension_is_never_executed(tmp_path: Path, ext: str):
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Exploit(marker))
    tensors = save_tensors({"moments": torch.zeros(2, 1, 1, 1), "prompt_embeds": torch.zeros(2, 2)})
    record = _tar([("k.safetensors", tensors), ("k.json", META), (f"k.{ext}", payload)], tmp_path / "s.tar")
    _manifest(tmp_path, [record])

    samples = list(read_shard(tmp_path, record))
    assert samples[0].extras == {ext: payload}, "unknown members must stay raw bytes"
    batch = next(iter(ShardStream(tmp_path, [record], batch_size=1, seed=0)))
    assert batch["keys"] == ["k"]
    assert not marker.exists()


@pytest.mark.parametrize("member", ["safetensors", "json"])
def test_pickle_disguised_as_tensors_or_metadata_is_refused_not_run(tmp_path: Path, member: str):
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Exploit(marker))
    good = {"safetensors": save_tensors({"moments": torch.zeros(1)}), "json": META}
    good[member] = payload
    record = _tar([(f"k.{name}", data) for name, data in good.items()], tmp_path / "s.tar")
    with pytest.raises(CacheError, match="cannot be parsed"):
        list(read_shard(tmp_path, record))
    assert not marker.exists()


BUCKET = "1x16x16"


def _sample(i: int) -> tuple[Sample, SampleEntry]:
    tensors = {"moments": torch.full((2, 1, 2, 2), float(i)), "prompt_embeds": torch.arange(12.0).reshape(3, 4) + i}
    entry = SampleEntry(f"k{i}", f"v{i}", f"h{i}", BUCKET, size=100 + i, mtime_ns=10**18 + i, caption_hash=f"c{i}")
    return Sample(f"k{i}", tensors, {"bucket": BUCKET, "i": i}, {"jpg": bytes([i]) * 3}), entry


def _written_cache(folder: Path, samples: int = 3, header: dict | None = None) -> Manifest:
    records: list[ShardRecord] = []
    writer = ShardWriter(folder, "shard-r00", records.append, max_samples=2, header=header)
    for i in range(samples):
        writer.write(*_sample(i))
    writer.flush()
    return _manifest(folder, records)


LAYOUT = {
    "moments": {"dtype": "float32", "shape": [2, 1, 2, 2]},
    "prompt_embeds": {"dtype": "float32", "shape": [3, 4]},
}


def test_round_trip_and_atomic_names(tmp_path: Path):
    manifest = _written_cache(tmp_path)
    assert [r.sample_count for r in manifest.shards] == [2, 1]
    assert not list(tmp_path.glob("*.tmp")), "temporary shard names must be gone after a flush"
    loaded = Manifest.load(tmp_path)
    for record in loaded.shards:  # the record describes the file exactly
        data = (tmp_path / record.name).read_bytes()
        assert (record.bytes, record.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert record.layouts == {BUCKET: LAYOUT}
    assert [e for r in loaded.shards for e in r.samples] == [_sample(i)[1] for i in range(3)]
    samples = [s for r in loaded.shards for s in read_shard(tmp_path, r)]
    for i, sample in enumerate(samples):  # tensors, metadata and extras come back exactly as written
        written, entry = _sample(i)
        assert sample.key == written.key and sample.extras == written.extras
        assert sample.tensors.keys() == written.tensors.keys()
        for name, tensor in written.tensors.items():
            assert torch.equal(sample.tensors[name], tensor) and sample.tensors[name].dtype == tensor.dtype
        # The writer adds the index line (top-level fields training reads, and all of it under "index").
        index = {"source": entry.source, "content_hash": entry.content_hash, "bucket": BUCKET, "size": entry.size,
                 "mtime_ns": entry.mtime_ns, "caption_hash": entry.caption_hash}  # fmt: skip
        assert sample.meta == {"bucket": BUCKET, "i": i, "source": entry.source,
                               "content_hash": entry.content_hash, "index": index}  # fmt: skip
    assert verify(tmp_path, loaded.shards) == []


def test_shards_are_plain_pax_tars_that_webdataset_reads_without_seeing_the_header(tmp_path: Path):
    import webdataset as wds

    header = {"producer": {"model": "m"}, "params": {"fps": 8}, "schema": {}}
    manifest = _written_cache(tmp_path, header=header)
    path = tmp_path / manifest.shards[0].name
    with tarfile.open(path, "r:") as tar:  # plain, uncompressed
        assert json.loads(tar.pax_headers["cogvx.header"]) == header
        assert [m.name for m in tar.getmembers()] == [
            f"k{i}.{ext}" for i in (0, 1) for ext in ("safetensors", "json", "jpg")
        ]
        # Only the global header (tarfile shows it on the first member): no per-member pax headers.
        assert all(m.isreg() and set(m.pax_headers) <= {"cogvx.header", "cogvx.opened"} for m in tar.getmembers())
    keys = [sample["__key__"] for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)]
    assert keys == ["k0", "k1"]


def test_a_changed_shard_is_refused_with_its_name(tmp_path: Path):
    manifest = _written_cache(tmp_path)
    target = tmp_path / manifest.shards[0].name
    data = bytearray(target.read_bytes())
    data[700] ^= 0xFF  # same size, different bytes
    target.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{target.name}.*does not match the manifest"):
        list(read_shard(tmp_path, manifest.shards[0]))
    with pytest.raises(CacheError, match="does not match the manifest"):
        next(iter(ShardStream(tmp_path, manifest.shards[:1], batch_size=1, seed=0)))
    problems = verify(tmp_path, manifest.shards)
    assert len(problems) == 1 and target.name in problems[0]


def test_missing_shard_and_bad_manifest_give_clear_errors(tmp_path: Path):
    manifest = _written_cache(tmp_path)
    os.remove(tmp_path / manifest.shards[1].name)
    with pytest.raises(CacheError, match="missing"):
        list(read_shard(tmp_path, manifest.shards[1]))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        Manifest.load(tmp_path)
    with pytest.raises(CacheError, match="cogvx preprocess"):
        Manifest.load(tmp_path / "nowhere")


def test_abandoned_shard_is_never_published(tmp_path: Path):
    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "shard-r00", records.append, max_samples=10)
    writer.write(Sample("k0", {"moments": torch.zeros(1)}, {"bucket": "b"}), SampleEntry("k0", "v", "h", "b"))
    assert list(tmp_path.glob("*.tar.tmp")) and not list(tmp_path.glob("*.tar"))
    writer.abandon()
    assert records == [] and not list(tmp_path.iterdir())


def test_the_exploit_payload_is_live(tmp_path: Path):
    """Guards the tests above: unpickling the payload really does write the marker."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Exploit(marker)))
    assert marker.read_text() == "unpickled!"


def test_excluded_samples_are_not_served_and_old_manifests_still_load(tmp_path: Path):
    from cogvx.shards import iter_raw_samples, iter_record_samples

    manifest = _written_cache(tmp_path)
    first = manifest.shards[0]
    replacement = ShardRecord("r.tar", 1, 1, "x", [SampleEntry("k9", "v0", "h2", BUCKET)])
    manifest.add_shard(replacement)  # a newer sample of source v0 replaces k0
    assert first.excluded == ["k0"] and manifest.sample_count == 3 - 1 + 1
    manifest.shards.pop()  # keep only real shards on disk for reading
    manifest.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded.shards[0].excluded == ["k0"] and loaded.bucket_counts() == {BUCKET: 2}
    assert [s.key for s in read_shard(tmp_path, loaded.shards[0])] == ["k1"]
    data = (tmp_path / first.name).read_bytes()
    assert [r["__key__"] for r in iter_raw_samples(data, "x", exclude=["k0"])] == ["k1"]
    assert [r["__key__"] for r in iter_record_samples(data, loaded.shards[0], "x")] == ["k1"]
    assert verify(tmp_path, loaded.shards) == []
    # A manifest written before exclusions (and stat fields) existed reads as "nothing excluded".
    raw = json.loads((tmp_path / "manifest.json").read_text())
    for shard in raw["shards"]:
        del shard["excluded"]
        for sample in shard["samples"]:
            for key in ("size", "mtime_ns", "caption_hash"):
                del sample[key]
        del shard["layouts"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    old = Manifest.load(tmp_path)
    assert old.sample_count == 3 and old.layouts() == {} and old.shards[0].excluded == []
    assert old.shards[0].samples[0] == SampleEntry("k0", "v0", "h0", BUCKET)
