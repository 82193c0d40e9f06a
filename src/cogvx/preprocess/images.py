"""Adding image latents to samples a cache already holds, without encoding any video again.

``cogvx preprocess --image-latents`` on a cache made without it: each live sample that lacks image latents
and whose video is in ``--data``, unchanged, gets them. Its shard is read once (sha256 checked, as training
reads it); decoding workers read only the first frame of each sample's window, through the same decoding
path as the full clip (``video.OpenClip.frames``), at the source frame and size the sample recorded; the
VAE encodes those frames alone; and the sample is written again under the same key with its moments,
prompt embedding, strip and metadata copied byte for byte, plus ``image_moments`` and its first frame. The
new sample supersedes the old one (``SampleEntry.supersedes``: same source, same variant), which stays in
its published shard, excluded.

All samples of one source in one shard are written together, so a run killed at any moment leaves each
of them either done or not; the next run does what is left, and a run with nothing left does nothing.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cogvx.pipeline.encode import encode_image_moments
from cogvx.preprocess.encoding import FirstFrames, failure, to_host
from cogvx.preprocess.video import SkipClip, read_first_frames
from cogvx.shards import Manifest, Sample, SampleEntry, read_shard
from cogvx.shards.manifest import IMAGE_MOMENTS
from cogvx.shards.shardfile import file_sha256


@dataclass(frozen=True)
class Target:
    """Live samples of one source in one shard that lack image latents (written again together)."""

    shard: str
    source: str
    path: str  # the source video, in the data as given now
    keys: tuple[str, ...]


def image_targets(manifest: Manifest, paths: dict[str, str], sources: set[str]) -> list[Target]:
    """The groups to add image latents to: samples lacking them whose source is in ``sources``.

    ``paths`` maps each source of the data to its file; ``sources`` are those known to be unchanged
    since their samples were encoded (same size and mtime, or same content hash).
    """
    found: dict[tuple[str, str], list[str]] = {}
    for shard in manifest.shards:
        for entry in shard.live_samples():
            if IMAGE_MOMENTS not in entry.carries and entry.source in sources:
                found.setdefault((shard.name, entry.source), []).append(entry.key)
    return [Target(shard, source, paths[source], tuple(keys)) for (shard, source), keys in found.items()]


@dataclass
class Refreshed:
    """Old samples of one source with their first frames read, on the way to being written again."""

    target: Target
    samples: list[Sample]  # as read from their shard
    entries: list[SampleEntry]  # their index lines
    first: FirstFrames
    stat: tuple[int, int]  # the source's size and mtime now (its content hash is the recorded one)
    image_moments: torch.Tensor | None = None  # [len(samples), 2C, 1, H', W'] on the host, once encoded
    ready: torch.cuda.Event | None = None


@dataclass(frozen=True)
class FrameRequest:
    """What a decoding worker needs to read the first frames of one target's samples exactly."""

    path: str
    content_hash: str
    stat: tuple[int | None, int | None]  # size and mtime_ns recorded with the samples
    keys: tuple[str, ...]
    indices: tuple[int, ...]  # the source frame each sample's window starts at
    mirrored: tuple[bool, ...]
    source_size: tuple[int, int]
    size: tuple[int, int]
    resize: str


def read_frames(request: FrameRequest) -> tuple[FirstFrames, tuple[int, int]] | tuple[str, str]:
    """In a worker: the noised first frames and the source's stat now, or (reason, detail) of a skip."""
    try:
        stat = os.stat(request.path)
        if (stat.st_size, stat.st_mtime_ns) != request.stat and file_sha256(request.path) != request.content_hash:
            raise SkipClip("source changed", "its content differs from the cached samples'; encode it again")
        frames = read_first_frames(
            request.path, list(request.indices), request.source_size, request.size, request.resize
        )
        frames = np.stack([f[:, ::-1] if flip else f for f, flip in zip(frames, request.mirrored, strict=True)])
        return FirstFrames.of(frames, list(request.keys)), (stat.st_size, stat.st_mtime_ns)
    except SkipClip as err:
        return err.reason, err.detail
    except OSError as err:
        return "cannot read file", err.strerror or str(err)
    except Exception as err:  # one bad clip must not end the run: recorded with where it was raised
        return "reading failed", failure(err)


def _request(target: Target, samples: list[Sample], entries: list[SampleEntry], resize: str) -> FrameRequest:
    metas = [sample.meta for sample in samples]
    for meta in metas:
        recorded = [meta.get(name) for name in ("frame_indices", "source_size", "size")]
        if not all(isinstance(value, list) and value for value in recorded):
            raise SkipClip("no frame record", "a cached sample does not record its frame_indices, source_size and size")
    return FrameRequest(
        path=target.path,
        content_hash=entries[0].content_hash,
        stat=(entries[0].size, entries[0].mtime_ns),
        keys=tuple(s.key for s in samples),
        indices=tuple(int(meta["frame_indices"][0]) for meta in metas),
        mirrored=tuple(bool(meta.get("mirrored")) for meta in metas),
        source_size=tuple(metas[0]["source_size"]),
        size=tuple(metas[0]["size"]),
        resize=resize,
    )


def _old_samples(folder: Path, manifest: Manifest, todo: list[Target]) -> Iterator[tuple[Target, list[Sample]]]:
    """Each target with its samples as its shard holds them, reading each shard once, in order."""
    by_shard: dict[str, list[Target]] = {}
    for target in todo:
        by_shard.setdefault(target.shard, []).append(target)
    for record in manifest.shards:
        if record.name not in by_shard:
            continue
        wanted = {key: target for target in by_shard[record.name] for key in target.keys}
        held: dict[Target, list[Sample]] = {}
        for sample in read_shard(folder, record):
            target = wanted.get(sample.key)
            if target is None:
                continue
            group = held.setdefault(target, [])
            group.append(sample)
            if len(group) == len(target.keys):
                yield target, held.pop(target)


class Pool:
    """First frames read in worker processes (inline with none), results taken in the order asked."""

    def __init__(self, workers: int):
        self.executor = None
        if workers:  # a fork server, like the clip loader: no inherited decord reader
            context = multiprocessing.get_context("forkserver")
            self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        self.depth = max(2, 2 * workers)

    def submit(self, request: FrameRequest) -> Future:
        if self.executor is not None:
            return self.executor.submit(read_frames, request)
        done: Future = Future()
        done.set_result(read_frames(request))
        return done

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def add_image_latents(
    folder: Path,
    manifest: Manifest,
    todo: list[Target],
    *,
    resize: str,
    vae,
    device: torch.device,
    batch: int,
    workers: int,
    emit: Callable[[Refreshed], None],
    skip: Callable[[str, str, str], None],
    progress: Callable[[int], None],
) -> int:
    """Add image latents to the samples of ``todo``; returns how many samples were written again.

    ``emit`` takes each group once its image latents are on their way to the host (the writer waits for
    ``ready``); ``skip(source, reason, detail)`` records a source whose first frames cannot be read.
    """
    index = {entry.key: entry for entry in manifest.live_entries()}
    pool = Pool(workers)
    pending: collections.deque = collections.deque()
    batcher = _ImageBatcher(vae, device, batch, emit)
    written = done = 0

    def take_oldest() -> None:
        nonlocal written, done
        target, samples, future = pending.popleft()
        outcome = future.result()
        done += 1
        progress(done)
        if isinstance(outcome[0], str):
            skip(target.source, *outcome)
            return
        first, stat = outcome
        batcher.add(Refreshed(target, samples, [index[sample.key] for sample in samples], first, stat))
        written += len(samples)

    try:
        for target, samples in _old_samples(folder, manifest, todo):
            try:
                request = _request(target, samples, [index[sample.key] for sample in samples], resize)
            except SkipClip as err:
                skip(target.source, err.reason, err.detail)
                continue
            pending.append((target, samples, pool.submit(request)))
            if len(pending) >= pool.depth:
                take_oldest()
        while pending:
            take_oldest()
        batcher.flush()
    finally:
        pool.close()
    return written


class _ImageBatcher:
    """Encodes the first frames of several groups of one size per VAE call (1-frame videos)."""

    def __init__(self, vae, device: torch.device, batch: int, emit: Callable[[Refreshed], None]):
        self.vae, self.device, self.batch, self.emit = vae, device, batch, emit
        self.pending: list[tuple[Refreshed, torch.Tensor]] = []
        self.count = 0

    def add(self, group: Refreshed) -> None:
        pixels, group.first.pixels = group.first.pixels, None
        if self.pending and (pixels.shape[1:] != self.pending[0][1].shape[1:] or self.count + len(pixels) > self.batch):
            self.flush()
        self.pending.append((group, pixels.to(self.device)))
        self.count += len(pixels)
        if self.count >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        moments = encode_image_moments(self.vae, torch.cat([pixels for _, pixels in self.pending]))
        (host,), ready = to_host(moments)
        offset = 0
        for group, pixels in self.pending:
            self.emit(replace(group, image_moments=host[offset : offset + len(pixels)], ready=ready))
            offset += len(pixels)
        self.pending, self.count = [], 0
