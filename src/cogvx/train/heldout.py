"""The held-out set: samples of the cache that training never sees, scored to tell whether a LoRA learns.

It is a function of the cache and the request alone, never of the run: the same manifest and the same
request give the same keys whatever the processes, data workers, batch size or ``random_flip``, so every
run on one cache is scored on the same samples and their scores compare.

What is held out is whole clips, never single samples. A clip is every live sample of one source file:
its windows (``--windows``), its mirrored variants (``--flip``), and any other copy of the same bytes
(another name, another caption). Samples are joined into one clip when they share the source file's
``content_hash``, or when one is the mirrored variant of the other (its key plus ``MIRROR_SUFFIX``).
Holding out one window of a video while training on its neighbour would score the model on frames it
has all but seen; by content hash, a copy of a held-out video under another name is held out too.

Clips are ranked by the sha256 of their name (the smallest content hash among their samples) and the
first ``count`` are held out. A cache that gains clips keeps most of its held-out set (each new clip
displaces at most one), and one that gains mirrors holds out the mirrors of its held-out originals.

Samples of a shard whose manifest entry lists no index cannot be named, so they are never held out.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from cogvx.errors import CacheError, ConfigError
from cogvx.shards import Manifest, ShardRecord
from cogvx.shards.manifest import MIRROR_SUFFIX, SampleEntry
from cogvx.shards.store import Store, open_store

# The TrainConfig fields (and so the CLI flags) this module's messages point to.
HOLDOUT_FIELD = "eval_holdout"
EVAL_SHARDS_FIELD = "eval_shards"
# Held out by default (no request): DEFAULT_FRACTION of the clips, at most DEFAULT_MAX_CLIPS, in a cache of
# at least DEFAULT_MIN_CLIPS clips; a smaller cache trains on everything, and says so.
DEFAULT_MIN_CLIPS = 20
DEFAULT_FRACTION = 0.1
DEFAULT_MAX_CLIPS = 6


def flag(field: str) -> str:
    """The CLI spelling of a TrainConfig field."""
    return "--" + field.replace("_", "-")


@dataclass(frozen=True)
class Clip:
    """The live samples of one source clip, by key (originals and mirrors)."""

    name: str  # the smallest content hash of its samples (its smallest key without the mirror suffix if none has one)
    keys: tuple[str, ...]

    @property
    def rank(self) -> str:
        """Its place in the hold-out order: a hash of the name, so the order is fixed by the cache alone."""
        return hashlib.sha256(f"cogvx-heldout:{self.name}".encode()).hexdigest()


@dataclass(frozen=True)
class EvalSet:
    """The samples an eval score is computed on, and, held out of the training cache, what training skips."""

    keys: frozenset[str]  # every held-out sample, originals and mirrors: training must never see one
    clips: int
    location: str  # the cache they are read from (display form)
    separate: bool = False  # a cache of its own (--eval-shards): nothing is taken from the training cache

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    @property
    def keys_hash(self) -> str:
        """sha256 over the sorted keys: the samples alone. A score names its set by ``evaluation.identity``,
        which adds how the samples are scored."""
        return hashlib.sha256("\n".join(sorted(self.keys)).encode()).hexdigest()

    @property
    def scored(self) -> list[str]:
        """The keys scored, sorted: each original, and a mirror only where its original is not in the set
        (a mirror is its original seen in a mirror: scoring both would count one clip twice)."""
        return sorted(k for k in self.keys if not (k.endswith(MIRROR_SUFFIX) and k.removesuffix(MIRROR_SUFFIX) in self))

    def excludes(self, key: str) -> bool:
        """Whether training must skip ``key``: the predicate for a stream's samples."""
        return not self.separate and key in self.keys


def clips(manifest: Manifest) -> list[Clip]:
    """The cache's clips (its indexed live samples grouped as the module says), in hold-out order."""
    entries = manifest.live_entries()
    parent = list(range(len(entries)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of: dict[tuple[str, str], int] = {}
    for index, entry in enumerate(entries):
        for label in _labels(entry):
            other = first_of.setdefault(label, index)
            parent[root(index)] = root(other)
    members: dict[int, list[SampleEntry]] = {}
    for index, entry in enumerate(entries):
        members.setdefault(root(index), []).append(entry)
    found = []
    for group in members.values():
        hashes = [e.content_hash for e in group if e.content_hash]
        name = min(hashes) if hashes else min(e.key.removesuffix(MIRROR_SUFFIX) for e in group)
        found.append(Clip(name, tuple(sorted(e.key for e in group))))
    return sorted(found, key=lambda clip: (clip.rank, clip.name))


def _labels(entry: SampleEntry) -> list[tuple[str, str]]:
    labels = [("key", entry.key.removesuffix(MIRROR_SUFFIX))]
    if entry.content_hash:
        labels.append(("content", entry.content_hash))
    return labels


def check_request(request: float | None) -> None:
    """A hold-out request is None (the default rule), 0 (none), a whole number of clips, or a fraction in (0, 1)."""
    if request is None:
        return
    bad = isinstance(request, bool) or not isinstance(request, (int, float)) or not math.isfinite(request)
    if bad or request < 0 or (request >= 1 and request != int(request)):
        raise ConfigError(
            f"{flag(HOLDOUT_FIELD)} {request!r} is neither a number of clips (0, 1, 2, ...) nor a fraction of them "
            "between 0 and 1 (0.1 holds out a tenth); pass one of those."
        )


def holdout_count(request: float | None, total: int, location: str) -> tuple[int, str]:
    """How many of ``total`` clips to hold out for ``request``, and the line the run prints about it.

    None is the default rule (DEFAULT_FRACTION of the clips, at most DEFAULT_MAX_CLIPS, from
    DEFAULT_MIN_CLIPS clips on); a request that leaves no clip to train on is a ConfigError.
    """
    check_request(request)
    how = f"{flag(HOLDOUT_FIELD)} N holds out N clips, {flag(EVAL_SHARDS_FIELD)} DIR scores another cache"
    if request is None:
        if total < DEFAULT_MIN_CLIPS:
            return 0, (
                f"No eval score: {location} holds {total} clips, fewer than the {DEFAULT_MIN_CLIPS} from which some "
                f"are held out by default ({how})."
            )
        count = min(DEFAULT_MAX_CLIPS, max(1, int(total * DEFAULT_FRACTION)))
    elif request == 0:
        return 0, f"No eval score ({flag(HOLDOUT_FIELD)} 0)."
    else:
        count = int(request) if request >= 1 else max(1, round(request * total))
    if total == 0:
        raise CacheError(
            f"{flag(HOLDOUT_FIELD)} {request:g}: {location} lists no samples by key (an old manifest), so none can "
            f"be held out. Index it with `cogvx shards rebuild-manifest`, or score another cache with "
            f"{flag(EVAL_SHARDS_FIELD)} DIR."
        )
    if count >= total:
        raise ConfigError(
            f"{flag(HOLDOUT_FIELD)} {request:g} holds out {count} clips, but {location} holds {total}, leaving none "
            f"to train on. Hold out fewer (at most {total - 1}), or score a cache of its own with "
            f"{flag(EVAL_SHARDS_FIELD)} DIR."
        )
    return count, (
        f"Eval score on {count} of {total} clips of {location}, held out of training "
        f"({'by default; ' if request is None else ''}a clip's windows and mirrors count as one; "
        f"{flag(HOLDOUT_FIELD)} 0 trains on all)."
    )


def held_out(manifest: Manifest, count: int, location: str) -> EvalSet:
    """The first ``count`` clips of the cache in hold-out order, as an EvalSet."""
    return _first(clips(manifest), count, location)


def choose(manifest: Manifest, request: float | None, location: str) -> tuple[EvalSet | None, str]:
    """The held-out set for ``request`` (None when nothing is held out), and the line the run prints."""
    found = clips(manifest)
    count, message = holdout_count(request, len(found), location)
    return (_first(found, count, location) if count else None), message


def _first(ordered: list[Clip], count: int, location: str) -> EvalSet:
    chosen = ordered[:count]
    return EvalSet(frozenset(k for clip in chosen for k in clip.keys), len(chosen), location)


def training_shards(shards: Iterable[ShardRecord], eval_set: EvalSet | None) -> list[ShardRecord]:
    """The shard records training streams: the held-out keys added to each record's ``excluded``.

    Readers skip excluded keys before decoding them, and ``rank_share`` splits only what is left, so a
    stream over these records never yields a held-out sample and the ranks' shares stay even. The
    records are copies: the manifest, and the shards' bytes and hashes, are unchanged.
    """
    shards = list(shards)
    if eval_set is None or eval_set.separate:
        return shards
    out = []
    for record in shards:
        held = [entry.key for entry in record.live_samples() if entry.key in eval_set]
        out.append(replace(record, excluded=[*record.excluded, *held]) if held else record)
    return out


def training_originals(manifest: Manifest, eval_set: EvalSet | None) -> int:
    """Originals left to train on (``--epochs`` counts steps from them): the manifest's, less those held out."""
    if eval_set is None or eval_set.separate:
        return manifest.original_count
    return manifest.original_count - sum(1 for key in eval_set.keys if not key.endswith(MIRROR_SUFFIX))


def separate_set(folder: Path | str | Store, cache_dir: Path | None = None) -> tuple[Store, Manifest, EvalSet]:
    """``--eval-shards``: every live sample of another cache. Check its encoders as the training cache's
    (``compat.check_cache_fits``) before scoring on it."""
    store = open_store(folder, cache_dir=cache_dir)
    manifest = Manifest.load(store)
    entries = manifest.live_entries()
    if len(entries) != manifest.sample_count:
        raise CacheError(
            f"{flag(EVAL_SHARDS_FIELD)} {store.location}: its manifest does not list every sample by key (an old "
            "manifest), and the eval score names each sample it scores. Index it with `cogvx shards "
            "rebuild-manifest`."
        )
    if not entries:
        raise CacheError(
            f"{flag(EVAL_SHARDS_FIELD)} {store.location} holds no samples; preprocess the held-out videos into it "
            "with `cogvx preprocess`."
        )
    keys = frozenset(entry.key for entry in entries)
    return store, manifest, EvalSet(keys, len(clips(manifest)), store.location, separate=True)
