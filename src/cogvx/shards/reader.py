"""Reading the samples a manifest lists: each checked against its index line and layout before it is served.

``read_shard`` takes a folder, URL or ``Store`` (normalised once, by ``open_store``), opens the shard
through its sha256 and yields decoded ``Sample``s. ``record_samples`` and ``decode`` are its two halves,
for readers that group raw samples before decoding them (training's batches by bucket); the webdataset
form of both (dicts with ``__key__`` ...) is ``iter_record_samples`` and ``decode_sample``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from cogvx.shards.checks import check_listed, check_sample, verify_hint
from cogvx.shards.codec import META, TENSORS, RawSample, Sample, decode_members, layout_of
from cogvx.shards.layouts import Layouts
from cogvx.shards.manifest import CacheError, SampleEntry, ShardRecord
from cogvx.shards.shardfile import open_shard, shard_location
from cogvx.shards.store import Store, open_store
from cogvx.shards.tar import MemberLimits, ShardReader


def record_samples(
    data: bytes | BinaryIO,
    record: ShardRecord,
    origin: str,
    layouts: Layouts | None = None,
    include_excluded: bool = False,
) -> Iterator[RawSample]:
    """The raw samples of one shard that readers should serve (its replaced samples left out).

    Each is checked against the manifest's index before it is yielded (key listed, .json an object whose
    bucket, source and content hash match), so code that groups raw samples by bucket can trust it, and
    carries what ``decode`` needs to check its tensors: its index line and ``layouts`` (the cache's
    bucket layouts; pass one dict for a whole stream, so a cache that recorded none learns each bucket's
    layout from its first sample).
    """
    index = {entry.key: entry for entry in record.samples}
    layouts = dict(record.layouts) if layouts is None else layouts
    exclude = () if include_excluded else record.excluded
    fix = verify_hint(origin)
    for raw in ShardReader(data, origin, MemberLimits.for_layouts(record.layouts)).samples(exclude):
        entry = index.get(raw.key)
        if index and entry is None:
            raise CacheError(f"Sample {raw.key} in {origin} is not in the manifest's index of that shard. {fix}.")
        raw.meta = check_listed(raw, entry, record, fix, required=(META, TENSORS))
        raw.entry, raw.layouts = entry, layouts
        yield raw


def decode(raw: RawSample) -> Sample:
    """A raw sample's tensors and metadata; one from ``record_samples`` is checked (``check_sample``) too."""
    sample = decode_members(raw)
    if raw.layouts is not None:
        entry: SampleEntry | None = raw.entry
        bucket = entry.bucket if entry is not None else sample.meta.get("bucket")
        # A cache that recorded no layout for this bucket: its first sample read sets it for the rest.
        layout = raw.layouts.setdefault(bucket, layout_of(sample)) if isinstance(bucket, str) else {}
        check_sample(sample, entry, layout, raw.origin)
    return sample


def iter_record_samples(
    data: bytes | BinaryIO,
    record: ShardRecord,
    origin: str,
    layouts: Layouts | None = None,
    include_excluded: bool = False,
) -> Iterator[dict[str, Any]]:
    """``record_samples`` in the webdataset form (``__key__``, ``__url__``, ``__entry__``, ``__layouts__``,
    ``__meta__``, extension -> bytes), for ``decode_sample``."""
    return (raw.to_dict() for raw in record_samples(data, record, origin, layouts, include_excluded))


def decode_sample(raw: dict[str, Any], origin: str = "") -> Sample:
    """A webdataset-grouped raw sample (suffix -> bytes) to tensors and metadata, without pickle.

    A raw sample from ``iter_record_samples`` carries its manifest index line and the cache's bucket
    layouts, and is checked against them (``check_sample``) before it is returned.
    """
    return decode(RawSample.from_dict(raw, origin))


def read_shard(
    folder: Path | str | Store, record: ShardRecord, include_excluded: bool = False, layouts: Layouts | None = None
) -> Iterator[Sample]:
    """Every live sample of one verified shard, decoded and checked (``include_excluded`` adds the replaced ones).

    The shard is hashed, then streamed from the file; ``layouts`` as in ``record_samples``.
    """
    store = open_store(folder)
    origin = str(shard_location(store, record))
    with open_shard(store, record) as stream:
        for raw in record_samples(stream, record, origin, layouts, include_excluded):
            yield decode(raw)
