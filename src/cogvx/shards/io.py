"""Writing and reading webdataset tar shards of safetensors samples.

A sample with key ``K`` is stored as consecutive tar members ``K.safetensors`` (all its tensors),
``K.json`` (its metadata) and optional raw members (``K.jpg`` ...). Nothing is ever unpickled:
tensors are parsed by safetensors, metadata by json, and every other member stays as raw bytes.
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

from cogvx.shards.manifest import CacheError, SampleEntry, ShardRecord

TENSORS = "safetensors"
META = "json"
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class Sample:
    key: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    extras: dict[str, bytes] = field(default_factory=dict)


def encode_sample(sample: Sample) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in order."""
    if not _KEY.match(sample.key):
        raise ValueError(f"Sample key {sample.key!r} must use only letters, digits, '-' and '_'.")
    tensors = {name: t.detach().cpu().contiguous() for name, t in sample.tensors.items()}
    members = [(f"{sample.key}.{TENSORS}", save_tensors(tensors))]
    members.append((f"{sample.key}.{META}", json.dumps(sample.meta, sort_keys=True).encode()))
    members += [(f"{sample.key}.{ext}", data) for ext, data in sorted(sample.extras.items())]
    return members


def decode_sample(raw: dict[str, Any], origin: str = "") -> Sample:
    """A webdataset-grouped raw sample (suffix -> bytes) to tensors and metadata, without pickle."""
    key = raw["__key__"]
    try:
        tensors = load_tensors(raw[TENSORS])
        meta = json.loads(raw[META])
    except KeyError as err:
        raise CacheError(f"Sample {key} in {origin} has no .{err.args[0]} member; the shard is damaged.") from err
    except Exception as err:
        raise CacheError(f"Sample {key} in {origin} cannot be parsed ({err}); the shard is damaged.") from err
    extras = {k: v for k, v in raw.items() if not k.startswith("__") and k not in (TENSORS, META)}
    return Sample(key, tensors, meta, extras)


class ShardWriter:
    """Writes samples into size-capped shards; each shard appears under its final name only when complete.

    ``on_shard`` is called with the record of every finished shard, so the caller can commit it to the
    manifest right away (an interrupted run then keeps everything up to its last finished shard).
    """

    def __init__(
        self,
        folder: Path,
        prefix: str,
        on_shard: Callable[[ShardRecord], None],
        max_bytes: int = 512 * 2**20,
        max_samples: int = 1000,
        first_index: int = 0,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.on_shard = on_shard
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.index = first_index
        self._tar: tarfile.TarFile | None = None
        self._entries: list[SampleEntry] = []
        self._bytes = 0

    def _path(self, index: int) -> Path:
        return self.folder / f"{self.prefix}-{index:06d}.tar"

    def write(self, sample: Sample, entry: SampleEntry) -> None:
        self.write_group([(sample, entry)])

    def write_group(self, group: list[tuple[Sample, SampleEntry]]) -> None:
        """Write samples that must land in the same shard (e.g. all windows of one clip).

        A shard is finished only between groups, so a run killed at any moment publishes either all of
        a group or none of it, and the next run can tell "done" by the source alone.
        """
        encoded = [encode_sample(sample) for sample, _ in group]  # fails before anything is written
        if self._tar is None:
            while self._path(self.index).exists():
                self.index += 1
            self._tar = tarfile.open(self._path(self.index).with_suffix(".tar.tmp"), "w", format=tarfile.GNU_FORMAT)
        now = time.time()
        for members, (_, entry) in zip(encoded, group, strict=True):
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), now, 0o644
                self._tar.addfile(info, io.BytesIO(data))
                self._bytes += len(data) + 1024
            self._entries.append(entry)
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
        record = ShardRecord(final.name, len(self._entries), final.stat().st_size, file_sha256(final), self._entries)
        self._tar, self._entries, self._bytes = None, [], 0
        self.index += 1
        self.on_shard(record)

    def abandon(self) -> None:
        """Drop the open shard without publishing it (on an error)."""
        if self._tar is not None:
            tmp = Path(self._tar.name)
            self._tar.close()
            tmp.unlink(missing_ok=True)
            self._tar, self._entries, self._bytes = None, [], 0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing(path: Path) -> CacheError:
    return CacheError(
        f"Shard {path} is listed in the manifest but missing. Restore it, or re-run `cogvx preprocess` "
        "on the same data into this folder to rebuild what is missing."
    )


def _mismatch(path: Path, size: int, record: ShardRecord) -> CacheError:
    return CacheError(
        f"Shard {path} does not match the manifest ({size} bytes, expected {record.bytes}; "
        "sha256 differs). It was changed or damaged after it was written. Delete it and re-run "
        "`cogvx preprocess` to re-encode its samples, or run `cogvx shards verify` to list every bad shard."
    )


def read_verified(folder: Path, record: ShardRecord) -> bytes:
    """A shard's bytes, refused unless they match the manifest's size and sha256."""
    path = Path(folder) / record.name
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise _missing(path) from err
    if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
        raise _mismatch(path, len(data), record)
    return data


def check_shard(folder: Path, record: ShardRecord, full: bool = True) -> Path:
    """Refuse a shard unless its size (and, with ``full``, its sha256, hashed while streaming) match."""
    path = Path(folder) / record.name
    try:
        size = path.stat().st_size
    except FileNotFoundError as err:
        raise _missing(path) from err
    if size != record.bytes or (full and file_sha256(path) != record.sha256):
        raise _mismatch(path, size, record)
    return path


def iter_raw_samples(data: bytes | BinaryIO, origin: str, exclude: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
    """Group the members of a tar (bytes or an open file) into raw webdataset samples (suffix -> bytes).

    ``exclude``: keys not to yield -- pass ``record.excluded``, the samples a later shard replaced.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    skip = set(exclude)
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        for raw in group_by_keys(tar_file_expander([{"url": origin, "stream": stream}])):
            if raw["__key__"] not in skip:
                yield raw
    except (tarfile.TarError, ValueError) as err:
        raise CacheError(f"Shard {origin} is not a readable tar file ({err}).") from err


def iter_record_samples(data: bytes, record: ShardRecord, origin: str) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard that readers should serve (its replaced samples left out)."""
    return iter_raw_samples(data, origin, exclude=record.excluded)


def read_shard(folder: Path, record: ShardRecord, include_excluded: bool = False) -> Iterator[Sample]:
    """Every live sample of one verified shard, decoded (``include_excluded`` adds the replaced ones)."""
    origin = str(Path(folder) / record.name)
    exclude = () if include_excluded else record.excluded
    for raw in iter_raw_samples(read_verified(folder, record), origin, exclude=exclude):
        yield decode_sample(raw, origin)


def verify(folder: Path, records: list[ShardRecord], deep: bool = True) -> list[str]:
    """Check every shard against the manifest; return one message per problem (empty when all good).

    Size and sha256 always; the sample count and keys against the manifest's index; with ``deep``,
    also that every sample's tensors and metadata parse (safetensors and json, never pickle).
    """
    problems = []
    for record in records:
        origin = str(Path(folder) / record.name)
        try:
            raws = list(iter_raw_samples(read_verified(folder, record), origin))
            keys = [raw["__key__"] for raw in raws]
            if len(keys) != record.sample_count:
                problems.append(f"{record.name}: {len(keys)} samples, manifest says {record.sample_count}")
            indexed = [entry.key for entry in record.samples]
            if indexed and keys != indexed:
                missing = sorted(set(indexed) - set(keys))[:3]
                problems.append(f"{record.name}: sample keys differ from the manifest index (missing {missing})")
            unknown = sorted(set(record.excluded) - set(keys))
            if unknown:
                problems.append(f"{record.name}: excluded keys not in the shard: {unknown[:3]}")
            if deep:
                for raw in raws:
                    decode_sample(raw, origin)
        except CacheError as err:
            problems.append(str(err))
    return problems
