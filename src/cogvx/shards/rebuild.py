"""Rebuilding a shard's manifest record from the shard alone: its samples' .json index lines and its header."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogvx.files import HashingReader
from cogvx.shards.checks import check_sample
from cogvx.shards.codec import HEADER_KEY, OPENED_KEY, decode_members, entry_from_meta, layout_of
from cogvx.shards.layouts import Layouts, joined_layout
from cogvx.shards.manifest import CacheError, SampleEntry, ShardRecord, is_plain_name
from cogvx.shards.store import open_regular
from cogvx.shards.tar import ShardReader


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
        hashing = HashingReader(f, size)
        fix = f"Move it out of {folder} (a later `cogvx preprocess` re-encodes its clips)"
        reader = ShardReader(hashing, origin, fix=fix)
        reader.size = size
        entries: list[SampleEntry] = []
        layouts: Layouts = {}
        for raw in reader.samples():
            sample = decode_members(raw)
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
    record = ShardRecord(name, len(entries), size, sha256, entries, [], layouts)
    header, opened = _writer_header(reader.header, origin)
    return IndexedShard(record, header, opened)


def _writer_header(pax: dict[str, str], origin: str) -> tuple[dict[str, Any] | None, int]:
    """What ``ShardWriter`` recorded in a shard's pax global header: its ``header`` and when it opened it."""
    header = pax.get(HEADER_KEY)
    try:
        header = json.loads(header) if header is not None else None
        opened = int(pax.get(OPENED_KEY, 0))
    except (ValueError, RecursionError) as err:
        raise CacheError(f"Shard {origin} has an unreadable cogvx header ({err}).") from err
    if header is not None and not isinstance(header, dict):
        raise CacheError(f"Shard {origin} has a cogvx header that is a {type(header).__name__}, not an object.")
    return header, opened


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
