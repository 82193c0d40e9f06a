"""Writing and reading webdataset tar shards of safetensors samples.

A sample with key ``K`` is stored as consecutive tar members ``K.safetensors`` (all its tensors),
``K.json`` (its metadata) and optional raw members (``K.jpg`` ...). Nothing is ever unpickled:
tensors are parsed by safetensors, metadata by json, and every other member stays as raw bytes.

Shards may come from anywhere (copied, downloaded, half-synced), so the reader trusts nothing in
them: it reads plain uncompressed tars only (never gzip), opens regular files only, accepts only
regular members named ``KEY.ext``, and bounds every read by the manifest's byte count, the tar
headers and maxima derived from the sample layout (see docs/cache-format.md, "Reader limits").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from cogvx.shards import paths
from cogvx.shards.manifest import (
    KEY_PATTERN,
    CacheError,
    Layouts,
    SampleEntry,
    ShardRecord,
    describe_layout,
    is_plain_name,
    joined_layout,
    layout_bytes,
    merge_layouts,
    open_regular,
    parse_carries,
    sample_layout,
)
from cogvx.shards.store import LocalStore, Mismatch, Store, is_remote, open_store, parent_of

TENSORS = "safetensors"
META = "json"
INDEX = "index"  # the json field where the writer keeps the sample's manifest index line
INDEX_FIELDS = ("bucket", "source", "content_hash")  # also top-level json fields, which training reads

# Reader limits (bytes). A member larger than its limit is refused before it is read.
MAX_META_BYTES = 1 << 20  # a sample's .json
MAX_EXTRA_BYTES = 16 << 20  # any other raw member (.jpg strip ...)
TENSOR_HEADER_ALLOWANCE = 1 << 20  # a safetensors header on top of the bytes its layout's tensors need
MAX_PAX_BYTES = 1 << 20  # a pax header (the writer's header lives in one)
MAX_MEMBERS_PER_SAMPLE = 64
_BLOCK = 512
_EXT = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
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
HEADER_KEY = "cogvx.header"  # pax global header: what the cache was made with (``ShardWriter(header=...)``)
OPENED_KEY = "cogvx.opened"  # pax global header: when the writer opened the shard (ns), to order a rebuild


@dataclass
class Sample:
    key: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    extras: dict[str, bytes] = field(default_factory=dict)


def layout_of(sample: Sample) -> dict[str, dict[str, Any]]:
    """The names, dtypes and shapes of a sample's tensors: what all samples of its bucket share."""
    return {
        name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        for name, t in sorted(sample.tensors.items())
    }


def encode_sample(sample: Sample) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in order."""
    if not KEY_PATTERN.match(sample.key):
        raise ValueError(f"Sample key {sample.key!r} must use only letters, digits, '-' and '_' (at most 64).")
    bad = [ext for ext in sample.extras if ext in (TENSORS, META) or not _EXT.match(ext)]
    if bad:
        raise ValueError(f"Sample {sample.key}: extra member name {bad[0]!r} is reserved or not [A-Za-z0-9_.]+.")
    tensors = {name: t.detach().cpu().contiguous() for name, t in sample.tensors.items()}
    members = [(f"{sample.key}.{TENSORS}", save_tensors(tensors))]
    members.append((f"{sample.key}.{META}", json.dumps(sample.meta, sort_keys=True).encode()))
    members += [(f"{sample.key}.{ext}", data) for ext, data in sorted(sample.extras.items())]
    return members


def decode_sample(raw: dict[str, Any], origin: str = "") -> Sample:
    """A webdataset-grouped raw sample (suffix -> bytes) to tensors and metadata, without pickle.

    A raw sample from ``iter_record_samples`` carries its manifest index line and the cache's bucket
    layouts, and is checked against them (``check_sample``) before it is returned.
    """
    key = raw["__key__"]
    try:
        tensors = load_tensors(raw[TENSORS])
        meta = raw["__meta__"] if "__meta__" in raw else json.loads(raw[META])  # parsed once by the reader
    except KeyError as err:
        raise CacheError(f"Sample {key} in {origin} has no .{err.args[0]} member; the shard is damaged.") from err
    except Exception as err:
        raise CacheError(f"Sample {key} in {origin} cannot be parsed ({err}); the shard is damaged.") from err
    if not isinstance(meta, dict):
        raise CacheError(f"Sample {key} in {origin}: its .json is a {type(meta).__name__}, not an object.")
    extras = {k: v for k, v in raw.items() if not k.startswith("__") and k not in (TENSORS, META)}
    sample = Sample(key, tensors, meta, extras)
    layouts = raw.get("__layouts__")
    if layouts is not None:
        entry: SampleEntry | None = raw["__entry__"]
        bucket = entry.bucket if entry is not None else meta.get("bucket")
        # A cache that recorded no layout for this bucket: its first sample read sets it for the rest.
        layout = layouts.setdefault(bucket, layout_of(sample)) if isinstance(bucket, str) else {}
        check_sample(sample, entry, layout, origin)
    return sample


def check_sample(
    sample: Sample,
    entry: SampleEntry | None,
    layout: dict[str, dict[str, Any]],
    origin: str,
    fix: str | None = None,
) -> None:
    """Refuse a decoded sample that training cannot use, with a CacheError naming ``origin`` and the key.

    Checks its .json against its manifest index line (``entry``; None when the manifest has no index)
    and its tensors against its bucket's ``layout`` (names, dtypes, shapes); floating tensors must be
    finite (no NaN or Inf). ``fix``, a sentence, ends the message (default: run `cogvx shards verify`).
    """
    where = f"Sample {sample.key} in {origin}"
    fix = fix or _verify_hint(origin)
    check_index(sample.meta, entry, where, fix)
    found = layout_of(sample)
    # Tensors a sample may carry (image latents) are part of its bucket's layout only where it carries them.
    layout = sample_layout(layout, entry.carries if entry is not None else tuple(found))
    if found != layout:
        bucket = sample.meta.get("bucket")
        raise CacheError(
            f"{where} holds {describe_layout(found) or 'no tensors'}, but bucket {bucket} is "
            f"{describe_layout(layout) or 'empty'}; training cannot batch it. {fix}."
        )
    for name, tensor in sample.tensors.items():
        if not _all_finite(tensor):
            raise CacheError(f"{where}: tensor {name} holds NaN or Inf. {fix}.")


def check_index(meta: Any, entry: SampleEntry | None, where: str, fix: str) -> None:
    """The .json of a sample must be an object that agrees with its manifest index line."""
    if not isinstance(meta, dict):
        raise CacheError(f"{where}: its .json is a {type(meta).__name__}, not an object. {fix}.")
    if not isinstance(meta.get("bucket"), str):
        raise CacheError(f"{where}: its .json has no bucket. {fix}.")
    if entry is None:
        return
    expected = {name: getattr(entry, name) for name in INDEX_FIELDS}
    if INDEX in meta:
        expected = {**expected, INDEX: _index_line(entry)}
    for name, value in expected.items():
        if meta.get(name) != value:
            raise CacheError(
                f"{where}: its .json says {name} {_short(meta.get(name))}, the manifest's index says "
                f"{_short(value)}: the shard or the manifest was changed. {fix}."
            )


def _index_line(entry: SampleEntry) -> dict[str, Any]:
    return {k: v for k, v in entry.to_dict().items() if k != "key"}


def entry_from_meta(key: str, meta: dict[str, Any]) -> SampleEntry:
    """The manifest index line of a sample, rebuilt from its own .json (``index``, else the top-level fields)."""
    line = meta.get(INDEX)
    if not isinstance(line, dict):  # written before the writer kept index lines: the fields it had
        line = {name: meta.get(name) for name in INDEX_FIELDS}
    kinds = {"source": str, "content_hash": str, "bucket": str, "size": int, "mtime_ns": int, "caption_hash": str}
    line = dict(line)
    if "carries" in line:
        carries = line.pop("carries")
        if not isinstance(carries, list):
            raise CacheError(f"Sample {key}: its .json index line has an unusable carries ({_short(carries)}).")
        line["carries"] = parse_carries(carries, f"Sample {key}: its .json index line")
    for name, value in line.items():
        if name == "carries":
            continue
        kind = kinds.get(name)
        optional = name not in INDEX_FIELDS and value is None
        if kind is None or not (optional or type(value) is kind):
            raise CacheError(f"Sample {key}: its .json index line has an unusable {name} ({_short(value)}).")
    missing = [name for name in INDEX_FIELDS if name not in line]
    if missing:
        raise CacheError(f"Sample {key}: its .json index line has no {missing[0]}.")
    return SampleEntry(key, **line)


def _verify_hint(origin: str) -> str:
    return f"The shard is unusable; run `cogvx shards verify {parent_of(origin)}` for how to repair it"


# Floating dtypes by their bits: a value is NaN or Inf exactly when its exponent bits are all ones, so
# "magnitude bits >= that exponent" over an integer view finds one in a single pass (numpy: ~1 ms for a
# 5b-size latent, 20x faster than torch.isfinite on bfloat16).
_FLOAT_BITS = {
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}


def _all_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    bits = _FLOAT_BITS.get(tensor.dtype)
    if bits is None:  # float8 and other rare types
        return bool(torch.isfinite(tensor.float()).all())
    kind, magnitude, exponent = bits
    ints = tensor.detach().cpu().contiguous().view(kind).numpy()
    return int((ints & magnitude).max()) < exponent


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# A shard is finished once it reaches either limit (PreprocessConfig's shard_max_mb / shard_max_samples).
SHARD_MAX_BYTES = 512 * 2**20
SHARD_MAX_SAMPLES = 1000


class ShardWriter:
    """Writes samples into size-capped shards; each shard appears under its final name only when complete.

    ``on_shard`` is called with the record of every finished shard, so the caller can commit it to the
    manifest right away (an interrupted run then keeps everything up to its last finished shard).
    ``header`` (what the cache is made with: producer, params, schema) is stored in every shard as a pax
    global header, which webdataset readers never see; with each sample's .json carrying its index line,
    it lets ``rebuild_manifest`` re-create a lost manifest from the shards alone.
    """

    def __init__(
        self,
        folder: Path,
        prefix: str,
        on_shard: Callable[[ShardRecord], None],
        max_bytes: int = SHARD_MAX_BYTES,
        max_samples: int = SHARD_MAX_SAMPLES,
        first_index: int = 0,
        header: dict[str, Any] | None = None,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.on_shard = on_shard
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.index = first_index
        self.header = json.dumps(header, sort_keys=True) if header is not None else None
        self.layouts: Layouts = {}  # every bucket written so far: later samples of a bucket must match
        self._tar: tarfile.TarFile | None = None
        self._entries: list[SampleEntry] = []
        self._shard_layouts: Layouts = {}
        self._bytes = 0

    def _path(self, index: int) -> Path:
        return self.folder / paths.shard_name(self.prefix, index)

    def write(self, sample: Sample, entry: SampleEntry) -> None:
        self.write_group([(sample, entry)])

    def write_group(self, group: list[tuple[Sample, SampleEntry]]) -> None:
        """Write samples that must land in the same shard (e.g. all windows of one clip).

        A shard is finished only between groups, so a run killed at any moment publishes either all of
        a group or none of it, and the next run can tell "done" by the source alone.
        """
        encoded, layouts = [], dict(self.layouts)
        for sample, entry in group:  # everything is checked before anything is written
            if sample.key != entry.key:
                raise ValueError(f"Sample {sample.key} comes with the index line of {entry.key}.")
            layout = layout_of(sample)
            if layout != sample_layout(layout, entry.carries):
                raise ValueError(f"Sample {sample.key} holds {describe_layout(layout)}, its index line carries "
                                 f"{list(entry.carries)}.")  # fmt: skip
            joined = joined_layout(layouts.setdefault(entry.bucket, layout), layout)
            if joined is None:
                raise ValueError(
                    f"Sample {sample.key} of bucket {entry.bucket} holds {describe_layout(layout)}, earlier samples "
                    f"of that bucket {describe_layout(layouts[entry.bucket])}; a bucket has one layout."
                )
            layouts[entry.bucket] = joined
            meta = _with_index(sample, entry)
            encoded.append((encode_sample(Sample(sample.key, sample.tensors, meta, sample.extras)), layout))
        if self._tar is None:
            while self._path(self.index).exists():
                self.index += 1
            pax = {OPENED_KEY: str(time.time_ns())}
            if self.header is not None:
                pax[HEADER_KEY] = self.header
            tmp = paths.temporary(self._path(self.index))
            self._tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT, pax_headers=pax)
        now = int(time.time())  # an int: a float mtime would add a pax header to every member
        for (members, layout), (_, entry) in zip(encoded, group, strict=True):
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), now, 0o644
                self._tar.addfile(info, io.BytesIO(data))
                self._bytes += len(data) + 1024
            self._entries.append(entry)
            # A shard records what its own samples hold: their layouts joined (checked above to agree).
            self._shard_layouts[entry.bucket] = joined_layout(self._shard_layouts.get(entry.bucket, layout), layout)
        self.layouts = layouts
        if self._bytes >= self.max_bytes or len(self._entries) >= self.max_samples:
            self.flush()

    def flush(self) -> None:
        """Finish the open shard (if any): close, fsync, rename into place, report it."""
        if self._tar is None:
            return
        tmp = Path(self._tar.name)
        self._tar.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self._path(self.index)
        os.replace(tmp, final)
        record = ShardRecord(
            final.name,
            len(self._entries),
            final.stat().st_size,
            file_sha256(final),
            self._entries,
            layouts=self._shard_layouts,
        )
        self._tar, self._entries, self._shard_layouts, self._bytes = None, [], {}, 0
        self.index += 1
        self.on_shard(record)

    def abandon(self) -> None:
        """Drop the open shard without publishing it (on an error)."""
        if self._tar is not None:
            tmp = Path(self._tar.name)
            self._tar.close()
            tmp.unlink(missing_ok=True)
            self._tar, self._entries, self._shard_layouts, self._bytes = None, [], {}, 0


def _with_index(sample: Sample, entry: SampleEntry) -> dict[str, Any]:
    """The sample's metadata plus its index line: top-level bucket/source/content_hash and ``index``."""
    meta = dict(sample.meta)
    for name, value in {**{n: getattr(entry, n) for n in INDEX_FIELDS}, INDEX: _index_line(entry)}.items():
        if meta.setdefault(name, value) != value:
            raise ValueError(
                f"Sample {sample.key}: its metadata says {name} {_short(meta[name])}, its index line {_short(value)}."
            )
    return meta


def file_sha256(path: Path, limit: int | None = None) -> str:
    """sha256 of a regular file (a FIFO or device is refused); with ``limit``, of at most its first ``limit``
    bytes -- reading stops there."""
    with open_regular(Path(path)) as f:
        return _sha256(f, limit)


def _sha256(f: BinaryIO, limit: int | None) -> str:
    digest = hashlib.sha256()
    left = limit if limit is not None else -1
    while left:
        block = f.read(1 << 22 if left < 0 else min(1 << 22, left))
        if not block:
            break
        digest.update(block)
        left -= len(block) if left > 0 else 0
    return digest.hexdigest()


def _shard_path(folder: Path | str | Store, record: ShardRecord) -> Path | str:
    """Where a listed shard is (a path, or a URL's display form), for messages and ``ShardReader``'s origin."""
    if not is_plain_name(record.name):  # records from a manifest are checked on load; these come from code
        where = folder.location if isinstance(folder, Store) else folder
        raise CacheError(f"Shard name {record.name!r} is not a plain file name inside {where}.")
    if isinstance(folder, Store):
        return folder.path(record.name) if isinstance(folder, LocalStore) else folder.url(record.name)
    return Path(folder) / record.name if not is_remote(folder) else open_store(folder).url(record.name)


def _missing(path: Path | str) -> CacheError:
    return CacheError(
        f"Shard {path} is listed in the manifest but missing. Restore it, or run `cogvx shards verify "
        f"{parent_of(str(path))}` for the command that re-encodes its samples."
    )


def _mismatch(path: Path | str, size: int, record: ShardRecord) -> CacheError:
    return CacheError(
        f"Shard {path} does not match the manifest ({size} bytes, expected {record.bytes}; "
        f"sha256 differs). It was changed or damaged after it was written. Run `cogvx shards verify "
        f"{parent_of(str(path))}` to list every bad shard and the command that re-encodes their samples."
    )


def open_shard(folder: Path | str | Store, record: ShardRecord, full: bool = True) -> BinaryIO:
    """An open shard file, refused unless it is a regular file of the manifest's size and (with ``full``)
    sha256. The hash reads at most ``record.bytes``; the file is returned at its start.

    ``folder`` may be a URL or a ``Store``: a remote shard is copied through its sha256 into a local
    temporary file (or the store's read-through cache) and handed out only once it matched, so no sample
    of a shard is served before its hash is confirmed, wherever it lives.
    """
    path = _shard_path(folder, record)
    try:
        return open_store(folder).fetch(record.name, record.bytes, record.sha256, full=full)
    except FileNotFoundError as err:
        raise _missing(path) from err
    except Mismatch as err:
        raise _mismatch(path, err.size, record) from err


def check_shard(folder: Path | str | Store, record: ShardRecord, full: bool = True) -> Path | str:
    """Refuse a shard unless its size (and, with ``full``, its sha256, hashed while streaming) match."""
    with open_shard(folder, record, full):
        return _shard_path(folder, record)


def read_verified(folder: Path | str | Store, record: ShardRecord) -> bytes:
    """A shard's bytes, refused unless they match the manifest's size and sha256."""
    path = _shard_path(folder, record)
    with open_shard(folder, record, full=False) as f:  # size checked; hashed below, from memory
        data = f.read(record.bytes + 1)
    if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
        raise _mismatch(path, len(data), record)
    return data


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
            if not KEY_PATTERN.match(key) or not _EXT.match(ext):
                raise self._refuse(f"holds a member named {_short(name)}, not KEY.ext with a plain key")
            yield key, ext, self._payload(size, self.limits.of(ext), name)

    def samples(self, exclude: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
        """Raw webdataset samples (``__key__``, ``__url__``, extension -> bytes), ``exclude`` keys left out."""
        skip, seen = set(exclude), set()
        current: dict[str, Any] | None = None
        for key, ext, data in self.members():
            if current is None or key != current["__key__"]:
                if current is not None and current["__key__"] not in skip:
                    yield current
                if key in seen:
                    raise self._refuse(f"holds sample key {key} twice")
                seen.add(key)
                current = {"__key__": key, "__url__": self.origin}
            if ext in current:
                raise self._refuse(f"holds member {key}.{ext} twice")
            if len(current) >= MAX_MEMBERS_PER_SAMPLE + 2:
                raise self._refuse(f"holds more than {MAX_MEMBERS_PER_SAMPLE} members for sample {key}")
            current[ext] = data
        if current is not None and current["__key__"] not in skip:
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
    return ShardReader(data, origin, limits, fix).samples(exclude)


def iter_record_samples(
    data: bytes | BinaryIO,
    record: ShardRecord,
    origin: str,
    layouts: Layouts | None = None,
    include_excluded: bool = False,
) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard that readers should serve (its replaced samples left out).

    Each is checked against the manifest's index before it is yielded (key listed, .json an object whose
    bucket, source and content hash match), so code that groups raw samples by bucket can trust it, and
    carries what ``decode_sample`` needs to check its tensors: its index line and ``layouts`` (the
    cache's bucket layouts; pass one dict for a whole stream, so a cache that recorded none learns each
    bucket's layout from its first sample).
    """
    index = {entry.key: entry for entry in record.samples}
    layouts = dict(record.layouts) if layouts is None else layouts
    exclude = () if include_excluded else record.excluded
    fix = _verify_hint(origin)
    for raw in iter_raw_samples(data, origin, exclude, MemberLimits.for_layouts(record.layouts)):
        key = raw["__key__"]
        where = f"Sample {key} in {origin}"
        entry = index.get(key)
        if index and entry is None:
            raise CacheError(f"{where} is not in the manifest's index of that shard. {fix}.")
        if META not in raw or TENSORS not in raw:
            raise CacheError(f"{where} has no .{META if META not in raw else TENSORS} member. {fix}.")
        try:
            meta = json.loads(raw[META])
        except (ValueError, RecursionError) as err:  # RecursionError: nested too deep
            raise CacheError(f"{where}: its .json cannot be parsed ({err}). {fix}.") from err
        check_index(meta, entry, where, fix)
        _check_recorded(meta["bucket"], record, where, fix)
        raw["__entry__"], raw["__layouts__"], raw["__meta__"] = entry, layouts, meta
        yield raw


def read_shard(
    folder: Path | str | Store, record: ShardRecord, include_excluded: bool = False, layouts: Layouts | None = None
) -> Iterator[Sample]:
    """Every live sample of one verified shard, decoded and checked (``include_excluded`` adds the replaced ones).

    The shard is hashed, then streamed from the file; ``layouts`` as in ``iter_record_samples``.
    """
    folder = open_store(folder)
    origin = str(_shard_path(folder, record))
    with open_shard(folder, record) as stream:
        for raw in iter_record_samples(stream, record, origin, layouts, include_excluded):
            yield decode_sample(raw, origin)


@dataclass
class ShardProblem:
    shard: str
    message: str
    damaged: bool = False  # missing, or its bytes differ from the manifest (re-encoding it repairs it)


def check_shards(folder: Path | str | Store, records: list[ShardRecord], deep: bool = True) -> list[ShardProblem]:
    """Every shard against the manifest, and every sample against its index line and bucket layout.

    Always: the file (a regular file of the recorded size and sha256), the tar (plain, regular members,
    within the reader limits), the sample count, keys against the index, duplicate keys (in a shard and
    across the cache), excluded keys, each .json against its index line. With ``deep``, also each
    sample's tensors: names, dtypes and shapes against its bucket's layout, and no NaN/Inf.
    """
    folder = open_store(folder)
    problems: list[ShardProblem] = []
    layouts: Layouts = {}
    for record in records:
        try:
            merge_layouts(layouts, record.layouts, record.name)
        except CacheError as err:
            problems.append(ShardProblem(record.name, str(err)))
    owner: dict[str, str] = {}  # live key -> the shard that serves it
    for record in records:
        origin = str(_shard_path(folder, record))
        try:
            stream = open_shard(folder, record)
        except CacheError as err:
            problems.append(ShardProblem(record.name, str(err), damaged=True))
            continue
        found: list[ShardProblem] = []
        keys: list[str] = []
        index = {entry.key: entry for entry in record.samples}
        fix = "The shard is unusable"  # verify's last line says how to repair it
        readable = True
        try:
            with stream:
                raws = iter_raw_samples(stream, origin, limits=MemberLimits.for_layouts(record.layouts), fix=fix)
                for raw in raws:
                    keys.append(raw["__key__"])
                    if len(found) >= 3 or (index and raw["__key__"] not in index):
                        continue  # enough said about this shard / reported below as a key mismatch
                    try:
                        _check_raw(raw, index.get(raw["__key__"]), record, layouts, origin, deep, fix)
                    except CacheError as err:
                        found.append(ShardProblem(record.name, str(err)))
        except CacheError as err:
            found.append(ShardProblem(record.name, str(err)))
            readable = False  # the keys read so far are not the shard's keys
        problems += found
        if not readable:
            continue
        if len(keys) != record.sample_count:
            problems.append(ShardProblem(record.name, f"{record.name}: {len(keys)} samples, manifest says "
                                         f"{record.sample_count}"))  # fmt: skip
        indexed = [entry.key for entry in record.samples]
        if indexed and keys != indexed:
            missing = sorted(set(indexed) - set(keys))[:3]
            extra = sorted(set(keys) - set(indexed))[:3]
            problems.append(ShardProblem(record.name, f"{record.name}: sample keys differ from the manifest index "
                                         f"(missing {missing}, not indexed {extra})"))  # fmt: skip
        unknown = sorted(set(record.excluded) - set(keys))
        if unknown:
            problems.append(ShardProblem(record.name, f"{record.name}: excluded keys not in the shard: {unknown[:3]}"))
        excluded = set(record.excluded)
        for key in keys:
            if key in excluded:
                continue
            if key in owner:
                problems.append(ShardProblem(record.name, f"{record.name}: sample key {key} is also served by "
                                             f"{owner[key]}; every key must be unique in a cache"))  # fmt: skip
            owner.setdefault(key, record.name)
    return problems


def _check_recorded(bucket: str, record: ShardRecord, where: str, fix: str) -> None:
    """A shard that recorded its layouts recorded every bucket it holds."""
    if record.layouts and bucket not in record.layouts:
        raise CacheError(f"{where}: its bucket {bucket} has no layout in the manifest's record of the shard. {fix}.")


def _check_raw(raw, entry, record: ShardRecord, layouts: Layouts, origin: str, deep: bool, fix: str) -> None:
    where = f"Sample {raw['__key__']} in {origin}"
    if META not in raw:
        raise CacheError(f"{where} has no .{META} member. {fix}.")
    try:
        meta = json.loads(raw[META])
    except (ValueError, RecursionError) as err:
        raise CacheError(f"{where}: its .json cannot be parsed ({err}). {fix}.") from err
    check_index(meta, entry, where, fix)
    _check_recorded(meta["bucket"], record, where, fix)
    if deep:
        decode_sample({**raw, "__entry__": entry, "__layouts__": layouts}, origin)


def verify(folder: Path | str | Store, records: list[ShardRecord], deep: bool = True) -> list[str]:
    """Check every shard against the manifest; return one message per problem (empty when all good).

    See ``check_shards`` for what is checked.
    """
    return [problem.message for problem in check_shards(folder, records, deep)]


@dataclass
class IndexedShard:
    record: ShardRecord
    header: dict[str, Any] | None  # what the writer was given as ``header`` (None: not recorded)
    opened: int  # when its writer opened it (ns since the epoch; 0 if not recorded)


def read_indexed_shard(folder: Path, name: str) -> IndexedShard:
    """Read one shard file completely and rebuild its manifest record from its own contents.

    Every sample is decoded and checked (its .json index line, one layout per bucket, finite tensors);
    anything wrong is a CacheError naming the shard. The record's ``excluded`` is empty: which samples
    later shards replaced is a matter of the whole cache (``Manifest.add_shard``).
    """
    if not is_plain_name(name):
        raise CacheError(f"Shard name {name!r} is not a plain file name inside {folder}.")
    path = Path(folder) / name
    origin = str(path)
    with open_regular(path, what="Shard") as f:
        size = os.fstat(f.fileno()).st_size
        hashing = _HashingReader(f, size)
        fix = f"Move it out of {folder} (a later `cogvx preprocess` re-encodes its clips)"
        reader = ShardReader(hashing, origin, fix=fix)
        reader.size = size
        entries: list[SampleEntry] = []
        layouts: Layouts = {}
        for raw in reader.samples():
            sample = decode_sample(raw, origin)
            try:
                entry = entry_from_meta(sample.key, sample.meta)
            except CacheError as err:
                raise CacheError(f"{err} (shard {origin}) {fix}.") from err
            layout = layout_of(sample)
            joined = joined_layout(layouts.setdefault(entry.bucket, layout), layout)
            check_sample(sample, entry, layouts[entry.bucket] if joined is None else joined, origin, fix)
            layouts[entry.bucket] = joined
            entries.append(entry)
        sha256 = hashing.finish()
    header = reader.header.get(HEADER_KEY)
    try:
        header = json.loads(header) if header is not None else None
        opened = int(reader.header.get(OPENED_KEY, 0))
    except (ValueError, RecursionError) as err:
        raise CacheError(f"Shard {origin} has an unreadable cogvx header ({err}).") from err
    if header is not None and not isinstance(header, dict):
        raise CacheError(f"Shard {origin} has a cogvx header that is a {type(header).__name__}, not an object.")
    record = ShardRecord(name, len(entries), size, sha256, entries, [], layouts)
    return IndexedShard(record, header, opened)


def index_shard(folder: Path, name: str, header: dict[str, Any] | None = None) -> ShardRecord:
    """The manifest record of a complete shard file, rebuilt and checked from its own contents.

    With ``header``, the shard must have been written with exactly that ``ShardWriter(header=...)``
    (preprocessing adopts only shards made with its own settings); else a CacheError.
    """
    indexed = read_indexed_shard(folder, name)
    if header is not None and indexed.header != json.loads(json.dumps(header, sort_keys=True)):
        raise CacheError(
            f"Shard {Path(folder) / name} was written with other settings than this run's "
            f"({'none recorded' if indexed.header is None else 'its header differs'}); it cannot join this cache."
        )
    return indexed.record


class _HashingReader(io.RawIOBase):
    """Reads a file through a sha256, never past ``size`` bytes."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.left, self.digest = f, size, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        """Hash what is left after the tar's end marker too: the sha256 is of the whole file."""
        while self.left and self.read(1 << 22):
            pass
        return self.digest.hexdigest()
