"""``cogvx preprocess``: videos and captions in, a cache of latent moments and prompt embeddings out.

See docs/preprocess.md for what happens to each clip, and docs/cache-format.md for what is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cogvx import __version__, files, hub
from cogvx.errors import CacheError, InputError
from cogvx.pipeline import models
from cogvx.pipeline.encode import encode_prompts
from cogvx.pipeline.speed import compiling
from cogvx.preprocess import cachedir, remote
from cogvx.preprocess.config import VAE_FRAME_STEP, PreprocessConfig  # noqa: F401 (re-exported)
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
from cogvx.preprocess.sources import INVALID_UTF8, VIDEO_EXTENSIONS, Clip, Sources, find_sources
from cogvx.preprocess.video import FrameSpec
from cogvx.preprocess.writer import CloseShard, RankWriter
from cogvx.progress import progress_bar
from cogvx.shards import Manifest, SampleEntry, paths, store, write_json_atomic
from cogvx.shards.shardfile import file_sha256

log = logging.getLogger("cogvx.preprocess")

SCHEMA = {
    "moments": "VAE posterior [2C, F, H, W]: mean then log-variance on axis 0, unscaled",
    "prompt_embeds": "T5 last hidden state [L, D], pads included (L: the transformer's max_text_seq_length)",
    "json": "source, content_hash, caption, window, frame_indices, fps, size, bucket, ...",
    "jpg": "JPEG strip of up to 8 of the sampled frames, side by side, 64 px high",
    "image_moments": "with --image-latents: VAE posterior [2C, 1, H, W] of the noised first frame, unscaled",
    "first.jpg": "with --image-latents: the first frame (before the noise) at the sample's size",
}


@dataclass
class PreprocessResult:
    encoded: int = 0  # clips encoded by this run
    samples: int = 0  # samples written by this run (one per window)
    already_cached: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated_captions: int = 0
    truncated_sources: list[str] = field(default_factory=list)
    images_added: int = 0  # cached samples written again with image latents added (--image-latents)
    images_missing: int = 0  # with image latents: samples in the cache still without them at the end
    # Listed shards found missing or damaged at the start (dropped from the manifest, their samples
    # encoded again), and the sources of their samples that no longer exist in the data: lost.
    dropped_shards: list[str] = field(default_factory=list)
    lost_sources: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Seconds from the start to: the encoders on the device ("encoders"), the first clip's samples
    # written ("first_written") and every sample written ("encoded"). Across ranks: the slowest.
    timeline: dict[str, float] = field(default_factory=dict)
    ranks: int = 1
    manifest: Manifest | None = None
    started: float = field(default_factory=time.time)

    def mark(self, name: str) -> None:
        """Put ``name`` on the timeline at now, unless it is there already."""
        self.timeline.setdefault(name, time.time() - self.started)

    def counts(self) -> dict:
        """Everything but the manifest, as JSON values."""
        data = {k: v for k, v in asdict(self).items() if k not in ("manifest", "started")}
        data["skipped"] = dict(self.skipped)
        return data

    def share(self) -> RankCounts:
        """What this rank did, for rank 0 to add up."""
        return RankCounts(
            encoded=self.encoded,
            samples=self.samples,
            already_cached=self.already_cached,
            skipped=dict(self.skipped),
            truncated_captions=self.truncated_captions,
            truncated_sources=list(self.truncated_sources),
            timeline=dict(self.timeline),
            images_added=self.images_added,
        )

    def add(self, other: RankCounts) -> None:
        self.encoded += other.encoded
        self.samples += other.samples
        self.already_cached += other.already_cached
        self.skipped.update(other.skipped)
        self.truncated_captions += other.truncated_captions
        self.truncated_sources += other.truncated_sources
        self.images_added += other.images_added
        for name, seconds in other.timeline.items():
            self.timeline[name] = max(seconds, self.timeline.get(name, 0.0))


@dataclass
class RankCounts:
    """One rank's share of a distributed run, as its result part file holds it (JSON)."""

    encoded: int
    samples: int
    already_cached: int
    skipped: dict[str, int]
    truncated_captions: int
    truncated_sources: list[str]
    timeline: dict[str, float]
    images_added: int = 0

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> RankCounts:
        return cls(**json.loads(Path(path).read_text()))


def run(cfg: PreprocessConfig, show_progress: bool = False) -> PreprocessResult:
    """Encode every usable clip under ``cfg.data`` that the cache in ``cfg.output`` does not hold yet.

    Under torchrun / accelerate launch each rank encodes its share; rank 0 returns the totals.
    Raises InputError when nothing usable exists (every clip skipped and the cache empty).
    """
    ranks = Ranks.from_env()
    try:
        if store.is_remote(cfg.output):  # staged in a local folder, mirrored to the remote cache
            with remote.Mirror(str(cfg.output), ranks) as mirror:
                staged = dataclasses.replace(cfg, output=mirror.staging)
                return _run(staged, ranks, show_progress and ranks.is_main, mirror)
        return _run(cfg, ranks, show_progress and ranks.is_main)
    except OSError as err:
        problem = _write_problem(err, store.display(cfg.output))
        if problem is None:
            raise
        raise CacheError(problem) from err
    finally:
        ranks.close()


def _write_problem(err: OSError, output: Path) -> str | None:
    """One line for a cache folder that cannot be written (full, read-only, no permission), else None."""
    path = err.filename or output
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"No space left on the device to write {path}. Free some space (or use another --output) and run "
            "again: the cache keeps every shard its manifest lists, and the next run encodes the rest."
        )
    inside = Path(os.path.abspath(path)).is_relative_to(os.path.abspath(output))
    if err.errno == errno.EROFS or (err.errno in (errno.EACCES, errno.EPERM) and inside):
        return f"Cannot write {path} ({err.strerror}). Make the folder writable, or choose another --output."
    return None


def _run(
    cfg: PreprocessConfig, ranks: Ranks, show_progress: bool, mirror: remote.Mirror | None = None
) -> PreprocessResult:
    started = time.time()
    data = hub.resolve_dataset(cfg.data)  # a hub dataset is downloaded to huggingface_hub's cache first
    sources = find_sources(data, cfg.caption_column, cfg.video_column, cfg.allow_outside_paths)
    clips = sources.clips
    if not clips:
        unusable = f"; {len(sources.skipped)} entries named like videos are not usable files" if sources.skipped else ""
        raise InputError(
            f"No videos found under {cfg.data} (looked for {', '.join(sorted(VIDEO_EXTENSIONS))}, "
            f"recursively{unusable})."
        )
    if cfg.id_token:
        clips = [dataclasses.replace(c, caption=f"{cfg.id_token} {c.caption}") if c.caption else c for c in clips]

    info = models.ModelInfo.read(cfg.model, cfg.model_revision, cfg.model_variant)
    spec = cfg.frame_spec(info.native_size, info.native_frames, info.frame_step)
    producer = {"tool": "cogvx", "version": __version__, **info.recorded(), "encoders": info.encoder_identity()}
    params = cfg.cache_params(spec)
    shown = mirror.location if mirror else cfg.output  # the cache as messages name it
    existing = cachedir.check_existing(cfg.output, producer, params, info, shown)  # every rank refuses alike

    device = _device(cfg.device, ranks)
    cfg.output.mkdir(parents=True, exist_ok=True)
    locked = ranks.is_main and mirror is None  # a mirror holds the locks of its own
    with cachedir.writer_lock(cfg.output) if locked else contextlib.nullcontext():
        if ranks.is_main:
            manifest = existing or Manifest(producer=producer, params=params, schema=SCHEMA)
            # where the last run read its videos: the hub URL, or the local folder
            manifest.producer["data"] = str(cfg.data) if isinstance(cfg.data, str) else str(data.resolve())
            recovery = (mirror or cachedir).recover(cfg.output, manifest, check_hashes=cfg.repair)
        ranks.barrier()  # the folder is tidy and the manifest final for this run's start
        if not ranks.is_main:
            if mirror:
                mirror.pull_manifest()
            manifest = Manifest.load(cfg.output)

        # A cache that holds image latents keeps getting them, so it serves image-to-video whole.
        image_latents = cfg.image_latents or manifest.image_latent_count > 0
        jobs, cached = _todo(clips, manifest, cfg.flip, image_latents)
        mine = jobs[ranks.rank :: ranks.world]
        result = PreprocessResult(
            already_cached=len(cached) if ranks.is_main else 0, ranks=ranks.world, manifest=manifest, started=started
        )
        if ranks.is_main:
            _report_found(cfg, sources, recovery, result)
        # The workers start decoding now, while the encoders load (seconds for T5's 4.8 B parameters).
        items = iter(_clip_loader(mine, spec, cfg.workers, device))
        encoders = _load_encoders(cfg, info, device)
        result.mark("encoders")
        if ranks.is_main and cfg.validation_prompts:
            save_validation_prompts(cfg.output, manifest, list(cfg.validation_prompts), encoders.encode_text)
        with (
            RankWriter(
                cfg.output,
                ranks.rank,
                ranks.world,
                manifest,
                max_bytes=cfg.shard_max_mb * 2**20,
                max_samples=cfg.shard_max_samples,
                on_written=functools.partial(result.mark, "first_written"),
                mirror=mirror,
            ) as writer,
            _saying_what_was_kept(writer, shown),
        ):
            _encode(
                cfg,
                mine,
                items,
                encoders=encoders,
                device=device,
                writer=writer,
                result=result,
                total=len(clips),
                world=ranks.world,
                show_progress=show_progress,
                # cached clips whose samples lack image latents: each rank adds them to its share
                refresh=cached[ranks.rank :: ranks.world] if image_latents else None,
                clip_paths={clip.source: str(clip.path) for clip in clips},
            )
        result.mark("encoded")

        if ranks.world > 1:
            result.share().save(paths.result_part(cfg.output, ranks.rank))
        if mirror:
            mirror.push_parts()
        ranks.barrier()  # every rank has finished its shards
        if ranks.is_main:
            if mirror:
                mirror.gather_parts()
            if ranks.world > 1:
                for rank in range(1, ranks.world):
                    result.add(RankCounts.load(paths.result_part(cfg.output, rank)))
                (mirror or cachedir).merge_shard_parts(cfg.output, manifest)
            cachedir.merge_skipped(cfg.output)
            cachedir.clear_parts(cfg.output, keep_folder=False)
            manifest.save(cfg.output)
            if mirror:
                mirror.finish(cfg.output, manifest)  # the manifest last: after every shard it names
        ranks.barrier()  # the manifest is final before any rank returns

    result.seconds = time.time() - started
    if ranks.is_main:
        if result.truncated_captions:
            log.warning(
                "%d caption(s) were longer than %d tokens and were cut to fit: %s",
                result.truncated_captions,
                info.max_text_tokens,
                ", ".join(result.truncated_sources[:5]) + (" ..." if result.truncated_captions > 5 else ""),
            )
        if image_latents:
            result.images_missing = manifest.sample_count - manifest.image_latent_count
            if result.images_missing:
                log.warning(
                    "%d sample(s) in %s still have no image latents: their videos are not in %s, or their first "
                    "frames could not be read (reasons in %s).",
                    result.images_missing,
                    cfg.output,
                    cfg.data,
                    paths.skipped(cfg.output),
                )
        if show_progress:
            print_summary(result, shown)
        # Fatal only when the cache ends up empty: a cache that still serves samples (of sources this run
        # did not touch, or earlier encodings of a clip that no longer decodes) stays usable.
        if result.encoded + result.already_cached == 0 and result.manifest.sample_count == 0:
            raise InputError(
                f"Nothing usable in {cfg.data}: all {len(clips)} clips were skipped "
                f"(reasons in {mirror.store.url(paths.SKIPPED) if mirror else paths.skipped(cfg.output)})."
            )
    return result


def _report_found(
    cfg: PreprocessConfig, sources: Sources, recovery: cachedir.Recovery, result: PreprocessResult
) -> None:
    """Say what was found before encoding: unusable entries, odd captions, and shards that were repaired."""
    with open(paths.skipped_part(cfg.output, 0), "a", encoding="utf-8") as skipped_log:
        for row in sources.skipped:
            skipped_log.write(json.dumps(row, ensure_ascii=False) + "\n")
            result.skipped[row["reason"]] += 1
    invalid = [clip.source for clip in sources.clips if INVALID_UTF8 in clip.caption_notes]
    if invalid:
        log.warning(
            "%d caption(s) are not valid UTF-8; their undecodable bytes were replaced by U+FFFD "
            "(marked caption_invalid_utf8 in the samples): %s",
            len(invalid),
            ", ".join(invalid[:5]) + (" ..." if len(invalid) > 5 else ""),
        )
    if recovery.adopted:
        log.warning(
            "Listed %d finished shard(s) an interrupted run left: %s",
            len(recovery.adopted),
            ", ".join(recovery.adopted),
        )
    if recovery.dropped:
        result.dropped_shards = [record.name for record in recovery.dropped]
        held = {entry.source for record in recovery.dropped for entry in record.live_samples()}
        result.lost_sources = sorted(held - {clip.source for clip in sources.clips})
        log.warning(
            "%d listed shard(s) were missing or damaged and left the manifest: %s; their %d source(s) are "
            "encoded again where they still exist.",
            len(recovery.dropped),
            ", ".join(result.dropped_shards),
            len(held),
        )
    if result.lost_sources:
        log.warning(
            "%d sample source(s) of those shards are no longer in %s, so their samples are lost: %s",
            len(result.lost_sources),
            cfg.data,
            ", ".join(result.lost_sources[:20]) + (" ..." if len(result.lost_sources) > 20 else ""),
        )


def _todo(clips: list[Clip], manifest: Manifest, flip: bool, image_latents: bool) -> tuple[list[Job], list[str]]:
    """Clips the cache does not hold yet, and the sources of those it does. Same answer on every rank.

    A clip whose size, mtime and caption match its cached samples is done without reading it; any other
    clip with cached samples is hashed in a worker and skipped there if its content did not change. With
    ``flip``, a clip the cache holds without mirrored variants is read again for them alone. (Cached
    samples without image latents get them after the clips are encoded: ``add_image_latents``.)
    """
    known: dict[str, SampleEntry] = {}
    mirrored: set[str] = set()
    for entry in manifest.live_entries():
        if entry.mirrored:
            mirrored.add(entry.source)
        else:
            known.setdefault(entry.source, entry)
    jobs, cached = [], []
    for clip in clips:
        entry = known.get(clip.source)
        if entry is None:
            jobs.append(Job(clip, mirrors=flip, image_latents=image_latents))
            continue
        caption = caption_hash(clip.caption) if clip.caption else None
        try:
            stat = os.stat(clip.path)
            unchanged = (stat.st_size, stat.st_mtime_ns) == (entry.size, entry.mtime_ns)
        except OSError:
            unchanged = False
        has_mirrors = clip.source in mirrored
        if unchanged and caption is not None and caption == entry.caption_hash and (has_mirrors or not flip):
            cached.append(clip.source)
        else:  # hashed in a worker: unchanged content needs only what is missing (its mirrors, with flip)
            jobs.append(
                Job(clip, entry.content_hash, entry.caption_hash, flip, has_mirrors, image_latents=image_latents)
            )
    return jobs, cached


@dataclass(frozen=True)
class Encoders:
    """The VAE, and ``encode_text(texts) -> (embeds, truncated)`` with T5, on one device."""

    vae: Any
    encode_text: Callable[[list[str]], tuple[torch.Tensor, list[bool]]]


def _load_encoders(cfg: PreprocessConfig, info: models.ModelInfo, device: torch.device) -> Encoders:
    dtype = models.parse_dtype(cfg.dtype)
    vae = info.load_vae(dtype, device).eval()
    if cfg.vae_tiling:
        vae.enable_tiling()
    if cfg.vae_slicing:
        vae.enable_slicing()
    if cfg.compile_vae if cfg.compile_vae is not None else device.type == "cuda":
        # Faster than the plain encode (BENCHMARKS.md, section 9); the first run per shape compiles, later
        # runs load the kernels from the persistent cache.
        compiling.use_persistent_compile_cache()
        compiling.compile_vae_encoder(vae)
    tokenizer, text_encoder = info.load_text_encoder(dtype, device)

    def encode_text(texts: list[str]):
        encoding = encode_prompts(tokenizer, text_encoder, texts, info.max_text_tokens)
        return encoding.embeds, encoding.truncated

    return Encoders(vae, encode_text)


def _clip_loader(jobs: list[Job], spec: FrameSpec, workers: int, device: torch.device):
    # Decoding workers start from a fork server, not from a fork of this process: a decord VideoReader
    # alive here (a notebook, a test session, workers=0 earlier) would be inherited with its decoder
    # threads' locks, and destroying that copy in a worker aborts or hangs it (seen in the test suite).
    return torch.utils.data.DataLoader(
        ClipReader(jobs, spec),
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        multiprocessing_context="forkserver" if workers else None,
    )


def _encode(
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
    batcher = VaeBatcher(encoders.vae, device, cfg.vae_batch, sink.put)
    started = time.time()
    base = result.already_cached  # rank 0 counts the clips found done before the loop
    bar = progress_bar(show_progress, "preprocess", total, "{task.fields[rate]:.2f} clips/s", rate=0.0)
    unchanged: list[str] = []  # sources whose cached samples this rank found to be of the same content
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"  # a few shapes, each seen many times
    try:
        with bar as update:
            update(base)
            for position, item in enumerate(items, 1):
                clip = jobs[item.index].clip
                if isinstance(item, Skipped):
                    result.skipped[item.reason] += 1
                    writer.skip(clip.source, item.reason, item.detail)
                elif isinstance(item, Unchanged):
                    result.already_cached += 1
                    unchanged.append(clip.source)
                else:
                    job = jobs[item.index]
                    if (item.content_hash, caption_hash(clip.caption)) == (job.known_hash, job.known_caption):
                        unchanged.append(clip.source)  # the cache holds this clip: only its mirrors were new
                    prompt = prompts.get(item.index)
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
def _saying_what_was_kept(writer: RankWriter, shown: Path | str) -> Iterator[None]:
    """A Ctrl-C while encoding leaves as ``Interrupted``, counting the samples the cache keeps: those its
    manifest lists, and under torchrun also this rank's shards that its part file lists for the next run."""
    try:
        yield
    except KeyboardInterrupt as err:
        shards = list(writer.manifest.shards)
        if writer.world > 1:
            shards += writer.records
        raise Interrupted(shown, sum(s.live_count for s in shards), len(shards)) from err


# First frames per VAE call when image latents are added to cached samples, per clip of --vae-batch: a
# 1-frame video takes a small part of a clip's activations.
IMAGES_PER_CLIP = 8


def _skip(result: PreprocessResult, writer: RankWriter, source: str, reason: str, detail: str) -> None:
    result.skipped[reason] += 1
    writer.skip(source, reason, detail)


def _device(name: str | None, ranks: Ranks) -> torch.device:
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


def print_summary(result: PreprocessResult, output: Path | str) -> None:
    from rich.console import Console
    from rich.table import Table

    manifest = result.manifest
    table = Table(title="preprocess summary", show_header=False)
    table.add_row("encoded now", f"{result.encoded} clips, {result.samples} samples")
    table.add_row("already in cache", str(result.already_cached))
    if result.images_added:
        table.add_row("image latents added", f"{result.images_added} cached samples (no video encoded again)")
    if manifest.image_latent_count:
        missing = f", {result.images_missing} without" if result.images_missing else ""
        table.add_row("samples with image latents", f"{manifest.image_latent_count}{missing}")
    skipped = sum(result.skipped.values())
    listed = store.join(output, paths.SKIPPED)
    table.add_row("skipped", f"{skipped} (listed in {listed})" if skipped else "0")
    for reason, count in result.skipped.most_common():
        table.add_row(f"  {reason}", str(count))
    if result.truncated_captions:
        length = manifest.producer["encoders"]["max_text_tokens"]
        table.add_row(f"captions cut at {length} tokens", str(result.truncated_captions))
    if result.dropped_shards:
        table.add_row("damaged shards dropped", f"{len(result.dropped_shards)}: {', '.join(result.dropped_shards)}")
    if result.lost_sources:
        table.add_row("sources lost (gone from the data)", str(len(result.lost_sources)))
    table.add_row("samples in cache", str(manifest.sample_count))
    for bucket, count in manifest.bucket_counts().items():
        table.add_row(f"  bucket {bucket}", str(count))
    table.add_row("size on disk", f"{manifest.total_bytes / 2**20:.1f} MiB in {len(manifest.shards)} shards")
    table.add_row("time", _timing(result))
    table.add_row("cache", store.display(output))
    Console(stderr=True).print(table)


def save_validation_prompts(folder: Path, manifest: Manifest, prompts: list[str], encode) -> None:
    """Store the embeddings of validation prompts, and of the empty prompt (for guidance), in the cache.

    Training samples validation latents from these without loading T5. The manifest stops naming the old
    file before it is replaced and names the new one after: a kill in between leaves a cache without
    validation prompts (which training says in one line), never a manifest naming other bytes.
    """
    embeds, _ = encode([*prompts, ""])
    path = paths.validation_prompts(folder)
    tensors = {
        "prompt_embeds": embeds[:-1].contiguous().cpu(),
        "negative_prompt_embeds": embeds[-1:].contiguous().cpu(),
    }
    if manifest.extras.pop(paths.VALIDATION_ENTRY, None) is not None:
        manifest.save(folder)
    files.save_safetensors(path, tensors, metadata={"prompts": json.dumps(prompts)})
    manifest.extras[paths.VALIDATION_ENTRY] = {
        "file": paths.VALIDATION_PROMPTS,
        "prompts": prompts,
        "sha256": file_sha256(path),
    }
    manifest.save(folder)


def _timing(result: PreprocessResult) -> str:
    """E.g. "95.2 s on 2 ranks: 21.0 s loading the encoders, then 70.1 clips/min"."""
    text = f"{result.seconds:.1f} s" + (f" on {result.ranks} ranks" if result.ranks > 1 else "")
    loaded, encoded = result.timeline.get("encoders"), result.timeline.get("encoded")
    if loaded is None or encoded is None:
        return text
    text += f": {loaded:.1f} s loading the encoders"
    if result.encoded and encoded > loaded:
        text += f", then {60 * result.encoded / (encoded - loaded):.1f} clips/min"
    return text
