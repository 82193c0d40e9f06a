"""``cogvx.shards.manifest``: the exact values the manifest promises (names, counts, refusals in full).

Each test pins a value docs/cache-format.md states (a limit, a count, a file name, a message that names
the file and the fix), so a changed comparison, constant or string in the module fails here.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from cogvx.files import write_json_atomic
from cogvx.shards import CacheError, Manifest, SampleEntry, ShardRecord
from cogvx.shards.manifest import describe_layout, is_plain_name, merge_layouts
from tests.helpers.shardcache import (
    BUCKET,
    LAYOUT,
    refusal_without_blocking,
    written_cache,
)


@pytest.mark.parametrize(
    "name, plain",
    [
        ("a", True),
        ("x" * 255, True),
        ("x" * 256, False),
        ("", False),
        (".", False),
        ("..", False),
        (".tar", False),
        ("a\tb.tar", False),
        ("a\\b", False),
        ("a/b", False),
        ("a\0b", False),
        (7, False),
    ],
)
def test_plain_names_are_1_to_255_printable_characters_without_folders(name, plain: bool):
    assert is_plain_name(name) is plain


def test_layouts_are_described_sorted_by_tensor_name_and_a_disagreement_names_both():
    assert describe_layout(LAYOUT) == "moments float32 [2, 1, 2, 2], prompt_embeds float32 [3, 4]"
    into = {BUCKET: LAYOUT}
    merge_layouts(into, {"b2": {"x": {"dtype": "int8", "shape": [1]}}}, "s.tar")  # a new bucket joins
    assert into == {BUCKET: LAYOUT, "b2": {"x": {"dtype": "int8", "shape": [1]}}}
    wide = {"moments": {"dtype": "float32", "shape": [4, 1, 2, 2]}}
    with pytest.raises(CacheError) as err:
        merge_layouts(into, {BUCKET: wide}, "o.tar")
    assert str(err.value) == (
        f"o.tar stores bucket {BUCKET} as moments float32 [4, 1, 2, 2], but other shards of the cache as "
        f"{describe_layout(LAYOUT)}; one cache holds one layout per bucket. Write it to a new folder."
    )


def _record(name: str, entries: list[SampleEntry], size: int = 10, excluded=()) -> ShardRecord:
    return ShardRecord(name, len(entries), size, "0" * 64, entries, list(excluded), {})


def test_counts_totals_and_replaced_samples():
    first = _record("a.tar", [SampleEntry("k0", "v0", "h", "b1"), SampleEntry("k1", "v1", "h", "b2")], size=100)
    second = _record("b.tar", [SampleEntry("k2", "v2", "h", "b1")], size=30)
    manifest = Manifest({"model": "m"}, {}, {}, [first, second])
    assert (manifest.sample_count, manifest.excluded_count, manifest.total_bytes) == (3, 0, 130)
    # A newer sample of v0 and of v2 replaces both older ones; listing it again changes nothing.
    newer = _record("c.tar", [SampleEntry("k3", "v0", "h2", "b2"), SampleEntry("k4", "v2", "h2", "b1")], size=7)
    manifest.add_shard(newer)
    manifest.add_shard(_record("c.tar", [SampleEntry("k5", "v1", "h3", "b1")]))
    assert first.excluded == ["k0"] and second.excluded == ["k2"] and len(manifest.shards) == 3
    manifest.add_shard(_record("d.tar", [SampleEntry("k6", "v0", "h4", "b2")]))  # k0 is not excluded twice
    assert first.excluded == ["k0"] and newer.excluded == ["k3"]
    assert (first.live_count, second.live_count, manifest.sample_count, manifest.excluded_count) == (1, 0, 3, 3)
    assert [e.key for e in manifest.live_entries()] == ["k1", "k4", "k6"]
    assert manifest.bucket_counts() == {"b1": 1, "b2": 2} and list(manifest.bucket_counts()) == ["b1", "b2"]
    totals = manifest.to_dict()["totals"]
    assert totals == {"shards": 4, "samples": 3, "excluded": 3, "bytes": 147, "buckets": {"b1": 1, "b2": 2}}


def test_the_manifest_file_is_indented_sorted_json_readable_by_everyone(tmp_path: Path):
    manifest = written_cache(tmp_path)
    path = tmp_path / "manifest.json"
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=1, sort_keys=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tar")) == ["manifest.json"]
    loaded = Manifest.load(tmp_path)
    assert loaded.updated >= loaded.created and isinstance(loaded.created, float)
    assert loaded.to_dict() == manifest.to_dict()
    # A failed write leaves the old file as it was and no temporary file behind.
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert path.read_text() == text and sorted(os.listdir(tmp_path)) == sorted(
        [r.name for r in manifest.shards] + ["manifest.json"]
    )
    write_json_atomic(tmp_path / "new" / "deeper" / "x.json", [1])  # creates its folders
    assert json.loads((tmp_path / "new" / "deeper" / "x.json").read_text()) == [1]


def _load_with(tmp_path: Path, change) -> CacheError:
    raw = written_cache(tmp_path).to_dict()
    change(raw)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CacheError) as err:
        Manifest.load(tmp_path)
    return err.value


def _sample0(raw: dict) -> dict:
    return raw["shards"][0]["samples"][0]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(format="other"), "is not a cogvx cache manifest (format is 'other')."),
        (lambda r: r.pop("format"), "is not a cogvx cache manifest (format is None)."),
        (lambda r: r["shards"].append(r["shards"][0]), "lists shard shard-r00-000000.tar more than once; rebuild it"),
        (lambda r: r["shards"][0].update(sha256="A" * 64), "has sha256 'AAAA"),
        (lambda r: r["shards"][0].update(sha256="0" * 63), "not 64 lowercase hex digits."),
        (
            lambda r: r["shards"][0].update(sample_count=-1),
            "shard 'shard-r00-000000.tar' has `sample_count` = -1, below 0.",
        ),
        (lambda r: r["shards"][0].update(bytes=-1), "has `bytes` = -1, below 0."),
        (lambda r: r["shards"][0].update(excluded=["k0", 3]), "has an `excluded` entry that is not a key string."),
        (lambda r: _sample0(r).update(key="a.b"), "has a sample key 'a.b' that is not [A-Za-z0-9_-]+."),
        (lambda r: _sample0(r).update(key="x" * 65), "that is not [A-Za-z0-9_-]+."),
        (
            lambda r: _sample0(r).update(size="1"),
            "sample k0 of shard 'shard-r00-000000.tar' has `size` = \"1\", not int.",
        ),
        (lambda r: _sample0(r).update(mtime_ns=True), "has `mtime_ns` = true, not int."),
        (lambda r: _sample0(r).update(caption_hash=1), "has `caption_hash` = 1, not str."),
        (lambda r: _sample0(r).pop("source"), "sample k0 of shard 'shard-r00-000000.tar' has no `source`."),
        (lambda r: _sample0(r).pop("content_hash"), "has no `content_hash`."),
        (lambda r: _sample0(r).pop("bucket"), "has no `bucket`."),
        (lambda r: r["shards"][0]["layouts"][BUCKET]["moments"].update(shape=[2, -1]), "the shape [2, -1]."),
        (lambda r: r["shards"][0]["layouts"][BUCKET]["moments"].update(shape=[2, 1.0]), "the shape [2, 1.0]."),
        (lambda r: r["shards"][0]["layouts"][BUCKET]["moments"].pop("dtype"), "has no `dtype`."),
        (lambda r: r["shards"][0]["layouts"][BUCKET]["moments"].update(dtype=3), "has `dtype` = 3, not str."),
        (
            lambda r: r["shards"][0]["layouts"].update(b=[]),
            "layout 'b' of shard 'shard-r00-000000.tar' is a list, not an object.",
        ),
        (lambda r: r["shards"][0].update(name=7), "a shard entry has `name` = 7, not str."),
        (lambda r: r.update(created=float("inf")), "the manifest has `created` = inf, not float."),
        (lambda r: r.update(updated="x" * 50), 'has `updated` = "' + "x" * 36 + "..., not float."),
        (lambda r: r.pop("producer"), "the manifest has no `producer`. The manifest is damaged."),
        (
            lambda r: r.update(extras={"v": {"file": "../x"}}),
            "names side file '../x' for 'v': side files must be plain",
        ),
    ],
)
def test_each_damaged_manifest_field_is_named_exactly(tmp_path: Path, change, message: str):
    err = _load_with(tmp_path, change)
    assert str(err).startswith(str(tmp_path / "manifest.json")) and message in str(err), str(err)
    assert "\n" not in str(err)


def test_a_valid_manifest_keeps_every_field_and_integer_times_read_as_floats(tmp_path: Path):
    raw = written_cache(tmp_path).to_dict()
    raw.update(created=5, updated=6, extras={"v": {"file": "p.safetensors", "n": 1}, "other": 3})
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    loaded = Manifest.load(tmp_path)
    assert (loaded.created, loaded.updated) == (5.0, 6.0) and type(loaded.created) is float
    assert loaded.extras == {"v": {"file": "p.safetensors", "n": 1}, "other": 3}
    assert loaded.producer == {"model": "test"} and loaded.params == {} and loaded.schema == {}
    assert loaded.shards[0].layouts == {BUCKET: LAYOUT} and loaded.shards[0].samples[0].size == 100


def test_a_folder_of_shards_without_a_manifest_says_how_many_and_how_to_rebuild(tmp_path: Path):
    written_cache(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CacheError) as err:
        Manifest.load(tmp_path)
    assert str(err.value) == (
        f"No manifest.json in {tmp_path}, but it holds 2 shard file(s): re-create the manifest from them with "
        f"`cogvx shards rebuild-manifest {tmp_path}`."
    )
    for path in tmp_path.glob("*.tar"):
        path.unlink()
    with pytest.raises(CacheError) as err:
        Manifest.load(tmp_path)
    assert str(err.value) == (
        f"No manifest.json in {tmp_path}: this is not a finished cogvx cache. "
        "Create one with `cogvx preprocess --data VIDEOS --output FOLDER`."
    )


def test_a_manifest_over_the_size_limit_is_refused(tmp_path: Path, monkeypatch):
    from cogvx.shards import manifest as module

    written_cache(tmp_path)
    size = (tmp_path / "manifest.json").stat().st_size
    monkeypatch.setattr(module, "MAX_MANIFEST_BYTES", size)  # exactly the limit: still read
    assert Manifest.load(tmp_path).sample_count == 3
    monkeypatch.setattr(module, "MAX_MANIFEST_BYTES", size - 1)
    with pytest.raises(CacheError, match="manifest.json is larger than 0 MiB; it is not a cogvx manifest."):
        Manifest.load(tmp_path)
    monkeypatch.setattr(module, "MAX_MANIFEST_BYTES", 1 << 30)
    assert module.MAX_MANIFEST_BYTES >> 20 == 1024


def test_a_manifest_that_cannot_be_opened_is_one_line(tmp_path: Path):
    written_cache(tmp_path)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(CacheError) as err:
        Manifest.load(tmp_path)
    assert str(err.value).startswith(f"The manifest {tmp_path / 'manifest.json'} ")
    os.rmdir(tmp_path / "manifest.json")
    os.mkfifo(tmp_path / "manifest.json")
    err = refusal_without_blocking(tmp_path / "manifest.json", lambda: Manifest.load(tmp_path))
    assert isinstance(err, CacheError) and str(err) == (
        f"The manifest {tmp_path / 'manifest.json'} is not a regular file (a device, FIFO or folder); "
        "cogvx reads only files."
    )


def test_layout_bytes_counts_each_dtypes_itemsize_and_refuses_an_unknown_dtype():
    from cogvx.shards.manifest import layout_bytes

    layout = {
        "a": {"dtype": "bfloat16", "shape": [3, 5]},
        "b": {"dtype": "float64", "shape": [2]},
        "c": {"dtype": "int8", "shape": []},
    }
    assert layout_bytes(layout) == 3 * 5 * 2 + 2 * 8 + 1
    assert layout_bytes({}) == 0
    for bad in ("nope", "Tensor"):  # not an attribute of torch / not a dtype
        with pytest.raises(CacheError) as err:
            layout_bytes({"a": {"dtype": bad, "shape": [1]}})
        assert str(err.value) == f"The manifest names an unknown tensor dtype {bad!r}."


def test_manifest_layouts_merge_across_shards_and_name_the_one_that_disagrees():
    one = ShardRecord("a.tar", 0, 0, "0" * 64, layouts={"b1": {"x": {"dtype": "int8", "shape": [1]}}})
    two = ShardRecord("b.tar", 0, 0, "0" * 64, layouts={"b1": {"x": {"dtype": "int8", "shape": [2]}}})
    three = ShardRecord("c.tar", 0, 0, "0" * 64, layouts={"b2": {"x": {"dtype": "int8", "shape": [0]}}})
    assert Manifest({}, {}, {}, [one, three]).layouts() == {**one.layouts, **three.layouts}
    with pytest.raises(CacheError, match="^b.tar stores bucket b1 as x int8 \\[2\\], but other shards"):
        Manifest({}, {}, {}, [one, three, two]).layouts()


def test_a_shard_entry_outside_a_manifest_file_is_named_as_the_manifests():
    with pytest.raises(CacheError) as err:
        ShardRecord.from_dict({"name": "../x.tar"})
    assert str(err.value) == (
        "the manifest lists a shard named '../x.tar': shard names must be plain file names inside the cache folder "
        "(no '/', '..' or absolute paths). The manifest was edited or damaged; rebuild it with "
        "`cogvx shards rebuild-manifest`."
    )
    with pytest.raises(CacheError, match="^the manifest: a shard entry has no `name`. The manifest is damaged.$"):
        ShardRecord.from_dict({})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(updated="x" * 38), 'has `updated` = "' + "x" * 38 + '", not float.'),
        (lambda r: r.update(updated="x" * 39), 'has `updated` = "' + "x" * 36 + "..., not float."),
        (lambda r: r["shards"][0]["samples"].append(3), "a sample of shard 'shard-r00-000000.tar' is a int, not an"),
        (
            lambda r: r["shards"][0]["layouts"][BUCKET].update(moments=3),
            f"tensor 'moments' of layout '{BUCKET}' of shard 'shard-r00-000000.tar' is a int, not an object.",
        ),
    ],
)
def test_more_damaged_fields_named_exactly(tmp_path: Path, change, message: str):
    err = _load_with(tmp_path, change)
    assert str(err).startswith(f"{tmp_path / 'manifest.json'}: ") and message in str(err), str(err)


def test_a_layout_with_an_empty_dimension_is_refused(tmp_path: Path):
    err = _load_with(tmp_path, lambda r: r["shards"][0]["layouts"][BUCKET]["moments"].update(shape=[2, 0, 2, 2]))
    assert "the shape [2, 0, 2, 2]. It must be 4 positive sizes [2C, F, H, W]." in str(err)


def test_a_shard_entry_without_an_index_loads_with_no_samples(tmp_path: Path):
    raw = written_cache(tmp_path).to_dict()
    del raw["shards"][0]["samples"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    loaded = Manifest.load(tmp_path)
    assert loaded.shards[0].samples == [] and loaded.shards[0].sample_count == 2


def test_manifest_refusals_in_full(tmp_path: Path):
    def second_twice(raw):
        raw["shards"].append(raw["shards"][1])

    err = _load_with(tmp_path, second_twice)
    assert str(err) == (
        f"{tmp_path / 'manifest.json'} lists shard shard-r00-000001.tar more than once; rebuild it with "
        "`cogvx shards rebuild-manifest`."
    )
    other = tmp_path / "other"
    err = _load_with(other, lambda r: r["shards"][0].update(bytes="1"))
    assert str(err) == (
        f"{other / 'manifest.json'}: shard 'shard-r00-000000.tar' has `bytes` = \"1\", not int. "
        "The manifest is damaged."
    )
    (tmp_path / "manifest.json").write_text("[1]")
    with pytest.raises(CacheError) as error:
        Manifest.load(tmp_path)
    assert str(error.value) == f"{tmp_path / 'manifest.json'} is not a cogvx cache manifest (format is 'list')."


def test_an_empty_shard_entry_is_valid(tmp_path: Path):
    raw = written_cache(tmp_path).to_dict()
    raw["shards"][0].update(sample_count=0, bytes=0, samples=[])
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert Manifest.load(tmp_path).shards[0].sample_count == 0


def test_an_oversized_manifest_is_refused_after_reading_only_up_to_the_limit(tmp_path: Path, monkeypatch):
    import tracemalloc

    from cogvx.shards import manifest as module

    monkeypatch.setattr(module, "MAX_MANIFEST_BYTES", 3 << 20)
    with open(tmp_path / "manifest.json", "wb") as f:
        f.truncate(200 << 20)  # sparse: 200 MB that take no disk
    tracemalloc.start()
    try:
        with pytest.raises(CacheError, match="manifest.json is larger than 3 MiB; it is not a cogvx manifest.$"):
            Manifest.load(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, f"read {peak} bytes of a manifest over the limit"


def test_a_manifest_without_extras_loads_and_a_side_file_outside_the_folder_is_refused(tmp_path: Path):
    raw = written_cache(tmp_path).to_dict()
    del raw["extras"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert Manifest.load(tmp_path).extras == {}
    err = _load_with(tmp_path / "side", lambda r: r.update(extras={"v": {"file": "/etc/passwd"}}))
    assert str(err) == (
        f"{tmp_path / 'side' / 'manifest.json'} names side file '/etc/passwd' for 'v': side files must be plain file "
        "names inside the cache folder. The manifest was edited or damaged."
    )
