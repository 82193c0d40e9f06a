"""The training stream: resampled shards, a shuffle buffer and same-shape batches, counted in steps.

Every global rank (process of the launch, on any node) trains on its own share of the cache:
``rank_share`` cuts the cache's samples, in the manifest's order, into ``world size`` contiguous runs
of equal size (within one sample), computed from the manifest alone so all ranks agree without
talking. Shares are disjoint and together hold every live sample; a rank reads whole shards except
those holding the ends of its run, which it shares with a neighbour, and a cache of fewer shards than
ranks (one shard on four processes) is split inside its shards. A sample and its mirrored variant count as one and go to
the same rank, so every share keeps its mirrors for ``--random-flip``.

Every (rank, DataLoader worker) pair is one independent stream over its rank's share, drawing the
share's shards with replacement, seeded from ``(seed, stream id)``.
DataLoader hands out worker batches round-robin, starting at worker 0. After ``n`` consumed batches the
next one is stream ``n % W``'s, so a resumed loader's worker ``w`` plays stream ``(w + n) % W`` and drops
that stream's batches already used, without decoding them. Same seed, world size and worker count give
the same batches, bit for bit, from any position.

A user error a worker meets with the cache (a ``CogvxError``, e.g. ``CacheError``) reaches the caller as
the same one-line exception the in-process stream raises, not as DataLoader's wrapped traceback.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cogvx.errors import CogvxError, ConfigError
from cogvx.shards import CacheError, RawSample, ShardRecord, decode, merged_layouts, open_shard, record_samples
from cogvx.shards.manifest import IMAGE_MOMENTS, MIRROR_SUFFIX
from cogvx.shards.store import Store, StoreError, open_store

SKIPPED_SHARDS = "skipped_shards"  # a batch's list of the shards its stream skipped so far (--skip-bad-shards)


@dataclass(frozen=True)
class Piece:
    """The live samples of one shard that one rank serves: all of them, or those named."""

    record: ShardRecord
    count: int  # samples of this piece
    keys: frozenset[str] | None = None  # the samples by key; None with ``positions`` None: the whole shard
    # For a shard whose manifest entry has no index of its samples: the live samples by their place
    # among the shard's live samples, in file order.
    positions: range | None = None

    @property
    def whole(self) -> bool:
        return self.keys is None and self.positions is None


# A shard's live samples as (unit number, key) pairs, or, for a shard whose manifest entry indexes no samples,
# the range of unit numbers its places take (place p is unit ``start + p``): never a list over a bare count.
Members = list[tuple[int, str]] | range


def _units(shards: list[ShardRecord]) -> tuple[int, list[tuple[ShardRecord, Members]]]:
    """Number every live sample's unit in the manifest's order of first appearance, and list each shard's
    live samples by unit. A unit is a key without its mirror suffix; in a shard whose manifest entry indexes
    no samples (readers accept one) each live sample is a unit, by its place. Time and memory go with the
    shards and the index lines, not with the counts the manifest claims."""
    order: dict[str, int] = {}  # unit (key) -> its number
    placed = 0  # units of index-less shards so far
    listed: list[tuple[ShardRecord, Members]] = []
    for record in shards:
        live = record.live_samples()
        if len(live) == record.live_count:
            units = [order.setdefault(e.key.removesuffix(MIRROR_SUFFIX), len(order) + placed) for e in live]
            listed.append((record, list(zip(units, (e.key for e in live), strict=True))))
        else:
            start = len(order) + placed
            listed.append((record, range(start, start + record.live_count)))
            placed += record.live_count
    return len(order) + placed, listed


def unit_count(shards: list[ShardRecord]) -> int:
    """How many samples the cache splits among ranks (a sample and its mirrored variant count once)."""
    return _units(shards)[0]


def check_batch_fits(shards: list[ShardRecord], batch_size: int, world_size: int, location: str) -> None:
    """Refuse a forward pass of more samples than the cache holds, before anything is loaded.

    The stream draws with replacement, so it would fill any batch; but one batch across the processes larger
    than the cache holds some sample twice (or a thousand times) in the same forward pass, which no one asks
    for by --batch-size. Accumulating over more micro-batches than the cache holds is allowed: a small cache
    with --gradient-accumulation passes over the cache more than once per step, as several epochs would.
    """
    units, batch = unit_count(shards), batch_size * world_size
    if batch > units:
        raise ConfigError(
            f"--batch-size {batch_size} x {world_size} process(es) is {batch} samples per forward pass, more than "
            f"the {units} samples in {location} (a clip and its mirror count once): every batch would repeat "
            f"samples. Take at most {units} per pass (--gradient-accumulation makes larger steps), or add videos "
            "with `cogvx preprocess`."
        )


def rank_share(shards: list[ShardRecord], rank: int, world_size: int) -> list[Piece]:
    """What global ``rank`` of ``world_size`` trains on: its pieces of the shards, in manifest order.

    Rank r owns the units numbered ``[r * U // world_size, (r + 1) * U // world_size)`` of the cache's
    ``U``: a function of the manifest alone, so every rank computes every share the same way.
    """
    return _share(shards, rank, world_size)[1]


def _share(shards: list[ShardRecord], rank: int, world_size: int) -> tuple[int, list[Piece]]:
    """The cache's unit count and ``rank_share``, from one pass over the manifest."""
    units, listed = _units(shards)
    low, high = rank * units // world_size, (rank + 1) * units // world_size
    pieces = []
    for record, members in listed:
        if isinstance(members, range):  # an index-less shard: the places of its units in [low, high)
            mine = range(max(members.start, low) - members.start, min(members.stop, high) - members.start)
            if not mine:
                continue
            if len(mine) == len(members):
                pieces.append(Piece(record, len(mine)))
            elif mine:
                pieces.append(Piece(record, len(mine), positions=mine))
            continue
        keys = [key for unit, key in members if low <= unit < high]
        if not keys:
            continue
        if len(keys) == len(members):
            pieces.append(Piece(record, len(keys)))
        else:
            pieces.append(Piece(record, len(keys), keys=frozenset(keys)))
    return units, pieces


class ShardStream(IterableDataset):
    def __init__(
        self,
        folder: Path | str | Store,  # a cache folder, a URL or a Store (with its read-through cache)
        shards: list[ShardRecord],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        shuffle_buffer: int,  # TrainConfig.shuffle_buffer: its default lives there
        random_flip: float,  # TrainConfig.random_flip
        skip_batches: int = 0,
        skip_bad: bool = False,  # TrainConfig.skip_bad_shards
    ):
        self.store = open_store(folder)
        if not shards or sum(s.live_count for s in shards) == 0:
            raise CacheError(f"The cache in {self.store.location} holds no samples; run `cogvx preprocess` first.")
        units, self.pieces = _share(shards, rank, world_size)
        if units < world_size:  # the same answer on every rank: all of them stop, none waits for the others
            raise CacheError(
                f"The cache in {self.store.location} holds {units} samples (a clip and its mirror count once), fewer "
                f"than the {world_size} processes, and each process trains on samples of its own. Launch at most "
                f"{units} processes, or add videos with `cogvx preprocess`."
            )
        self.folder, self.shards = folder, shards
        self.skip_bad, self.skipped = skip_bad, {}  # skipped: the URL of each shard skipped -> why
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.skip_batches = shuffle_buffer, skip_batches
        self.random_flip = random_flip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # A fresh DataLoader starts its round-robin at worker 0 whatever was consumed, and the next batch
        # (global index n) belongs to stream n % W: worker w continues stream (w + n) % W, whose batches
        # were the global indices stream, stream + W, ...; those below n were consumed.
        stream = (worker + self.skip_batches) % workers
        rng = random.Random(f"cogvx-stream:{self.seed}:{self.rank * workers + stream}:{self.world_size * workers}")
        skip = (self.skip_batches - stream + workers - 1) // workers
        self.skipped = {}
        raw = self._shuffled(self._flipped(self._raw_samples(rng), rng), rng)
        for index, group in enumerate(self._bucketed(raw)):
            if index >= skip:
                batch = collate([decode(r) for r in group])
                if self.skipped:
                    batch[SKIPPED_SHARDS] = sorted(self.skipped)
                yield batch

    def _raw_samples(self, rng: random.Random) -> Iterator[RawSample]:
        """Endless raw samples of this rank's share: its shards drawn with replacement, weighted by how
        many of the share's samples each holds (a fully replaced shard is never drawn)."""
        weights = [piece.count for piece in self.pieces]
        verified: set[str] = set()
        # Each sample is checked against its index line here and against its bucket's layout when decoded
        # (a cache without recorded layouts: the first sample of each bucket sets it for the others).
        layouts = merged_layouts(self.shards)
        while True:
            piece = rng.choices(self.pieces, weights)[0]
            record = piece.record
            url = self.store.url(record.name)
            if url in self.skipped:
                continue  # drawn all the same: the other shards' draws stay where they were
            # The sha256 is checked the first time this process draws a shard (hashing as it streams,
            # before any of its samples is served); later draws check the size and stream the file. A
            # remote shard is hashed on every draw, as it is copied (or read from the verified cache_dir).
            try:
                with open_shard(self.store, record, full=record.name not in verified) as stream:
                    verified.add(record.name)
                    samples = record_samples(stream, record, url, layouts)
                    yield from samples if piece.whole else _only(piece, samples)
            except StoreError:
                raise  # the store cannot be reached: nothing is known about the shard
            except CacheError as err:
                if not self.skip_bad:
                    raise
                self._skip(url, err, weights)

    def _skip(self, url: str, err: CacheError, weights: list[int]) -> None:
        """--skip-bad-shards: leave a missing, changed or unreadable shard out of this stream, said aloud.

        A shard is bad or not by its bytes, so every replay of the stream skips it at the same draws.
        """
        self.skipped[url] = str(err)
        print(f"[warning] skipping shard {url} (--skip-bad-shards): {err}", file=sys.stderr, flush=True)
        pieces = zip(self.pieces, weights, strict=True)
        left = [p for p, w in pieces if w and self.store.url(p.record.name) not in self.skipped]
        if not left:
            raise CacheError(
                f"Every shard this process reads from {self.store.location} is bad ({len(self.skipped)} skipped); "
                f"nothing is left to train on. Run `cogvx shards verify {self.store.location}`."
            )

    def _flipped(self, samples: Iterator[RawSample], rng: random.Random) -> Iterator[RawSample]:
        """Each sample as drawn, or its mirrored variant with probability ``random_flip``.

        The two variants are separate samples of the cache: an original is kept with probability 1 - p
        and a mirrored one with probability p, drawn from the stream's generator, so a replayed stream
        makes the same choices. With p = 0 no number is drawn: the stream is the one without mirrors.
        """
        p = self.random_flip
        for raw in samples:
            mirrored = bool(raw.meta.get("mirrored"))
            certain = p in (0, 1)  # nothing to draw: only originals (p = 0) or only mirrors (p = 1)
            if (mirrored == (p == 1)) if certain else ((rng.random() < p) == mirrored):
                yield raw

    def _shuffled(self, samples: Iterator[RawSample], rng: random.Random) -> Iterator[RawSample]:
        from webdataset.filters import shuffle

        if self.shuffle_buffer <= 1:
            return samples
        return shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)

    def _bucketed(self, samples: Iterator[RawSample]) -> Iterator[list[RawSample]]:
        """Groups of ``batch_size`` raw samples of one bucket (shape), in the order they fill up."""
        pending: dict[str, list[RawSample]] = {}
        for raw in samples:
            bucket = raw.meta["bucket"]  # parsed and checked by record_samples
            group = pending.setdefault(bucket, [])
            group.append(raw)
            if len(group) == self.batch_size:
                del pending[bucket]
                yield group


def _only(piece: Piece, samples: Iterator[RawSample]) -> Iterator[RawSample]:
    """The samples of a shard that belong to ``piece`` (the others are skipped before any decoding)."""
    for place, raw in enumerate(samples):
        if (raw.key in piece.keys) if piece.keys is not None else (place in piece.positions):
            yield raw


def collate(samples: list) -> dict[str, Any]:
    def join(name: str) -> torch.Tensor:
        tensors = [s.tensors[name] for s in samples]
        return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)  # no copy for one

    batch = {"moments": join("moments"), "prompt_embeds": join("prompt_embeds"), "keys": [s.key for s in samples]}
    if all(IMAGE_MOMENTS in s.tensors for s in samples):  # a cache made with --image-latents (for I2V models)
        batch[IMAGE_MOMENTS] = join(IMAGE_MOMENTS)
    return batch


def make_loader(stream: ShardStream, workers: int, pin_memory: bool, prefetch: int = 2) -> Loader:
    loader = DataLoader(
        _ReportingErrors(stream) if workers else stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers else None,
        persistent_workers=False,
    )
    return Loader(loader)


class Loader:
    """Batches of a DataLoader; a worker's user error is raised here as itself, with its one-line message."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The batches, the workers started now (not at the first batch asked for): each fetches its first
        batches while the caller does other work, such as loading the model."""
        return _checked(iter(self.loader))


def _checked(batches: Iterator[Any]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        if isinstance(batch, _WorkerError):
            raise batch.error()
        yield batch


class _WorkerError:
    """A user error met in a worker. DataLoader would re-raise it as "Caught CacheError in DataLoader
    worker process 0. Original Traceback ..."; this carries the type and message instead."""

    def __init__(self, error: CogvxError):
        self.kind, self.message = type(error), str(error)

    def error(self) -> CogvxError:
        try:
            return self.kind(self.message)
        except TypeError:  # a subclass that wants more than a message: the message is what counts
            return CogvxError(self.message)


class _ReportingErrors(IterableDataset):
    """The stream as a DataLoader worker runs it: a user error ends the worker's batches with a _WorkerError.

    Anything else (a bug) keeps DataLoader's handling, traceback included.
    """

    def __init__(self, stream: ShardStream):
        self.stream = stream

    def __iter__(self) -> Iterator[dict[str, Any] | _WorkerError]:
        try:
            yield from self.stream
        except CogvxError as err:
            yield _WorkerError(err)
