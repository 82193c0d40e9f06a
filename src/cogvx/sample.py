"""``cogvx sample``: videos from the base model plus a trained LoRA, through diffusers' ``CogVideoXPipeline``.

An image-to-video model (CogVideoX-5b-I2V, CogVideoX1.5-5B-I2V, ``tiny-i2v``) runs
``CogVideoXImageToVideoPipeline`` instead, conditioned on ``--image`` (the first frame of every video).

The LoRA is loaded with ``load_lora_weights`` (its saved rank and alpha give the scale; ``--lora-scale``
multiplies it). One mp4 per prompt, a contact sheet of them all, and a JSON file of the settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from cogvx import runs
from cogvx.errors import ConfigError, ModelError, RunError
from cogvx.files import save_safetensors
from cogvx.media import (
    VideoWriteError,
    check_mp4_writer,
    to_uint8,
    write_mp4,
    write_sheet,
)
from cogvx.pipeline import models
from cogvx.pipeline.decode import check_decoded_size, device_and_dtype
from cogvx.progress import progress_bar
from cogvx.stage_configs import SampleConfig  # noqa: F401 (re-exported)

LORA_ADAPTER = "cogvx"
# An --image whose aspect ratio is within this of the video's is resized to it; anything else is refused
# (stretching or cropping a picture changes what the video starts from: that is the user's choice to make).
ASPECT_TOLERANCE = 0.01

console = Console(stderr=True)


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
        path = runs.lora_weights(path)
    if not path.is_file():
        raise RunError(
            f"No LoRA weights at {path}. Point --lora at a run folder written by `cogvx train` "
            f"(it holds {runs.LORA_WEIGHTS}) or at the .safetensors file itself."
        )
    from safetensors import SafetensorError, safe_open

    try:  # the header and the file's length, checked before minutes go into loading the base model
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as err:
        raise RunError(
            f"--lora {path} is not a readable safetensors file ({err}): it is damaged or was cut short (copied "
            "while training wrote it?); copy it again from where it was trained, or train it again."
        ) from err
    return path


def lora_base_model(lora: Path) -> str | None:
    """The model a LoRA was trained on, from its run's resolved settings, if there are any."""
    return runs.read_config(_run_folder(lora)).get("model")


def _run_folder(lora: Path) -> Path:
    return Path(lora) if Path(lora).is_dir() else Path(lora).parent


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
        origin = repr(trained_on) if trained_on else f"another model (no {runs.CONFIG_JSON} beside it says which)"
        raise ModelError(
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


SAMPLES = Path("samples")  # where samples go without --output


def with_output(cfg: SampleConfig) -> SampleConfig:
    """``cfg`` with its ``output`` named: without one, the next free default (``default_output``)."""
    if cfg.output is not None:
        return cfg
    return dataclasses.replace(cfg, output=default_output(cfg.no_lora))


def default_output(no_lora: bool, folder: Path = SAMPLES) -> Path:
    """``samples/lora-NNN.mp4`` (``base-NNN.mp4`` with --no-lora), NNN one more than the highest there: a
    sample never replaces an earlier one, and the newest has the highest number."""
    stem = "base" if no_lora else "lora"
    taken = re.compile(rf"^{stem}-(\d{{3,}})(-\d+)?\.")  # its videos (NAME-KK.mp4 too), sheet and settings
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := taken.match(p.name))] if folder.is_dir() else []
    return folder / f"{stem}-{max(numbers, default=0) + 1:03d}.mp4"


def check_outputs_writable(cfg: SampleConfig) -> None:
    """Every file ``sample`` writes can be created, and none replaces an earlier one's without --overwrite,
    before any minute goes into generating."""
    cfg = with_output(cfg)
    folder = cfg.output.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".cogvx-write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"Cannot write into {folder} ({err.strerror or err}): pick another --output.") from err
    for path in [*cfg.video_paths(), cfg.sheet_path, cfg.output.with_suffix(".json")]:
        if path.is_dir():
            raise ConfigError(f"{path} is a folder, so the sample cannot be written there: pick another --output.")
        if path.exists() and not cfg.overwrite:
            raise ConfigError(
                f"{path} exists (an earlier sample's): pass --overwrite to replace it, or another --output "
                f"(without --output each sample gets the next free number, {default_output(cfg.no_lora)})."
            )


def save_frames(video: Path, frames: np.ndarray, prompt: str, fps: int) -> Path:
    """Frames whose mp4 could not be written: ``NAME.frames.safetensors``, tensor ``frames`` uint8 [F, H, W, 3]."""
    path = video.with_suffix(".frames.safetensors")
    tensors = {"frames": torch.from_numpy(np.ascontiguousarray(frames))}
    return save_safetensors(path, tensors, metadata={"prompt": prompt, "fps": str(fps)})


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass
class SamplePlan:
    """What ``sample`` will do, settled from configs and the file system before any weight is read."""

    model_name: str
    info: models.ModelInfo
    weights: Path | None  # the LoRA file, None for --no-lora without --lora
    trained_on: str | None  # the LoRA's base model, from its run's resolved settings
    height: int
    width: int
    device: torch.device
    dtype: torch.dtype
    image: Any = None  # the first frame as a PIL image of exactly height x width (image-to-video models)


def load_image(path: Path, height: int, width: int, model: str):
    """``--image`` as an RGB picture of ``height`` x ``width``: resized when its aspect ratio is within 1%."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            picture = opened.convert("RGB")
    except FileNotFoundError as err:
        raise ConfigError(f"--image {path} does not exist: pass the picture the videos start from.") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError(f"--image {path} is not a picture Pillow can read ({err}); pass a PNG or JPEG.") from err
    if picture.size == (width, height):
        return picture
    ratio = (picture.width / picture.height) / (width / height)
    if abs(ratio - 1) > ASPECT_TOLERANCE:
        raise ConfigError(
            f"--image {path} is {picture.width}x{picture.height} (width x height), and {model} samples "
            f"{width}x{height}: the aspect ratios differ by {abs(ratio - 1):.0%}. Crop it to {width}:{height} "
            f"first, or pass --width/--height of its aspect ratio (multiples of 16)."
        )
    return picture.resize((width, height), Image.Resampling.LANCZOS)


def plan_sample(cfg: SampleConfig) -> SamplePlan:
    """Check everything that can be checked without loading the pipeline: LoRA, model, size, mp4 writer, folder."""
    weights = lora_file(cfg.lora) if cfg.lora is not None else None
    trained_on = lora_base_model(cfg.lora) if cfg.lora is not None else None
    recorded = [(trained_on, str(runs.config_json(_run_folder(cfg.lora))))] if cfg.lora is not None else []
    model_name = models.choose_model(cfg.model, *recorded)
    # The run's model comes with the revision and variant it was trained from.
    trained = runs.read_config(_run_folder(cfg.lora)) if cfg.lora is not None and cfg.model is None else {}
    info = models.ModelInfo.read(model_name, trained.get("model_revision"), trained.get("model_variant"))
    height, width = cfg.height or info.native_size[0], cfg.width or info.native_size[1]
    multiple = info.spatial_compression * (info.read_config("transformer").get("patch_size") or 1)
    if height % multiple or width % multiple:
        raise ConfigError(f"--height/--width must be multiples of {multiple} for {model_name} (got {height}x{width}).")
    if (cfg.frames - 1) % info.temporal_compression:
        raise ConfigError(f"--frames must be {info.temporal_compression}k+1 for {model_name} (got {cfg.frames}).")
    info.check_task()
    image = None
    if info.image_to_video:
        if cfg.image is None:
            raise ConfigError(
                f"{model_name} is an image-to-video model: pass --image FRAME.png, the picture the videos start from."
            )
        image = load_image(cfg.image, height, width, model_name)
    elif cfg.image is not None:
        raise ConfigError(
            f"--image is for image-to-video models, and {model_name} is text-to-video: drop --image, or sample "
            "with an I2V model (e.g. --model THUDM/CogVideoX-5b-I2V)."
        )
    check_mp4_writer()
    check_outputs_writable(cfg)
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    return SamplePlan(model_name, info, weights, trained_on, height, width, device, dtype, image)


def load_pipeline(cfg: SampleConfig, plan: SamplePlan):
    """The diffusers pipeline (``CogVideoXImageToVideoPipeline`` for I2V models) with the LoRA at ``--lora-scale``
    and the memory options set."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    kind = CogVideoXImageToVideoPipeline if plan.info.image_to_video else CogVideoXPipeline
    with models.quiet_loading():
        pipe = kind.from_pretrained(plan.info.source, torch_dtype=plan.dtype, **plan.info.from_pretrained_args())
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


def _generate(
    pipe, plan: SamplePlan, cfg: SampleConfig, prompt: str, label: str, quiet: bool, show_progress: bool
) -> np.ndarray:
    """One prompt's video from the pipeline, as its float frames, with a progress bar per denoising step."""
    # One generator per prompt, seeded alike: a prompt's video does not depend on the others,
    # and --no-lora starts from exactly the same noise.
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    with (
        _quiet(type(pipe).__module__) if quiet else contextlib.nullcontext(),
        progress_bar(show_progress, label, cfg.steps) as update,
    ):

        def step_done(_pipe, index, _timestep, outputs, update=update):
            update(index + 1)
            return outputs

        conditioning = {"image": plan.image} if plan.image is not None else {}
        return pipe(
            **conditioning,
            prompt=prompt,
            negative_prompt=cfg.negative_prompt or None,
            height=plan.height,
            width=plan.width,
            num_frames=cfg.frames,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            use_dynamic_cfg=cfg.dynamic_cfg,
            generator=generator,
            output_type="np",
            max_sequence_length=pipe.transformer.config.max_text_seq_length,
            callback_on_step_end=step_done,
        ).frames[0]


def _settings(cfg: SampleConfig, plan: SamplePlan, videos: list[Path], truncated: list[bool]) -> dict[str, Any]:
    """What NAME.json records: the model, the LoRA and every setting that decides the videos."""
    return {
        "model": plan.model_name,
        "lora": None if cfg.no_lora or plan.weights is None else str(plan.weights),
        "lora_scale": None if cfg.no_lora else cfg.lora_scale,
        "prompts": list(cfg.prompts),
        "image": str(cfg.image) if cfg.image is not None else None,
        "videos": [p.name for p in videos],
        "truncated": truncated,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "dynamic_cfg": cfg.dynamic_cfg,
        "negative_prompt": cfg.negative_prompt,
        "frames": cfg.frames,
        "height": plan.height,
        "width": plan.width,
        "fps": cfg.fps,
        "dtype": str(plan.dtype).removeprefix("torch."),
    }


def run_sample(cfg: SampleConfig, show_progress: bool = False) -> SampleResult:
    """Generate one video per prompt with the base model plus the LoRA (or without it, ``--no-lora``).

    If an mp4 cannot be written after generation, the frames go to ``NAME.frames.safetensors`` instead,
    the other prompts still run, and a ``VideoWriteError`` at the end says where everything is.
    """
    cfg = with_output(cfg)
    plan = plan_sample(cfg)
    pipe = load_pipeline(cfg, plan)
    height, width = plan.height, plan.width

    truncated = _warn_truncated(pipe.tokenizer, cfg.prompts, pipe.transformer.config.max_text_seq_length)
    videos, all_frames, warned_frames = cfg.video_paths(), [], False
    unwritten: list[tuple[Path, Path, Exception]] = []  # (mp4, frames file, error)
    for prompt, path in zip(cfg.prompts, videos, strict=True):
        label = f"prompt {len(all_frames) + 1}/{len(cfg.prompts)}"
        out = _generate(pipe, plan, cfg, prompt, label, quiet=any(truncated), show_progress=show_progress)
        frames = to_uint8(np.asarray(out))
        check_decoded_size(frames, height, width, cfg.vae_tiling)
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
    settings = _settings(cfg, plan, videos, truncated)
    if unwritten:
        settings["frames_files"] = {mp4.name: saved.name for mp4, saved, _ in unwritten}
    cfg.output.with_suffix(".json").write_text(json.dumps(settings, indent=1))
    if unwritten:
        mp4, _, first = unwritten[0]
        raise VideoWriteError(
            f"Generated {len(videos)} video(s) but could not write {len(unwritten)} mp4 file(s) ({mp4.name}: "
            f"{_one_line(first)}); their frames are saved in {', '.join(str(s) for _, s, _ in unwritten)} "
            f"(tensor 'frames', uint8 [F, H, W, 3]) and the contact sheet in {sheet}. Fix the mp4 writer (ffmpeg "
            "with libx264, disk space) and write them with cogvx.media.write_mp4."
        ) from first
    return SampleResult(plan.model_name, videos, sheet, all_frames, truncated)
