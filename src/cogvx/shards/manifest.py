"""The manifest: the one file that says what a cache folder holds.

Readers trust only shards listed here; a shard is listed only once it is complete and renamed into
place, and the manifest itself is replaced atomically, so a reader never sees a partial write.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cogvx.errors import CacheError
from cogvx.files import write_json_atomic
from cogvx.locations import parent_of
from cogvx.shards import paths
from cogvx.shards.layouts import (  # noqa: F401 -- their home is layouts.py; imported from here too
    BASE_TENSORS,
    CARRIED_TENSORS,
    DTYPE_BYTES,
    IMAGE_MOMENTS,
    TAR_BLOCK,
    TENSOR_SHAPES,
    Layouts,
    describe_layout,
    joined_layout,
    layout_bytes,
    merge_layouts,
    min_sample_bytes,
    sample_layout,
)
from cogvx.shards.store import (
    Store,
    open_regular,  # noqa: F401 -- its home is store.py; imported from here too
    open_store,
)

FORMAT_NAME = "cogvx-cache"
FORMAT_VERSION = 1


# The key of a sample's mirrored variant is its own key with this suffix (keys are at most 64 characters).
MIRROR_SUFFIX = "-mirrored"
FIRST_FRAME = "first.jpg"  # the member (K.first.jpg) holding the first frame of a sample with image latents
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # sample keys: webdataset splits member names at a dot
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# No shard is larger: 16 times the largest --shard-max-mb allows (1 TiB). A larger `bytes` is a damaged entry.
MAX_SHARD_BYTES = 1 << 44


def is_plain_name(name: object) -> bool:
    """A file name inside the cache folder: no folder part, no ``..``, nothing hidden or absolute."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and not name.startswith(".")  # hidden, "." and ".."
        and "/" not in name
        and "\\" not in name
        and name.isprintable()  # no NUL or other control character
    )


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
    # Tensors it holds beyond the base ones (names from CARRIED_TENSORS); written only when not empty, so
    # caches written before samples carried any read unchanged.
    carries: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Its index line as JSON values (``carries`` only when not empty)."""
        data = asdict(self)
        if self.carries:
            data["carries"] = list(self.carries)
        else:
            del data["carries"]
        return data

    @property
    def mirrored(self) -> bool:
        """A horizontally mirrored variant of another sample (``cogvx preprocess --flip``)."""
        return self.key.endswith(MIRROR_SUFFIX)

    def supersedes(self, older: SampleEntry) -> bool:
        """Whether this entry makes ``older`` stale: the same source as another input (content or caption
        changed), or the same input in the same variant (original or mirrored) again."""
        if older.source != self.source:
            return False
        changed = (older.content_hash, older.caption_hash) != (self.content_hash, self.caption_hash)
        return changed or older.mirrored == self.mirrored


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
    # The tensors of each bucket in this shard (names, dtypes, shapes), as its writer saw them; empty in
    # caches written before layouts were recorded (readers then check that a bucket's samples agree).
    layouts: Layouts = field(default_factory=dict)

    @property
    def live_count(self) -> int:
        """Samples a reader serves from this shard: all of them but the excluded ones."""
        return self.sample_count - len(self.excluded)

    def live_samples(self) -> list[SampleEntry]:
        excluded = set(self.excluded)
        return [s for s in self.samples if s.key not in excluded]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples"] = [entry.to_dict() for entry in self.samples]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: Path | str = "the manifest") -> ShardRecord:
        """A record from its JSON form; any wrongly typed field is a CacheError naming ``origin``."""
        fields_ = _Fields(data, origin, "a shard entry")
        name = fields_.get("name", str)
        where = f"shard {name!r}"
        if not is_plain_name(name):
            raise CacheError(
                f"{origin} lists a shard named {name!r}: shard names must be plain file names inside the cache "
                "folder (no '/', '..' or absolute paths). The manifest was edited or damaged; rebuild it with "
                "`cogvx shards rebuild-manifest`."
            )
        fields_ = _Fields(data, origin, where)
        sample_count = fields_.get("sample_count", int, minimum=0)
        size = fields_.get("bytes", int, minimum=0)
        sha256 = fields_.get("sha256", str)
        if not _SHA256.match(sha256):
            raise CacheError(f"{origin}: {where} has sha256 {sha256!r}, not 64 lowercase hex digits.")
        samples = [_sample_entry(s, origin, where) for s in fields_.get("samples", list, default=[])]
        excluded = fields_.get("excluded", list, default=[])
        if not all(isinstance(key, str) for key in excluded):
            raise CacheError(f"{origin}: {where} has an `excluded` entry that is not a key string.")
        layouts = _layouts(fields_.get("layouts", dict, default={}), origin, where)
        _check_counts(sample_count, size, len(samples), excluded, layouts, origin, where)
        return cls(name, sample_count, size, sha256, samples, list(excluded), layouts)


def merged_layouts(records: list[ShardRecord]) -> Layouts:
    """The bucket layouts the shards recorded, as one dict (a bucket laid out two ways is a CacheError)."""
    merged: Layouts = {}
    for record in records:
        merge_layouts(merged, record.layouts, record.name)
    return merged


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
    # sha256 of the bytes ``load`` read (not a field: never written): the cache's identity, the same for a copy
    # read elsewhere. None for a manifest built in memory.
    sha256: ClassVar[str | None] = None

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

    @property
    def original_count(self) -> int:
        """Samples readers serve, mirrored variants not counted: what one epoch passes over."""
        return sum(1 for entry in self.live_entries() if not entry.mirrored)

    @property
    def image_latent_count(self) -> int:
        """Samples readers serve that carry image latents (``image_moments``, for image-to-video)."""
        return sum(1 for entry in self.live_entries() if IMAGE_MOMENTS in entry.carries)

    def missing_mirrors(self) -> list[str]:
        """Keys of served originals without a served mirrored variant."""
        keys = {entry.key for entry in self.live_entries()}
        return [k for k in keys if not k.endswith(MIRROR_SUFFIX) and k + MIRROR_SUFFIX not in keys]

    def layouts(self) -> Layouts:
        """Every bucket's tensor layout, merged from the shards that recorded one."""
        return merged_layouts(self.shards)

    def add_shard(self, record: ShardRecord) -> None:
        """List a finished shard; samples of the same sources in earlier shards stop being served.

        A source is re-encoded only when its file changed, so an older sample of it is stale. Marking
        it excluded (rather than rewriting its shard) keeps published shards byte-for-byte unchanged.
        """
        if any(shard.name == record.name for shard in self.shards):
            return  # already merged (a merge interrupted after saving the manifest)
        merge_layouts(self.layouts(), record.layouts, record.name)  # refuses a shard that disagrees
        by_source: dict[str, list[SampleEntry]] = {}
        for entry in record.samples:
            by_source.setdefault(entry.source, []).append(entry)
        for shard in self.shards:
            stale = [
                e.key
                for e in shard.samples
                if e.key not in shard.excluded and any(new.supersedes(e) for new in by_source.get(e.source, ()))
            ]
            shard.excluded.extend(stale)
        self.shards.append(record)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shards"] = [shard.to_dict() for shard in self.shards]
        data["totals"] = {
            "shards": len(self.shards),
            "samples": self.sample_count,
            "excluded": self.excluded_count,
            "bytes": self.total_bytes,
            "buckets": self.bucket_counts(),
        }
        return data

    @classmethod
    def from_dict(cls, data: Any, origin: Path | str) -> Manifest:
        """A manifest from its JSON form; anything missing or wrongly typed is a CacheError naming ``origin``."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise CacheError(f"{origin} is not a cogvx cache manifest (format is {found!r}).")
        version = data.get("version")
        if type(version) is not int or version != FORMAT_VERSION:  # 1.0, True and "1" are not version 1
            raise CacheError(
                f"{origin} uses cache format version {version!r}, this cogvx reads version "
                f"{FORMAT_VERSION}. Re-run `cogvx preprocess` into a new folder, or install the matching cogvx."
            )
        fields_ = _Fields(data, origin, "the manifest")
        shards = [ShardRecord.from_dict(s, origin) for s in fields_.get("shards", list)]
        names = [s.name for s in shards]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise CacheError(f"{origin} lists shard {twice[0]} more than once; rebuild it with "
                             "`cogvx shards rebuild-manifest`.")  # fmt: skip
        extras = fields_.get("extras", dict, default={})
        for label, extra in extras.items():
            if isinstance(extra, dict) and "file" in extra and not is_plain_name(extra["file"]):
                raise CacheError(
                    f"{origin} names side file {extra['file']!r} for {label!r}: side files must be plain file names "
                    "inside the cache folder. The manifest was edited or damaged."
                )
        return cls(
            producer=fields_.get("producer", dict),
            params=fields_.get("params", dict),
            schema=fields_.get("schema", dict),
            shards=shards,
            extras=extras,
            created=fields_.get("created", float),
            updated=fields_.get("updated", float),
        )

    @classmethod
    def load(cls, folder: Path | str | Store) -> Manifest:
        """The manifest of a cache: a folder, a URL (``s3://bucket/prefix``, ``https://host/path/``) or a Store."""
        store = open_store(folder)
        where = store.url(paths.MANIFEST)
        try:
            with store.open(paths.MANIFEST, what="The manifest") as f:
                text = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            shards = [name for name in store.list() if name.endswith(".tar")]
            if shards:
                raise CacheError(
                    f"No {paths.MANIFEST} in {store.location}, but it holds {len(shards)} shard file(s): re-create "
                    f"the manifest from them with `cogvx shards rebuild-manifest {store.location}`."
                ) from None
            raise CacheError(
                f"No {paths.MANIFEST} in {store.location}: this is not a finished cogvx cache. "
                "Create one with `cogvx preprocess --data VIDEOS --output FOLDER`."
            ) from None
        if len(text) > MAX_MANIFEST_BYTES:
            raise CacheError(f"{where} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; it is not a cogvx manifest.")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:  # bad JSON or UTF-8; RecursionError: nested too deep
            raise CacheError(
                f"{where} is not valid JSON ({err}); move it away and rebuild it with "
                f"`cogvx shards rebuild-manifest {store.location}`."
            ) from err
        manifest = cls.from_dict(data, where if store.remote else Path(where))
        manifest.sha256 = hashlib.sha256(text).hexdigest()
        return manifest

    def save(self, folder: Path) -> None:
        """Replace the manifest atomically: readers see the old one or the new one, never a mix."""
        self.updated = time.time()
        write_json_atomic(paths.manifest(folder), self.to_dict())


MAX_MANIFEST_BYTES = 1 << 30  # about 2 million samples' index lines


class _Fields:
    """Typed access to one JSON object of the manifest: a missing or wrongly typed field is a CacheError."""

    _MISSING = object()

    def __init__(self, data: Any, origin: Path | str, where: str):
        if not isinstance(data, dict):
            raise CacheError(f"{origin}: {where} is a {type(data).__name__}, not an object. The manifest is damaged.")
        self.data, self.origin, self.where = data, origin, where

    def get(self, name: str, kind: type, default: Any = _MISSING, minimum: int | None = None) -> Any:
        value = self.data.get(name, default)
        if value is self._MISSING:
            raise CacheError(f"{self.origin}: {self.where} has no `{name}`. The manifest is damaged.")
        if value is default and default is not self._MISSING:
            return value
        if not _is(value, kind):
            raise CacheError(
                f"{self.origin}: {self.where} has `{name}` = {_short(value)}, not {kind.__name__}. "
                "The manifest is damaged."
            )
        if minimum is not None and value < minimum:
            raise CacheError(f"{self.origin}: {self.where} has `{name}` = {value}, below {minimum}.")
        return float(value) if kind is float else value


def _is(value: Any, kind: type) -> bool:
    if kind is int:
        return type(value) is int  # bool is not a count
    if kind is float:
        return type(value) in (int, float) and math.isfinite(value)
    return isinstance(value, kind)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _sample_entry(data: Any, origin: Path | str, where: str) -> SampleEntry:
    fields_ = _Fields(data, origin, f"a sample of {where}")
    key = fields_.get("key", str)
    if not KEY_PATTERN.match(key):
        raise CacheError(f"{origin}: {where} has a sample key {key!r} that is not [A-Za-z0-9_-]+.")
    fields_ = _Fields(data, origin, f"sample {key} of {where}")
    return SampleEntry(
        key,
        source=fields_.get("source", str),
        content_hash=fields_.get("content_hash", str),
        bucket=fields_.get("bucket", str),
        size=fields_.get("size", int, default=None),
        mtime_ns=fields_.get("mtime_ns", int, default=None),
        caption_hash=fields_.get("caption_hash", str, default=None),
        carries=parse_carries(fields_.get("carries", list, default=[]), f"{origin}: sample {key} of {where}"),
    )


def parse_carries(names: list, where: str) -> tuple[str, ...]:
    """``carries`` of an index line: distinct names of CARRIED_TENSORS; anything else is a CacheError."""
    if not all(isinstance(n, str) and n in CARRIED_TENSORS for n in names) or len(set(names)) != len(names):
        raise CacheError(
            f"{where} has `carries` = {_short(names)}: it must list distinct tensor names among "
            f"{', '.join(CARRIED_TENSORS)}. The manifest or shard is damaged; rebuild it with "
            "`cogvx shards rebuild-manifest`."
        )
    return tuple(names)


def _rebuild(origin: Path | str) -> str:
    """What to do about a manifest that says something its shards cannot hold."""
    folder = parent_of(str(origin))
    return (
        f"The manifest was edited or damaged: check the cache with `cogvx shards verify {folder}`, or move the "
        f"manifest away and rebuild it from the shards with `cogvx shards rebuild-manifest {folder}`."
    )


def _layouts(data: dict, origin: Path | str, where: str) -> Layouts:
    """The layouts of a shard entry: for each bucket, the base tensors and maybe carried ones, each with a
    known dtype and as many positive sizes as its kind has dimensions."""
    for bucket, layout in data.items():
        tensors = _Fields(layout, origin, f"layout {bucket!r} of {where}")
        for name in tensors.data:
            spec = _Fields(tensors.data[name], origin, f"tensor {name!r} of layout {bucket!r} of {where}")
            dtype = spec.get("dtype", str)
            shape = spec.get("shape", list)
            if name not in TENSOR_SHAPES:
                raise CacheError(
                    f"{origin}: {where} lists a tensor {_short(name)} in bucket {bucket!r}; samples hold only "
                    f"{', '.join(TENSOR_SHAPES)}. {_rebuild(origin)}"
                )
            dims = TENSOR_SHAPES[name].count(",") + 1
            if len(shape) != dims or not all(type(n) is int and n >= 1 for n in shape):
                raise CacheError(
                    f"{origin}: {where} gives tensor {name!r} of bucket {bucket!r} the shape {_short(shape)}. It must "
                    f"be {dims} positive sizes {TENSOR_SHAPES[name]}. {_rebuild(origin)}"
                )
            if dtype not in DTYPE_BYTES:
                raise CacheError(
                    f"{origin}: {where} gives tensor {name!r} of bucket {bucket!r} the dtype {_short(dtype)}, not one "
                    f"of {', '.join(DTYPE_BYTES)}. {_rebuild(origin)}"
                )
        missing = [name for name in BASE_TENSORS if name not in tensors.data]
        if missing:
            raise CacheError(
                f"{origin}: {where} gives bucket {bucket!r} no {missing[0]!r} tensor; every sample holds "
                f"{' and '.join(BASE_TENSORS)}. {_rebuild(origin)}"
            )
    return data


def _check_counts(
    count: int, size: int, indexed: int, excluded: list[str], layouts: Layouts, origin: Path | str, where: str
) -> None:
    """A shard entry's counts must fit the shard it describes: checked before anything is made per sample.

    A shard is at most ``MAX_SHARD_BYTES``; an index lists every sample; no more samples are excluded than
    the shard holds, each once; and the samples fit the shard's bytes, each taking at least ``min_sample_bytes``.
    """
    least = min_sample_bytes(layouts)
    if size > MAX_SHARD_BYTES:
        problem = f"has `bytes` = {size}, more than any shard holds ({MAX_SHARD_BYTES >> 40} TiB)"
    elif indexed and indexed != count:
        problem = f"has `sample_count` = {count}, but its index lists {indexed} samples"
    elif len(excluded) > count or len(set(excluded)) != len(excluded):
        problem = f"excludes {len(excluded)} keys ({len(set(excluded))} distinct) of its {count} samples"
    elif count * least > size:
        problem = (
            f"has `sample_count` = {count} in `bytes` = {size}, but a sample takes at least {least} bytes (tar "
            f"headers and its tensors): at most {size // least} fit"
        )
    else:
        return
    raise CacheError(f"{origin}: {where} {problem}. {_rebuild(origin)}")
