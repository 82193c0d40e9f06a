"""The three stages of the preprocessing hot loop, arranged so the GPU never waits for the CPU.

1. ``ClipReader`` (DataLoader worker processes): hash, decode, resize, and make the JPEG strips.
   Frames leave the workers as pinned uint8 (4x less to copy than floats).
2. ``VaeBatcher`` (main thread): copies frames to the GPU without blocking, encodes clips of one shape
   together, and starts the copy of the moments back into pinned memory, marked by a CUDA event.
   Nothing here waits for the GPU, so the next clip's kernels queue behind the current one's.
3. ``SampleSink`` (a background thread): waits for each clip's event, then serialises, writes the tar
   shards and commits them. Serialisation and sha256 release the GIL for most of their time.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from cogvx.pipeline.encode import encode_image_moments, encode_video_moments, noised_first_frame
from cogvx.preprocess.sources import Clip
from cogvx.preprocess.video import FrameSpec, SkipClip, jpeg_frame, jpeg_strip, read_clip
from cogvx.shards.manifest import MIRROR_SUFFIX
from cogvx.shards.shardfile import file_sha256


def caption_hash(caption: str) -> str:
    return hashlib.sha256(caption.encode()).hexdigest()[:16]


def sample_key(source: str, content_hash: str, window: int, caption: str = "", mirrored: bool = False) -> str:
    key = hashlib.sha256(f"{source}\0{content_hash}\0{window}\0{caption}".encode()).hexdigest()[:24]
    return key + MIRROR_SUFFIX if mirrored else key


@dataclass
class FirstFrames:
    """The first frame of each row of a clip's samples, for image latents (``--image-latents``)."""

    pixels: torch.Tensor | None  # [rows, 3, H, W] float32, noised (noised_first_frame); None once on the GPU
    sigmas: list[float]  # the noise level drawn for each row
    jpegs: list[bytes]  # each first frame before the noise, JPEG at the sample's size

    @classmethod
    def of(cls, frames: np.ndarray, keys: list[str]) -> FirstFrames:
        """From uint8 first frames ``[rows, H, W, 3]`` and the keys of the samples they belong to."""
        noised = [
            noised_first_frame(torch.from_numpy(np.ascontiguousarray(f)), key)
            for f, key in zip(frames, keys, strict=True)
        ]
        return cls(torch.stack([p for p, _ in noised]), [s for _, s in noised], [jpeg_frame(f) for f in frames])


@dataclass(frozen=True)
class Job:
    """A clip to look at, and what the cache already knows about its source (None: nothing)."""

    clip: Clip
    known_hash: str | None = None
    known_caption: str | None = None
    mirrors: bool = False  # --flip: also encode each window's mirror image
    known_mirrored: bool = False  # the cache holds mirrored variants of this source already
    image_latents: bool = False  # --image-latents: also encode each sample's first frame alone


@dataclass
class ReadClip:
    """A clip decoded in a worker, ready for the VAE: its source's identity, frames and what was taken."""

    index: int  # position in the rank's job list
    clip: Clip
    content_hash: str
    size: int
    mtime_ns: int
    frames: torch.Tensor | None  # [windows, F, H, W, 3] uint8; None once handed to the GPU
    bucket: str
    windows: list[list[int]]  # source frame indices of each window
    info: dict[str, Any]  # what read_clip measured (source size and rate, crop, ...): goes into each sample
    strips: list[bytes]  # one JPEG strip per row of frames
    # Per row of frames: (window number, mirrored). Rows are the windows, their mirrors, or both, in order.
    variants: list[tuple[int, bool]]
    first: FirstFrames | None = None  # with image latents: each row's first frame
    decoded_at: float = 0.0  # when the worker had it ready (time.time()): the run's timeline

    def pin_memory(self) -> ReadClip:
        """Called by the DataLoader's pinning thread: frames leave it page-locked, for a non-blocking copy."""
        first = self.first and replace(self.first, pixels=self.first.pixels.pin_memory())
        return replace(self, frames=self.frames.pin_memory(), first=first)

    def key(self, row: int) -> str:
        """The sample key of row ``row``."""
        window, mirrored = self.variants[row]
        return sample_key(self.clip.source, self.content_hash, window, self.clip.caption, mirrored)


@dataclass(frozen=True)
class Unchanged:
    """A clip whose content and caption the cache already holds (only its mtime changed)."""

    index: int


@dataclass(frozen=True)
class Skipped:
    """A clip that cannot be used, with a short reason (counted) and a detail (in skipped.jsonl)."""

    index: int
    reason: str
    detail: str


ClipItem = ReadClip | Unchanged | Skipped  # what ClipReader yields for one job


def failure(err: Exception) -> str:
    """``Type: message (at file.py:line)`` of an unexpected error, the line being where it was raised."""
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    place = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    message = str(err).strip().splitlines()[-1][:300] if str(err).strip() else ""
    return f"{type(err).__name__}: {message}{place}"


class ClipReader(torch.utils.data.Dataset):
    """One clip per item, in DataLoader workers; a clip that cannot be used comes back as a skip record."""

    def __init__(self, jobs: list[Job], spec: FrameSpec):
        self.jobs, self.spec = jobs, spec

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> ClipItem:
        try:
            return self._read(index, self.jobs[index])
        except SkipClip as err:
            return Skipped(index, err.reason, err.detail)
        except Exception as err:
            # Whatever else goes wrong with one clip (a decoder or library failure no check foresaw) must not
            # end a run of thousands in a DataLoader worker: it is recorded with where it was raised.
            return Skipped(index, "reading failed", failure(err))

    def _read(self, index: int, job: Job) -> ReadClip | Unchanged:
        clip = job.clip
        if clip.caption is None:
            raise SkipClip("missing caption", "no caption file or column value for this video")
        if not clip.caption.strip():
            raise SkipClip("empty caption", "the caption is empty")
        try:
            stat = os.stat(clip.path)
            content_hash = file_sha256(clip.path)
        except OSError as err:
            raise SkipClip("cannot read file", err.strerror or str(err)) from err
        if stat.st_size == 0:
            raise SkipClip("unreadable video", "empty file (0 bytes)")
        originals, mirrors = True, job.mirrors
        if content_hash == job.known_hash and caption_hash(clip.caption) == job.known_caption:
            if not (job.mirrors and not job.known_mirrored):
                return Unchanged(index)  # touched but unchanged: already in the cache
            originals = False  # the cache holds this clip: only its mirrored variants are new
        frames, plan, info = read_clip(str(clip.path), self.spec)
        rows, variants = [], []
        if originals:
            rows.append(frames)
            variants += [(window, False) for window in range(len(frames))]
        if mirrors:  # pixels mirrored left to right: a latent cannot be mirrored exactly
            rows.append(np.ascontiguousarray(frames[:, :, :, ::-1]))
            variants += [(window, True) for window in range(len(frames))]
        frames = np.concatenate(rows) if len(rows) > 1 else rows[0]
        read = ReadClip(
            index=index,
            clip=clip,
            content_hash=content_hash,
            size=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
            frames=torch.from_numpy(frames),
            bucket=plan.bucket.name,
            windows=[plan.windows[window] for window, _ in variants],
            info=info,
            strips=[jpeg_strip(row) for row in frames],
            variants=variants,
        )
        if job.image_latents:
            read.first = FirstFrames.of(frames[:, 0], [read.key(row) for row in range(len(frames))])
        read.decoded_at = time.time()
        return read


@dataclass(frozen=True)
class Prompt:
    """A caption's T5 embedding, and whether the caption was cut to fit the model's prompt length."""

    embeds: torch.Tensor  # [L, D] on the host
    truncated: bool


class PromptBank:
    """Encodes captions in de-duplicated batches, a little ahead of the clips that need them."""

    def __init__(self, captions: list[str], encode: Callable[[list[str]], tuple[torch.Tensor, list[bool]]], batch: int):
        self.captions, self.encode, self.batch = captions, encode, batch
        self.cache: dict[str, tuple[torch.Tensor, bool]] = {}

    def get(self, index: int) -> Prompt:
        caption = self.captions[index]
        if caption not in self.cache:
            upcoming = list(dict.fromkeys(self.captions[index : index + 4 * self.batch]))
            todo = [c for c in upcoming if c not in self.cache][: self.batch]
            embeds, truncated = self.encode(todo)
            embeds = embeds.cpu()  # one copy per batch of captions, not one per clip
            for text, emb, cut in zip(todo, embeds, truncated, strict=True):
                self.cache[text] = (emb.clone(), cut)
            while len(self.cache) > 8 * self.batch:
                self.cache.pop(next(iter(self.cache)))
        return Prompt(*self.cache[caption])


@dataclass
class Encoded:
    """A clip's moments on their way to the host: valid once ``ready`` has completed."""

    read: ReadClip  # its frames already dropped
    prompt: Prompt
    moments: torch.Tensor  # [windows, 2C, F', H', W'] on the host
    ready: torch.cuda.Event | None
    image_moments: torch.Tensor | None = None  # [windows, 2C, 1, H', W'] on the host, with image latents


def to_host(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """Start copying GPU tensors into pinned host memory; the event marks the end of the copies."""
    if not tensors or not tensors[0].is_cuda:
        return list(tensors), None
    hosts = []
    for tensor in tensors:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        hosts.append(host)
    ready = torch.cuda.Event()
    ready.record()
    return hosts, ready


class VaeBatcher:
    """Encodes clips of the same shape together (up to ``batch`` windows per VAE call).

    With image latents, the first frames of the same clips are encoded right after them, in one call of
    1-frame videos (their shapes differ from the clips', so they cannot share the clips' call).
    ``autotune``: cuDNN's autotuner on from the second call (``calls`` counts them).
    """

    def __init__(self, vae, device: torch.device, batch: int, emit: Callable[[Encoded], None], autotune: bool = False):
        self.vae, self.device, self.batch, self.emit, self.autotune = vae, device, batch, emit, autotune
        self.pending: list[tuple[ReadClip, Prompt, torch.Tensor, torch.Tensor | None]] = []
        self.count = 0
        self.calls = 0

    def add(self, clip: ReadClip, prompt: Prompt) -> None:
        frames, clip.frames = clip.frames, None  # the host copy is not kept while the clip waits to be written
        first = None
        if clip.first is not None:
            first, clip.first.pixels = clip.first.pixels.to(self.device, non_blocking=True), None
        if self.pending and (frames.shape[1:] != self.pending[0][2].shape[1:] or self.count + len(frames) > self.batch):
            self.flush()
        self.pending.append((clip, prompt, frames.to(self.device, non_blocking=True), first))
        self.count += len(frames)
        if self.count >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        frames = torch.cat([f for _, _, f, _ in self.pending]) if len(self.pending) > 1 else self.pending[0][2]
        moments = torch.cat([encode_video_moments(self.vae, chunk) for chunk in frames.split(self.batch)])
        firsts = [first for *_, first in self.pending if first is not None]
        images = [encode_image_moments(self.vae, torch.cat(firsts))] if firsts else []
        self.calls += 1
        if self.autotune:
            torch.backends.cudnn.benchmark = True
        (host, *host_images), ready = to_host(moments, *images)
        offset, image_offset = 0, 0
        for clip, prompt, clip_frames, first in self.pending:
            rows = len(clip_frames)
            image_moments = None
            if first is not None:
                image_moments = host_images[0][image_offset : image_offset + rows]
                image_offset += rows
            self.emit(Encoded(clip, prompt, host[offset : offset + rows], ready, image_moments))
            offset += rows
        self.pending, self.count = [], 0


class SampleSink:
    """Runs ``write(encoded)`` on a background thread, in order, at most ``depth`` clips behind."""

    def __init__(self, write: Callable[[Encoded], None], depth: int = 8):
        self.write = write
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="cogvx-shard-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            encoded = self.queue.get()
            if encoded is None:
                return
            if self.error is not None:
                continue  # drain without writing: the main thread will raise
            try:
                if encoded.ready is not None:
                    encoded.ready.synchronize()  # waits on this thread only; the main one keeps queueing
                self.write(encoded)
            except BaseException as err:  # handed to the main thread, which re-raises it
                self.error = err

    def put(self, encoded: Encoded) -> None:
        self._raise()
        self.queue.put(encoded)

    def close(self) -> None:
        """Wait until everything queued is written; re-raise a writing error here."""
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop without writing what is still queued (the caller is failing and abandons the shard)."""
        self.error = self.error or RuntimeError("interrupted")
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
