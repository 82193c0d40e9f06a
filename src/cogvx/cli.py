"""The ``cogvx`` command: each subcommand builds its stage's config from the flags given and calls ``run``.

Every ``[default: ...]`` in the help comes from the stage's config dataclass (``_help``), the one place
each default lives. Flags are passed to the config by name, explicitly: what a flag sets can be
followed from here to its use. A ``CogvxError`` prints as one line; anything else keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from cogvx import __version__, runs
from cogvx import config as configfile
from cogvx.compare import CompareConfig
from cogvx.errors import CogvxError
from cogvx.preprocess.run import PreprocessConfig
from cogvx.render import RenderConfig
from cogvx.report import ReportConfig
from cogvx.sample import SampleConfig
from cogvx.shards.tools import InspectConfig
from cogvx.train.config import DEFAULT_MAX_STEPS, TrainConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts say "[default: ...]": plain text, not rich markup
    help="Fine-tune CogVideoX with LoRA from a latent cache.",
)
shards_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Look into a cache folder.")
app.add_typer(shards_app, name="shards")
console = Console(stderr=True)


def _shown(value: Any) -> str:
    """A dataclass default as the help text shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def _help(config: type, name: str, text: str, rule: str | None = None) -> str:
    """``text`` with the default of ``config``'s field ``name``; ``rule`` says what an unset (None) field means."""
    field = {f.name: f for f in dataclasses.fields(config)}[name]
    default = field.default
    if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    if default is None or default is dataclasses.MISSING or default in ("", ()):
        return f"{text} [default: {rule}]" if rule else text
    if rule is not None:
        raise TypeError(f"{config.__name__}.{name} has a default ({default!r}); a rule is only for unset fields")
    return f"{text} [default: {_shown(default)}]"


def _version(value: bool) -> None:
    if value:
        print(f"cogvx {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print cogvx's version and exit."
    ),
) -> None:
    """Fine-tune CogVideoX with LoRA from a latent cache."""


P = PreprocessConfig


@app.command()
def preprocess(
    data: str = typer.Option(
        ...,
        help="Folder of videos with .txt captions, a root with prompts.txt/videos.txt, a .csv/.jsonl file, or "
        "hf://datasets/OWNER/NAME[@REVISION][/FOLDER] (downloaded to the Hugging Face cache).",
    ),
    output: str = typer.Option(None, help=_help(P, "output", "Cache folder, or a URL such as s3://bucket/prefix.")),
    model: str = typer.Option(None, help=_help(P, "model", "Hub id, local diffusers folder, or tiny.")),
    model_revision: str = typer.Option(
        None, help=_help(P, "model_revision", "Branch, tag or commit of a hub model.", "the newest")
    ),
    model_variant: str = typer.Option(
        None, help=_help(P, "model_variant", "Weights variant, e.g. fp16 (files NAME.fp16.safetensors).", "none")
    ),
    height: int = typer.Option(
        None, help=_help(P, "height", "Frame height in pixels.", "the model's native size, 480 for 2b/5b, 768 for 1.5")
    ),
    width: int = typer.Option(
        None, help=_help(P, "width", "Frame width in pixels.", "the model's native size, 720 for 2b/5b, 1360 for 1.5")
    ),
    resolution: list[str] = typer.Option(
        None, help="A HEIGHTxWIDTH bucket, repeatable; each clip goes to the closest aspect ratio."
    ),
    max_frames: int = typer.Option(
        None,
        help=_help(
            P, "max_frames", "Frames per sample, 4k+1 (8k+1 for 1.5).", "the model's own, 49 for 2b/5b, 81 for 1.5"
        ),
    ),
    frame_bucket: list[int] = typer.Option(
        None, help="A frame count (4k+1) bucket, repeatable, instead of --max-frames; clips take the longest that fits."
    ),
    min_frames: int = typer.Option(None, help=_help(P, "min_frames", "Skip clips shorter than this after sampling.")),
    fps: float = typer.Option(None, help=_help(P, "fps", "Sample frames at this rate, from each clip's real rate.")),
    skip_frames_start: int = typer.Option(
        None, help=_help(P, "skip_frames_start", "Source frames to drop at the start.")
    ),
    skip_frames_end: int = typer.Option(None, help=_help(P, "skip_frames_end", "Source frames to drop at the end.")),
    resize: str = typer.Option(None, help=_help(P, "resize", "crop (cover, centre crop) or stretch.")),
    windows: int = typer.Option(
        None, help=_help(P, "windows", "Up to this many evenly spaced windows from a long clip.")
    ),
    max_upscale: float = typer.Option(
        None, help=_help(P, "max_upscale", "Skip clips that need more enlarging than this.")
    ),
    id_token: str = typer.Option(None, help=_help(P, "id_token", "Prepended to every caption with a space.")),
    caption_column: str = typer.Option(
        None,
        help=_help(P, "caption_column", "Caption file (seed layout) or column (.csv/.jsonl).", "prompts.txt / caption"),
    ),
    video_column: str = typer.Option(
        None,
        help=_help(P, "video_column", "Video list file (seed layout) or column (.csv/.jsonl).", "videos.txt / video"),
    ),
    dtype: str = typer.Option(None, help=_help(P, "dtype", "bf16, fp16 or fp32 for the VAE and T5.")),
    device: str = typer.Option(
        None, help=_help(P, "device", "cuda, cuda:1, cpu.", "cuda if available, one GPU per rank")
    ),
    workers: int = typer.Option(None, help=_help(P, "workers", "Video decoding processes per rank.")),
    vae_batch: int = typer.Option(None, help=_help(P, "vae_batch", "Clips of one shape per VAE call.")),
    vae_tiling: bool = typer.Option(
        None, "--vae-tiling/--no-vae-tiling", help=_help(P, "vae_tiling", "Encode in tiles (less memory).")
    ),
    vae_slicing: bool = typer.Option(
        None, "--vae-slicing/--no-vae-slicing", help=_help(P, "vae_slicing", "Encode a batch one clip at a time.")
    ),
    compile_vae: bool = typer.Option(
        None,
        "--compile/--no-compile",
        help=_help(
            P,
            "compile_vae",
            "torch.compile the VAE encoder; compiled kernels are kept in ~/.cache/cogvx/torch-compile for later runs.",
            "on with a GPU, off on a CPU",
        ),
    ),
    shard_max_mb: int = typer.Option(None, help=_help(P, "shard_max_mb", "Shard size limit in MiB.")),
    validation_prompt: list[str] = typer.Option(
        None, help="Store this prompt's embedding for validation during training (repeatable)."
    ),
    repair: bool = typer.Option(
        None,
        "--repair",
        help=_help(P, "repair", "Also check every listed shard's sha256 and re-encode damaged ones' samples."),
    ),
    flip: bool = typer.Option(
        None,
        "--flip",
        help=_help(P, "flip", "Also encode every sample mirrored left to right (for train --random-flip)."),
    ),
    image_latents: bool = typer.Option(
        None,
        "--image-latents",
        help=_help(P, "image_latents", "Also encode each sample's first frame, for image-to-video training."),
    ),
    allow_outside_paths: bool = typer.Option(
        None,
        "--allow-outside-paths",
        help=_help(P, "allow_outside_paths", "Let a metadata or videos.txt file name videos outside its folder."),
    ),
    config: Path = typer.Option(None, help="TOML file with any of these settings (flags win)."),
) -> None:
    """Encode videos and captions once into a reusable cache of latent moments and prompt embeddings."""
    from cogvx.preprocess.run import run

    def go():  # the config is built inside _guard: a bad setting is one line too
        cfg = configfile.build(
            PreprocessConfig,
            config,
            data=data,
            output=output,
            model=model,
            model_revision=model_revision,
            model_variant=model_variant,
            height=height,
            width=width,
            resolutions=_repeated(resolution),
            max_frames=max_frames,
            frame_buckets=_repeated(frame_bucket),
            min_frames=min_frames,
            fps=fps,
            skip_frames_start=skip_frames_start,
            skip_frames_end=skip_frames_end,
            resize=resize,
            windows=windows,
            max_upscale=max_upscale,
            id_token=id_token,
            caption_column=caption_column,
            video_column=video_column,
            dtype=dtype,
            device=device,
            workers=workers,
            vae_batch=vae_batch,
            vae_tiling=vae_tiling,
            vae_slicing=vae_slicing,
            compile_vae=compile_vae,
            shard_max_mb=shard_max_mb,
            validation_prompts=_repeated(validation_prompt),
            repair=repair,
            allow_outside_paths=allow_outside_paths,
            flip=flip,
            image_latents=image_latents,
        )
        built.append(cfg)
        run(cfg, show_progress=True)

    built: list[PreprocessConfig] = []  # the config, once built: a Ctrl-C names its cache
    _guard(go, lambda err: _preprocess_interrupted(err, built[0].output if built else output))


T = TrainConfig


@app.command()
def train(
    shards: str = typer.Option(
        None, help="Cache written by `cogvx preprocess`: a folder, or a URL (s3://bucket/prefix, https://host/path/)."
    ),
    output: Path = typer.Option(None, help=_help(T, "output", "Run folder.")),
    model: str = typer.Option(None, help=_help(T, "model", "Base model.", "the one recorded in the cache")),
    max_steps: int = typer.Option(
        None, help=_help(T, "max_steps", "Optimizer steps.", f"{DEFAULT_MAX_STEPS}, unless --epochs is given")
    ),
    epochs: float = typer.Option(
        None, help=_help(T, "epochs", "Passes over the cache instead of --max-steps (samples / global batch each).")
    ),
    batch_size: int = typer.Option(None, help=_help(T, "batch_size", "Samples per batch and process.")),
    gradient_accumulation: int = typer.Option(
        None, help=_help(T, "gradient_accumulation", "Batches per optimizer step.")
    ),
    rank: int = typer.Option(None, help=_help(T, "rank", "LoRA rank.")),
    alpha: float = typer.Option(None, help=_help(T, "alpha", "LoRA alpha.")),
    targets: str = typer.Option(None, help=_help(T, "targets", "Comma-separated modules.")),
    lora_dropout: float = typer.Option(None, help=_help(T, "lora_dropout", "Dropout on the LoRA input.")),
    optimizer: str = typer.Option(None, help=_help(T, "optimizer", "adamw, adam, prodigy, adamw8bit.")),
    learning_rate: float = typer.Option(None, help=_help(T, "learning_rate", "Peak learning rate.")),
    scale_lr: bool = typer.Option(
        None, "--scale-lr/--no-scale-lr", help=_help(T, "scale_lr", "Multiply LR by the total batch size.")
    ),
    lr_scheduler: str = typer.Option(
        None, help=_help(T, "lr_scheduler", "constant, constant_with_warmup, linear, cosine, ...")
    ),
    lr_warmup_steps: int = typer.Option(None, help=_help(T, "lr_warmup_steps", "Steps of linear warm-up.")),
    max_grad_norm: float = typer.Option(None, help=_help(T, "max_grad_norm", "Gradient clipping norm.")),
    mixed_precision: str = typer.Option(None, help=_help(T, "mixed_precision", "bf16, fp16 or fp32 (also: no).")),
    allow_tf32: bool = typer.Option(
        None, "--allow-tf32/--no-allow-tf32", help=_help(T, "allow_tf32", "TF32 matmuls for fp32 work on GPUs.")
    ),
    checkpointing: str = typer.Option(
        None,
        help=_help(
            T,
            "checkpointing",
            "auto (the fastest mode predicted to fit), none (fastest), selective, full, offload or swap "
            "(least memory).",
        ),
    ),
    max_memory: float = typer.Option(
        None, help=_help(T, "max_memory", "GB that --checkpointing auto may plan for.", "what the device has free")
    ),
    compile: bool = typer.Option(
        None,
        "--compile/--no-compile",
        help=_help(T, "compile", "torch.compile the blocks.", "on with a GPU, off on a CPU"),
    ),
    fp8_base: bool = typer.Option(
        None, "--fp8-base/--no-fp8-base", help=_help(T, "fp8_base", "Store frozen base weights in float8.")
    ),
    fp8_matmul: bool = typer.Option(
        None,
        "--fp8-matmul/--no-fp8-matmul",
        help=_help(
            T,
            "fp8_matmul",
            "Also multiply by the frozen base weights in float8 (Ada, Hopper or newer GPUs; implies --fp8-base).",
        ),
    ),
    seed: int = typer.Option(None, help=_help(T, "seed", "Seed for LoRA init, data order and noise.")),
    random_flip: float = typer.Option(
        None, help=_help(T, "random_flip", "Probability of drawing a sample's mirrored variant (preprocess --flip).")
    ),
    workers: int = typer.Option(None, help=_help(T, "workers", "DataLoader worker processes.")),
    cache_dir: Path = typer.Option(
        None, help=_help(T, "cache_dir", "Keep a remote cache's verified shards here, to read them again locally.")
    ),
    skip_bad_shards: bool = typer.Option(
        None, "--skip-bad-shards", help=_help(T, "skip_bad_shards", "Skip (and report) missing or changed shards.")
    ),
    validation_every: int = typer.Option(
        None,
        help=_help(
            T, "validation_every", "Steps between validation samples of the cache's validation prompts, 0 for none."
        ),
    ),
    validation_steps: int = typer.Option(None, help=_help(T, "validation_steps", "Sampler steps for validation.")),
    validation_guidance: float = typer.Option(
        None, help=_help(T, "validation_guidance", "Classifier-free guidance for validation.")
    ),
    validation_frames: int = typer.Option(
        None, help=_help(T, "validation_frames", "Validation video frames, 4k+1.", "the first bucket's")
    ),
    validation_height: int = typer.Option(
        None, help=_help(T, "validation_height", "Validation height in pixels.", "the first bucket's")
    ),
    validation_width: int = typer.Option(
        None, help=_help(T, "validation_width", "Validation width in pixels.", "the first bucket's")
    ),
    eval_every: int = typer.Option(
        None,
        help=_help(T, "eval_every", "Steps between eval scores (loss on held-out clips, fixed noise), 0 for none."),
    ),
    eval_holdout: float = typer.Option(
        None,
        help=_help(
            T,
            "eval_holdout",
            "Clips of --shards held out for the eval score: N clips, a fraction (0.1), or 0 for none.",
            "a tenth (at most 8) of a cache of 20 clips or more, else none",
        ),
    ),
    eval_shards: str = typer.Option(
        None,
        help=_help(
            T, "eval_shards", "Score another cache (same encoders) instead of holding clips out, a folder or URL."
        ),
    ),
    keep_best: bool = typer.Option(
        None, "--keep-best", help=_help(T, "keep_best", "Keep the LoRA of the lowest eval score in RUN/best/.")
    ),
    checkpoint_every: int = typer.Option(
        None, help=_help(T, "checkpoint_every", "Steps between checkpoints, 0 for none.")
    ),
    keep_checkpoints: int = typer.Option(None, help=_help(T, "keep_checkpoints", "Checkpoints to keep.")),
    resume: str = typer.Option(None, help="auto (newest checkpoint in --output) or a checkpoint folder."),
    report_to: str = typer.Option(None, help=_help(T, "report_to", "none, tensorboard or wandb.")),
    push_to_hub: bool = typer.Option(
        None,
        "--push-to-hub",
        help=_help(T, "push_to_hub", "Upload the LoRA, model card, curve and config to the Hub at the end."),
    ),
    hub_model_id: str = typer.Option(None, help=_help(T, "hub_model_id", "The model repo, OWNER/NAME.")),
    push_checkpoints: bool = typer.Option(
        None, "--push-checkpoints", help=_help(T, "push_checkpoints", "Also upload each checkpoint's LoRA.")
    ),
    config: Path = typer.Option(None, help="TOML file with any of these settings (flags win)."),
) -> None:
    """Train a LoRA on a cache. Never loads the VAE or the text encoder."""
    from cogvx.train.loop import run

    def go():  # the config is built inside _guard: a bad setting is one line too
        cfg = configfile.build(
            TrainConfig,
            config,
            shards=shards,
            output=output,
            model=model,
            max_steps=max_steps,
            epochs=epochs,
            batch_size=batch_size,
            gradient_accumulation=gradient_accumulation,
            rank=rank,
            alpha=alpha,
            targets=targets,
            lora_dropout=lora_dropout,
            optimizer=optimizer,
            learning_rate=learning_rate,
            scale_lr=scale_lr,
            lr_scheduler=lr_scheduler,
            lr_warmup_steps=lr_warmup_steps,
            max_grad_norm=max_grad_norm,
            mixed_precision=mixed_precision,
            allow_tf32=allow_tf32,
            checkpointing=checkpointing,
            max_memory=max_memory,
            compile=compile,
            fp8_base=fp8_base,
            fp8_matmul=fp8_matmul,
            seed=seed,
            random_flip=random_flip,
            workers=workers,
            cache_dir=cache_dir,
            skip_bad_shards=skip_bad_shards,
            validation_every=validation_every,
            validation_steps=validation_steps,
            validation_guidance=validation_guidance,
            validation_frames=validation_frames,
            validation_height=validation_height,
            validation_width=validation_width,
            eval_every=eval_every,
            eval_holdout=eval_holdout,
            eval_shards=eval_shards,
            keep_best=keep_best,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints,
            resume=resume,
            report_to=report_to,
            push_to_hub=push_to_hub,
            hub_model_id=hub_model_id,
            push_checkpoints=push_checkpoints,
        )
        built.append(cfg)
        result = run(cfg, show_progress=True)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun/accelerate, the main process tells
            settings = result.model.config if result.model is not None else None
            # An image-to-video transformer reads twice the channels it writes: its videos need a first frame.
            i2v = settings is not None and settings.in_channels != (settings.out_channels or settings.in_channels)
            _say_where_the_run_is(result.output, result.steps, i2v, result.eval.line() if result.eval else None)
        for url in result.skipped_shards:  # every process says its own: each reads its share of the shards
            console.print(f"[yellow]skipped[/yellow] bad shard {url} (--skip-bad-shards)", soft_wrap=True)

    built: list[TrainConfig] = []  # the config, once built: a Ctrl-C looks into its run folder
    _guard(go, lambda _: _train_interrupted(built[0] if built else None))


def _say_where_the_run_is(run: Path, steps: int, image_to_video: bool = False, eval_line: str | None = None) -> None:
    final = runs.final_loss(runs.read_metrics(run))
    loss = f", final loss {final[0]:.4f} ({final[1]})" if final else ""
    console.print(f"[green]trained[/green] {steps} steps{loss}", soft_wrap=True)
    if eval_line:  # "eval loss 0.412 at step 1200, best; base 0.455"
        console.print(f"  {eval_line}", soft_wrap=True)
    for what, path in (
        ("LoRA", runs.lora_weights(run)),
        ("best LoRA", runs.lora_weights(runs.best(run))),
        ("model card", runs.model_card(run)),
        ("loss curve", runs.loss_curve(run)),
    ):
        if path.is_file():
            console.print(f"  {what:10} {path}", soft_wrap=True)
    console.print(f"  report     cogvx report {run}", soft_wrap=True)
    image = " --image FRAME.png" if image_to_video else ""
    console.print(f'  sample     cogvx sample --lora {run}{image} --prompt "..."', soft_wrap=True)


@shards_app.command("verify")
def shards_verify(
    folder: str = typer.Argument(..., help="Cache folder or URL (s3://bucket/prefix, https://host/path/)."),
    deep: bool = typer.Option(True, "--deep/--quick", help="Also parse every sample (default) or only hash shards."),
) -> None:
    """Check every shard and sample against the manifest; say exactly what to run to repair a cache."""
    from cogvx.shards.tools import VerifyConfig, verify_cache

    def check():
        report = verify_cache(VerifyConfig(folder, deep=deep))
        for problem in report.problems:
            console.print(f"[red]bad[/red] {problem}", soft_wrap=True)
        for name in report.unlisted:
            console.print(f"[yellow]unlisted[/yellow] {name} (not in the manifest, never read)", soft_wrap=True)
        if not report.ok:
            raise CogvxError(report.advice())
        console.print(f"[green]ok[/green] {report.shards} shards, {report.samples} samples verified.")

    _guard(check)


@shards_app.command("rebuild-manifest")
def shards_rebuild_manifest(
    folder: str = typer.Argument(..., help="Cache folder whose manifest is lost."),
) -> None:
    """Re-create a lost manifest from the shards' own headers and metadata (every shard is checked)."""
    from cogvx.shards import paths
    from cogvx.shards.tools import rebuild_manifest

    def rebuild():
        result = rebuild_manifest(folder)
        m = result.manifest
        for label in result.dropped_extras:
            console.print(f"[yellow]not listed[/yellow] side file {label!r}: missing or changed", soft_wrap=True)
        console.print(
            f"[green]rebuilt[/green] {paths.manifest(folder)}: {len(m.shards)} shards, {m.sample_count} samples "
            f"({m.excluded_count} replaced).",
            soft_wrap=True,
        )

    _guard(rebuild)


I = InspectConfig  # noqa: E741


@shards_app.command("inspect")
def shards_inspect(
    folder: str = typer.Argument(..., help="Cache folder or URL (s3://bucket/prefix, https://host/path/)."),
    contact_sheet: Path = typer.Option(
        None, help=_help(I, "contact_sheet", "Also write a PNG of the samples' frame strips here.")
    ),
    max_strips: int = typer.Option(None, help=_help(I, "max_strips", "Samples on the contact sheet.")),
) -> None:
    """Summarise a cache: samples, buckets, size, model and parameters."""
    from rich.table import Table

    from cogvx.shards.tools import inspect

    def show():
        cfg = configfile.build(InspectConfig, folder=folder, contact_sheet=contact_sheet, max_strips=max_strips)
        summary = inspect(cfg)
        table = Table(title=f"cache {summary.folder}", show_header=False)
        for name, value in summary.rows():
            table.add_row(name, value)
        Console().print(table)

    _guard(show)


S = SampleConfig


@app.command()
def sample(
    prompt: list[str] = typer.Option(None, help="Text to render; repeat for several (one mp4 each)."),
    image: Path = typer.Option(
        None, help="First frame for an image-to-video model (resized if its aspect ratio is within 1%)."
    ),
    lora: Path = typer.Option(None, help="Run folder written by `cogvx train` (or its .safetensors file)."),
    output: Path = typer.Option(
        None,
        help=_help(
            S,
            "output",
            "mp4 file; NAME-KK.mp4 for several prompts.",
            "samples/lora-NNN.mp4, the next free number: nothing is replaced",
        ),
    ),
    overwrite: bool = typer.Option(
        None, "--overwrite", help=_help(S, "overwrite", "Replace the files of an --output that exists.")
    ),
    model: str = typer.Option(None, help=_help(S, "model", "Base model.", "the one recorded in the LoRA's run folder")),
    no_lora: bool = typer.Option(
        None, "--no-lora", help=_help(S, "no_lora", "Render the base model alone, same seed (to compare).")
    ),
    lora_scale: float = typer.Option(
        None, help=_help(S, "lora_scale", "Multiplies the LoRA's trained scale; 0 = base model.")
    ),
    steps: int = typer.Option(None, help=_help(S, "steps", "Denoising steps.")),
    guidance: float = typer.Option(None, help=_help(S, "guidance", "Classifier-free guidance scale.")),
    dynamic_cfg: bool = typer.Option(
        None, "--dynamic-cfg", help=_help(S, "dynamic_cfg", "Ramp the guidance over the steps (5b-style).")
    ),
    negative_prompt: str = typer.Option(None, help=_help(S, "negative_prompt", "Text to steer away from.", "none")),
    seed: int = typer.Option(None, help=_help(S, "seed", "Noise seed, the same for every prompt.")),
    frames: int = typer.Option(None, help=_help(S, "frames", "Frames, 4k+1.")),
    height: int = typer.Option(None, help=_help(S, "height", "Pixels.", "the model's native size, 480 for 2b/5b")),
    width: int = typer.Option(None, help=_help(S, "width", "Pixels.", "the model's native size, 720 for 2b/5b")),
    fps: int = typer.Option(None, help=_help(S, "fps", "Frame rate written into the mp4.")),
    dtype: str = typer.Option(None, help=_help(S, "dtype", "bf16, fp16 or fp32.", "bf16 on a GPU, fp32 on a CPU")),
    device: str = typer.Option(None, help=_help(S, "device", "cuda, cuda:1, cpu.", "cuda if available")),
    cpu_offload: bool = typer.Option(
        None, "--cpu-offload", help=_help(S, "cpu_offload", "Keep idle components in CPU memory (GPU only).")
    ),
    vae_tiling: bool = typer.Option(
        None, "--vae-tiling", help=_help(S, "vae_tiling", "Decode in tiles: less GPU memory.")
    ),
    vae_slicing: bool = typer.Option(
        None, "--vae-slicing", help=_help(S, "vae_slicing", "Decode one video at a time: less GPU memory.")
    ),
    config: Path = typer.Option(None, help="TOML file with any of these settings (flags win)."),
) -> None:
    """Generate videos with a trained LoRA (or the base model) and a PNG contact sheet."""
    from cogvx.sample import run_sample

    def go():
        cfg = configfile.build(
            SampleConfig,
            config,
            prompts=_repeated(prompt),
            image=image,
            lora=lora,
            output=output,
            overwrite=overwrite,
            model=model,
            no_lora=no_lora,
            lora_scale=lora_scale,
            steps=steps,
            guidance=guidance,
            dynamic_cfg=dynamic_cfg,
            negative_prompt=negative_prompt,
            seed=seed,
            frames=frames,
            height=height,
            width=width,
            fps=fps,
            dtype=dtype,
            device=device,
            cpu_offload=cpu_offload,
            vae_tiling=vae_tiling,
            vae_slicing=vae_slicing,
        )
        result = run_sample(cfg, show_progress=True)
        for path in result.videos:
            console.print(f"[green]wrote[/green] {path}")
        console.print(f"[green]wrote[/green] {result.sheet} (contact sheet)")

    _guard(go)


R = RenderConfig


@app.command()
def render(
    run: Path = typer.Argument(..., help="Run folder with validation latents saved by `cogvx train`."),
    model: str = typer.Option(None, help=_help(R, "model", "Model whose VAE decodes.", "the run's model")),
    fps: int = typer.Option(None, help=_help(R, "fps", "Frame rate written into the mp4.")),
    dtype: str = typer.Option(None, help=_help(R, "dtype", "bf16, fp16 or fp32.", "bf16 on a GPU, fp32 on a CPU")),
    device: str = typer.Option(None, help=_help(R, "device", "cuda, cuda:1, cpu.", "cuda if available")),
    vae_tiling: bool = typer.Option(
        None, "--vae-tiling", help=_help(R, "vae_tiling", "Decode in tiles: less GPU memory.")
    ),
    vae_slicing: bool = typer.Option(
        None, "--vae-slicing", help=_help(R, "vae_slicing", "Decode one video at a time: less GPU memory.")
    ),
    force: bool = typer.Option(None, "--force", help=_help(R, "force", "Render steps again that already have videos.")),
) -> None:
    """Decode the validation latents saved by training into mp4s and contact sheets (VAE only)."""
    from cogvx.render import run_render

    def go():
        cfg = configfile.build(
            RenderConfig,
            run=run,
            model=model,
            fps=fps,
            dtype=dtype,
            device=device,
            vae_tiling=vae_tiling,
            vae_slicing=vae_slicing,
            force=force,
        )
        result = run_render(cfg, show_progress=True)
        for step in result.rendered:
            console.print(f"[green]rendered[/green] step {step.step}: {len(step.samples)} video(s) in {step.folder}")
        if result.skipped:
            console.print(f"skipped {len(result.skipped)} step(s) already rendered (--force renders them again)")

    _guard(go)


@app.command()
def report(
    run: Path = typer.Argument(..., help="Run folder written by `cogvx train`."),
    output: Path = typer.Option(None, help=_help(ReportConfig, "output", "HTML file.", f"RUN/{runs.REPORT}")),
    render: bool = typer.Option(
        None,
        "--render/--no-render",
        help=_help(ReportConfig, "render", "Decode validation videos not yet rendered."),
    ),
    model: str = typer.Option(None, help=_help(ReportConfig, "model", "Model whose VAE renders.", "the run's model")),
) -> None:
    """Write a self-contained HTML page: config, data, training curves, validation videos (prompts x steps)."""
    from cogvx.report import run as write_report

    def go():
        result = write_report(configfile.build(ReportConfig, run=run, output=output, render=render, model=model))
        for note in result.notes:
            console.print(f"[yellow]note:[/yellow] {note}")
        console.print(f"[green]wrote[/green] {result.path}")

    _guard(go)


@app.command()
def compare(
    run_folders: list[str] = typer.Argument(
        ..., metavar="RUN", help="Run folders of one cache: local folders or URLs (s3://bucket/run, ...)."
    ),
    output: Path = typer.Option(None, help=_help(CompareConfig, "output", "HTML file.")),
    overwrite: bool = typer.Option(
        None, "--overwrite/--no-overwrite", help=_help(CompareConfig, "overwrite", "Replace an existing output file.")
    ),
) -> None:
    """Runs of one cache side by side on one HTML page: differing settings, held-out and training curves,
    best steps, validation videos."""
    from cogvx.compare import run as write_compare

    def go():
        cfg = configfile.build(CompareConfig, runs=tuple(run_folders), output=output, overwrite=overwrite)
        result = write_compare(cfg)
        for note in result.notes:
            console.print(f"[yellow]note:[/yellow] {note}")
        console.print(f"[green]wrote[/green] {result.path}")

    _guard(go)


def _repeated(values: list | None) -> tuple | None:
    """A repeatable flag arrives as a list (empty when not given); the config field is a tuple."""
    return tuple(values) if values else None


def _guard(action, on_interrupt: Callable[[KeyboardInterrupt], list[tuple[str, str]]] | None = None) -> None:
    """Run a command: a user error (CogvxError) prints one line and exits 1; a Ctrl-C says what was kept and
    how to go on (``on_interrupt``'s rows) and exits 130, as typer does; anything else keeps its traceback."""
    try:
        action()
    except CogvxError as err:
        console.print(f"[bold red]error:[/bold red] {err}", soft_wrap=True)
        raise typer.Exit(1) from err
    except KeyboardInterrupt as err:
        if int(os.environ.get("RANK", "0")) == 0:  # under a launcher every process is interrupted: one tells
            console.print("[yellow]interrupted[/yellow] (Ctrl-C)", soft_wrap=True)
            for what, text in on_interrupt(err) if on_interrupt is not None else []:
                console.print(f"  {what:10} {text}", soft_wrap=True, markup=False, highlight=False)
        raise typer.Exit(130) from err


def _command_again(resume: str | None = None) -> str:
    """This command as it was given, shell-quoted; with ``resume``, ``--resume RESUME`` replaces any --resume."""
    args = sys.argv[1:]
    if resume is not None:
        kept, value_next = [], False
        for arg in args:
            if value_next or arg == "--resume" or arg.startswith("--resume="):
                value_next = arg == "--resume"
                continue
            kept.append(arg)
        args = [*kept, "--resume", resume]
    command = shlex.join([*_program(), *args])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the launcher's own arguments are not known here
        command += " (launched as before: torchrun or accelerate launch, then these arguments)"
    return command


def _program() -> list[str]:
    """How this process was started, as words to type again: ``cogvx`` or ``python -m cogvx`` when those
    name the same program on the PATH, else the full path."""
    started = Path(sys.argv[0])
    if started.name == "__main__.py":
        python = "python" if _same_file(shutil.which("python"), sys.executable) else sys.executable
        return [python, "-m", "cogvx"]
    return ["cogvx" if _same_file(shutil.which("cogvx"), started) else str(started)]


def _same_file(found: str | None, path: str | Path) -> bool:
    try:
        return found is not None and os.path.samefile(found, path)
    except OSError:
        return False


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'' if number == 1 else 's'}"


def _train_interrupted(cfg: TrainConfig | None) -> list[tuple[str, str]]:
    """What a Ctrl-C of ``train`` kept, read from the run folder, and the command that continues."""
    if cfg is None:
        return [("again", _command_again())]
    kept = runs.checkpoints(cfg.output)
    if kept:
        newest = kept[-1]
        return [
            ("kept", f"{newest} (step {runs.checkpoint_step(newest)}), the newest checkpoint"),
            ("continue", _command_again(resume="auto")),
        ]
    held = sorted(p.name for p in cfg.output.iterdir() if not p.name.startswith(".")) if cfg.output.is_dir() else []
    holds = ", ".join(held) if held else "nothing"
    return [
        ("kept", f"no checkpoint yet: nothing to resume, the run folder {cfg.output} holds {holds}"),
        ("again", _command_again()),
        ("note", "with no checkpoint, the run starts again from step 0"),
    ]


def _preprocess_interrupted(err: KeyboardInterrupt, output: Path | str | None) -> list[tuple[str, str]]:
    """What a Ctrl-C of ``preprocess`` kept, and the command that goes on (the same: it encodes only what is new)."""
    from cogvx.preprocess.run import Interrupted

    if isinstance(err, Interrupted):
        kept = f"{_count(err.samples, 'sample')} in {_count(err.shards, 'shard')} in {err.cache}"
    else:  # stopped before or after encoding: the cache is as its manifest lists it
        kept = f"every shard the manifest of {output or 'the cache'} lists"
    return [
        ("kept", kept),
        ("continue", _command_again()),
        ("note", "the same command: a run encodes only the clips the cache does not hold yet"),
    ]


def main() -> None:
    from cogvx.pipeline.memory import use_expandable_segments

    use_expandable_segments()  # before anything touches CUDA
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
