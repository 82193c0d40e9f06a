"""``cogvx render``: the validation latents training saved, decoded to mp4 and contact sheets with the VAE alone.

T5 and the transformer never leave the disk. Each ``validation/step-NNNNNN/`` gets ``sample-KK.mp4`` per
saved sample and a ``sheet.png``, written last, whose presence marks the step as rendered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cogvx import runs
from cogvx.errors import ModelError, RunError
from cogvx.media import check_mp4_writer, write_mp4, write_sheet
from cogvx.pipeline import models
from cogvx.pipeline.decode import check_decoded_size, decode_latents, device_and_dtype
from cogvx.stage_configs import RenderConfig  # noqa: F401 (re-exported)

NO_VALIDATION_HINT = (
    "Training saves them when the cache holds validation prompts and validation is switched on: "
    '`cogvx preprocess --data VIDEOS --output shards --validation-prompt "..."`, then '
    "`cogvx train --shards shards --output RUN --validation-every N`."
)


@dataclass
class ValidationStep:
    step: int
    folder: Path
    samples: list[Path]  # sample-KK.safetensors, in KK order

    def video(self, sample: Path) -> Path:
        return runs.validation_video(sample)

    @property
    def sheet(self) -> Path:
        return runs.validation_sheet(self.folder)

    @property
    def rendered(self) -> bool:
        return self.sheet.is_file() and all(self.video(s).is_file() for s in self.samples)


@dataclass
class RenderResult:
    rendered: list[ValidationStep]
    skipped: list[ValidationStep]  # already rendered
    videos: list[Path] = field(default_factory=list)


def find_validation(run: Path) -> list[ValidationStep]:
    """Every validation step of a run with its saved samples, by step."""
    return [ValidationStep(step, folder, samples) for step, folder, samples in runs.validation_steps(run)]


def run_render(cfg: RenderConfig, show_progress: bool = False) -> RenderResult:
    """Decode every saved validation sample into ``sample-KK.mp4`` and a per-step ``sheet.png``, VAE only."""
    if not cfg.run.is_dir():
        raise RunError(f"Run folder {cfg.run} does not exist.")
    steps = find_validation(cfg.run)
    if not steps:
        raise RunError(f"{cfg.run} has no validation latents (no {runs.VALIDATION_LAYOUT}). " + NO_VALIDATION_HINT)
    todo = steps if cfg.force else [s for s in steps if not s.rendered]
    result = RenderResult([], [s for s in steps if s not in todo])
    if not todo:
        return result
    check_mp4_writer()  # before the VAE is loaded and anything decoded

    first_meta = runs.read_validation_sample(todo[0].samples[0])[1]
    model_name = models.choose_model(
        cfg.model,
        (runs.read_config(cfg.run).get("model"), str(runs.config_json(cfg.run))),
        (first_meta.get("model"), "the latents"),
    )
    trained = runs.read_config(cfg.run) if cfg.model is None else {}  # the run's model, as it was read
    info = models.ModelInfo.read(model_name, trained.get("model_revision"), trained.get("model_variant"))
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    vae = info.load_vae(dtype, device).eval()
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
                latents, meta = runs.read_validation_sample(sample)
                if latents.ndim != 5 or latents.shape[2] != info.latent_channels:
                    raise ModelError(
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
                check_decoded_size(frames, *size, cfg.vae_tiling)
                result.videos.append(write_mp4(step.video(sample), frames, cfg.fps))
                rows.append((meta.get("prompt", sample.stem), frames))
                done += 1
                update(done)
            # The sheet is written last: its presence marks the step as rendered.
            write_sheet(step.sheet, rows, cfg.sheet_columns)
            result.rendered.append(step)
    return result
