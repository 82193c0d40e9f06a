"""``cogvx.preprocess.cachedir``: an existing cache checked, recovered and merged, with the exact names and messages.

Each test pins a value docs/cache-format.md states (a limit, a count, a file name, a message that names
the file and the fix), so a changed comparison, constant or string in the module fails here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from cogvx.shards import CacheError, Manifest, ShardRecord, paths
from tests.helpers.shardcache import (
    sample_and_entry,
)


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

    records: list[ShardRecord] = []
    writer = ShardWriter(folder, f"shard-r{rank:02d}", records.append, max_samples=1, first_index=first,
                         header=cache_header(manifest))  # fmt: skip
    for i in range(first, first + count):
        writer.write(*sample_and_entry(i))
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


def test_both_cache_targets_implement_the_whole_protocol_with_its_signatures():
    import inspect

    from cogvx.preprocess.remote import RemoteTarget
    from cogvx.preprocess.target import CacheTarget, LocalTarget

    members = ["__enter__", "__exit__"]
    members += [name for name, value in vars(CacheTarget).items() if inspect.isfunction(value) and name[0] != "_"]
    assert {"recover", "publish_shard", "publish", "save_validation_prompts", "writing"} <= set(members)
    for target in (LocalTarget, RemoteTarget):
        for name in members:
            expected = inspect.signature(getattr(CacheTarget, name)).parameters
            assert list(inspect.signature(getattr(target, name)).parameters) == list(expected), (target, name)
    assert {"folder", "shown"} <= set(CacheTarget.__annotations__)
