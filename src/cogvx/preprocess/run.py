"""``cogvx preprocess``: videos and captions in, a cache of latent moments and prompt embeddings out.

The stage's order: read the inputs, open the cache target (``target.py``), plan the jobs (``plan.py``),
encode this rank's share (``loop.py``), close and publish the cache, report (``report.py``). See
docs/preprocess.md for what happens to each clip, and docs/cache-format.md for what is written.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from cogvx import __version__, hub
from cogvx.config import Domain, check_domains, integers, positive
from cogvx.errors import CacheError, ConfigError, InputError
from cogvx.pipeline import models
from cogvx.preprocess import cachedir
from cogvx.preprocess.cachedir import Recovery, save_validation_prompts
from cogvx.preprocess.loop import Interrupted, clip_loader, encode, load_encoders, pick_device, saying_what_was_kept
from cogvx.preprocess.plan import find_clips, todo
from cogvx.preprocess.ranks import Ranks
from cogvx.preprocess.report import PreprocessResult, RankCounts, print_summary, report_end, report_found
from cogvx.preprocess.sources import Clip, Sources
from cogvx.preprocess.target import CacheTarget, open_target
from cogvx.preprocess.video import FrameSpec, largest_4k1
from cogvx.preprocess.writer import RankWriter
from cogvx.shards import Manifest, paths, store
from cogvx.shards.writer import SHARD_MAX_BYTES, SHARD_MAX_SAMPLES

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


@dataclass
class PreprocessConfig:
    data: Path | str  # a folder or metadata file, or hf://datasets/OWNER/NAME[@REVISION][/FOLDER]
    output: Path | str = Path("shards")  # a folder, or a URL such as s3://bucket/prefix (preprocess/remote.py)
    model: str = models.DEFAULT_MODEL
    model_revision: str | None = None  # a hub model's branch, tag or commit
    model_variant: str | None = None  # weights files NAME.VARIANT.safetensors, e.g. fp16
    height: int | None = None  # default: the model's native size, from its transformer config
    width: int | None = None
    resolutions: tuple[str, ...] = ()  # several "HxW" buckets instead of --height/--width
    max_frames: int | None = None  # default: the model's native frame count, its transformer's sample_frames
    frame_buckets: tuple[int, ...] = ()  # several frame counts instead of --max-frames
    min_frames: int = 5
    fps: float = float(models.NATIVE_FPS)
    skip_frames_start: int = 0
    skip_frames_end: int = 0
    resize: str = "crop"
    windows: int = 1
    max_upscale: float = 4.0
    id_token: str | None = None
    caption_column: str | None = None  # seed layout: prompts.txt; metadata file: caption, text or prompt
    video_column: str | None = None  # seed layout: videos.txt; metadata file: video, file_name, path, ...
    dtype: str = "bf16"
    device: str | None = None
    text_batch_size: int = 16
    vae_batch: int = 1
    vae_tiling: bool = False
    vae_slicing: bool = False
    compile_vae: bool | None = None  # torch.compile the VAE encoder (None: on with a GPU); kept across runs
    workers: int = 2
    shard_max_mb: int = SHARD_MAX_BYTES >> 20
    shard_max_samples: int = SHARD_MAX_SAMPLES
    validation_prompts: tuple[str, ...] = ()
    repair: bool = False  # also check every listed shard's sha256 (size is always checked)
    allow_outside_paths: bool = False  # let a metadata or video-list file name videos outside its folder
    flip: bool = False  # also encode each sample's mirror image (left to right), beside it; added to a cache later too
    image_latents: bool = False  # also encode each sample's first frame alone (image-to-video); added later too

    # What each numeric setting may be (cogvx.config.Domain): checked where it is read, file or flag.
    DOMAINS: ClassVar[dict[str, Domain]] = {
        "height": integers(16, 8192),
        "width": integers(16, 8192),
        "max_frames": integers(1, 1025),
        "frame_buckets": integers(1, 1025, flag="--frame-bucket"),
        "min_frames": integers(1, 1025),
        "fps": positive(1000),
        "skip_frames_start": integers(0, 10**7),
        "skip_frames_end": integers(0, 10**7),
        "windows": integers(1, 10**4),
        "max_upscale": positive(1000),
        "text_batch_size": integers(1, 4096, file_only=True),
        "vae_batch": integers(1, 4096),
        "workers": integers(0, 256),
        "shard_max_mb": integers(1, 1 << 20, why="1 TiB"),
        "shard_max_samples": integers(1, 10**7, file_only=True),
    }

    def __post_init__(self):
        check_domains(self)
        self.data = hub.hub_url(self.data) or Path(self.data)  # a Path would fold hf:// into hf:/
        self.output = self.output if store.is_remote(self.output) else Path(self.output)
        models.parse_dtype(self.dtype)
        self.resolutions = tuple(_parse_resolution(r) for r in self.resolutions)
        self.frame_buckets = tuple(sorted({int(f) for f in self.frame_buckets}))
        self.validation_prompts = tuple(self.validation_prompts)
        if self.resolutions and (self.height or self.width):
            raise ConfigError("Give either --height/--width or --resolution (repeatable), not both.")
        if (self.height or 16) % 16 or (self.width or 16) % 16:
            raise ConfigError(f"--height/--width must be multiples of 16 (got {self.height}x{self.width}).")
        for frames in (*self.frame_counts(None), *self.frame_buckets):
            if frames < 1 or largest_4k1(frames) != frames:
                raise ConfigError(f"Frame counts must be of the form 4k+1 (got {frames}; try 49 or 81).")
        self._check_min_frames(self.frame_counts(None))
        if self.resize not in ("crop", "stretch"):
            raise ConfigError(f"--resize must be 'crop' or 'stretch' (got {self.resize!r}).")

    def frame_counts(self, native_frames: int | None) -> tuple[int, ...]:
        """The frame buckets: --frame-bucket values if given, else --max-frames, else the model's own count
        (``native_frames``; None: not known yet, and then nothing)."""
        if self.frame_buckets:
            return self.frame_buckets
        frames = self.max_frames or native_frames
        return (frames,) if frames else ()

    def _check_min_frames(self, counts: tuple[int, ...]) -> None:
        if counts and not 1 <= self.min_frames <= max(counts):
            raise ConfigError(
                f"--min-frames must be between 1 and the largest frame count {max(counts)} (got {self.min_frames})."
            )

    def frame_spec(self, native_size: tuple[int, int], native_frames: int, frame_step: int) -> FrameSpec:
        """The frame settings for a model trained at ``native_frames`` x ``native_size``, whose usable frame
        counts are ``1 + k * frame_step`` (``ModelInfo``'s fields of those names)."""
        if self.resolutions:
            resolutions = tuple((int(h), int(w)) for h, w in (r.split("x") for r in self.resolutions))
        else:
            resolutions = ((self.height or native_size[0], self.width or native_size[1]),)
        counts = self.frame_counts(native_frames)
        self._check_min_frames(counts)
        unusable = [frames for frames in counts if largest_4k1(frames, frame_step) != frames]
        if unusable:
            flag = "--frame-bucket" if self.frame_buckets else "--max-frames"
            lower = largest_4k1(unusable[0], frame_step)
            raise ConfigError(
                f"{flag} {unusable[0]}: {self.model} uses frame counts of the form {frame_step}k+1 (CogVideoX 1.5 "
                f"packs two latent frames per token); use {flag} {lower} or {lower + frame_step} instead."
            )
        return FrameSpec(
            resolutions=resolutions,
            frame_buckets=counts,
            min_frames=self.min_frames,
            fps=float(self.fps),
            skip_frames_start=self.skip_frames_start,
            skip_frames_end=self.skip_frames_end,
            resize=self.resize,
            windows=self.windows,
            max_upscale=float(self.max_upscale),
            frame_step=frame_step,
        )

    def cache_params(self, spec: FrameSpec) -> dict:
        """Everything that changes what a sample holds: a cache is made with exactly one set."""
        params = {**asdict(spec), "id_token": self.id_token, "dtype": self.dtype}
        if spec.frame_step == VAE_FRAME_STEP:  # recorded only where it is not the VAE's own (1.5's 8), so
            del params["frame_step"]  # caches made before it was a setting keep their parameters
        return json.loads(json.dumps(params))  # tuples as lists, exactly as the manifest stores them


# Every CogVideoX VAE compresses time 4:1 after the first frame: 4k+1 frames.
VAE_FRAME_STEP = 4


def _parse_resolution(value) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = f"{value[0]}x{value[1]}"
    try:
        height, width = (int(part) for part in str(value).lower().split("x"))
    except ValueError:
        raise ConfigError(f"--resolution {value!r} must look like HEIGHTxWIDTH, e.g. 480x720.") from None
    bounds = PreprocessConfig.DOMAINS["height"]  # a bucket's sides take the values --height/--width take
    if not (bounds.holds(height) and bounds.holds(width)) or height % 16 or width % 16:
        raise ConfigError(f"--resolution {value!r}: height and width must be multiples of 16, {bounds.describe()}.")
    return f"{height}x{width}"


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


def _read_inputs(cfg: PreprocessConfig) -> _Inputs:
    data = hub.resolve_dataset(cfg.data)  # a hub dataset is downloaded to huggingface_hub's cache first
    sources, clips = find_clips(cfg, data)
    info = models.ModelInfo.read(cfg.model, cfg.model_revision, cfg.model_variant)
    spec = cfg.frame_spec(info.native_size, info.native_frames, info.frame_step)
    producer = {"tool": "cogvx", "version": __version__, **info.recorded(), "encoders": info.encoder_identity()}
    return _Inputs(data, sources, clips, info, spec, producer, cfg.cache_params(spec))


def _run(cfg: PreprocessConfig, target: CacheTarget, ranks: Ranks, show_progress: bool) -> PreprocessResult:
    started = time.time()
    inputs = _read_inputs(cfg)
    # every rank refuses alike
    existing = cachedir.check_existing(target.folder, inputs.producer, inputs.params, inputs.info, target.shown)
    device = pick_device(cfg.device, ranks)
    with target.writing(ranks):
        manifest, recovery = _open_cache(cfg, inputs, target, ranks, existing)
        # A cache that holds image latents keeps getting them, so it serves image-to-video whole.
        image_latents = cfg.image_latents or manifest.image_latent_count > 0
        jobs, cached = todo(inputs.clips, manifest, cfg.flip, image_latents)
        mine = jobs[ranks.rank :: ranks.world]
        result = PreprocessResult(
            already_cached=len(cached) if ranks.is_main else 0, ranks=ranks.world, manifest=manifest, started=started
        )
        if ranks.is_main:
            report_found(target.folder, cfg.data, inputs.sources, recovery, result)
        # The workers start decoding now, while the encoders load (seconds for T5's 4.8 B parameters).
        items = iter(clip_loader(mine, inputs.spec, cfg.workers, device))
        encoders = load_encoders(cfg, inputs.info, device)
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
        _close_cache(target, ranks, result, manifest)
    result.seconds = time.time() - started
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
