"""Checking a whole cache: every shard against the manifest, every sample against its index line and layout."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from cogvx.shards.checks import check_listed
from cogvx.shards.layouts import Layouts, merge_layouts
from cogvx.shards.manifest import CacheError, ShardRecord
from cogvx.shards.reader import decode
from cogvx.shards.shardfile import open_shard, shard_location
from cogvx.shards.store import Store, open_store
from cogvx.shards.tar import MemberLimits, ShardReader


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
    store = open_store(folder)
    problems: list[ShardProblem] = []
    layouts: Layouts = {}
    for record in records:
        try:
            merge_layouts(layouts, record.layouts, record.name)
        except CacheError as err:
            problems.append(ShardProblem(record.name, str(err)))
    owner: dict[str, str] = {}  # live key -> the shard that serves it
    for record in records:
        keys = _check_samples(store, record, layouts, deep, problems)
        if keys is not None:
            problems += _check_keys(record, keys, owner)
    return problems


def _check_samples(
    store: Store, record: ShardRecord, layouts: Layouts, deep: bool, problems: list[ShardProblem]
) -> list[str] | None:
    """Read one shard, adding its problems (at most three about its samples); its keys, None if unreadable."""
    origin = str(shard_location(store, record))
    try:
        stream = open_shard(store, record)
    except CacheError as err:
        problems.append(ShardProblem(record.name, str(err), damaged=True))
        return None
    found: list[ShardProblem] = []
    keys: list[str] = []
    index = {entry.key: entry for entry in record.samples}
    fix = "The shard is unusable"  # verify's last line says how to repair it
    try:
        with stream:
            for raw in ShardReader(stream, origin, MemberLimits.for_layouts(record.layouts), fix).samples():
                keys.append(raw.key)
                if len(found) >= 3 or (index and raw.key not in index):
                    continue  # enough said about this shard / reported below as a key mismatch
                try:
                    raw.entry = index.get(raw.key)
                    raw.meta = check_listed(raw, raw.entry, record, fix)
                    if deep:
                        decode(replace(raw, layouts=layouts))
                except CacheError as err:
                    found.append(ShardProblem(record.name, str(err)))
    except CacheError as err:
        problems += [*found, ShardProblem(record.name, str(err))]
        return None  # the keys read so far are not the shard's keys
    problems += found
    return keys


def _check_keys(record: ShardRecord, keys: list[str], owner: dict[str, str]) -> list[ShardProblem]:
    """A readable shard's keys against its record and the keys earlier shards serve (``owner``, updated)."""
    problems: list[ShardProblem] = []
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


def verify(folder: Path | str | Store, records: list[ShardRecord], deep: bool = True) -> list[str]:
    """Check every shard against the manifest; return one message per problem (empty when all good).

    See ``check_shards`` for what is checked.
    """
    return [problem.message for problem in check_shards(folder, records, deep)]
