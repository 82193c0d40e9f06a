"""A listed shard opened from its store: refused unless it is a regular file of the manifest's size and sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

from cogvx.files import sha256_of
from cogvx.locations import parent_of
from cogvx.shards.manifest import CacheError, ShardRecord, is_plain_name
from cogvx.shards.store import LocalStore, Mismatch, Store, open_regular, open_store


def file_sha256(path: Path, limit: int | None = None) -> str:
    """sha256 of a regular file (a FIFO or device is refused); with ``limit``, of at most its first ``limit``
    bytes -- reading stops there."""
    with open_regular(Path(path)) as f:
        return sha256_of(f, limit)


def shard_location(store: Store, record: ShardRecord) -> Path | str:
    """Where a listed shard is (a path, or a URL's display form), for messages and a reader's origin."""
    if not is_plain_name(record.name):  # records from a manifest are checked on load; these come from code
        raise CacheError(f"Shard name {record.name!r} is not a plain file name inside {store.location}.")
    return store.path(record.name) if isinstance(store, LocalStore) else store.url(record.name)


def open_shard(folder: Path | str | Store, record: ShardRecord, full: bool = True) -> BinaryIO:
    """An open shard file, refused unless it is a regular file of the manifest's size and (with ``full``)
    sha256. The hash reads at most ``record.bytes``; the file is returned at its start.

    ``folder`` may be a URL or a ``Store``: a remote shard is copied through its sha256 into a local
    temporary file (or the store's read-through cache) and handed out only once it matched, so no sample
    of a shard is served before its hash is confirmed, wherever it lives.
    """
    store = open_store(folder)
    path = shard_location(store, record)
    try:
        return store.fetch(record.name, record.bytes, record.sha256, full=full)
    except FileNotFoundError as err:
        raise CacheError(
            f"Shard {path} is listed in the manifest but missing. Restore it, or run `cogvx shards verify "
            f"{parent_of(str(path))}` for the command that re-encodes its samples."
        ) from err
    except Mismatch as err:
        raise mismatch(path, err.size, record) from err


def check_shard(folder: Path | str | Store, record: ShardRecord, full: bool = True) -> Path | str:
    """Refuse a shard unless its size (and, with ``full``, its sha256, hashed while streaming) match."""
    store = open_store(folder)
    with open_shard(store, record, full):
        return shard_location(store, record)


def read_verified(folder: Path | str | Store, record: ShardRecord) -> bytes:
    """A shard's bytes, refused unless they match the manifest's size and sha256."""
    store = open_store(folder)
    with open_shard(store, record, full=False) as f:  # size checked; hashed below, from memory
        data = f.read(record.bytes + 1)
    if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
        raise mismatch(shard_location(store, record), len(data), record)
    return data


def mismatch(path: Path | str, size: int, record: ShardRecord) -> CacheError:
    """The refusal of a shard whose bytes differ from what the manifest recorded."""
    return CacheError(
        f"Shard {path} does not match the manifest ({size} bytes, expected {record.bytes}; "
        f"sha256 differs). It was changed or damaged after it was written. Run `cogvx shards verify "
        f"{parent_of(str(path))}` to list every bad shard and the command that re-encodes their samples."
    )
