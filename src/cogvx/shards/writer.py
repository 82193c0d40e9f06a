"""Writing samples into size-capped shards, each published under its final name only when complete."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cogvx import files
from cogvx.names import SHARD_MAX_BYTES, SHARD_MAX_SAMPLES
from cogvx.shards import paths
from cogvx.shards.codec import HEADER_KEY, OPENED_KEY, Sample, encode_sample, layout_of, with_index
from cogvx.shards.layouts import Layouts, describe_layout, joined_layout, sample_layout
from cogvx.shards.manifest import SampleEntry, ShardRecord
from cogvx.shards.shardfile import file_sha256


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
            meta = with_index(sample, entry)
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
        final = files.publish(tmp, self._path(self.index))
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
