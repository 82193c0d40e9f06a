"""``cogvx.shards.verify``: every problem of a cache named once, with its shard, without stopping at the first.

Each test pins a value docs/cache-format.md states (a limit, a count, a file name, a message that names
the file and the fix), so a changed comparison, constant or string in the module fails here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cogvx.shards import Sample, SampleEntry, ShardRecord
from tests.helpers.shardcache import (
    BUCKET,
    LAYOUT,
    manifest_of,
    refusal_without_blocking,
    sample_and_entry,
    tar_bytes,
    written_cache,
)


def test_check_shards_reports_each_kind_of_problem_once_with_its_shard(tmp_path: Path):
    import shutil

    from cogvx.shards import check_shards

    manifest = written_cache(tmp_path, samples=3)
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

    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append)
    for i in range(5):
        sample, entry = sample_and_entry(i)
        sample.tensors["moments"][0, 0, 0, 0] = float("nan")
        writer.write(sample, entry)
    writer.flush()
    manifest_of(tmp_path, records)
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


def test_verify_decodes_tensors_only_when_deep(tmp_path: Path):
    from cogvx.shards import ShardWriter, verify

    records: list[ShardRecord] = []
    writer = ShardWriter(tmp_path, "s", records.append)
    sample, entry = sample_and_entry(0)
    sample.tensors["moments"][0, 0, 0, 0] = float("inf")
    writer.write(sample, entry)
    writer.flush()
    assert verify(tmp_path, records, deep=False) == []
    assert [m.split(": ")[1] for m in verify(tmp_path, records)] == [
        f"tensor moments holds NaN or Inf. The shard is unusable; run `cogvx shards verify {tmp_path}` for how to "
        "repair it."
    ]


def test_check_shards_names_a_missing_json_and_a_lying_one_without_decoding(tmp_path: Path):
    import hashlib

    from cogvx.shards import check_shards
    from cogvx.shards.rebuild import read_indexed_shard

    def listed(name: str, members: list[tuple[str, bytes]]) -> ShardRecord:
        data = tar_bytes(members)
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


def test_check_shards_goes_on_after_a_missing_shard_and_names_an_unreadable_one(tmp_path: Path):
    import hashlib

    from cogvx.shards import check_shards

    manifest = written_cache(tmp_path, samples=3)
    first, second = manifest.shards
    (tmp_path / first.name).unlink()
    data = tar_bytes([("k.j/son", b"")])
    (tmp_path / "odd.tar").write_bytes(data)
    odd = ShardRecord("odd.tar", 1, len(data), hashlib.sha256(data).hexdigest())
    problems = check_shards(tmp_path, [first, odd, second])
    assert [(p.shard, p.damaged) for p in problems] == [(first.name, True), ("odd.tar", False)]
    assert problems[1].message == (
        f"Shard {tmp_path / 'odd.tar'} holds a member named 'k.j/son', not KEY.ext with a plain key. cogvx shards are "
        "plain uncompressed tars of regular KEY.ext members; this one was not written by cogvx or was changed. The "
        "shard is unusable."
    )


def test_check_shards_names_the_shard_of_each_problem_and_lists_three_keys(tmp_path: Path):
    import dataclasses

    from cogvx.shards import ShardWriter, check_shards
    from cogvx.shards.shardfile import file_sha256

    manifest = written_cache(tmp_path, samples=3)
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
        writer.write(*sample_and_entry(i))
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
