"""How a sample is laid out in a shard: its tar members, its .json's index line, and its tensor layout.

A sample with key ``K`` is stored as consecutive tar members ``K.safetensors`` (all its tensors),
``K.json`` (its metadata) and optional raw members (``K.jpg`` ...). Nothing is ever unpickled:
tensors are parsed by safetensors, metadata by json, and every other member stays as raw bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from cogvx.shards.layouts import Layouts
from cogvx.shards.manifest import KEY_PATTERN, CacheError, SampleEntry, parse_carries

TENSORS = "safetensors"
META = "json"
INDEX = "index"  # the json field where the writer keeps the sample's manifest index line
INDEX_FIELDS = ("bucket", "source", "content_hash")  # also top-level json fields, which training reads
MEMBER_EXT = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")  # what follows ``KEY.`` in a member name
HEADER_KEY = "cogvx.header"  # pax global header: what the cache was made with (``ShardWriter(header=...)``)
OPENED_KEY = "cogvx.opened"  # pax global header: when the writer opened the shard (ns), to order a rebuild


@dataclass
class Sample:
    key: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    extras: dict[str, bytes] = field(default_factory=dict)


@dataclass
class RawSample:
    """One sample's members as read from a shard (extension -> bytes), not yet decoded.

    The record reader adds what it checked against the manifest: the parsed .json (``meta``), the index
    line (``entry``, None when the manifest has no index) and the cache's bucket ``layouts``, which
    decoding then checks the tensors against (``layouts`` None: decoded without checks).
    """

    key: str
    origin: str
    members: dict[str, bytes]
    meta: dict[str, Any] | None = None
    entry: SampleEntry | None = None
    layouts: Layouts | None = None

    def to_dict(self) -> dict[str, Any]:
        """The webdataset form (``__key__``, ``__url__``, extension -> bytes; checked ones add ``__entry__``,
        ``__layouts__`` and ``__meta__``), as ``iter_raw_samples`` and ``iter_record_samples`` yield it."""
        raw: dict[str, Any] = {"__key__": self.key, "__url__": self.origin, **self.members}
        if self.layouts is not None:
            raw.update(__entry__=self.entry, __layouts__=self.layouts, __meta__=self.meta)
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any], origin: str) -> RawSample:
        members = {k: v for k, v in raw.items() if not k.startswith("__")}
        meta, entry, layouts = raw.get("__meta__"), raw.get("__entry__"), raw.get("__layouts__")
        return cls(raw["__key__"], origin, members, meta, entry, layouts)


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
    bad = [ext for ext in sample.extras if ext in (TENSORS, META) or not MEMBER_EXT.match(ext)]
    if bad:
        raise ValueError(f"Sample {sample.key}: extra member name {bad[0]!r} is reserved or not [A-Za-z0-9_.]+.")
    tensors = {name: t.detach().cpu().contiguous() for name, t in sample.tensors.items()}
    members = [(f"{sample.key}.{TENSORS}", save_tensors(tensors))]
    members.append((f"{sample.key}.{META}", json.dumps(sample.meta, sort_keys=True).encode()))
    members += [(f"{sample.key}.{ext}", data) for ext, data in sorted(sample.extras.items())]
    return members


def decode_members(raw: RawSample) -> Sample:
    """A raw sample's tensors and metadata, parsed without pickle (unchecked: see ``reader.decode``)."""
    where = f"Sample {raw.key} in {raw.origin}"
    try:
        tensors = load_tensors(raw.members[TENSORS])
        meta = raw.meta if raw.meta is not None else json.loads(raw.members[META])  # parsed once by the reader
    except KeyError as err:
        raise CacheError(f"{where} has no .{err.args[0]} member; the shard is damaged.") from err
    except Exception as err:
        raise CacheError(f"{where} cannot be parsed ({err}); the shard is damaged.") from err
    if not isinstance(meta, dict):
        raise CacheError(f"{where}: its .json is a {type(meta).__name__}, not an object.")
    extras = {k: v for k, v in raw.members.items() if k not in (TENSORS, META)}
    return Sample(raw.key, tensors, meta, extras)


def index_line(entry: SampleEntry) -> dict[str, Any]:
    """What a sample's .json keeps of its manifest index line (under ``index``)."""
    return {k: v for k, v in entry.to_dict().items() if k != "key"}


def with_index(sample: Sample, entry: SampleEntry) -> dict[str, Any]:
    """The sample's metadata plus its index line: top-level bucket/source/content_hash and ``index``."""
    meta = dict(sample.meta)
    for name, value in {**{n: getattr(entry, n) for n in INDEX_FIELDS}, INDEX: index_line(entry)}.items():
        if meta.setdefault(name, value) != value:
            raise ValueError(
                f"Sample {sample.key}: its metadata says {name} {short(meta[name])}, its index line {short(value)}."
            )
    return meta


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
            raise CacheError(f"Sample {key}: its .json index line has an unusable carries ({short(carries)}).")
        line["carries"] = parse_carries(carries, f"Sample {key}: its .json index line")
    for name, value in line.items():
        if name == "carries":
            continue
        kind = kinds.get(name)
        optional = name not in INDEX_FIELDS and value is None
        if kind is None or not (optional or type(value) is kind):
            raise CacheError(f"Sample {key}: its .json index line has an unusable {name} ({short(value)}).")
    missing = [name for name in INDEX_FIELDS if name not in line]
    if missing:
        raise CacheError(f"Sample {key}: its .json index line has no {missing[0]}.")
    return SampleEntry(key, **line)


def short(value: Any) -> str:
    """``repr(value)``, cut to 60 characters for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
