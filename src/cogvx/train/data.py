"""The training stream: resampled shards, a shuffle buffer and same-shape batches, counted in steps.

Every (rank, DataLoader worker) pair is one independent stream seeded from ``(seed, stream id)``.
DataLoader hands out worker batches round-robin, starting at worker 0. After ``n`` consumed batches the
next one is stream ``n % W``'s, so a resumed loader's worker ``w`` plays stream ``(w + n) % W`` and drops
that stream's batches already used, without decoding them. Same seed, world size and worker count give
the same batches, bit for bit, from any position.

A user error a worker meets with the cache (a ``CogvxError``, e.g. ``CacheError``) reaches the caller as
the same one-line exception the in-process stream raises, not as DataLoader's wrapped traceback.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cogvx.errors import CogvxError
from cogvx.shards import CacheError, ShardRecord, decode_sample, iter_record_samples, merged_layouts, open_shard
from cogvx.shards.manifest import IMAGE_MOMENTS


class ShardStream(IterableDataset):
    def __init__(
        self,
        folder: Path,
        shards: list[ShardRecord],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        shuffle_buffer: int,  # TrainConfig.shuffle_buffer: its default lives there
        random_flip: float,  # TrainConfig.random_flip
        skip_batches: int = 0,
    ):
        if not shards or sum(s.live_count for s in shards) == 0:
            raise CacheError(f"The cache in {folder} holds no samples; run `cogvx preprocess` first.")
        self.folder, self.shards = Path(folder), shards
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
        raw = self._shuffled(self._flipped(self._raw_samples(rng), rng), rng)
        for index, group in enumerate(self._bucketed(raw)):
            if index >= skip:
                yield collate([decode_sample(r, r["__url__"]) for r in group])

    def _raw_samples(self, rng: random.Random) -> Iterator[dict[str, Any]]:
        """Endless raw samples from shards drawn with replacement, weighted by their sample counts."""
        weights = [s.live_count for s in self.shards]  # a fully replaced shard is never drawn
        verified: set[str] = set()
        # Each sample is checked against its index line here and against its bucket's layout when decoded
        # (a cache without recorded layouts: the first sample of each bucket sets it for the others).
        layouts = merged_layouts(self.shards)
        while True:
            record = rng.choices(self.shards, weights)[0]
            # The sha256 is checked the first time this process draws a shard (hashing as it streams,
            # before any of its samples is served); later draws check the size and stream the file.
            with open_shard(self.folder, record, full=record.name not in verified) as stream:
                verified.add(record.name)
                yield from iter_record_samples(stream, record, str(self.folder / record.name), layouts)

    def _flipped(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        """Each sample as drawn, or its mirrored variant with probability ``random_flip``.

        The two variants are separate samples of the cache: an original is kept with probability 1 - p
        and a mirrored one with probability p, drawn from the stream's generator, so a replayed stream
        makes the same choices. With p = 0 no number is drawn: the stream is the one without mirrors.
        """
        p = self.random_flip
        for raw in samples:
            mirrored = bool(raw["__meta__"].get("mirrored"))
            certain = p in (0, 1)  # nothing to draw: only originals (p = 0) or only mirrors (p = 1)
            if (mirrored == (p == 1)) if certain else ((rng.random() < p) == mirrored):
                yield raw

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        from webdataset.filters import shuffle

        if self.shuffle_buffer <= 1:
            return samples
        return shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)

    def _bucketed(self, samples: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """Groups of ``batch_size`` raw samples of one bucket (shape), in the order they fill up."""
        pending: dict[str, list[dict[str, Any]]] = {}
        for raw in samples:
            bucket = raw["__meta__"]["bucket"]  # parsed and checked by iter_record_samples
            group = pending.setdefault(bucket, [])
            group.append(raw)
            if len(group) == self.batch_size:
                del pending[bucket]
                yield group


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
        for batch in self.loader:
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
