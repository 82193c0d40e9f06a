"""The bounded tar reader: a shard's members grouped into raw samples, trusting nothing in the file.

Shards may come from anywhere (copied, downloaded, half-synced), so the reader reads plain uncompressed
tars only (never gzip), accepts only regular members named ``KEY.ext``, and bounds every read by the
shard's size, the tar headers and maxima derived from the sample layout (see docs/cache-format.md,
"Reader limits"). It never creates, follows or decompresses anything.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from cogvx.locations import parent_of
from cogvx.shards.codec import MEMBER_EXT, META, TENSORS, RawSample, short
from cogvx.shards.layouts import Layouts, layout_bytes
from cogvx.shards.manifest import KEY_PATTERN, CacheError

# Reader limits (bytes). A member larger than its limit is refused before it is read.
MAX_META_BYTES = 1 << 20  # a sample's .json
MAX_EXTRA_BYTES = 16 << 20  # any other raw member (.jpg strip ...)
TENSOR_HEADER_ALLOWANCE = 1 << 20  # a safetensors header on top of the bytes its layout's tensors need
MAX_PAX_BYTES = 1 << 20  # a pax header (the writer's header lives in one)
MAX_MEMBERS_PER_SAMPLE = 64
_BLOCK = 512
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_MEMBER_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.DIRTYPE: "a folder",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_LONGNAME: "a GNU long name",
    tarfile.GNUTYPE_LONGLINK: "a GNU long link",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}


@dataclass
class MemberLimits:
    """The largest member (bytes) the reader accepts, by kind; ``tensors`` None = only the shard's size."""

    tensors: int | None = None
    meta: int = MAX_META_BYTES
    extra: int = MAX_EXTRA_BYTES

    @classmethod
    def for_layouts(cls, layouts: Layouts) -> MemberLimits:
        if not layouts:
            return cls()
        return cls(tensors=max(layout_bytes(layout) for layout in layouts.values()) + TENSOR_HEADER_ALLOWANCE)

    def of(self, ext: str) -> int | None:
        return self.tensors if ext == TENSORS else self.meta if ext == META else self.extra


class ShardReader:
    """Streams the members of one plain (uncompressed) tar and groups them into raw samples.

    Never decompresses, never follows or creates anything on disk: only regular members named
    ``KEY.ext`` are accepted, each refused before it is read if larger than its ``MemberLimits`` or
    than what is left of the shard. ``header`` holds the pax global header once reading has started.
    """

    def __init__(self, data: bytes | BinaryIO, origin: str, limits: MemberLimits | None = None, fix: str | None = None):
        if isinstance(data, bytes | bytearray):
            self.size: int | None = len(data)
            self.stream: BinaryIO = io.BytesIO(data)
        else:
            self.stream = data
            try:
                self.size = os.fstat(data.fileno()).st_size - data.tell()
            except (AttributeError, OSError, io.UnsupportedOperation):
                self.size = None
        self.origin, self.limits = origin, limits or MemberLimits()
        self.fix = fix or f"Run `cogvx shards verify {parent_of(origin)}`"
        self.header: dict[str, str] = {}
        self.position = 0

    def _read(self, n: int) -> bytes:
        data = self.stream.read(n)
        self.position += len(data)
        if len(data) != n:
            raise CacheError(f"Shard {self.origin} ends inside a tar member (byte {self.position}); it is truncated.")
        return data

    def _refuse(self, what: str) -> CacheError:
        return CacheError(
            f"Shard {self.origin} {what}. cogvx shards are plain uncompressed tars of regular KEY.ext members; "
            f"this one was not written by cogvx or was changed. {self.fix}."
        )

    def _payload(self, size: int, limit: int | None, name: str) -> bytes:
        if limit is not None and size > limit:
            raise self._refuse(f"has a member {name!r} of {size} bytes, over the {limit}-byte limit for its kind")
        if self.size is not None and size > self.size - self.position:
            raise self._refuse(f"has a member {name!r} of {size} bytes, more than the file holds")
        data = self._read(size)
        self._read(-size % _BLOCK)
        return data

    def members(self) -> Iterator[tuple[str, str, bytes]]:
        """(key, extension, bytes) of every member, in order."""
        pending: dict[str, str] = {}  # a pax extended header applies to the next member
        while True:
            block = self.stream.read(_BLOCK)
            self.position += len(block)
            if not block or block == bytes(_BLOCK):
                return  # end of archive (a missing end marker is tolerated, as tarfile does)
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as err:
                kind = " (it is gzip-compressed)" if block[:2] == b"\x1f\x8b" else ""
                raise self._refuse(f"is not an uncompressed tar{kind}: bad header at byte {self.position - _BLOCK} "
                                   f"({err})") from err  # fmt: skip
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
                records = _pax_records(self._payload(info.size, MAX_PAX_BYTES, "pax header"), self)
                if info.type == tarfile.XGLTYPE:
                    self.header.update(records)
                else:
                    pending = records
                continue
            name = pending.get("path", info.name)
            try:
                size = int(pending.get("size", info.size))
            except ValueError as err:
                raise self._refuse(f"has a pax header with size {pending['size']!r}") from err
            pending = {}
            if info.type not in _REGULAR:
                kind = _MEMBER_KINDS.get(info.type, f"a member of type {info.type!r}")
                raise self._refuse(f"holds {name!r}, {kind}")
            key, _, ext = name.partition(".")
            if not KEY_PATTERN.match(key) or not MEMBER_EXT.match(ext):
                raise self._refuse(f"holds a member named {short(name)}, not KEY.ext with a plain key")
            yield key, ext, self._payload(size, self.limits.of(ext), name)

    def samples(self, exclude: Iterable[str] = ()) -> Iterator[RawSample]:
        """The raw samples of the tar, in order, ``exclude`` keys left out."""
        skip, seen = set(exclude), set()
        current: RawSample | None = None
        for key, ext, data in self.members():
            if current is None or key != current.key:
                if current is not None and current.key not in skip:
                    yield current
                if key in seen:
                    raise self._refuse(f"holds sample key {key} twice")
                seen.add(key)
                current = RawSample(key, self.origin, {})
            if ext in current.members:
                raise self._refuse(f"holds member {key}.{ext} twice")
            if len(current.members) >= MAX_MEMBERS_PER_SAMPLE:
                raise self._refuse(f"holds more than {MAX_MEMBERS_PER_SAMPLE} members for sample {key}")
            current.members[ext] = data
        if current is not None and current.key not in skip:
            yield current


def _pax_records(data: bytes, reader: ShardReader) -> dict[str, str]:
    """``LENGTH KEY=VALUE\\n`` records of a pax header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 20)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise reader._refuse(f"has a malformed pax header at byte {reader.position}")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


def iter_raw_samples(
    data: bytes | BinaryIO,
    origin: str,
    exclude: Iterable[str] = (),
    limits: MemberLimits | None = None,
    fix: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Group the members of a tar (bytes or an open file) into raw webdataset samples (suffix -> bytes).

    ``exclude``: keys not to yield -- pass ``record.excluded``, the samples a later shard replaced.
    ``fix`` ends a refusal's message (default: run `cogvx shards verify`).
    """
    return (raw.to_dict() for raw in ShardReader(data, origin, limits, fix).samples(exclude))
