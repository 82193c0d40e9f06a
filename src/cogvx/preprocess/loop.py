"""The encode loop of one rank: clips from the decoding workers through the VAE and T5 into its shards.

Decoding runs in DataLoader workers, encoding on this thread (the GPU), writing on the sample sink's
thread. A Ctrl-C keeps what was written (``Interrupted`` says how much); any other failure drops the
open shard and keeps every shard already listed.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import multiprocessing.forkserver
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cogvx import interrupts
from cogvx.pipeline import models
from cogvx.pipeline.encode import encode_prompts
from cogvx.pipeline.speed import compiling
from cogvx.preprocess.encoding import (
    ClipItem,
    ClipReader,
    Job,
    PromptBank,
    SampleSink,
    Skipped,
    Unchanged,
    VaeBatcher,
    caption_hash,
)
from cogvx.preprocess.images import add_image_latents, image_targets
from cogvx.preprocess.ranks import Ranks
from cogvx.preprocess.report import PreprocessResult
from cogvx.preprocess.video import FrameSpec
from cogvx.preprocess.writer import CloseShard, RankWriter
from cogvx.progress import progress_bar

if TYPE_CHECKING:
    from cogvx.preprocess.run import PreprocessConfig

# First frames per VAE call when image latents are added to cached samples, per clip of --vae-batch: a
# 1-frame video takes a small part of a clip's activations.
IMAGES_PER_CLIP = 8


@dataclass(frozen=True)
class Encoders:
    """The VAE, and ``encode_text(texts) -> (embeds, truncated)`` with T5, on one device; ``compiled_stamp``:
    the file to write once the compiled encoder has encoded (None: not compiled)."""

    vae: Any
    encode_text: Callable[[list[str]], tuple[torch.Tensor, list[bool]]]
    compiled_stamp: Path | None = None


def load_encoders(
    cfg: PreprocessConfig,
    info: models.ModelInfo,
    device: torch.device,
    result: PreprocessResult,
    spec: FrameSpec,
    clips: int,
) -> Encoders:
    """The VAE (tiled, sliced, compiled as ``cfg`` says; left to cogvx, when compiling pays for the ``clips`` this
    rank encodes at ``spec``'s largest bucket) and T5 of ``info``'s model, on ``device``.

    One after the other on this thread, while the decoding workers start: loading either while the other
    loads or runs is not safe, as both libraries' ``from_pretrained`` change process-wide state for a
    while (transformers sets torch's default dtype; accelerate's empty-weights patch is class-wide).
    """
    dtype = models.parse_dtype(cfg.dtype)
    vae = info.load_vae(dtype, device).eval()
    if cfg.vae_tiling:
        vae.enable_tiling()
    if cfg.vae_slicing:
        vae.enable_slicing()
    frames, height, width = spec.largest_window
    stamp = compiling.vae_compile_stamp(info.encoder_identity(), dtype, spec.largest_window, device)
    choice = compiling.vae_compile_choice(cfg.compile_vae, device, clips, frames * height * width, stamp.is_file())
    result.vae_compiled, result.vae_compile_why = choice.on, choice.why
    if choice.on:
        # Faster than the plain encode (BENCHMARKS.md, section 9); the first run per shape compiles, later runs
        # load the kernels from the persistent cache.
        compiling.use_persistent_compile_cache()
        compiling.compile_vae_encoder(vae)
    result.mark("vae")
    tokenizer, text_encoder = info.load_text_encoder(dtype, device)
    result.mark("t5")

    def encode_text(texts: list[str]):
        encoding = encode_prompts(tokenizer, text_encoder, texts, info.max_text_tokens)
        return encoding.embeds, encoding.truncated

    return Encoders(vae, encode_text, stamp if choice.on else None)


def pick_device(name: str | None, ranks: Ranks) -> torch.device:
    """``--device`` (default: a GPU if there is one), one GPU per rank under a launcher."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and ranks.world > 1:
        name = f"cuda:{ranks.local_rank}"  # one GPU per rank
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        # The DataLoader's pinning thread works on the current device: without this every rank
        # would open a CUDA context on GPU 0.
        torch.cuda.set_device(device)
    return device


def start_decoder_server(workers: int) -> None:
    """Start the fork server the decoding workers come from now, with torch and the clip reader imported in it.

    Each worker forked from it then starts decoding at once, instead of importing them first (seconds, at
    the start of every run); the server imports them while this process reads the configs and loads the
    encoders. It holds no decoder state: workers still start clean.
    """
    if workers:
        multiprocessing.set_forkserver_preload(["__main__", "cogvx.preprocess.encoding"])
        multiprocessing.forkserver.ensure_running()


def weights_files(info: models.ModelInfo) -> list[Path]:
    """The VAE's and T5's weights files of a local model folder, of its variant (none for a hub model)."""
    folder = Path(info.source)
    if not folder.is_dir():
        return []
    found = [path for sub in ("vae", "text_encoder") for path in sorted((folder / sub).glob("*.safetensors"))]
    # NAME.safetensors, NAME-00001-of-00002.safetensors; with a variant NAME.VARIANT[-00001-of-00002].safetensors
    middles = {path: path.name.split(".")[1:-1] for path in found}
    if info.variant is None:
        return [path for path in found if not middles[path]]
    return [path for path in found if middles[path] and middles[path][0].split("-")[0] == info.variant]


def prefetch_weights(info: models.ModelInfo) -> None:
    """Have the OS read the encoders' weights files into memory now, while the run starts (a thread asks)."""
    files = weights_files(info)
    if files and hasattr(os, "posix_fadvise"):
        threading.Thread(target=_will_need, args=(files,), name="cogvx-prefetch", daemon=True).start()


def _will_need(files: list[Path]) -> None:
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            continue  # a hint only: loading reads the file either way, and reports what is wrong with it


def clip_loader(jobs: list[Job], spec: FrameSpec, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """The decoding workers: each job's clip read, sampled and checked (``encoding.ClipReader``)."""
    # Decoding workers start from a fork server, not from a fork of this process: a decord VideoReader
    # alive here (a notebook, a test session, workers=0 earlier) would be inherited with its decoder
    # threads' locks, and destroying that copy in a worker aborts or hangs it.
    return torch.utils.data.DataLoader(
        ClipReader(jobs, spec),
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        multiprocessing_context="forkserver" if workers else None,
    )


def encode(
    cfg: PreprocessConfig,
    jobs: list[Job],
    items: Iterator[ClipItem],
    *,
    encoders: Encoders,
    device: torch.device,
    writer: RankWriter,
    result: PreprocessResult,
    total: int,
    world: int,
    show_progress: bool,
    refresh: list[str] | None,
    clip_paths: dict[str, str],
) -> None:
    """Encode (GPU) -> write (thread) this rank's clips as ``items`` come from the decoding workers.

    With ``refresh`` (image latents on: the sources of cached clips this rank looks after), the cached
    samples of those and of the clips found unchanged here that lack image latents then get them.
    """
    prompts = PromptBank([job.clip.caption or "" for job in jobs], encoders.encode_text, cfg.text_batch_size)
    sink = SampleSink(writer.write)

    # cuDNN's autotuner (a few shapes, each seen many times) only from the second VAE call: on the first it
    # costs seconds (BENCHMARKS.md, section 10), and the first sample waits for that call.
    def emit(encoded) -> None:
        result.mark("first_latent")  # the first VAE call made, its kernels queued: before its sample can be written
        sink.put(encoded)

    batcher = VaeBatcher(encoders.vae, device, cfg.vae_batch, emit, autotune=device.type == "cuda")
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        unchanged = _encode_clips(jobs, items, prompts, batcher, writer, result, total, world, show_progress)
        torch.backends.cudnn.benchmark = device.type == "cuda"
        if refresh is not None:
            todo = image_targets(writer.manifest, clip_paths, {*refresh, *unchanged})
            with progress_bar(show_progress and bool(todo), "image latents", len(todo)) as update:
                result.images_added += add_image_latents(
                    writer.folder,
                    writer.manifest,
                    todo,
                    resize=cfg.resize,
                    vae=encoders.vae,
                    device=device,
                    batch=cfg.vae_batch * IMAGES_PER_CLIP,
                    workers=cfg.workers,
                    emit=sink.put,
                    skip=functools.partial(_skip, result, writer),
                    progress=update,
                )
        sink.put(CloseShard())
        sink.close()
    except KeyboardInterrupt:
        _keep_written(sink, writer)
        raise
    except BaseException:
        sink.abort()
        writer.abandon()
        raise
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _encode_clips(
    jobs: list[Job],
    items: Iterator[ClipItem],
    prompts: PromptBank,
    batcher: VaeBatcher,
    writer: RankWriter,
    result: PreprocessResult,
    total: int,
    world: int,
    show_progress: bool,
) -> list[str]:
    """Each decoded clip to the VAE with its prompt, each skipped one to the skipped list; returns the sources
    whose cached samples were found to be of the same content."""
    started = time.time()
    base = result.already_cached  # rank 0 counts the clips found done before the loop
    bar = progress_bar(show_progress, "preprocess", total, "{task.fields[rate]:.2f} clips/s", rate=0.0)
    unchanged: list[str] = []
    with bar as update:
        update(base)
        for position, item in enumerate(items, 1):
            interrupts.check()  # a Ctrl-C swallowed inside a decoder's __del__ stops the run here
            clip = jobs[item.index].clip
            if isinstance(item, Skipped):
                result.skipped[item.reason] += 1
                writer.skip(clip.source, item.reason, item.detail)
            elif isinstance(item, Unchanged):
                result.already_cached += 1
                unchanged.append(clip.source)
            else:
                result.timeline.setdefault("first_decoded", item.decoded_at - result.started)
                job = jobs[item.index]
                if (item.content_hash, caption_hash(clip.caption)) == (job.known_hash, job.known_caption):
                    unchanged.append(clip.source)  # the cache holds this clip: only its mirrors were new
                prompt = prompts.get(item.index)
                result.mark("first_prompt")
                if prompt.truncated:
                    result.truncated_captions += 1
                    result.truncated_sources.append(clip.source)
                batcher.add(item, prompt)
                result.encoded += 1
                result.samples += len(item.windows)
            # Other ranks' progress is not known here; rank 0's bar shows its own share scaled up.
            done = base + position * world
            update(min(done, total), rate=position * world / max(time.time() - started, 1e-9))
        batcher.flush()
    interrupts.check()  # nor does one that landed after the last clip: the samples are kept, the exit says 130
    return unchanged


def _skip(result: PreprocessResult, writer: RankWriter, source: str, reason: str, detail: str) -> None:
    result.skipped[reason] += 1
    writer.skip(source, reason, detail)


def _keep_written(sink: SampleSink, writer: RankWriter) -> None:
    """After a Ctrl-C: write the clips already encoded and commit the open shard early, as the end of a run
    does (a shard of fewer samples is whole), so the next run encodes only what this one did not. Clips
    still in the VAE are left to the next run. If this fails too (a second Ctrl-C, a full disk), the open
    shard is dropped as after any failure; the shards already listed stay."""
    try:
        sink.put(CloseShard())  # behind anything queued: the writing thread finishes the shard, uncut
        sink.close()
    except BaseException:
        sink.abort()
        writer.abandon()
        raise


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a preprocess run, after it kept every sample it had written: what the cache holds now.

    Still a KeyboardInterrupt, so whatever stops on a Ctrl-C stops on this too.
    """

    def __init__(self, cache: Path | str, samples: int, shards: int):
        super().__init__(f"{samples} samples in {shards} shards kept in {cache}")
        self.cache, self.samples, self.shards = cache, samples, shards


@contextlib.contextmanager
def saying_what_was_kept(writer: RankWriter, shown: Path | str) -> Iterator[None]:
    """A Ctrl-C while encoding leaves as ``Interrupted``, counting the samples the cache keeps: those its
    manifest lists, and under torchrun also this rank's shards that its part file lists for the next run."""
    try:
        yield
    except KeyboardInterrupt as err:
        shards = list(writer.manifest.shards)
        if writer.world > 1:
            shards += writer.records
        raise Interrupted(shown, sum(s.live_count for s in shards), len(shards)) from err
