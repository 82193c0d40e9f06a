"""The exact values the cache format promises, where mutation testing found the other tests too lenient.

Each test pins a value docs/cache-format.md states (a limit, a count, a file name, a message that
names the file and the fix), so a changed comparison, constant or string in `shards/manifest.py`,
`shards/io.py` or `preprocess/cachedir.py` fails here. All cases are in-process and fast.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch

from cogvx.files import write_json_atomic
from cogvx.shards import CacheError, Manifest, Sample, SampleEntry, ShardRecord, paths
from cogvx.shards.manifest import describe_layout, is_plain_name, merge_layouts

from .test_shards import BUCKET, LAYOUT, _written_cache, refusal_without_blocking

# --- manifest.py ----------------------------------------------------------------------------------


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
    manifest = _written_cache(tmp_path)
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
    raw = _written_cache(tmp_path).to_dict()
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
    raw = _written_cache(tmp_path).to_dict()
    raw.update(created=5, updated=6, extras={"v": {"file": "p.safetensors", "n": 1}, "other": 3})
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    loaded = Manifest.load(tmp_path)
    assert (loaded.created, loaded.updated) == (5.0, 6.0) and type(loaded.created) is float
    assert loaded.extras == {"v": {"file": "p.safetensors", "n": 1}, "other": 3}
    assert loaded.producer == {"model": "test"} and loaded.params == {} and loaded.schema == {}
    assert loaded.shards[0].layouts == {BUCKET: LAYOUT} and loaded.shards[0].samples[0].size == 100


def test_a_folder_of_shards_without_a_manifest_says_how_many_and_how_to_rebuild(tmp_path: Path):
    _written_cache(tmp_path)
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

    _written_cache(tmp_path)
    size = (tmp_path / "manifest.json").stat().st_size
    monkeypatch.setattr(module, "MAX_MANIFEST_BYTES", size)  # exactly the limit: still read
    assert Manifest.load(tmp_path).sample_count == 3
    monkeypatch.setattr(module, "MAX_MANIFEST_BYTES", size - 1)
    with pytest.raises(CacheError, match="manifest.json is larger than 0 MiB; it is not a cogvx manifest."):
        Manifest.load(tmp_path)
    monkeypatch.setattr(module, "MAX_MANIFEST_BYTES", 1 << 30)
    assert module.MAX_MANIFEST_BYTES >> 20 == 1024


def test_a_manifest_that_cannot_be_opened_is_one_line(tmp_path: Path):
    _written_cache(tmp_path)
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


# --- preprocess/cachedir.py -----------------------------------------------------------------------
# The distributed paths (part files, merging) run under torchrun in the other tests, out of reach of an
# in-process check: here they are called directly on real shards.


def _info(vae: str = "vae-1"):
    from cogvx.pipeline.models import ModelInfo

    return ModelInfo("m", "m", vae, "t5-1", 1.0, 16, 4096, 8, 4, (480, 720), 226)


def _cache_dir(folder: Path, params: dict | None = None) -> Manifest:
    """A manifest in ``folder`` made by ``_info()`` with ``params``; no shards yet."""
    producer = {"model": "m", "encoders": _info().encoder_identity(), "data": "/videos"}
    manifest = Manifest(producer, params or {"fps": 8}, {"moments": "m"})
    manifest.save(folder)
    return manifest


def _shards(folder: Path, manifest: Manifest, first: int, count: int, rank: int = 0) -> list[ShardRecord]:
    """``count`` one-sample shards of ``rank`` written with the cache's header, not listed anywhere."""
    from cogvx.preprocess.cachedir import cache_header
    from cogvx.shards import ShardWriter

    from .test_shards import _sample

    records: list[ShardRecord] = []
    writer = ShardWriter(folder, f"shard-r{rank:02d}", records.append, max_samples=1, first_index=first,
                         header=cache_header(manifest))  # fmt: skip
    for i in range(first, first + count):
        writer.write(*_sample(i))
    return records


def test_check_existing_returns_a_matching_cache_and_refuses_other_settings(tmp_path: Path):
    from cogvx.preprocess.cachedir import check_existing

    producer = {"model": "m2"}
    assert check_existing(tmp_path / "none", producer, {"fps": 8}, _info()) is None
    assert check_existing(tmp_path, producer, {"fps": 8}, _info()) is None
    manifest = _cache_dir(tmp_path, {"fps": 8, "size": 2})
    found = check_existing(tmp_path, producer, {"fps": 8, "size": 2}, _info())
    assert found is not None and found.to_dict() == manifest.to_dict()
    with pytest.raises(CacheError) as err:
        check_existing(tmp_path, producer, {"size": 3, "fps": 8, "new": 1}, _info())
    assert str(err.value) == (
        f"{tmp_path} already holds a cache made with other settings: new, size differ (stored: model m, "
        "{'fps': 8, 'size': 2}; now: model m2, {'size': 3, 'fps': 8, 'new': 1}). Write to a new --output "
        "folder, or re-run with the stored settings to add to it."
    )
    with pytest.raises(CacheError, match="other settings: model encoders \\(VAE / text encoder\\) differ"):
        check_existing(tmp_path, producer, {"fps": 8, "size": 2}, _info("vae-2"))
    with pytest.raises(CacheError, match="other settings: size, model encoders \\(VAE / text encoder\\) differ"):
        check_existing(tmp_path, producer, {"fps": 8, "size": 1}, _info("vae-2"))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError) as err:
        check_existing(tmp_path, producer, {}, _info())
    assert str(err.value).startswith(f"{tmp_path / 'manifest.json'} is not valid JSON (")
    assert str(err.value).endswith("); restore it, or write to another --output.")


def test_check_existing_refuses_shards_without_a_manifest_naming_three(tmp_path: Path):
    from cogvx.preprocess.cachedir import check_existing

    manifest = Manifest({"model": "m"}, {}, {})
    _shards(tmp_path, manifest, 0, 3)
    message = (
        f"{tmp_path} holds 3 shard file(s) (shard-r00-000000.tar, shard-r00-000001.tar, shard-r00-000002.tar) but no "
        f"manifest.json. Re-create it from the shards with `cogvx shards rebuild-manifest {tmp_path}`, or write to "
        "another --output folder (preprocess never deletes shards it did not write)."
    )
    with pytest.raises(CacheError) as err:
        check_existing(tmp_path, {"model": "m"}, {}, _info())
    assert str(err.value) == message
    _shards(tmp_path, manifest, 3, 1)
    with pytest.raises(CacheError) as err:
        check_existing(tmp_path, {"model": "m"}, {}, _info())
    assert "holds 4 shard file(s) (shard-r00-000000.tar, shard-r00-000001.tar, shard-r00-000002.tar ...) but" in str(
        err.value
    )


def test_the_writer_lock_refuses_a_second_writer_until_the_first_is_done(tmp_path: Path):
    from cogvx.preprocess.cachedir import writer_lock

    with writer_lock(tmp_path):
        assert (tmp_path / ".lock").is_file()
        with pytest.raises(CacheError) as err, writer_lock(tmp_path):
            pass
        assert str(err.value) == (
            f"Another `cogvx preprocess` is writing to {tmp_path}. Wait for it to finish, or use another --output."
        )
    with writer_lock(tmp_path):  # released
        pass


def test_part_files_are_named_by_rank_and_merged_in_rank_order_when_complete(tmp_path: Path):
    from cogvx.preprocess import cachedir

    assert paths.shard_part(tmp_path, 3) == tmp_path / ".parts" / "shards.r03.json"
    assert paths.skipped_part(tmp_path, 12) == tmp_path / ".parts" / "skipped.r12.jsonl"
    assert paths.result_part(tmp_path, 0) == tmp_path / ".parts" / "result.r00.json"
    manifest = _cache_dir(tmp_path)
    rank0, rank1 = _shards(tmp_path, manifest, 0, 2, rank=0), _shards(tmp_path, manifest, 2, 3, rank=1)
    (tmp_path / rank1[2].name).write_bytes(b"cut")  # not what its part says: not listed
    (tmp_path / rank1[1].name).unlink()  # gone: not listed
    cachedir.save_shard_part(tmp_path, 1, rank1)
    cachedir.save_shard_part(tmp_path, 0, rank0)
    assert json.loads(paths.shard_part(tmp_path, 0).read_text())[0]["name"] == "shard-r00-000000.tar"
    manifest.add_shard(rank0[1])  # already merged before a kill
    assert cachedir.merge_shard_parts(tmp_path, manifest) == 2
    assert [s.name for s in manifest.shards] == ["shard-r00-000001.tar", "shard-r00-000000.tar", "shard-r01-000002.tar"]
    assert manifest.shards[1] == rank0[0]
    assert cachedir.merge_shard_parts(tmp_path, manifest) == 0


def test_recover_adopts_tidies_and_sets_aside_and_never_deletes_a_shard(tmp_path: Path, caplog):
    from cogvx.preprocess import cachedir

    manifest = _cache_dir(tmp_path)
    listed = _shards(tmp_path, manifest, 0, 3)
    for record in listed:
        manifest.add_shard(record)
    (tmp_path / listed[1].name).write_bytes(b"x" * listed[1].bytes)  # right size, wrong bytes
    (tmp_path / listed[2].name).unlink()
    parted = _shards(tmp_path, manifest, 3, 1, rank=1)
    cachedir.save_shard_part(tmp_path, 1, parted)
    orphan = _shards(tmp_path, manifest, 4, 1)[0]
    foreign = _shards(tmp_path, Manifest({"model": "other"}, {}, {}), 5, 1)[0]
    (tmp_path / "shard-r00-000006.tar").write_bytes(b"not a tar")
    (tmp_path / "shard-r00-000006.tar.damaged").write_bytes(b"earlier")
    (tmp_path / "mine.tar").write_bytes(b"someone else's")
    (tmp_path / "shard-r02-000000.tar.tmp").write_bytes(b"half")
    (tmp_path / "keep.tmp").write_bytes(b"not ours")
    paths.skipped_part(tmp_path, 0).write_text("")
    late = _shards(tmp_path, manifest, 7, 1)[0]  # after the unreadable one: still adopted
    with caplog.at_level(logging.WARNING, logger="cogvx.preprocess"):
        done = cachedir.recover(tmp_path, manifest, check_hashes=False)  # sizes only: the changed bytes are not seen
    assert done.adopted == [parted[0].name, orphan.name, late.name]
    other, unreadable = (r.getMessage() for r in caplog.records)
    assert unreadable.startswith(f"{tmp_path / 'shard-r00-000006.tar'} is not listed and cannot be read (Shard ")
    assert unreadable.endswith("re-encodes its clips).); renamed to .damaged")
    assert (
        other
        == f"{tmp_path / foreign.name} is not listed and was made with other settings than this cache; left as it is"
    )
    assert done.set_aside == ["shard-r00-000006.tar.damaged.1"] and done.foreign == [foreign.name]
    assert [r.name for r in done.dropped] == [listed[2].name]
    assert not (tmp_path / "shard-r02-000000.tar.tmp").exists() and (tmp_path / "keep.tmp").exists()
    assert (tmp_path / "mine.tar").read_bytes() == b"someone else's" and (tmp_path / foreign.name).is_file()
    assert list((tmp_path / ".parts").iterdir()) == []
    names = [listed[0].name, listed[1].name, parted[0].name, orphan.name, late.name]
    assert [s.name for s in Manifest.load(tmp_path).shards] == names
    assert Manifest.load(tmp_path).producer["data"] == "/videos"
    again = cachedir.recover(tmp_path, manifest, check_hashes=True)
    assert [r.name for r in again.dropped] == [listed[1].name] and again.adopted == []
    assert again.foreign == [foreign.name], "a foreign shard stays where it is"
    assert again.set_aside == [f"{listed[1].name}.damaged"]
    assert (tmp_path / f"{listed[1].name}.damaged").read_bytes() == b"x" * listed[1].bytes


def test_the_cache_header_is_what_a_shard_stores_without_the_data_path():
    from cogvx.preprocess.cachedir import cache_header

    manifest = Manifest({"model": "m", "data": "/v", "encoders": {"b": 1, "a": (1, 2)}}, {"fps": 8}, {"x": "y"})
    assert cache_header(manifest) == {
        "producer": {"model": "m", "encoders": {"a": [1, 2], "b": 1}},
        "params": {"fps": 8},
        "schema": {"x": "y"},
    }
    assert manifest.producer["data"] == "/v"


def _encoded(source: str, windows: int = 2):
    from cogvx.preprocess.encoding import Encoded, Prompt, ReadClip
    from cogvx.preprocess.sources import Clip

    clip = Clip(Path(source), "a caption", source)
    read = ReadClip(0, clip, "h" * 64, 10, 20, None, "1x16x16", [[0]] * windows, {"fps": 8.0}, [b"jpg"] * windows,
                    [(window, False) for window in range(windows)])  # fmt: skip
    return Encoded(read, Prompt(torch.zeros(3, 2), False), torch.zeros(windows, 4, 1, 2, 2), None)


def test_a_single_rank_lists_each_finished_shard_in_the_manifest_at_once(tmp_path: Path):
    from cogvx.preprocess.writer import RankWriter

    manifest = _cache_dir(tmp_path)
    paths.parts(tmp_path).mkdir()
    written = []
    with RankWriter(tmp_path, 0, 1, manifest, 2**30, 2, lambda: written.append(1)) as writer:
        writer.write(_encoded("a.mp4"))  # two windows: one full shard
        assert [s.name for s in Manifest.load(tmp_path).shards] == ["shard-r00-000000.tar"]
        writer.write(_encoded("b.mp4", windows=1))
        writer.skip("c.mp4", "too short", "3 frames")
        writer.finish()
    assert [s.name for s in Manifest.load(tmp_path).shards] == ["shard-r00-000000.tar", "shard-r00-000001.tar"]
    assert written == [1, 1] and not paths.shard_part(tmp_path, 0).exists()
    row = json.loads(paths.skipped_part(tmp_path, 0).read_text())
    assert row == {"source": "c.mp4", "reason": "too short", "detail": "3 frames"}
    samples = Manifest.load(tmp_path).shards[0].samples
    assert [e.source for e in samples] == ["a.mp4", "a.mp4"] and len({e.key for e in samples}) == 2


def test_a_rank_of_several_lists_its_shards_in_its_part_file_and_abandons_a_half_shard(tmp_path: Path):
    from cogvx.preprocess.writer import RankWriter

    manifest = _cache_dir(tmp_path)
    paths.parts(tmp_path).mkdir()
    with RankWriter(tmp_path, 1, 2, manifest, 2**30, 2, lambda: None) as writer:
        writer.write(_encoded("a.mp4"))
        writer.write(_encoded("b.mp4", windows=1))
        assert [p.name for p in paths.temporary_shards(tmp_path, 1)] == ["shard-r01-000001.tar.tmp"]
        writer.abandon()
    assert Manifest.load(tmp_path).shards == []
    assert [r["name"] for r in json.loads(paths.shard_part(tmp_path, 1).read_text())] == ["shard-r01-000000.tar"]
    assert paths.temporary_shards(tmp_path, 1) == [] and (tmp_path / "shard-r01-000000.tar").is_file()


def test_new_shard_numbers_skip_every_used_one_and_temporaries_are_this_ranks(tmp_path: Path):
    from cogvx.preprocess.cachedir import next_shard_index, remove_temporary

    assert next_shard_index(tmp_path, 1) == 0
    for name in ["shard-r01-000001.tar", "shard-r01-000003.tar.damaged", "shard-r02-000009.tar", "shard-r01-x.tar"]:
        (tmp_path / name).write_bytes(b"")
    assert next_shard_index(tmp_path, 1) == 4 and next_shard_index(tmp_path, 2) == 10
    assert next_shard_index(tmp_path, 0) == 0
    (tmp_path / "shard-r01-000004.tar.tmp").write_bytes(b"")
    (tmp_path / "shard-r02-000010.tar.tmp").write_bytes(b"")
    remove_temporary(tmp_path, 1)
    assert not (tmp_path / "shard-r01-000004.tar.tmp").exists() and (tmp_path / "shard-r02-000010.tar.tmp").exists()


def test_clear_parts_empties_or_removes_the_parts_folder(tmp_path: Path):
    from cogvx.preprocess.cachedir import clear_parts
    from cogvx.shards.paths import parts as parts_dir

    clear_parts(tmp_path)
    assert parts_dir(tmp_path) == tmp_path / ".parts" and list(parts_dir(tmp_path).iterdir()) == []
    (parts_dir(tmp_path) / "shards.r00.json").write_text("[]")
    clear_parts(tmp_path)
    assert list(parts_dir(tmp_path).iterdir()) == []
    (parts_dir(tmp_path) / "shards.r00.json").write_text("[]")
    clear_parts(tmp_path, keep_folder=False)
    assert not parts_dir(tmp_path).exists()
    clear_parts(tmp_path, keep_folder=False)  # nothing there: nothing to do
    assert not parts_dir(tmp_path).exists()


def test_merge_skipped_sorts_every_ranks_rows_by_source_as_utf8(tmp_path: Path):
    from cogvx.preprocess.cachedir import clear_parts, merge_skipped
    from cogvx.shards.paths import skipped_part

    clear_parts(tmp_path)
    skipped_part(tmp_path, 1).write_text('{"source": "b.mp4", "reason": "r"}\n\n', encoding="utf-8")
    skipped_part(tmp_path, 0).write_text('{"source": "é.mp4", "reason": "r"}\n{"source": "a.mp4"}\n', encoding="utf-8")
    rows = merge_skipped(tmp_path)
    assert [row["source"] for row in rows] == ["a.mp4", "b.mp4", "é.mp4"]
    text = (tmp_path / "skipped.jsonl").read_text(encoding="utf-8")
    assert text == '{"source": "a.mp4"}\n{"source": "b.mp4", "reason": "r"}\n{"source": "é.mp4", "reason": "r"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == [".parts", "skipped.jsonl"]


# --- shards/codec.py, tar.py, checks.py, shardfile.py, reader.py, verify.py, rebuild.py ----------------


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


@pytest.mark.parametrize(
    "key, extras, message",
    [
        ("a.b", {}, "Sample key 'a.b' must use only letters, digits, '-' and '_' (at most 64)."),
        ("x" * 65, {}, "must use only letters"),
        ("k", {"json": b""}, "Sample k: extra member name 'json' is reserved or not [A-Za-z0-9_.]+."),
        ("k", {"safetensors": b""}, "extra member name 'safetensors' is reserved"),
        ("k", {"a/b": b""}, "extra member name 'a/b' is reserved"),
    ],
)
def test_encode_sample_refuses_keys_and_member_names_readers_would(key: str, extras: dict, message: str):
    from cogvx.shards import Sample
    from cogvx.shards.codec import encode_sample

    with pytest.raises(ValueError) as err:
        encode_sample(Sample(key, {"x": torch.zeros(1)}, {}, extras))
    assert message in str(err.value)


def test_encode_sample_writes_tensors_then_sorted_json_then_sorted_extras():
    from safetensors.torch import load

    from cogvx.shards import Sample
    from cogvx.shards.codec import encode_sample

    members = encode_sample(Sample("k-1", {"x": torch.arange(4.0)[::2]}, {"b": 1, "a": 2}, {"z": b"1", "a.b": b"2"}))
    assert [name for name, _ in members] == ["k-1.safetensors", "k-1.json", "k-1.a.b", "k-1.z"]
    assert torch.equal(load(members[0][1])["x"], torch.tensor([0.0, 2.0]))
    assert members[1][1] == b'{"a": 2, "b": 1}' and members[3][1] == b"1"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_nan_and_inf_are_found_in_every_float_dtype_and_the_largest_finite_is_not(dtype):
    from cogvx.shards.checks import all_finite as _all_finite

    largest = torch.finfo(dtype).max
    assert _all_finite(torch.tensor([0.0, -largest, largest], dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert not _all_finite(torch.tensor([1.0, bad, 2.0], dtype=dtype)), (dtype, bad)
    assert _all_finite(torch.zeros(0, dtype=dtype))


def test_finiteness_of_rare_and_integer_dtypes():
    from cogvx.shards.checks import all_finite as _all_finite

    assert _all_finite(torch.tensor([-1, 2**31 - 1], dtype=torch.int32))
    assert _all_finite(torch.tensor([448.0], dtype=torch.float8_e4m3fn))
    assert not _all_finite(torch.tensor([float("nan")], dtype=torch.float8_e4m3fn))
    assert not _all_finite(torch.tensor([float("inf")], dtype=torch.float8_e5m2))


def test_entry_from_meta_reads_the_index_line_or_the_top_level_fields():
    from cogvx.shards.codec import entry_from_meta

    line = {"source": "v", "content_hash": "h", "bucket": "b", "size": 1, "mtime_ns": 2, "caption_hash": None}
    assert entry_from_meta("k", {"index": line}) == SampleEntry("k", "v", "h", "b", 1, 2, None)
    old = {"source": "v", "content_hash": "h", "bucket": "b", "size": 9}
    assert entry_from_meta("k", old) == SampleEntry("k", "v", "h", "b")  # only the fields it had
    assert entry_from_meta("k", {**old, "index": "not a dict"}) == SampleEntry("k", "v", "h", "b")
    cases = [
        ({**line, "size": "1"}, "Sample k: its .json index line has an unusable size ('1')."),
        ({**line, "size": True}, "has an unusable size (True)."),
        ({**line, "source": None}, "has an unusable source (None)."),
        ({**line, "extra": 1}, "has an unusable extra (1)."),
        ({"source": "v", "bucket": "b"}, "Sample k: its .json index line has no content_hash."),
    ]
    for bad, message in cases:
        with pytest.raises(CacheError) as err:
            entry_from_meta("k", {"index": bad})
        assert str(err.value).startswith("Sample k: its .json index line") and message in str(err.value)


def test_short_values_are_cut_at_60_characters():
    from cogvx.shards.codec import short as _short

    assert _short("x" * 58) == repr("x" * 58)
    assert _short("x" * 59) == "'" + "x" * 56 + "..."
    assert len(_short(list(range(100)))) == 60


def _one_sample_bytes() -> int:
    """What the writer counts for one ``_sample`` (each member's bytes plus 1024 for its headers)."""
    from cogvx.shards.codec import encode_sample
    from cogvx.shards.codec import with_index as _with_index

    from .test_shards import _sample

    sample, entry = _sample(0)
    members = encode_sample(type(sample)(sample.key, sample.tensors, _with_index(sample, entry), sample.extras))
    return sum(len(data) + 1024 for _, data in members)


@pytest.mark.parametrize("extra, per_shard", [(0, [1, 1]), (1, [2])])
def test_a_shard_is_finished_when_it_reaches_max_bytes(tmp_path: Path, extra: int, per_shard: list[int]):
    from cogvx.shards import ShardWriter

    from .test_shards import _sample

    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append, max_bytes=_one_sample_bytes() + extra)
    for i in range(2):
        writer.write(*_sample(i))
    writer.flush()
    writer.flush()  # nothing open: nothing more
    assert [r.sample_count for r in records] == per_shard


def test_the_writer_never_takes_an_existing_name_and_resets_after_abandon(tmp_path: Path):
    import tarfile

    from cogvx.shards import ShardWriter
    from cogvx.shards.codec import HEADER_KEY, OPENED_KEY
    from cogvx.shards.shardfile import file_sha256

    from .test_shards import _sample

    (tmp_path / "s-000003.tar").write_bytes(b"someone's")
    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append, max_samples=2, first_index=3)
    writer.write(*_sample(0))
    writer.abandon()
    writer.abandon()  # nothing open: nothing to do
    other = Sample("k9", {"x": torch.ones(2, dtype=torch.int16)}, {}, {})
    writer.write(other, SampleEntry("k9", "v9", "h9", "b9"))
    writer.write(*_sample(1))
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

    from .test_shards import _sample

    sample, entry = _sample(0)
    sample.meta["content_hash"] = "other"
    with pytest.raises(ValueError) as err:
        _with_index(sample, entry)
    assert str(err.value) == "Sample k0: its metadata says content_hash 'other', its index line 'h0'."


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


def test_member_limits_by_kind():
    from cogvx.shards.tar import MAX_EXTRA_BYTES, MAX_META_BYTES, TENSOR_HEADER_ALLOWANCE, MemberLimits

    assert (MAX_META_BYTES, MAX_EXTRA_BYTES, TENSOR_HEADER_ALLOWANCE) == (1 << 20, 16 << 20, 1 << 20)
    limits = MemberLimits.for_layouts(
        {"a": {"x": {"dtype": "int8", "shape": [10]}}, "b": {"x": {"dtype": "int8", "shape": [30]}}}
    )
    assert (limits.of("safetensors"), limits.of("json"), limits.of("jpg")) == (30 + (1 << 20), 1 << 20, 16 << 20)
    assert MemberLimits.for_layouts({}).of("safetensors") is None


def _tar_bytes(members: list[tuple[str, bytes]], pax: dict[str, str] | None = None, kind=None) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers=pax or {}) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _raw(data: bytes, **kwargs) -> list[dict]:
    from cogvx.shards import iter_raw_samples

    return list(iter_raw_samples(data, "/c/s.tar", **kwargs))


def test_the_reader_groups_members_and_reads_the_global_header():
    from cogvx.shards.tar import ShardReader

    data = _tar_bytes([("a.json", b"{}"), ("a.x.y", b"1"), ("b.json", b"[]")], pax={"cogvx.opened": "5", "k": "é"})
    assert _raw(data) == [
        {"__key__": "a", "__url__": "/c/s.tar", "json": b"{}", "x.y": b"1"},
        {"__key__": "b", "__url__": "/c/s.tar", "json": b"[]"},
    ]
    assert _raw(data, exclude=["a"]) == [{"__key__": "b", "__url__": "/c/s.tar", "json": b"[]"}]
    assert _raw(data, exclude=["b"])[-1]["__key__"] == "a"
    reader = ShardReader(data, "/c/s.tar")
    list(reader.samples())
    assert (
        reader.header == {"cogvx.opened": "5", "k": "é"} and reader.position == 9 * 512
    )  # 8 blocks and the end marker
    assert _raw(b"") == [] and _raw(bytes(1024)) == []


def test_a_member_exactly_at_its_limit_is_read_and_one_byte_more_is_refused():
    from cogvx.shards.tar import MemberLimits

    data = _tar_bytes([("k.json", b"12345"), ("k.jpg", b"123"), ("k.safetensors", b"1234567")])
    assert len(_raw(data, limits=MemberLimits(tensors=7, meta=5, extra=3))) == 1
    for limits, name in [((6, 5, 3), "k.safetensors"), ((7, 4, 3), "k.json"), ((7, 5, 2), "k.jpg")]:
        tensors, meta, extra = limits
        with pytest.raises(CacheError) as err:
            _raw(data, limits=MemberLimits(tensors=tensors, meta=meta, extra=extra))
        size = {"k.safetensors": 7, "k.json": 5, "k.jpg": 3}[name]
        assert str(err.value) == (
            f"Shard /c/s.tar has a member {name!r} of {size} bytes, over the {size - 1}-byte limit for its kind. "
            "cogvx shards are plain uncompressed tars of regular KEY.ext members; this one was not written by cogvx "
            "or was changed. Run `cogvx shards verify /c`."
        )


def test_64_members_per_sample_are_read():
    assert len(_raw(_tar_bytes([(f"k.x{i}", b"") for i in range(64)]))[0]) == 66


def test_a_truncated_tar_and_a_stream_without_a_size_are_refused_at_the_cut(tmp_path: Path):
    import io

    from cogvx.shards.tar import ShardReader

    data = _tar_bytes([("k.json", b"x" * 700)])
    cut = data[: 512 + 600]  # the member header and part of its data
    with pytest.raises(CacheError, match="has a member 'k.json' of 700 bytes, more than the file holds"):
        _raw(cut)
    reader = ShardReader(io.BufferedReader(io.BytesIO(cut)), "/c/s.tar")  # no file number: size unknown
    assert reader.size is None
    with pytest.raises(CacheError) as err:
        list(reader.samples())
    assert str(err.value) == f"Shard /c/s.tar ends inside a tar member (byte {len(cut)}); it is truncated."
    (tmp_path / "s.tar").write_bytes(b"12345" + data)
    with open(tmp_path / "s.tar", "rb") as f:
        f.read(5)
        assert ShardReader(f, "x").size == len(data)  # what is left from where the stream is


def test_pax_headers_name_and_size_members_and_malformed_ones_are_refused():
    import io
    import tarfile

    from cogvx.shards.tar import _pax_records

    info = tarfile.TarInfo("x" * 60 + "." + "j" * 60)  # over 100 characters: tarfile writes a pax path record
    info.size = 2
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b"{}"))
    assert _raw(buffer.getvalue())[0] == {"__key__": "x" * 60, "__url__": "/c/s.tar", "j" * 60: b"{}"}
    reader = type("R", (), {"position": 7, "_refuse": lambda self, what: CacheError(what)})()
    assert _pax_records(b"11 a=bcdef\n8 c=d=e\n\0\0", reader) == {"a": "bcdef", "c": "d=e"}
    for bad in (b"11 a=bcdef\n8 c=de\n", b"x a=b\n", b"5 ab\n", b"99 a=b\n", b"6 a=bc", b"0 a=b\n"):
        with pytest.raises(CacheError, match="has a malformed pax header at byte 7"):
            _pax_records(bad, reader)


def test_pax_size_records_and_unknown_member_types():
    import io
    import tarfile

    def tar_with(info: tarfile.TarInfo, data: bytes, pax: dict | None = None) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info.pax_headers = pax or {}
            tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    info = tarfile.TarInfo("k.json")
    info.size = 3
    assert _raw(tar_with(info, b"abc", {"size": "3"}))[0]["json"] == b"abc"
    data = tar_with(info, b"abc", {"comment": "x"}).replace(b"comment=x", b"size=zzzz")  # the same length
    with pytest.raises(CacheError, match="has a pax header with size 'zzzz'"):
        _raw(data)
    odd = tarfile.TarInfo("k.json")
    odd.type = b"Z"
    with pytest.raises(CacheError, match="holds 'k.json', a member of type b'Z'"):
        _raw(tar_with(odd, b""))
    for name in ("k", ".json", "k.j/s"):
        with pytest.raises(CacheError, match="not KEY.ext with a plain key"):
            _raw(_tar_bytes([(name, b"")]))
    gz = bytes([0x1F, 0x8B]) + bytes(510)
    with pytest.raises(
        CacheError, match="is not an uncompressed tar \\(it is gzip-compressed\\): bad header at byte 0"
    ):
        _raw(gz)
    with pytest.raises(CacheError, match="is not an uncompressed tar: bad header at byte 512"):
        _raw(_tar_bytes([("k.json", b"")])[:512] + b"\1" * 512)


def test_check_shards_reports_each_kind_of_problem_once_with_its_shard(tmp_path: Path):
    import shutil

    from cogvx.shards import check_shards

    manifest = _written_cache(tmp_path, samples=3)
    first, second = manifest.shards
    assert check_shards(tmp_path, manifest.shards) == []
    # The count, the keys and the excluded keys the manifest says, against what the shard holds.
    wrong = ShardRecord(first.name, 3, first.bytes, first.sha256, first.samples[::-1], ["k7"], first.layouts)
    messages = [p.message for p in check_shards(tmp_path, [wrong])]
    assert messages == [
        f"{first.name}: 2 samples, manifest says 3",
        f"{first.name}: sample keys differ from the manifest index (missing [], not indexed [])",
        f"{first.name}: excluded keys not in the shard: ['k7']",
    ]
    unindexed = ShardRecord(first.name, 2, first.bytes, first.sha256, first.samples[:1], [], first.layouts)
    (problem,) = check_shards(tmp_path, [unindexed])
    assert (
        problem.message == f"{first.name}: sample keys differ from the manifest index (missing [], not indexed ['k1'])"
    )
    assert problem.shard == first.name and not problem.damaged
    # The same shard twice: every key is served twice; excluded keys are not.
    shutil.copy(tmp_path / first.name, tmp_path / "copy.tar")
    copy = ShardRecord("copy.tar", 2, first.bytes, first.sha256, first.samples, ["k0"], first.layouts)
    messages = [p.message for p in check_shards(tmp_path, [first, copy])]
    assert messages == [f"copy.tar: sample key k1 is also served by {first.name}; every key must be unique in a cache"]
    # A missing shard is damaged (re-encoding repairs it); a layout conflict between records is not.
    (tmp_path / second.name).unlink()
    other = {BUCKET: {"moments": {"dtype": "int8", "shape": [1]}}}
    clash = ShardRecord("copy.tar", 2, first.bytes, first.sha256, first.samples, ["k0", "k1"], other)
    problems = check_shards(tmp_path, [first, clash, second], deep=False)
    assert [(p.shard, p.damaged) for p in problems] == [("copy.tar", False), (second.name, True)]
    assert problems[0].message.startswith(f"copy.tar stores bucket {BUCKET} as moments int8 [1]")
    assert problems[1].message.startswith(f"Shard {tmp_path / second.name} is listed in the manifest but missing.")


def test_check_shards_stops_at_three_sample_problems_and_deep_decodes_tensors(tmp_path: Path):
    from cogvx.shards import ShardWriter, check_shards

    from .test_shards import _manifest, _sample

    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append)
    for i in range(5):
        sample, entry = _sample(i)
        sample.tensors["moments"][0, 0, 0, 0] = float("nan")
        writer.write(sample, entry)
    writer.flush()
    _manifest(tmp_path, records)
    messages = [p.message for p in check_shards(tmp_path, records)]
    assert [m.split(":")[0] for m in messages] == [f"Sample k{i} in {tmp_path / 's-000000.tar'}" for i in range(3)]
    hint = f"The shard is unusable; run `cogvx shards verify {tmp_path}` for how to repair it."
    assert all(m.endswith(f"tensor moments holds NaN or Inf. {hint}") for m in messages)
    assert check_shards(tmp_path, records, deep=False) == []
    # An index entry whose bucket has no recorded layout in the shard's record.
    (record,) = records
    record.layouts = {"other": record.layouts[BUCKET]}
    messages = [p.message for p in check_shards(tmp_path, [record], deep=False)]
    assert messages[0] == (
        f"Sample k0 in {tmp_path / 's-000000.tar'}: its bucket {BUCKET} has no layout in the manifest's record of the "
        "shard. The shard is unusable."
    )
    assert len(messages) == 3


def test_iter_record_samples_checks_each_raw_sample_against_the_index(tmp_path: Path):
    from cogvx.shards import iter_record_samples

    manifest = _written_cache(tmp_path, samples=2)
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
            list(iter_record_samples(_tar_bytes(member_list), bare, origin))
        assert str(err.value).startswith(message)


def test_read_indexed_shard_rebuilds_the_record_and_refuses_what_it_cannot_use(tmp_path: Path):
    from cogvx.shards.rebuild import index_shard, read_indexed_shard

    manifest = _written_cache(tmp_path, samples=2)
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
        (tmp_path / "h.tar").write_bytes(_tar_bytes([], pax=pax))
        with pytest.raises(CacheError) as err:
            read_indexed_shard(tmp_path, "h.tar")
        assert str(err.value).startswith(f"Shard {tmp_path / 'h.tar'} {message}")
    (tmp_path / "h.tar").write_bytes(_tar_bytes([], pax={"cogvx.header": '{"b": 1, "a": 2}', "cogvx.opened": "12"}))
    assert read_indexed_shard(tmp_path, "h.tar").header == {"a": 2, "b": 1}
    assert read_indexed_shard(tmp_path, "h.tar").opened == 12
    assert index_shard(tmp_path, "h.tar", header={"a": 2, "b": 1}).sample_count == 0
    (tmp_path / "h.tar").write_bytes(_tar_bytes([("k.safetensors", b""), ("k.json", b"{}")]))
    with pytest.raises(CacheError) as err:
        read_indexed_shard(tmp_path, "h.tar")
    assert "cannot be parsed" in str(err.value)


# --- survivors of the first manifest.py run ---


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
    raw = _written_cache(tmp_path).to_dict()
    del raw["shards"][0]["samples"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    loaded = Manifest.load(tmp_path)
    assert loaded.shards[0].samples == [] and loaded.shards[0].sample_count == 2


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


def test_an_index_field_in_the_json_must_equal_the_whole_index_line():
    from cogvx.shards.checks import check_index

    entry = SampleEntry("k", "v", "h", "b", 1, 2, "c")
    line = {"source": "v", "content_hash": "h", "bucket": "b", "size": 1, "mtime_ns": 2, "caption_hash": "c"}
    meta = {"source": "v", "content_hash": "h", "bucket": "b"}
    check_index(meta, entry, "S", "F")  # written before index lines: the top-level fields only
    check_index({**meta, "index": line}, entry, "S", "F")
    check_index({"bucket": "b"}, None, "S", "F")  # no manifest index: only the bucket is needed
    with pytest.raises(CacheError) as err:
        check_index({**meta, "index": {**line, "mtime_ns": 3}}, entry, "S", "F")
    assert str(err.value).startswith("S: its .json says index {'source': 'v', ")
    assert str(err.value).endswith(": the shard or the manifest was changed. F.")
    with pytest.raises(CacheError) as err:
        check_index({**meta, "content_hash": "x"}, entry, "S", "F")
    assert str(err.value) == (
        "S: its .json says content_hash 'x', the manifest's index says 'h': the shard or the manifest was changed. F."
    )
    with pytest.raises(CacheError) as err:
        check_index([], entry, "S", "F")
    assert str(err.value) == "S: its .json is a list, not an object. F."
    with pytest.raises(CacheError) as err:
        check_index({"bucket": 1}, None, "S", "F")
    assert str(err.value) == "S: its .json has no bucket. F."


def test_empty_members_and_members_of_whole_blocks_are_read_through_the_hash(tmp_path: Path):
    from cogvx.shards import ShardWriter
    from cogvx.shards.rebuild import read_indexed_shard

    from .test_shards import _sample

    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append)
    sample, entry = _sample(0)
    writer.write(Sample("k0", sample.tensors, sample.meta, {"empty": b"", "block": bytes(512)}), entry)
    writer.flush()
    indexed = read_indexed_shard(tmp_path, records[0].name)
    assert indexed.record == records[0]


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
    raw = _written_cache(tmp_path).to_dict()
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


# --- survivors of the first io.py run ---


def test_abandon_tolerates_a_vanished_temporary_and_counts_bytes_from_zero_again(tmp_path: Path):
    from cogvx.shards import ShardWriter

    from .test_shards import _sample

    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append, max_bytes=_one_sample_bytes() + 1)
    writer.write(*_sample(0))
    (tmp_path / "s-000000.tar.tmp").unlink()  # e.g. removed by a cleanup after a failure
    writer.abandon()
    writer.write(*_sample(1))
    assert records == [], "one sample after an abandon is still under max_bytes"
    writer.write(*_sample(2))
    assert [[e.key for e in r.samples] for r in records] == [["k1", "k2"]]


def test_read_verified_refuses_a_fifo_as_a_shard(tmp_path: Path):
    from cogvx.shards import read_verified, verify

    os.mkfifo(tmp_path / "p.tar")
    err = refusal_without_blocking(
        tmp_path / "p.tar", lambda: read_verified(tmp_path, ShardRecord("p.tar", 0, 0, "0" * 64))
    )
    assert str(err).startswith(f"Shard {tmp_path / 'p.tar'} is not a regular file")
    assert verify(tmp_path / "none", []) == []


def test_verify_decodes_tensors_only_when_deep(tmp_path: Path):
    from cogvx.shards import ShardWriter, verify

    from .test_shards import _sample

    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append)
    sample, entry = _sample(0)
    sample.tensors["moments"][0, 0, 0, 0] = float("inf")
    writer.write(sample, entry)
    writer.flush()
    assert verify(tmp_path, records, deep=False) == []
    assert [m.split(": ")[1] for m in verify(tmp_path, records)] == [
        f"tensor moments holds NaN or Inf. The shard is unusable; run `cogvx shards verify {tmp_path}` for how to "
        "repair it."
    ]


def test_index_shard_says_when_the_header_differs(tmp_path: Path):
    from cogvx.shards.rebuild import index_shard

    _written_cache(tmp_path, samples=1, header={"b": 1, "a": {"d": 2, "c": 3}})
    assert index_shard(tmp_path, "shard-r00-000000.tar", header={"a": {"c": 3, "d": 2}, "b": 1}).sample_count == 1
    with pytest.raises(CacheError) as err:
        index_shard(tmp_path, "shard-r00-000000.tar", header={"a": 1})
    assert str(err.value) == (
        f"Shard {tmp_path / 'shard-r00-000000.tar'} was written with other settings than this run's (its header "
        "differs); it cannot join this cache."
    )


def test_read_verified_refuses_a_file_longer_than_an_empty_record(tmp_path: Path):
    import hashlib

    from cogvx.shards import read_verified

    empty = ShardRecord("e.tar", 0, 0, hashlib.sha256(b"").hexdigest())
    (tmp_path / "e.tar").write_bytes(b"")
    assert read_verified(tmp_path, empty) == b""
    (tmp_path / "e.tar").write_bytes(b"grown")
    with pytest.raises(CacheError, match="\\(5 bytes, expected 0; sha256 differs\\)"):
        read_verified(tmp_path, empty)


def test_a_manifest_without_extras_loads_and_a_side_file_outside_the_folder_is_refused(tmp_path: Path):
    raw = _written_cache(tmp_path).to_dict()
    del raw["extras"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert Manifest.load(tmp_path).extras == {}
    err = _load_with(tmp_path / "side", lambda r: r.update(extras={"v": {"file": "/etc/passwd"}}))
    assert str(err) == (
        f"{tmp_path / 'side' / 'manifest.json'} names side file '/etc/passwd' for 'v': side files must be plain file "
        "names inside the cache folder. The manifest was edited or damaged."
    )


def test_check_shards_names_a_missing_json_and_a_lying_one_without_decoding(tmp_path: Path):
    import hashlib

    from cogvx.shards import check_shards
    from cogvx.shards.rebuild import read_indexed_shard

    def listed(name: str, members: list[tuple[str, bytes]]) -> ShardRecord:
        data = _tar_bytes(members)
        (tmp_path / name).write_bytes(data)
        return ShardRecord(name, 1, len(data), hashlib.sha256(data).hexdigest(), [SampleEntry("k", "s", "h", "b")])

    lying = json.dumps({"bucket": "b", "source": "x", "content_hash": "h"}).encode()
    records = [listed("a.tar", [("k.safetensors", b"")]), listed("b.tar", [("k.safetensors", b""), ("k.json", lying)])]
    messages = [p.message for p in check_shards(tmp_path, records, deep=False)]
    assert messages[:2] == [
        f"Sample k in {tmp_path / 'a.tar'} has no .json member. The shard is unusable.",
        f"Sample k in {tmp_path / 'b.tar'}: its .json says source 'x', the manifest's index says 's': the shard or the "
        "manifest was changed. The shard is unusable.",
    ]
    os.mkfifo(tmp_path / "p.tar")
    err = refusal_without_blocking(tmp_path / "p.tar", lambda: read_indexed_shard(tmp_path, "p.tar"))
    assert str(err).startswith(f"Shard {tmp_path / 'p.tar'} is not a regular file")


def test_read_indexed_shard_refusals_name_the_shard_and_say_to_move_it_out(tmp_path: Path):
    import tarfile

    from safetensors.torch import save

    from cogvx.shards.rebuild import read_indexed_shard

    path = tmp_path / "s.tar"
    fix = f"Move it out of {tmp_path} (a later `cogvx preprocess` re-encodes its clips)."
    blob = save({"x": torch.ones(2)})

    def refusal(members: list[tuple[str, bytes]]) -> str:
        path.write_bytes(_tar_bytes(members))
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


def test_the_hashing_reader_never_reads_past_its_size():
    import hashlib
    import io

    from cogvx.files import HashingReader as _HashingReader

    reader = _HashingReader(io.BytesIO(b"0123456789"), 4)
    assert (reader.read(3), reader.read(3), reader.read(3)) == (b"012", b"3", b"")
    assert reader.finish() == hashlib.sha256(b"0123").hexdigest()
    whole = _HashingReader(io.BytesIO(b"0123456789"), 6)
    assert whole.read() == b"012345" and whole.finish() == hashlib.sha256(b"012345").hexdigest()
    rest = _HashingReader(io.BytesIO(b"0123456789"), 7)
    assert rest.read(2) == b"01" and rest.finish() == hashlib.sha256(b"0123456").hexdigest()


def test_set_aside_takes_the_next_free_damaged_name(tmp_path: Path):
    from cogvx.preprocess.cachedir import _set_aside

    for name in ("s.tar", "s.tar.damaged", "s.tar.damaged.1"):
        (tmp_path / name).write_bytes(name.encode())
    assert _set_aside(tmp_path / "s.tar") == "s.tar.damaged.2"
    assert (tmp_path / "s.tar.damaged.2").read_bytes() == b"s.tar" and not (tmp_path / "s.tar").exists()
    assert (tmp_path / "s.tar.damaged.1").read_bytes() == b"s.tar.damaged.1"


def test_check_existing_names_the_manifest_it_cannot_use(tmp_path: Path):
    from cogvx.preprocess.cachedir import check_existing

    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(CacheError) as err:
        check_existing(tmp_path, {"model": "m"}, {}, _info())
    assert str(err.value) == f"{tmp_path / 'manifest.json'} is not a cogvx cache manifest (format is 'other')."


def test_check_shards_goes_on_after_a_missing_shard_and_names_an_unreadable_one(tmp_path: Path):
    import hashlib

    from cogvx.shards import check_shards

    manifest = _written_cache(tmp_path, samples=3)
    first, second = manifest.shards
    (tmp_path / first.name).unlink()
    data = _tar_bytes([("k.j/son", b"")])
    (tmp_path / "odd.tar").write_bytes(data)
    odd = ShardRecord("odd.tar", 1, len(data), hashlib.sha256(data).hexdigest())
    problems = check_shards(tmp_path, [first, odd, second])
    assert [(p.shard, p.damaged) for p in problems] == [(first.name, True), ("odd.tar", False)]
    assert problems[1].message == (
        f"Shard {tmp_path / 'odd.tar'} holds a member named 'k.j/son', not KEY.ext with a plain key. cogvx shards are "
        "plain uncompressed tars of regular KEY.ext members; this one was not written by cogvx or was changed. The "
        "shard is unusable."
    )


def test_the_manifest_is_written_to_a_hidden_temporary_beside_it_then_renamed(tmp_path: Path):
    seen: list[list[str]] = []

    class Watched(dict):
        def items(self):  # json.dump (indented) asks for the items while the temporary is open
            seen.append(sorted(os.listdir(tmp_path)))
            return super().items()

    (tmp_path / "manifest.json").write_text("old")
    write_json_atomic(tmp_path / "manifest.json", Watched(a=1))
    (during,) = seen
    assert len(during) == 2 and "manifest.json" in during
    temporary = next(name for name in during if name != "manifest.json")
    assert temporary.startswith(".manifest.json.")
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"] and json.loads(
        (tmp_path / "manifest.json").read_text()
    ) == {"a": 1}


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


# --- survivors of the second io.py run ---


def test_last_io_survivors(tmp_path: Path):
    import hashlib

    from cogvx.shards import ShardWriter, check_sample
    from cogvx.shards.shardfile import check_shard, file_sha256

    from .test_shards import _sample

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
        writer.write(*_sample(i))
    assert [[e.key for e in r.samples] for r in records] == [["k0", "k1"]]


# --- survivors of the third io.py run ---


def _pax_within(data: bytes, seconds: float = 5.0):
    """The records ``_pax_records`` reads from ``data``, or the error it raises; fails if it never returns."""
    import threading

    from cogvx.shards.tar import ShardReader, _pax_records

    out: list = []

    def target():
        try:
            out.append(_pax_records(data, ShardReader(b"", "/c/s.tar")))
        except BaseException as err:  # handed to the test
            out.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"reading the pax records {data!r} did not end within {seconds} s"
    return out[0]


def test_pax_lengths_have_at_most_19_digits_and_bytes_after_the_last_record_are_refused():
    refused = "Shard /c/s.tar has a malformed pax header at byte 0. cogvx shards are plain"
    assert _pax_within(b"0000000000000000024 a=b\n") == {"a": "b"}  # 19 digits, the space within 20 bytes
    # Each of these would be a record only if a length were read past 19 digits, or guessed as 0 or 1.
    for bad in (b"00000000000000000025 a=b\n", b"8 a=bcd\n\n", b"8 a=bcd\n3\n\n\0"):
        err = _pax_within(bad)
        assert isinstance(err, CacheError) and str(err).startswith(refused), (bad, err)
    # Keys and values that are not UTF-8 are read with replacement characters, never refused.
    assert _pax_within(b"8 k\xff=v\xfe\n") == {"k\ufffd": "v\ufffd"}


def _refusal(data: bytes) -> str:
    with pytest.raises(CacheError) as err:
        _raw(data)
    return str(err.value)


def test_reader_refusals_name_the_pax_header_the_member_kind_the_raw_name_and_a_repeated_key():
    import io
    import tarfile

    tail = ". cogvx shards are plain uncompressed tars of regular KEY.ext members;"
    data = _tar_bytes([("a.json", b"{}")], pax={"k": "v"})  # the global header's one record: b"6 k=v\n"
    assert data.count(b"6 k=v\n") == 1
    assert _refusal(data.replace(b"6 k=v\n", b"9 k=v\n")).startswith(
        f"Shard /c/s.tar has a malformed pax header at byte 1024{tail}"
    )
    big = _tar_bytes([("a.json", b"{}")], pax={"c": "x" * (1 << 20)})
    message = _refusal(big)
    assert message.startswith("Shard /c/s.tar has a member 'pax header' of 1048587 bytes, over the 1048576-byte limit")
    # A symbolic link is named as one.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("k.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    assert _refusal(buffer.getvalue()).startswith(f"Shard /c/s.tar holds 'k.json', a symbolic link{tail}")
    # A member name that is not UTF-8 is read (surrogate-escaped) and refused by name, not by a decoding error.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT, errors="surrogateescape") as tar:
        info = tarfile.TarInfo("k\udcff.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    assert b"k\xff.json" in buffer.getvalue()
    assert _refusal(buffer.getvalue()).startswith(
        "Shard /c/s.tar holds a member named 'k\\udcff.json', not KEY.ext with a plain key"
    )
    # A key that comes back after another sample's members.
    again = _tar_bytes([("a.json", b"{}"), ("b.json", b"{}"), ("a.txt", b"")])
    assert _refusal(again).startswith(f"Shard /c/s.tar holds sample key a twice{tail}")


def test_a_member_that_ends_exactly_at_the_end_of_the_file_is_read():
    data = _tar_bytes([("k.json", b"x" * 512)])
    assert data[1024:] == bytes(len(data) - 1024)  # the header and the data; then only the end marker
    assert _raw(data[:1024]) == [{"__key__": "k", "__url__": "/c/s.tar", "json": b"x" * 512}]


def test_check_shards_names_the_shard_of_each_problem_and_lists_three_keys(tmp_path: Path):
    import dataclasses

    from cogvx.shards import ShardWriter, check_shards
    from cogvx.shards.shardfile import file_sha256

    from .test_shards import _sample

    manifest = _written_cache(tmp_path, samples=3)
    first = manifest.shards[0]
    wrong = ShardRecord(first.name, 3, first.bytes, first.sha256, first.samples[::-1], ["k7"], first.layouts)
    assert [p.shard for p in check_shards(tmp_path, [wrong])] == [first.name] * 3
    copy = dataclasses.replace(first, name="copy.tar")
    (tmp_path / "copy.tar").write_bytes((tmp_path / first.name).read_bytes())
    assert [(p.shard, p.message.split(";")[0]) for p in check_shards(tmp_path, [first, copy])] == [
        ("copy.tar", f"copy.tar: sample key k0 is also served by {first.name}"),
        ("copy.tar", f"copy.tar: sample key k1 is also served by {first.name}"),
    ]
    unrecorded = dataclasses.replace(first, layouts={"other": LAYOUT})
    problems = check_shards(tmp_path, [unrecorded], deep=False)
    assert [p.shard for p in problems] == [first.name] * 2 and "has no layout" in problems[0].message
    # An unreadable shard (its bytes match the manifest, but it is no tar) does not stop the check.
    (tmp_path / "bad.tar").write_bytes(b"\1" * 512)
    bad = ShardRecord("bad.tar", 0, 512, file_sha256(tmp_path / "bad.tar"))
    problems = check_shards(tmp_path, [bad, wrong])
    assert [p.shard for p in problems] == ["bad.tar", first.name, first.name, first.name]
    # Four missing, four unindexed and four unknown excluded keys: three of each are named.
    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path / "four", "s", records.append)
    for i in range(4):
        writer.write(*_sample(i))
    writer.flush()
    (record,) = records
    others = [dataclasses.replace(entry, key=f"m{i}") for i, entry in enumerate(record.samples)]
    lying = dataclasses.replace(record, samples=others, excluded=["x0", "x1", "x2", "x3"])
    assert [p.message for p in check_shards(tmp_path / "four", [lying])] == [
        f"{record.name}: sample keys differ from the manifest index (missing ['m0', 'm1', 'm2'], "
        "not indexed ['k0', 'k1', 'k2'])",
        f"{record.name}: excluded keys not in the shard: ['x0', 'x1', 'x2']",
    ]


def test_check_shards_bounds_tensor_members_by_the_recorded_layouts(tmp_path: Path):
    from cogvx.shards import ShardWriter, check_shards

    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append)
    writer.write(Sample("k0", {"x": torch.zeros(300_000)}, {"bucket": "b"}), SampleEntry("k0", "v0", "h0", "b"))
    writer.flush()
    (record,) = records
    record.layouts = {"b": {"x": {"dtype": "int8", "shape": [1]}}}  # a limit of 1 + 1 MiB bytes
    (problem,) = check_shards(tmp_path, [record])
    assert problem.message.startswith(f"Shard {tmp_path / record.name} has a member 'k0.safetensors' of ")
    assert problem.message.endswith(
        f" bytes, over the {1 + (1 << 20)}-byte limit for its kind. cogvx shards are plain uncompressed tars of "
        "regular KEY.ext members; this one was not written by cogvx or was changed. The shard is unusable."
    )


def test_iter_record_samples_refuses_before_yielding_with_where_and_fix(tmp_path: Path):
    import dataclasses

    from cogvx.shards import iter_record_samples

    record = _written_cache(tmp_path, samples=2).shards[0]
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

    record = _written_cache(tmp_path, samples=2).shards[0]
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


def test_a_shard_without_an_opened_time_was_opened_at_0(tmp_path: Path):
    import io
    import tarfile

    from cogvx.shards.rebuild import read_indexed_shard

    record = _written_cache(tmp_path, samples=2).shards[0]
    with (
        tarfile.open(tmp_path / record.name) as source,
        tarfile.open(tmp_path / "plain.tar", "w", format=tarfile.USTAR_FORMAT) as plain,
    ):  # the same members without the writer's pax global header
        for info in source.getmembers():
            plain.addfile(info, io.BytesIO(source.extractfile(info).read()))
    indexed = read_indexed_shard(tmp_path, "plain.tar")
    assert (indexed.opened, indexed.header, [e.key for e in indexed.record.samples]) == (0, None, ["k0", "k1"])
