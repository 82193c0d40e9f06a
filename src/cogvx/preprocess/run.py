"""``cogvx preprocess``: videos and captions in, a cache of latent moments and prompt embeddings out.

The stage's order: read the inputs, open the cache target (``target.py``), plan the jobs (``plan.py``),
encode this rank's share (``loop.py``), close and publish the cache, report (``report.py``). See
docs/preprocess.md for what happens to each clip, and docs/cache-format.md for what is written.
"""

from __future__ import annotations

import errno
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cogvx import __version__, hub
from cogvx.errors import CacheError, InputError
from cogvx.pipeline import models
from cogvx.preprocess import cachedir
from cogvx.preprocess.cachedir import Recovery, save_validation_prompts
from cogvx.preprocess.config import VAE_FRAME_STEP, PreprocessConfig  # noqa: F401 (re-exported)
from cogvx.preprocess.loop import (
    Interrupted,
    clip_loader,
    encode,
    load_encoders,
    pick_device,
    prefetch_weights,
    saying_what_was_kept,
    start_decoder_server,
)
from cogvx.preprocess.plan import find_clips, todo
from cogvx.preprocess.ranks import Ranks
from cogvx.preprocess.report import PreprocessResult, RankCounts, print_summary, report_end, report_found
from cogvx.preprocess.sources import Clip, Sources
from cogvx.preprocess.target import CacheTarget, open_target
from cogvx.preprocess.video import FrameSpec
from cogvx.preprocess.writer import RankWriter
from cogvx.shards import Manifest, paths, store

# The stage's public names, where cogvx.cli and scripts import them from.
__all__ = ["Interrupted", "PreprocessConfig", "PreprocessResult", "run", "save_validation_prompts"]

SCHEMA = {
    "moments": "VAE posterior [2C, F, H, W]: mean then log-variance on axis 0, unscaled",
    "prompt_embeds": "T5 last hidden state [L, D], pads included (L: the transformer's max_text_seq_length)",
    "json": "source, content_hash, caption, window, frame_indices, fps, size, bucket, ...",
    "jpg": "JPEG strip of up to 8 of the sampled frames, side by side, 64 px high",
    "image_moments": "with --image-latents: VAE posterior [2C, 1, H, W] of the noised first frame, unscaled",
    "first.jpg": "with --image-latents: the first frame (before the noise) at the sample's size",
}


def run(cfg: PreprocessConfig, show_progress: bool = False) -> PreprocessResult:
    """Encode every usable clip under ``cfg.data`` that the cache in ``cfg.output`` does not hold yet.

    Under torchrun / accelerate launch each rank encodes its share; rank 0 returns the totals.
    Raises InputError when nothing usable exists (every clip skipped and the cache empty).
    """
    ranks = Ranks.from_env()
    try:
        with open_target(cfg.output, ranks) as target:
            return _run(cfg, target, ranks, show_progress and ranks.is_main)
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


@dataclass(frozen=True)
class _Inputs:
    """What a run reads before it touches the cache: the clips, the model, and what a sample holds."""

    data: Path  # cfg.data, downloaded first if it is on the hub
    sources: Sources
    clips: list[Clip]
    info: models.ModelInfo
    spec: FrameSpec
    producer: dict
    params: dict


def _read_inputs(cfg: PreprocessConfig, result: PreprocessResult) -> _Inputs:
    data = hub.resolve_dataset(cfg.data)  # a hub dataset is downloaded to huggingface_hub's cache first
    sources, clips = find_clips(cfg, data)
    result.mark("clips_found")
    info = models.ModelInfo.read(cfg.model, cfg.model_revision, cfg.model_variant)
    spec = cfg.frame_spec(info.native_size, info.native_frames, info.frame_step)
    producer = {"tool": "cogvx", "version": __version__, **info.recorded(), "encoders": info.encoder_identity()}
    return _Inputs(data, sources, clips, info, spec, producer, cfg.cache_params(spec))


def _run(cfg: PreprocessConfig, target: CacheTarget, ranks: Ranks, show_progress: bool) -> PreprocessResult:
    began = time.time()
    result = PreprocessResult(ranks=ranks.world)
    result.mark("imports")
    start_decoder_server(cfg.workers)  # its imports run while the configs are read and the encoders load
    inputs = _read_inputs(cfg, result)
    result.mark("configs")
    # every rank refuses alike
    existing = cachedir.check_existing(target.folder, inputs.producer, inputs.params, inputs.info, target.shown)
    prefetch_weights(inputs.info)  # a model folder fresh from disk is read while the run starts
    device = pick_device(cfg.device, ranks)
    with target.writing(ranks):
        manifest, recovery = _open_cache(cfg, inputs, target, ranks, existing)
        # A cache that holds image latents keeps getting them, so it serves image-to-video whole.
        image_latents = cfg.image_latents or manifest.image_latent_count > 0
        jobs, cached = todo(inputs.clips, manifest, cfg.flip, image_latents)
        mine = jobs[ranks.rank :: ranks.world]
        result.manifest = manifest
        result.already_cached = len(cached) if ranks.is_main else 0
        if ranks.is_main:
            report_found(target.folder, cfg.data, inputs.sources, recovery, result)
        # The workers start decoding now, while the encoders load (seconds for T5's 4.8 B parameters).
        items = iter(clip_loader(mine, inputs.spec, cfg.workers, device))
        result.mark("loader")
        encoders = load_encoders(cfg, inputs.info, device, result, inputs.spec, len(mine))
        result.mark("encoders")
        if ranks.is_main and cfg.validation_prompts:
            target.save_validation_prompts(manifest, list(cfg.validation_prompts), encoders.encode_text)
        with (
            RankWriter(
                target,
                ranks.rank,
                ranks.world,
                manifest,
                max_bytes=cfg.shard_max_mb * 2**20,
                max_samples=cfg.shard_max_samples,
                on_written=functools.partial(result.mark, "first_written"),
            ) as writer,
            saying_what_was_kept(writer, target.shown),
        ):
            encode(
                cfg,
                mine,
                items,
                encoders=encoders,
                device=device,
                writer=writer,
                result=result,
                total=len(inputs.clips),
                world=ranks.world,
                show_progress=show_progress,
                # cached clips whose samples lack image latents: each rank adds them to its share
                refresh=cached[ranks.rank :: ranks.world] if image_latents else None,
                clip_paths={clip.source: str(clip.path) for clip in inputs.clips},
            )
        result.mark("encoded")
        if encoders.compiled_stamp is not None and result.encoded:  # the next run finds this shape compiled
            encoders.compiled_stamp.parent.mkdir(parents=True, exist_ok=True)
            encoders.compiled_stamp.touch()
        _close_cache(target, ranks, result, manifest)
    result.seconds = time.time() - began
    if ranks.is_main:
        _conclude(cfg, inputs, target, result, image_latents, show_progress)
    return result


def _open_cache(
    cfg: PreprocessConfig, inputs: _Inputs, target: CacheTarget, ranks: Ranks, existing: Manifest | None
) -> tuple[Manifest, Recovery]:
    """The manifest this run starts from: rank 0 tidies what a killed run left, then every rank reads it."""
    recovery = Recovery()
    if ranks.is_main:
        manifest = existing or Manifest(producer=inputs.producer, params=inputs.params, schema=SCHEMA)
        # where the last run read its videos: the hub URL, or the local folder
        manifest.producer["data"] = str(cfg.data) if isinstance(cfg.data, str) else str(inputs.data.resolve())
        recovery = target.recover(manifest, check_hashes=cfg.repair)
    ranks.barrier()  # the folder is tidy and the manifest final for this run's start
    if not ranks.is_main:
        manifest = target.load_manifest()
    return manifest, recovery


def _close_cache(target: CacheTarget, ranks: Ranks, result: PreprocessResult, manifest: Manifest) -> None:
    """Every rank's shards, skipped inputs and counts into the cache's one manifest, published by rank 0."""
    if ranks.world > 1:
        result.share().save(paths.result_part(target.folder, ranks.rank))
    target.share_parts()
    ranks.barrier()  # every rank has finished its shards
    if ranks.is_main:
        target.gather_parts()
        if ranks.world > 1:
            for rank in range(1, ranks.world):
                result.add(RankCounts.load(paths.result_part(target.folder, rank)))
            target.merge_shard_parts(manifest)
        target.publish(manifest)  # the manifest last: after every shard it names
    ranks.barrier()  # the manifest is final before any rank returns


def _conclude(
    cfg: PreprocessConfig,
    inputs: _Inputs,
    target: CacheTarget,
    result: PreprocessResult,
    image_latents: bool,
    show_progress: bool,
) -> None:
    """Rank 0's last word: warnings, the summary, and a refusal if the cache ends up empty."""
    skipped = target.skipped_listing()
    report_end(result, inputs.info.max_text_tokens, image_latents, cfg.data, target.shown, skipped)
    if show_progress:
        print_summary(result, target.shown)
    # Fatal only when the cache ends up empty: a cache that still serves samples (of sources this run
    # did not touch, or earlier encodings of a clip that no longer decodes) stays usable.
    if result.encoded + result.already_cached == 0 and result.manifest.sample_count == 0:
        raise InputError(
            f"Nothing usable in {cfg.data}: all {len(inputs.clips)} clips were skipped (reasons in {skipped})."
        )
