"""Every knob of ``cogvx preprocess``: the TOML keys and the CLI flags are these fields, declared once.

Imports no tensor library (the CLI's help reads it); what needs one is imported where it is used.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from cogvx import hub
from cogvx.config import check_domains, integers, positive, setting, stage
from cogvx.errors import ConfigError
from cogvx.locations import as_location
from cogvx.names import DEFAULT_MODEL, DTYPE_NAMES, NATIVE_FPS, SHARD_MAX_BYTES, SHARD_MAX_SAMPLES

if TYPE_CHECKING:
    from cogvx.preprocess.video import FrameSpec

# Every CogVideoX VAE compresses time 4:1 after the first frame: 4k+1 frames.
VAE_FRAME_STEP = 4
SIDE = integers(16, 8192)  # a frame side in pixels; a --resolution bucket's sides take the same values


@stage
class PreprocessConfig:
    data: Path | str = setting(
        help="Folder of videos with .txt captions, a root with prompts.txt/videos.txt, a .csv/.jsonl file, or "
        "hf://datasets/OWNER/NAME[@REVISION][/FOLDER] (downloaded to the Hugging Face cache).",
    )
    output: Path | str = setting(Path("shards"), "Cache folder, or a URL such as s3://bucket/prefix.")
    model: str = setting(DEFAULT_MODEL, "Hub id, local diffusers folder, or tiny.")
    model_revision: str | None = setting(None, "Branch, tag or commit of a hub model.", rule="the newest")
    model_variant: str | None = setting(None, "Weights variant, e.g. fp16 (files NAME.fp16.safetensors).", rule="none")
    height: int | None = setting(
        None, "Frame height in pixels.", rule="the model's native size, 480 for 2b/5b, 768 for 1.5", domain=SIDE
    )
    width: int | None = setting(
        None, "Frame width in pixels.", rule="the model's native size, 720 for 2b/5b, 1360 for 1.5", domain=SIDE
    )
    resolutions: tuple[str, ...] = setting(
        (), "A HEIGHTxWIDTH bucket, repeatable; each clip goes to the closest aspect ratio.", name="resolution"
    )
    max_frames: int | None = setting(
        None,
        "Frames per sample, 4k+1 (8k+1 for 1.5).",
        rule="the model's own, 49 for 2b/5b, 81 for 1.5",
        domain=integers(1, 1025),
    )
    frame_buckets: tuple[int, ...] = setting(
        (),
        "A frame count (4k+1) bucket, repeatable, instead of --max-frames; clips take the longest that fits.",
        name="frame_bucket",
        domain=integers(1, 1025),
    )
    min_frames: int = setting(5, "Skip clips shorter than this after sampling.", domain=integers(1, 1025))
    fps: float = setting(
        float(NATIVE_FPS), "Sample frames at this rate, from each clip's real rate.", domain=positive(1000)
    )
    skip_frames_start: int = setting(0, "Source frames to drop at the start.", domain=integers(0, 10**7))
    skip_frames_end: int = setting(0, "Source frames to drop at the end.", domain=integers(0, 10**7))
    resize: str = setting("crop", "crop (cover, centre crop) or stretch.")
    windows: int = setting(1, "Up to this many evenly spaced windows from a long clip.", domain=integers(1, 10**4))
    max_upscale: float = setting(4.0, "Skip clips that need more enlarging than this.", domain=positive(1000))
    id_token: str | None = setting(None, "Prepended to every caption with a space.")
    caption_column: str | None = setting(
        None, "Caption file (seed layout) or column (.csv/.jsonl).", rule="prompts.txt / caption"
    )  # metadata file default: caption, text or prompt
    video_column: str | None = setting(
        None, "Video list file (seed layout) or column (.csv/.jsonl).", rule="videos.txt / video"
    )  # metadata file default: video, file_name, path, ...
    dtype: str = setting("bf16", "bf16, fp16 or fp32 for the VAE and T5.")
    device: str | None = setting(None, "cuda, cuda:1, cpu.", rule="cuda if available, one GPU per rank")
    text_batch_size: int = setting(16, domain=integers(1, 4096), file_only=True)
    vae_batch: int = setting(1, "Clips of one shape per VAE call.", domain=integers(1, 4096))
    vae_tiling: bool = setting(False, "Encode in tiles (less memory).", decls=("--vae-tiling/--no-vae-tiling",))
    vae_slicing: bool = setting(False, "Encode a batch one clip at a time.", decls=("--vae-slicing/--no-vae-slicing",))
    compile_vae: bool | None = setting(
        None,
        "torch.compile the VAE encoder; compiled kernels are kept in ~/.cache/cogvx/torch-compile for later runs.",
        rule="on a GPU when the clips to encode repay the compile, off on a CPU",
        decls=("--compile/--no-compile",),
    )
    workers: int = setting(2, "Video decoding processes per rank.", domain=integers(0, 256))
    shard_max_mb: int = setting(
        SHARD_MAX_BYTES >> 20, "Shard size limit in MiB.", domain=integers(1, 1 << 20, why="1 TiB")
    )
    shard_max_samples: int = setting(SHARD_MAX_SAMPLES, domain=integers(1, 10**7), file_only=True)
    validation_prompts: tuple[str, ...] = setting(
        (), "Store this prompt's embedding for validation during training (repeatable).", name="validation_prompt"
    )
    repair: bool = setting(
        False, "Also check every listed shard's sha256 and re-encode damaged ones' samples.", decls=("--repair",)
    )  # size is always checked
    allow_outside_paths: bool = setting(
        False, "Let a metadata or videos.txt file name videos outside its folder.", decls=("--allow-outside-paths",)
    )
    flip: bool = setting(
        False, "Also encode every sample mirrored left to right (for train --random-flip).", decls=("--flip",)
    )  # beside it; added to a cache later too
    image_latents: bool = setting(
        False, "Also encode each sample's first frame, for image-to-video training.", decls=("--image-latents",)
    )  # added to a cache later too

    def __post_init__(self):
        check_domains(self)
        self.data = hub.hub_url(self.data) or Path(self.data)  # a Path would fold hf:// into hf:/
        self.output = as_location(self.output)
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"Unknown dtype {self.dtype!r}: use one of {', '.join(DTYPE_NAMES)}.")
        self.resolutions = tuple(_parse_resolution(r) for r in self.resolutions)
        self.frame_buckets = tuple(sorted({int(f) for f in self.frame_buckets}))
        self.validation_prompts = tuple(self.validation_prompts)
        if self.resolutions and (self.height or self.width):
            raise ConfigError("Give either --height/--width or --resolution (repeatable), not both.")
        if (self.height or 16) % 16 or (self.width or 16) % 16:
            raise ConfigError(f"--height/--width must be multiples of 16 (got {self.height}x{self.width}).")
        for frames in (*self.frame_counts(None), *self.frame_buckets):
            if frames < 1 or (frames - 1) % VAE_FRAME_STEP:
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
        from cogvx.preprocess.video import FrameSpec, largest_4k1

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


def _parse_resolution(value) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = f"{value[0]}x{value[1]}"
    try:
        height, width = (int(part) for part in str(value).lower().split("x"))
    except ValueError:
        raise ConfigError(f"--resolution {value!r} must look like HEIGHTxWIDTH, e.g. 480x720.") from None
    if not (SIDE.holds(height) and SIDE.holds(width)) or height % 16 or width % 16:
        raise ConfigError(f"--resolution {value!r}: height and width must be multiples of 16, {SIDE.describe()}.")
    return f"{height}x{width}"
