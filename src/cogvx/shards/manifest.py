"""The manifest: the one file that says what a cache folder holds.

Readers trust only shards listed here; a shard is listed only once it is complete and renamed into
place, and the manifest itself is replaced atomically, so a reader never sees a partial write.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_NAME = "cogvx-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped.jsonl"  # inputs preprocessing could not use: {"source", "reason", "detail"}


class CacheError(ValueError):
    """A cache folder that cannot be used as it is; the message says which file and what to do."""


@dataclass
class SampleEntry:
    """Index line of one sample: enough to skip work already done and to count buckets."""

    key: str
    source: str
    content_hash: str
    bucket: str
    # The source file's size and mtime when it was hashed: a later run that sees the same pair trusts
    # content_hash without reading the file again (None in caches written before these were recorded).
    size: int | None = None
    mtime_ns: int | None = None
    # Hash of the caption the sample was encoded with: a changed caption is a changed input too.
    caption_hash: str | None = None


@dataclass
class ShardRecord:
    name: str
    sample_count: int
    bytes: int
    sha256: str
    samples: list[SampleEntry] = field(default_factory=list)
    # Keys of samples in this shard that a later shard replaced (their source file changed). Shards are
    # never rewritten once published, so readers skip these keys instead (missing field = none).
    excluded: list[str] = field(default_factory=list)

    @property
    def live_count(self) -> int:
        """Samples a reader serves from this shard: all of them but the excluded ones."""
        return self.sample_count - len(self.excluded)

    def live_samples(self) -> list[SampleEntry]:
        excluded = set(self.excluded)
        return [s for s in self.samples if s.key not in excluded]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardRecord:
        samples = [SampleEntry(**s) for s in data.get("samples", [])]
        excluded = list(data.get("excluded", []))
        return cls(data["name"], data["sample_count"], data["bytes"], data["sha256"], samples, excluded)


@dataclass
class Manifest:
    """What a cache holds: who made it, with which parameters, and every complete shard."""

    producer: dict[str, Any]
    params: dict[str, Any]
    schema: dict[str, Any]
    shards: list[ShardRecord] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # named side files, e.g. validation prompts
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @property
    def sample_count(self) -> int:
        """Samples readers serve (replaced ones not counted)."""
        return sum(s.live_count for s in self.shards)

    @property
    def excluded_count(self) -> int:
        return sum(len(s.excluded) for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def bucket_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for shard in self.shards:
            for sample in shard.live_samples():
                counts[sample.bucket] = counts.get(sample.bucket, 0) + 1
        return dict(sorted(counts.items()))

    def live_entries(self) -> list[SampleEntry]:
        return [entry for shard in self.shards for entry in shard.live_samples()]

    def add_shard(self, record: ShardRecord) -> None:
        """List a finished shard; samples of the same sources in earlier shards stop being served.

        A source is re-encoded only when its file changed, so an older sample of it is stale. Marking
        it excluded (rather than rewriting its shard) keeps published shards byte-for-byte unchanged.
        """
        if any(shard.name == record.name for shard in self.shards):
            return  # already merged (a merge interrupted after saving the manifest)
        replaced = {entry.source for entry in record.samples}
        for shard in self.shards:
            stale = [e.key for e in shard.samples if e.source in replaced and e.key not in shard.excluded]
            shard.excluded.extend(stale)
        self.shards.append(record)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["totals"] = {
            "shards": len(self.shards),
            "samples": self.sample_count,
            "excluded": self.excluded_count,
            "bytes": self.total_bytes,
            "buckets": self.bucket_counts(),
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: Path) -> Manifest:
        if data.get("format") != FORMAT_NAME:
            raise CacheError(f"{origin} is not a cogvx cache manifest (format is {data.get('format')!r}).")
        if data.get("version") != FORMAT_VERSION:
            raise CacheError(
                f"{origin} uses cache format version {data.get('version')}, this cogvx reads version "
                f"{FORMAT_VERSION}. Re-run `cogvx preprocess` into a new folder, or install the matching cogvx."
            )
        return cls(
            producer=data["producer"],
            params=data["params"],
            schema=data["schema"],
            shards=[ShardRecord.from_dict(s) for s in data["shards"]],
            extras=data.get("extras", {}),
            created=data["created"],
            updated=data["updated"],
        )

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise CacheError(
                f"No {MANIFEST_NAME} in {folder}: this is not a finished cogvx cache. "
                "Create one with `cogvx preprocess --data VIDEOS --output FOLDER`."
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CacheError(f"{path} is not valid JSON ({err}); re-run `cogvx preprocess`.") from err
        return cls.from_dict(data, path)

    def save(self, folder: Path) -> None:
        """Replace the manifest atomically: readers see the old one or the new one, never a mix."""
        self.updated = time.time()
        write_json_atomic(Path(folder) / MANIFEST_NAME, self.to_dict())


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is shared like the shards beside it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
