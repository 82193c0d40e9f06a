"""Seeing what a LoRA does: sampling with the CogVideoX pipeline, decoding saved latents, writing videos.

``sample`` runs the full diffusers ``CogVideoXPipeline`` with the LoRA loaded through
``load_lora_weights`` (its saved rank and alpha give the scale; ``--lora-scale`` multiplies it).
``render`` decodes the validation latents that training saved, with the VAE alone: T5 and the
transformer never leave the disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from cogvx.pipeline import models
from cogvx.pipeline.lora import WEIGHTS_NAME

LORA_ADAPTER = "cogvx"
DEFAULT_FPS = 8
VALIDATION_DIR = "validation"
SHEET_NAME = "sheet.png"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SAMPLE_FILE = re.compile(r"^sample-(\d+)\.safetensors$")
_PIPELINE_LOGGER = "diffusers.pipelines.cogvideo.pipeline_cogvideox"
NO_VALIDATION_HINT = (
    "Training saves them when the cache holds validation prompts and validation is switched on: "
    '`cogvx preprocess --data VIDEOS --output shards --validation-prompt "..."`, then '
    "`cogvx train --shards shards --output RUN --validation-every N`."
)

console = Console(stderr=True)


# --------------------------------------------------------------------------- writing videos and sheets


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (the pipeline's ``np`` output) to uint8, rounded."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_mp4(path: Path, frames: np.ndarray, fps: int = DEFAULT_FPS) -> Path:
    """uint8 frames ``[F, H, W, 3]`` to an H.264 mp4 (yuv420p, plays in browsers); atomic rename at the end."""
    import imageio.v2 as imageio

    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 wants uint8 frames [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 needs an even frame size; {path} would be {frames.shape[2]}x{frames.shape[1]}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    writer = imageio.get_writer(
        partial,
        format="FFMPEG",
        fps=fps,
        codec="libx264",
        quality=8,
        pixelformat="yuv420p",
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    try:
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # no half-written file left beside the outputs
        raise
    return path


def contact_sheet(rows: list[tuple[str, np.ndarray]], columns: int = 8):
    """A PIL image: one row per video (a text label above ``columns`` evenly spaced frames)."""
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise ValueError("contact_sheet needs at least one video")
    font = ImageFont.load_default()
    label_h, pad = 14, 2
    height, width = rows[0][1].shape[1:3]
    shown = min(columns, max(len(f) for _, f in rows))
    sheet = Image.new("RGB", (pad + shown * (width + pad), len(rows) * (label_h + height + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    max_chars = max(8, sheet.width // 6)
    for r, (label, frames) in enumerate(rows):
        top = pad + r * (label_h + height + pad)
        text = label if len(label) <= max_chars else label[: max_chars - 3] + "..."
        # The bitmap fallback font only knows latin-1.
        draw.text((pad, top), text.encode("latin-1", "replace").decode("latin-1"), fill="black", font=font)
        for c, index in enumerate(np.linspace(0, len(frames) - 1, min(shown, len(frames))).round().astype(int)):
            sheet.paste(Image.fromarray(frames[index]), (pad + c * (width + pad), top + label_h))
    return sheet


def write_sheet(path: Path, rows: list[tuple[str, np.ndarray]], columns: int = 8) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    contact_sheet(rows, columns).save(partial, format="PNG")
    os.replace(partial, path)
    return path


def _device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dev, models.parse_dtype(dtype or ("bf16" if dev.type == "cuda" else "fp32"))


def _check_size(frames: np.ndarray, height: int, width: int, tiling: bool) -> None:
    """Refuse to write a video of another size than asked (diffusers' VAE tiling miscounts with tiny tiles)."""
    if tuple(frames.shape[1:3]) != (height, width):
        hint = " VAE tiling assumes tiles of real CogVideoX size; drop --vae-tiling for this model." if tiling else ""
        raise ValueError(
            f"Decoding gave frames of {frames.shape[2]}x{frames.shape[1]} instead of {width}x{height}.{hint}"
        )


def _check_common(fps: int, sheet_columns: int, dtype: str | None) -> None:
    if fps < 1:
        raise ValueError(f"--fps must be at least 1 (got {fps})")
    if sheet_columns < 1:
        raise ValueError(f"--sheet-columns must be at least 1 (got {sheet_columns})")
    if dtype is not None:
        models.parse_dtype(dtype)


# --------------------------------------------------------------------------- cogvx sample


@dataclass
class SampleConfig:
    prompts: tuple[str, ...] = ()
    lora: Path | None = None  # a run folder (or its pytorch_lora_weights.safetensors)
    output: Path | None = None  # default: samples/lora.mp4, or samples/base.mp4 with --no-lora
    model: str | None = None  # default: the model recorded in the LoRA's run folder
    no_lora: bool = False
    lora_scale: float = 1.0
    steps: int = 50
    guidance: float = 6.0
    dynamic_cfg: bool = False
    negative_prompt: str = ""
    seed: int = 0
    frames: int = 49
    height: int | None = None  # default: the model's native size
    width: int | None = None
    fps: int = DEFAULT_FPS
    dtype: str | None = None  # default: bf16 on a GPU, fp32 on a CPU
    device: str | None = None
    cpu_offload: bool = False
    vae_tiling: bool = False
    vae_slicing: bool = False
    sheet_columns: int = 8

    def __post_init__(self):
        if isinstance(self.prompts, str):
            self.prompts = (self.prompts,)
        self.prompts = tuple(self.prompts or ())
        self.lora = Path(self.lora) if self.lora is not None else None
        if self.output is None:
            self.output = Path("samples") / ("base.mp4" if self.no_lora else "lora.mp4")
        self.output = Path(self.output)
        checks = [
            (bool(self.prompts), 'give at least one --prompt "..." (or prompts = ["..."] in a --config file)'),
            (all(p.strip() for p in self.prompts), "a --prompt is empty"),
            (self.lora is not None or (self.no_lora and self.model), "pass --lora RUN_FOLDER (or --no-lora --model M)"),
            (not (self.no_lora and self.lora_scale != 1.0), "--lora-scale has no effect with --no-lora; drop one"),
            (math.isfinite(self.lora_scale), f"--lora-scale must be a finite number (got {self.lora_scale})"),
            (self.output.suffix.lower() == ".mp4", f"--output must name an .mp4 file (got {self.output})"),
            (self.steps >= 1, f"--steps must be at least 1 (got {self.steps})"),
            (self.guidance >= 0, f"--guidance must be 0 or more (got {self.guidance})"),
            (self.frames >= 1 and (self.frames - 1) % 4 == 0, f"--frames must be 4k+1: 9, 13, 49 (got {self.frames})"),
            (self.height is None or self.height > 0, f"--height must be positive (got {self.height})"),
            (self.width is None or self.width > 0, f"--width must be positive (got {self.width})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        _check_common(self.fps, self.sheet_columns, self.dtype)

    def video_paths(self) -> list[Path]:
        """One mp4 per prompt: ``--output`` itself for one prompt, ``NAME-KK.mp4`` for several."""
        if len(self.prompts) == 1:
            return [self.output]
        return [self.output.with_name(f"{self.output.stem}-{k:02d}.mp4") for k in range(len(self.prompts))]

    @property
    def sheet_path(self) -> Path:
        return self.output.with_suffix(".png")


class VideoWriteError(ValueError):
    """Generation finished but an mp4 could not be written; the frames were saved another way."""


@dataclass
class SampleResult:
    model: str
    videos: list[Path]
    sheet: Path
    frames: list[np.ndarray]  # uint8 [F, H, W, 3] per prompt, exactly what went into the mp4 encoder
    truncated: list[bool] = field(default_factory=list)


def lora_file(lora: Path) -> Path:
    """The weights file of a run folder, or the file itself."""
    path = Path(lora)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(
            f"No LoRA weights at {path}. Point --lora at a run folder written by `cogvx train` "
            f"(it holds {WEIGHTS_NAME}) or at the .safetensors file itself."
        )
    return path


def lora_base_model(lora: Path) -> str | None:
    """The model a LoRA was trained on, from the run's config.json, if there is one."""
    return read_run_config(Path(lora) if Path(lora).is_dir() else Path(lora).parent).get("model")


def check_lora_fits(transformer: torch.nn.Module, weights: Path, trained_on: str | None, model: str) -> None:
    """Refuse a LoRA whose matrices do not fit this transformer, naming both models.

    Reads only the safetensors header, so a mismatch is reported before any weight is touched.
    """
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    modules = dict(transformer.named_modules())
    problems = []
    for key, shape in shapes.items():
        name = key.removeprefix("transformer.")
        for part, axis, attr in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
            if part in name:
                module_name = name.split(part)[0]
                module = modules.get(module_name)
                if module is None:
                    problems.append(f"{module_name} does not exist")
                elif getattr(module, attr, None) is not None and getattr(module, attr) != shape[axis]:
                    problems.append(f"{module_name}.{attr} is {getattr(module, attr)}, the LoRA has {shape[axis]}")
    if problems:
        origin = repr(trained_on) if trained_on else "another model (no config.json beside it says which)"
        raise ValueError(
            f"The LoRA {weights} was trained for {origin} and does not fit the base model {model!r}: "
            f"{len(problems)} mismatch(es), e.g. {'; '.join(sorted(set(problems))[:3])}. Sample with the model "
            f"it was trained on" + (f" (--model {trained_on}, or leave --model out)." if trained_on else ".")
        )


def _warn_truncated(tokenizer, prompts: tuple[str, ...], limit: int) -> list[bool]:
    flags = []
    for k, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=True, verbose=False).input_ids
        flags.append(len(ids) > limit)
        if flags[-1]:
            kept = tokenizer.decode(ids[: limit - 1], skip_special_tokens=True)
            console.print(
                f"[yellow]warning:[/yellow] prompt {k} has {len(ids)} tokens; the text encoder reads {limit}, so it "
                f"is truncated to: {kept[-60:]!r} (the last words kept)."
            )
    return flags


@contextlib.contextmanager
def _quiet(name: str):
    """Silence one library logger below errors (we already warned about the same thing, more clearly)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_mp4_writer() -> str:
    """The ffmpeg that ``write_mp4`` will use, checked to list the H.264 encoder; a clear error otherwise."""
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg
    except ImportError as err:
        raise ValueError(
            f"Writing mp4 needs imageio and imageio-ffmpeg ({err}): pip install imageio imageio-ffmpeg"
        ) from err
    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
        listed = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=60)
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        raise ValueError(
            f"No usable ffmpeg to write mp4 ({err}): pip install imageio-ffmpeg, or point IMAGEIO_FFMPEG_EXE at an "
            "ffmpeg with libx264. Nothing was generated."
        ) from err
    if listed.returncode != 0 or "libx264" not in listed.stdout:
        raise ValueError(
            f"{exe} cannot encode H.264 (libx264 is not among its encoders): pip install imageio-ffmpeg, or point "
            "IMAGEIO_FFMPEG_EXE at an ffmpeg with libx264. Nothing was generated."
        )
    return exe


def check_outputs_writable(cfg: SampleConfig) -> None:
    """Every file ``sample`` writes can be created, before any minute goes into generating."""
    folder = cfg.output.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".cogvx-write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"Cannot write into {folder} ({err.strerror or err}): pick another --output.") from err
    for path in [*cfg.video_paths(), cfg.sheet_path, cfg.output.with_suffix(".json")]:
        if path.is_dir():
            raise ValueError(f"{path} is a folder, so the sample cannot be written there: pick another --output.")


def save_frames(video: Path, frames: np.ndarray, prompt: str, fps: int) -> Path:
    """Frames whose mp4 could not be written: ``NAME.frames.safetensors``, tensor ``frames`` uint8 [F, H, W, 3]."""
    from safetensors.numpy import save_file

    path = video.with_suffix(".frames.safetensors")
    save_file({"frames": np.ascontiguousarray(frames)}, str(path), metadata={"prompt": prompt, "fps": str(fps)})
    return path


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass
class SamplePlan:
    """What ``sample`` will do, settled from configs and the file system before any weight is read."""

    model_name: str
    info: models.ModelInfo
    weights: Path | None  # the LoRA file, None for --no-lora without --lora
    trained_on: str | None  # the LoRA's base model, from its run's config.json
    height: int
    width: int
    device: torch.device
    dtype: torch.dtype


def plan_sample(cfg: SampleConfig) -> SamplePlan:
    """Check everything that can be checked without loading the pipeline: LoRA, model, size, mp4 writer, folder."""
    weights = lora_file(cfg.lora) if cfg.lora is not None else None
    trained_on = lora_base_model(cfg.lora) if cfg.lora is not None else None
    model_name = cfg.model or trained_on
    if model_name is None:
        raise ValueError(f"{cfg.lora} has no config.json naming its base model: pass --model.")
    info = models.ModelInfo.read(model_name)
    height, width = cfg.height or info.native_size[0], cfg.width or info.native_size[1]
    multiple = info.spatial_compression * (models.read_config(info.source, "transformer").get("patch_size") or 1)
    if height % multiple or width % multiple:
        raise ValueError(f"--height/--width must be multiples of {multiple} for {model_name} (got {height}x{width}).")
    if (cfg.frames - 1) % info.temporal_compression:
        raise ValueError(f"--frames must be {info.temporal_compression}k+1 for {model_name} (got {cfg.frames}).")
    check_mp4_writer()
    check_outputs_writable(cfg)
    device, dtype = _device_and_dtype(cfg.device, cfg.dtype)
    return SamplePlan(model_name, info, weights, trained_on, height, width, device, dtype)


def load_pipeline(cfg: SampleConfig, plan: SamplePlan):
    """The diffusers ``CogVideoXPipeline`` with the LoRA at ``--lora-scale`` and the memory options set."""
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(plan.info.source, torch_dtype=plan.dtype)
    pipe.set_progress_bar_config(disable=True)
    if plan.weights is not None and not cfg.no_lora:
        check_lora_fits(pipe.transformer, plan.weights, plan.trained_on, plan.model_name)
        pipe.load_lora_weights(str(plan.weights.parent), weight_name=plan.weights.name, adapter_name=LORA_ADAPTER)
        # The saved alpha and rank already set the trained scale; this multiplies it.
        pipe.set_adapters([LORA_ADAPTER], [cfg.lora_scale])
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()
    if cfg.vae_slicing:
        pipe.vae.enable_slicing()
    if cfg.cpu_offload and plan.device.type == "cuda":
        pipe.enable_model_cpu_offload(device=plan.device)
    else:
        if cfg.cpu_offload:
            console.print("[yellow]note:[/yellow] --cpu-offload only saves GPU memory; on the CPU it does nothing.")
        pipe.to(plan.device)
    return pipe


def run_sample(cfg: SampleConfig) -> SampleResult:
    """Generate one video per prompt with the base model plus the LoRA (or without it, ``--no-lora``).

    If an mp4 cannot be written after generation, the frames go to ``NAME.frames.safetensors`` instead,
    the other prompts still run, and a ``VideoWriteError`` at the end says where everything is.
    """
    plan = plan_sample(cfg)
    pipe = load_pipeline(cfg, plan)
    model_name, weights, height, width, dtype = plan.model_name, plan.weights, plan.height, plan.width, plan.dtype

    truncated = _warn_truncated(pipe.tokenizer, cfg.prompts, pipe.transformer.config.max_text_seq_length)
    videos, all_frames, warned_frames = cfg.video_paths(), [], False
    unwritten: list[tuple[Path, Path, Exception]] = []  # (mp4, frames file, error)
    for prompt, path in zip(cfg.prompts, videos, strict=True):
        # One generator per prompt, seeded alike: a prompt's video does not depend on the others,
        # and --no-lora starts from exactly the same noise.
        generator = torch.Generator("cpu").manual_seed(cfg.seed)
        with _quiet(_PIPELINE_LOGGER) if any(truncated) else contextlib.nullcontext():
            out = pipe(
                prompt=prompt,
                negative_prompt=cfg.negative_prompt or None,
                height=height,
                width=width,
                num_frames=cfg.frames,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance,
                use_dynamic_cfg=cfg.dynamic_cfg,
                generator=generator,
                output_type="np",
                max_sequence_length=pipe.transformer.config.max_text_seq_length,
            ).frames[0]
        frames = to_uint8(np.asarray(out))
        _check_size(frames, height, width, cfg.vae_tiling)
        if len(frames) != cfg.frames and not warned_frames:
            # CogVideoX 1.0 VAEs decode an even number of latent frames to 4 frames each (13 -> 16): the
            # pipeline does the same. 8k+1 frames (9, 17, 25, 49) give an odd latent count and exact lengths.
            console.print(
                f"[yellow]warning:[/yellow] the VAE decoded {len(frames)} frames for --frames {cfg.frames}, as the "
                "diffusers pipeline does; ask for 8k+1 frames (9, 17, 25, 49) to get exactly that many."
            )
            warned_frames = True
        try:
            write_mp4(path, frames, cfg.fps)
        except Exception as err:  # the writer failed after generation: keep the frames, report at the end
            unwritten.append((path, save_frames(path, frames, prompt, cfg.fps), err))
        all_frames.append(frames)
    sheet = write_sheet(cfg.sheet_path, list(zip(cfg.prompts, all_frames, strict=True)), cfg.sheet_columns)
    settings = {
        "model": model_name,
        "lora": None if cfg.no_lora or weights is None else str(weights),
        "lora_scale": None if cfg.no_lora else cfg.lora_scale,
        "prompts": list(cfg.prompts),
        "videos": [p.name for p in videos],
        "truncated": truncated,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "dynamic_cfg": cfg.dynamic_cfg,
        "negative_prompt": cfg.negative_prompt,
        "frames": cfg.frames,
        "height": height,
        "width": width,
        "fps": cfg.fps,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if unwritten:
        settings["frames_files"] = {mp4.name: saved.name for mp4, saved, _ in unwritten}
    cfg.output.with_suffix(".json").write_text(json.dumps(settings, indent=1))
    if unwritten:
        mp4, _, first = unwritten[0]
        raise VideoWriteError(
            f"Generated {len(videos)} video(s) but could not write {len(unwritten)} mp4 file(s) ({mp4.name}: "
            f"{_one_line(first)}); their frames are saved in {', '.join(str(s) for _, s, _ in unwritten)} "
            f"(tensor 'frames', uint8 [F, H, W, 3]) and the contact sheet in {sheet}. Fix the mp4 writer (ffmpeg "
            "with libx264, disk space) and write them with cogvx.pipeline.generate.write_mp4."
        ) from first
    return SampleResult(model_name, videos, sheet, all_frames, truncated)


# --------------------------------------------------------------------------- cogvx render


@dataclass
class RenderConfig:
    run: Path
    model: str | None = None  # default: the model in the run's config.json
    fps: int = DEFAULT_FPS
    dtype: str | None = None  # default: bf16 on a GPU, fp32 on a CPU
    device: str | None = None
    vae_tiling: bool = False
    vae_slicing: bool = False
    force: bool = False  # render steps again even if their videos exist
    sheet_columns: int = 8

    def __post_init__(self):
        self.run = Path(self.run)
        _check_common(self.fps, self.sheet_columns, self.dtype)


@dataclass
class ValidationStep:
    step: int
    folder: Path
    samples: list[Path]  # sample-KK.safetensors, in KK order

    def video(self, sample: Path) -> Path:
        return sample.with_suffix(".mp4")

    @property
    def sheet(self) -> Path:
        return self.folder / SHEET_NAME

    @property
    def rendered(self) -> bool:
        return self.sheet.is_file() and all(self.video(s).is_file() for s in self.samples)


@dataclass
class RenderResult:
    rendered: list[ValidationStep]
    skipped: list[ValidationStep]  # already rendered
    videos: list[Path] = field(default_factory=list)


def find_validation(run: Path) -> list[ValidationStep]:
    """Every ``validation/step-NNNNNN/`` with its ``sample-KK.safetensors`` files, by step."""
    steps = []
    root = Path(run) / VALIDATION_DIR
    if root.is_dir():
        for folder in root.iterdir():
            match = _STEP_DIR.match(folder.name)
            if not (match and folder.is_dir()):
                continue
            samples = sorted(
                (p for p in folder.iterdir() if _SAMPLE_FILE.match(p.name)),
                key=lambda p: int(_SAMPLE_FILE.match(p.name).group(1)),
            )
            if samples:
                steps.append(ValidationStep(int(match.group(1)), folder, samples))
    return sorted(steps, key=lambda s: s.step)


def _metadata_value(raw: str) -> str:
    """safetensors metadata are strings; training writes JSON-encoded values (``"\\"a prompt\\""``), read both."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    return value if isinstance(value, str) else json.dumps(value)


def read_latents(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """The ``latents`` tensor ``[1, F, C, H, W]`` and the metadata of a saved validation sample."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if "latents" not in f.keys():  # noqa: SIM118
                raise ValueError(f"{path} holds no tensor named 'latents' (it has {list(f.keys())}).")
            return f.get_tensor("latents"), {k: _metadata_value(v) for k, v in (f.metadata() or {}).items()}
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file ({err}); delete it or re-run training.") from err


def read_run_config(run: Path) -> dict[str, Any]:
    path = Path(run) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix it, or pass --model explicitly.") from err


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scaling_factor: float) -> np.ndarray:
    """Scaled latents ``[1, F, C, H, W]`` to uint8 frames ``[F, H, W, 3]``, as ``CogVideoXPipeline`` does it."""
    from diffusers.video_processor import VideoProcessor

    param = next(vae.parameters())
    video = vae.decode(latents.to(param.device, param.dtype).permute(0, 2, 1, 3, 4) / scaling_factor).sample
    spatial = 2 ** (len(vae.config.block_out_channels) - 1)
    frames = VideoProcessor(vae_scale_factor=spatial).postprocess_video(video=video, output_type="np")
    return to_uint8(np.asarray(frames[0]))


def run_render(cfg: RenderConfig, show_progress: bool = False) -> RenderResult:
    """Decode every saved validation sample into ``sample-KK.mp4`` and a per-step ``sheet.png``, VAE only."""
    if not cfg.run.is_dir():
        raise ValueError(f"Run folder {cfg.run} does not exist.")
    steps = find_validation(cfg.run)
    if not steps:
        raise ValueError(
            f"{cfg.run} has no validation latents (no {VALIDATION_DIR}/step-NNNNNN/sample-KK.safetensors). "
            + NO_VALIDATION_HINT
        )
    todo = steps if cfg.force else [s for s in steps if not s.rendered]
    result = RenderResult([], [s for s in steps if s not in todo])
    if not todo:
        return result

    first_meta = read_latents(todo[0].samples[0])[1]
    model_name = cfg.model or read_run_config(cfg.run).get("model") or first_meta.get("model")
    if not model_name:
        raise ValueError(f"Neither {cfg.run}/config.json nor the latents name a model: pass --model.")
    info = models.ModelInfo.read(model_name)
    device, dtype = _device_and_dtype(cfg.device, cfg.dtype)
    vae = models.load_vae(info.source, dtype, device).eval()
    if cfg.vae_tiling:
        vae.enable_tiling()
    if cfg.vae_slicing:
        vae.enable_slicing()

    from cogvx.progress import progress_bar

    total = sum(len(s.samples) for s in todo)
    with progress_bar(show_progress, "render", total) as update:
        done = 0
        for step in todo:
            rows = []
            for sample in step.samples:
                latents, meta = read_latents(sample)
                if latents.ndim != 5 or latents.shape[2] != info.latent_channels:
                    raise ValueError(
                        f"{sample}: latents of shape {tuple(latents.shape)} do not fit {model_name!r}, which wants "
                        f"[1, F, {info.latent_channels}, H, W]. Pass the run's model with --model."
                    )
                scaling = float(meta.get("scaling_factor", info.scaling_factor))
                if meta.get("num_frames", "").isdigit():
                    # CogVideoX 1.5 pads the latents at the front to a multiple of its temporal patch; the
                    # pipeline drops that padding before decoding, and so do we.
                    wanted = (int(meta["num_frames"]) - 1) // info.temporal_compression + 1
                    latents = latents[:, max(latents.shape[1] - wanted, 0) :]
                frames = decode_latents(vae, latents, scaling)
                size = latents.shape[3] * info.spatial_compression, latents.shape[4] * info.spatial_compression
                _check_size(frames, *size, cfg.vae_tiling)
                result.videos.append(write_mp4(step.video(sample), frames, cfg.fps))
                rows.append((meta.get("prompt", sample.stem), frames))
                done += 1
                update(done)
            # The sheet is written last: its presence marks the step as rendered.
            write_sheet(step.sheet, rows, cfg.sheet_columns)
            result.rendered.append(step)
    return result
