"""``cogvx.shards.codec`` and ``checks``: a sample's members, its .json index line, finiteness, exact messages.

Each test pins a value docs/cache-format.md states (a limit, a count, a file name, a message that names
the file and the fix), so a changed comparison, constant or string in the module fails here.
"""

from __future__ import annotations

import pytest
import torch

from cogvx.shards import CacheError, Sample, SampleEntry


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
    from cogvx.shards.codec import encode_sample

    with pytest.raises(ValueError) as err:
        encode_sample(Sample(key, {"x": torch.zeros(1)}, {}, extras))
    assert message in str(err.value)


def test_encode_sample_writes_tensors_then_sorted_json_then_sorted_extras():
    from safetensors.torch import load

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
