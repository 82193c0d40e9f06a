"""``cogvx.shards.tar``: the bounded tar reader refuses what cogvx does not write, before reading it.

Each test pins a value docs/cache-format.md states (a limit, a count, a file name, a message that names
the file and the fix), so a changed comparison, constant or string in the module fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cogvx.shards import CacheError
from tests.helpers.shardcache import (
    tar_bytes,
)


def test_member_limits_by_kind():
    from cogvx.shards.tar import MAX_EXTRA_BYTES, MAX_META_BYTES, TENSOR_HEADER_ALLOWANCE, MemberLimits

    assert (MAX_META_BYTES, MAX_EXTRA_BYTES, TENSOR_HEADER_ALLOWANCE) == (1 << 20, 16 << 20, 1 << 20)
    limits = MemberLimits.for_layouts(
        {"a": {"x": {"dtype": "int8", "shape": [10]}}, "b": {"x": {"dtype": "int8", "shape": [30]}}}
    )
    assert (limits.of("safetensors"), limits.of("json"), limits.of("jpg")) == (30 + (1 << 20), 1 << 20, 16 << 20)
    assert MemberLimits.for_layouts({}).of("safetensors") is None


def _raw(data: bytes, **kwargs) -> list[dict]:
    from cogvx.shards import iter_raw_samples

    return list(iter_raw_samples(data, "/c/s.tar", **kwargs))


def test_the_reader_groups_members_and_reads_the_global_header():
    from cogvx.shards.tar import ShardReader

    data = tar_bytes([("a.json", b"{}"), ("a.x.y", b"1"), ("b.json", b"[]")], pax={"cogvx.opened": "5", "k": "é"})
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

    data = tar_bytes([("k.json", b"12345"), ("k.jpg", b"123"), ("k.safetensors", b"1234567")])
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
    assert len(_raw(tar_bytes([(f"k.x{i}", b"") for i in range(64)]))[0]) == 66


def test_a_truncated_tar_and_a_stream_without_a_size_are_refused_at_the_cut(tmp_path: Path):
    import io

    from cogvx.shards.tar import ShardReader

    data = tar_bytes([("k.json", b"x" * 700)])
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
            _raw(tar_bytes([(name, b"")]))
    gz = bytes([0x1F, 0x8B]) + bytes(510)
    with pytest.raises(
        CacheError, match="is not an uncompressed tar \\(it is gzip-compressed\\): bad header at byte 0"
    ):
        _raw(gz)
    with pytest.raises(CacheError, match="is not an uncompressed tar: bad header at byte 512"):
        _raw(tar_bytes([("k.json", b"")])[:512] + b"\1" * 512)


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
    data = tar_bytes([("a.json", b"{}")], pax={"k": "v"})  # the global header's one record: b"6 k=v\n"
    assert data.count(b"6 k=v\n") == 1
    assert _refusal(data.replace(b"6 k=v\n", b"9 k=v\n")).startswith(
        f"Shard /c/s.tar has a malformed pax header at byte 1024{tail}"
    )
    big = tar_bytes([("a.json", b"{}")], pax={"c": "x" * (1 << 20)})
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
    again = tar_bytes([("a.json", b"{}"), ("b.json", b"{}"), ("a.txt", b"")])
    assert _refusal(again).startswith(f"Shard /c/s.tar holds sample key a twice{tail}")


def test_a_member_that_ends_exactly_at_the_end_of_the_file_is_read():
    data = tar_bytes([("k.json", b"x" * 512)])
    assert data[1024:] == bytes(len(data) - 1024)  # the header and the data; then only the end marker
    assert _raw(data[:1024]) == [{"__key__": "k", "__url__": "/c/s.tar", "json": b"x" * 512}]
