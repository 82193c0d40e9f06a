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
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_tensors

from cogvx.shards import (
    CacheError,
    Manifest,
    Sample,
    SampleEntry,
    ShardRecord,
    ShardWriter,
    decode_sample,
    read_shard,
    verify,
)
from cogvx.train.data import ShardStream
from tests.conftest import property_examples
from tests.helpers.shardcache import (
    BUCKET,
    LAYOUT,
    manifest_of,
    refusal_without_blocking,
    sample_and_entry,
    written_cache,
)


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


@pytest.mark.parametrize("ext", ["pth", "pyd", "pickle", "pkl", "npy", "bin", "cls"])
def test_pickle_payload_under_any_extension_is_never_executed(tmp_path: Path, ext: str):
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Exploit(marker))
    tensors = save_tensors({"moments": torch.zeros(2, 1, 1, 1), "prompt_embeds": torch.zeros(2, 2)})
    record = _tar([("k.safetensors", tensors), ("k.json", META), (f"k.{ext}", payload)], tmp_path / "s.tar")
    manifest_of(tmp_path, [record])

    samples = list(read_shard(tmp_path, record))
    assert samples[0].extras == {ext: payload}, "unknown members must stay raw bytes"
    batch = next(iter(ShardStream(tmp_path, [record], batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=64)))
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


def test_round_trip_and_atomic_names(tmp_path: Path):
    manifest = written_cache(tmp_path)
    assert [r.sample_count for r in manifest.shards] == [2, 1]
    assert not list(tmp_path.glob("*.tmp")), "temporary shard names must be gone after a flush"
    loaded = Manifest.load(tmp_path)
    for record in loaded.shards:  # the record describes the file exactly
        data = (tmp_path / record.name).read_bytes()
        assert (record.bytes, record.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert record.layouts == {BUCKET: LAYOUT}
    assert [e for r in loaded.shards for e in r.samples] == [sample_and_entry(i)[1] for i in range(3)]
    samples = [s for r in loaded.shards for s in read_shard(tmp_path, r)]
    for i, sample in enumerate(samples):  # tensors, metadata and extras come back exactly as written
        written, entry = sample_and_entry(i)
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
    manifest = written_cache(tmp_path, header=header)
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
    manifest = written_cache(tmp_path)
    target = tmp_path / manifest.shards[0].name
    data = bytearray(target.read_bytes())
    data[700] ^= 0xFF  # same size, different bytes
    target.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{target.name}.*does not match the manifest"):
        list(read_shard(tmp_path, manifest.shards[0]))
    with pytest.raises(CacheError, match="does not match the manifest"):
        next(iter(ShardStream(tmp_path, manifest.shards[:1], batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=64)))
    problems = verify(tmp_path, manifest.shards)
    assert len(problems) == 1 and target.name in problems[0]


def test_missing_shard_and_bad_manifest_give_clear_errors(tmp_path: Path):
    manifest = written_cache(tmp_path)
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

    manifest = written_cache(tmp_path)
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


# --- hostile input: every failure is a CacheError (one line, naming the file), never another exception ---


@settings(max_examples=property_examples(15))
@given(data=st.data())
def test_any_corruption_of_a_shard_is_a_cache_error_or_reads_the_same(tmp_path_factory, data):
    """Flipped, cut or inserted bytes anywhere in a shard: the reader raises CacheError or yields samples
    (it never crashes with another exception, never hangs, never reads past the file)."""
    from cogvx.shards import iter_record_samples

    folder = tmp_path_factory.mktemp("fuzz")
    record = written_cache(folder, samples=2).shards[0]
    shard = (folder / record.name).read_bytes()
    position = data.draw(st.integers(0, len(shard) - 1))
    kind = data.draw(st.sampled_from(["flip", "cut", "insert", "zero-block"]))
    if kind == "flip":
        shard = shard[:position] + bytes([shard[position] ^ data.draw(st.integers(1, 255))]) + shard[position + 1 :]
    elif kind == "cut":
        shard = shard[:position]
    elif kind == "insert":
        shard = shard[:position] + data.draw(st.binary(min_size=1, max_size=600)) + shard[position:]
    else:
        start = position // 512 * 512
        shard = shard[:start] + bytes(512) + shard[start + 512 :]
    try:
        for raw in iter_record_samples(shard, record, str(folder / record.name)):
            decode_sample(raw, raw["__url__"])
    except CacheError as err:
        assert record.name in str(err) and "\n" not in str(err)


@settings(max_examples=property_examples(15))
@given(data=st.data())
def test_any_mistyped_manifest_field_is_a_cache_error_naming_the_manifest(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("manifest")
    raw = written_cache(folder).to_dict()
    # Pick any field, at any depth, and give it a value of another JSON type.
    target, path = raw, []
    while isinstance(target, dict | list) and target and (not path or data.draw(st.booleans())):
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        key = data.draw(st.sampled_from(keys))
        parent, target = target, target[key]
        path.append(key)
    json_values = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=5),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )
    parent[path[-1]] = data.draw(json_values)
    (folder / "manifest.json").write_text(json.dumps(raw))
    try:
        Manifest.load(folder)
    except CacheError as err:
        assert str(folder / "manifest.json") in str(err)


@pytest.mark.parametrize("version", [1.0, True, "1", 2, None])
def test_the_version_must_be_the_integer_1(tmp_path: Path, version):
    raw = written_cache(tmp_path).to_dict()
    raw["version"] = version
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CacheError, match=f"version {version!r}, this cogvx reads version 1"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("name", ["../x.tar", "/etc/passwd", "a/b.tar", "..", ".hidden.tar", "", "a\\b.tar", "x\0.tar"])
def test_shard_names_must_be_plain_file_names(tmp_path: Path, name: str):
    raw = written_cache(tmp_path).to_dict()
    raw["shards"][0]["name"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CacheError) as err:
        Manifest.load(tmp_path)
    assert str(tmp_path / "manifest.json") in str(err.value) and repr(name) in str(err.value)


def test_fifo_and_device_shards_are_refused_without_reading(tmp_path: Path):
    manifest = written_cache(tmp_path)
    record = manifest.shards[0]
    (tmp_path / record.name).unlink()
    os.mkfifo(tmp_path / record.name)  # nobody writes: a plain open() would block forever
    err = refusal_without_blocking(tmp_path / record.name, lambda: list(read_shard(tmp_path, record)))
    assert isinstance(err, CacheError) and f"{record.name} is not a regular file" in str(err)
    (tmp_path / record.name).unlink()
    (tmp_path / record.name).symlink_to("/dev/zero")
    problems = verify(tmp_path, [record])
    assert len(problems) == 1 and f"{record.name} is not a regular file" in problems[0]


def test_member_sizes_are_bounded_by_the_layout_and_the_file(tmp_path: Path):
    from cogvx.shards.manifest import layout_bytes
    from cogvx.shards.tar import TENSOR_HEADER_ALLOWANCE, MemberLimits

    manifest = written_cache(tmp_path)
    record = manifest.shards[0]
    assert MemberLimits.for_layouts(record.layouts).tensors == layout_bytes(LAYOUT) + TENSOR_HEADER_ALLOWANCE
    assert layout_bytes(LAYOUT) == (2 * 1 * 2 * 2 + 3 * 4) * 4
    # A safetensors member larger than its bucket's layout allows is refused before it is read.
    big = save_tensors({"moments": torch.zeros(2, 1, 2, 2), "pad": torch.zeros(TENSOR_HEADER_ALLOWANCE // 4 + 64)})
    meta = json.dumps({"bucket": BUCKET, "source": "s", "content_hash": "h"}).encode()
    bomb = _tar([("k.safetensors", big), ("k.json", meta)], tmp_path / "big.tar")
    bomb.layouts, bomb.samples = record.layouts, [SampleEntry("k", "s", "h", BUCKET)]
    with pytest.raises(CacheError, match="over the .*-byte limit for its kind"):
        list(read_shard(tmp_path, bomb))
    # A member claiming more bytes than the file holds is refused without allocating them.
    header = tarfile.TarInfo("k.json")
    header.size = 3 << 30
    path = tmp_path / "claims.tar"
    path.write_bytes(header.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
    with pytest.raises(CacheError, match="more than the file holds"):
        list(iter_raw_samples_of(path))


def iter_raw_samples_of(path: Path):
    from cogvx.shards import iter_raw_samples
    from cogvx.shards.tar import MemberLimits

    with open(path, "rb") as f:
        yield from iter_raw_samples(f, str(path), limits=MemberLimits(meta=4 << 30))


# --- samples training cannot use ---


def test_writer_records_layouts_and_refuses_what_readers_would(tmp_path: Path):
    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append)
    sample, entry = sample_and_entry(0)
    with pytest.raises(ValueError, match="index line of k9"):
        writer.write(sample, SampleEntry("k9", "v", "h", BUCKET))
    with pytest.raises(ValueError, match="says bucket '1x16x16', its index line 'other'"):
        writer.write(sample, SampleEntry("k0", "v", "h", "other"))
    writer.write(sample, entry)
    wide = Sample("k1", {**sample.tensors, "moments": torch.zeros(4, 1, 2, 2)}, {}, {})
    with pytest.raises(ValueError, match="bucket 1x16x16 holds moments float32 \\[4, 1, 2, 2\\]"):
        writer.write(wide, SampleEntry("k1", "v1", "h", BUCKET))
    writer.write(Sample("k2", {"x": torch.ones(1, dtype=torch.int8)}, {}, {}), SampleEntry("k2", "v2", "h", "b2"))
    writer.flush()
    assert [e.key for e in records[0].samples] == ["k0", "k2"]
    assert records[0].layouts == {BUCKET: LAYOUT, "b2": {"x": {"dtype": "int8", "shape": [1]}}}
    # A shard laid out differently from the cache cannot join its manifest.
    manifest = manifest_of(tmp_path, records)
    other = ShardRecord("o.tar", 1, 1, "0" * 64, [], layouts={"b2": {"x": {"dtype": "int16", "shape": [1]}}})
    with pytest.raises(CacheError, match="o.tar stores bucket b2 as x int16 \\[1\\]"):
        manifest.add_shard(other)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.tensors.update(moments=torch.zeros(2, 1, 2, 3)), "moments float32 \\[2, 1, 2, 3\\]"),
        (lambda s: s.tensors.update(moments=torch.zeros(2, 1, 2, 2, dtype=torch.float16)), "moments float16"),
        (lambda s: s.tensors.pop("prompt_embeds"), "holds moments float32 \\[2, 1, 2, 2\\], but bucket"),
        (lambda s: s.tensors["moments"].view(-1).__setitem__(3, float("nan")), "tensor moments holds NaN or Inf"),
        (lambda s: s.tensors["prompt_embeds"].view(-1).__setitem__(0, float("-inf")), "prompt_embeds holds NaN"),
        (lambda s: s.meta.update(bucket="9x9x9"), "says bucket '9x9x9', the manifest's index says '1x16x16'"),
        (lambda s: s.meta.update(source="other.mp4"), "says source 'other.mp4'"),
        (lambda s: s.meta["index"].update(size=1), "says index"),
        (lambda s: s.meta.pop("bucket"), "its .json has no bucket"),
    ],
)
def test_check_sample_names_what_is_wrong(change, message):
    from cogvx.shards import check_sample
    from cogvx.shards.codec import with_index as _with_index

    sample, entry = sample_and_entry(0)
    sample.meta = _with_index(sample, entry)
    check_sample(sample, entry, LAYOUT, "/c/s.tar")  # as written: fine
    change(sample)
    with pytest.raises(CacheError, match=message) as err:
        check_sample(sample, entry, LAYOUT, "/c/s.tar")
    assert str(err.value).startswith("Sample k0 in /c/s.tar") and "cogvx shards verify /c" in str(err.value)


def test_huge_finite_values_are_not_mistaken_for_inf():
    from cogvx.shards import check_sample

    sample, entry = sample_and_entry(0)
    sample.tensors["moments"] = torch.full((2, 1, 2, 2), 3e38)  # the float32 sum overflows; no element does
    sample.meta.update(source=entry.source, content_hash=entry.content_hash)
    check_sample(sample, entry, LAYOUT, "s.tar")


def test_a_cache_without_recorded_layouts_checks_that_a_bucket_agrees_with_itself(tmp_path: Path):
    manifest = written_cache(tmp_path, samples=2)
    record = manifest.shards[0]
    # An older cache: no layouts in the manifest; the second sample's moments are wider than the first's.
    tensors = [{"moments": torch.zeros(2, 1, 2, 2), "prompt_embeds": torch.zeros(3, 4)},
               {"moments": torch.zeros(4, 1, 2, 2), "prompt_embeds": torch.zeros(3, 4)}]  # fmt: skip
    members = []
    for i, t in enumerate(tensors):
        meta = {"bucket": BUCKET, "source": f"v{i}", "content_hash": f"h{i}"}
        members += [(f"k{i}.safetensors", save_tensors(t)), (f"k{i}.json", json.dumps(meta).encode())]
    old = _tar(members, tmp_path / record.name)
    old.sample_count, old.samples = 2, [SampleEntry(f"k{i}", f"v{i}", f"h{i}", BUCKET) for i in range(2)]
    with pytest.raises(CacheError, match="Sample k1 .* holds moments float32 \\[4, 1, 2, 2\\]"):
        list(read_shard(tmp_path, old))
    problems = verify(tmp_path, [old])
    assert len(problems) == 1 and "Sample k1" in problems[0]
    stream = ShardStream(tmp_path, [old], batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=1)
    with pytest.raises(CacheError, match="holds moments float32 \\[4, 1, 2, 2\\]"):
        for _ in zip(range(10), stream, strict=False):
            pass


# --- rebuilding a lost manifest ---


def test_index_shard_rebuilds_the_writers_record_and_checks_the_header(tmp_path: Path):
    from cogvx.shards import index_shard

    header = {"producer": {"model": "m"}, "params": {"fps": 8.0}, "schema": {"moments": "…"}}
    manifest = written_cache(tmp_path, header=header)
    for record in manifest.shards:
        assert index_shard(tmp_path, record.name) == record
        assert index_shard(tmp_path, record.name, header=header) == record
    with pytest.raises(CacheError, match="written with other settings"):
        index_shard(tmp_path, manifest.shards[0].name, header={**header, "params": {"fps": 4.0}})
    data = bytearray((tmp_path / manifest.shards[0].name).read_bytes())
    data[-3000] ^= 0xFF  # inside the last sample's tensors
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    with pytest.raises(CacheError, match="bad.tar"):
        index_shard(tmp_path, "bad.tar")


def test_a_member_twice_and_too_many_members_are_refused(tmp_path: Path):
    from cogvx.shards import iter_raw_samples

    twice = _tar([("k.json", META), ("k.json", META)], tmp_path / "twice.tar")
    with pytest.raises(CacheError, match="twice.tar holds member k.json twice"):
        list(iter_raw_samples((tmp_path / twice.name).read_bytes(), str(tmp_path / twice.name)))
    many = _tar([(f"k.x{i}", b"") for i in range(65)], tmp_path / "many.tar")
    with pytest.raises(CacheError, match="more than 64 members for sample k"):
        list(iter_raw_samples((tmp_path / many.name).read_bytes(), str(tmp_path / many.name)))


def test_rebuild_lists_side_files_of_the_header_only_when_they_match(tmp_path: Path):
    from cogvx.shards import rebuild_manifest

    side = tmp_path / "validation_prompts.safetensors"
    side.write_bytes(b"prompts")
    extras = {
        "validation": {"file": side.name, "sha256": hashlib.sha256(b"prompts").hexdigest(), "prompts": ["a"]},
        "changed": {"file": side.name, "sha256": "0" * 64},
        "gone": {"file": "gone.safetensors", "sha256": "0" * 64},
    }
    header = {"producer": {"model": "m"}, "params": {}, "schema": {}, "extras": extras}
    written = written_cache(tmp_path, header=header)
    (tmp_path / "manifest.json").unlink()
    result = rebuild_manifest(tmp_path)
    assert result.manifest.extras == {"validation": extras["validation"]}
    assert sorted(result.dropped_extras) == ["changed", "gone"]
    assert result.manifest.shards == written.shards and result.manifest.producer == {"model": "m"}


def test_contact_sheet_refuses_a_huge_strip_before_decoding_it(tmp_path: Path):
    from PIL import Image

    from cogvx.shards.tools import write_contact_sheet

    strip = io.BytesIO()
    Image.new("L", (65_000, 300)).save(strip, "JPEG")  # 19.5 Mpixels, a few hundred KB on disk
    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append)
    sample, entry = sample_and_entry(0)
    writer.write(Sample(sample.key, sample.tensors, sample.meta, {"jpg": strip.getvalue()}), entry)
    writer.flush()
    manifest = manifest_of(tmp_path, records)
    with pytest.raises(CacheError, match="has a 65000x300 frame strip"):
        write_contact_sheet(tmp_path, manifest, tmp_path / "sheet.png", max_strips=64)


def test_deeply_nested_json_is_a_cache_error(tmp_path: Path):
    deep = b"[" * 200_000  # json.loads raises RecursionError, not ValueError, on this
    record = _tar([("k.safetensors", save_tensors({"x": torch.zeros(1)})), ("k.json", deep)], tmp_path / "s.tar")
    with pytest.raises(CacheError, match="its .json cannot be parsed"):
        list(read_shard(tmp_path, record))
    assert any("its .json cannot be parsed" in problem for problem in verify(tmp_path, [record]))
    (tmp_path / "manifest.json").write_bytes(deep)
    with pytest.raises(CacheError, match="is not valid JSON"):
        Manifest.load(tmp_path)
