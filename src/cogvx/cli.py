"""The ``cogvx`` command: each subcommand builds a config and calls its stage's ``run``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cogvx import config as configfile

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

USER_ERRORS = (ValueError, FileNotFoundError, ImportError)


@app.command()
def preprocess(
    data: Path = typer.Option(
        ..., help="Folder of videos with .txt captions, a root with prompts.txt/videos.txt, or a .csv/.jsonl file."
    ),
    output: Path = typer.Option(None, help="Cache folder to write [default: shards]."),
    model: str = typer.Option(None, help="Hub id, local diffusers folder, or tiny [default: THUDM/CogVideoX-2b]."),
    height: int = typer.Option(None, help="Frame height in pixels [default: the model's native size, 480 for 2b/5b]."),
    width: int = typer.Option(None, help="Frame width in pixels [default: the model's native size, 720 for 2b/5b]."),
    resolution: list[str] = typer.Option(
        None, help="A HEIGHTxWIDTH bucket, repeatable; each clip goes to the closest aspect ratio."
    ),
    max_frames: int = typer.Option(None, help="Frames per sample, 4k+1 [default: 49]."),
    frame_bucket: list[int] = typer.Option(
        None, help="A frame count (4k+1) bucket, repeatable, instead of --max-frames; clips take the longest that fits."
    ),
    min_frames: int = typer.Option(None, help="Skip clips shorter than this after sampling [default: 5]."),
    fps: float = typer.Option(None, help="Sample frames at this rate, from each clip's real rate [default: 8]."),
    skip_frames_start: int = typer.Option(None, help="Source frames to drop at the start [default: 0]."),
    skip_frames_end: int = typer.Option(None, help="Source frames to drop at the end [default: 0]."),
    resize: str = typer.Option(None, help="crop (cover, centre crop) or stretch [default: crop]."),
    windows: int = typer.Option(None, help="Up to this many evenly spaced windows from a long clip [default: 1]."),
    max_upscale: float = typer.Option(None, help="Skip clips that need more enlarging than this [default: 4]."),
    id_token: str = typer.Option(None, help="Prepended to every caption with a space."),
    caption_column: str = typer.Option(
        None, help="Caption file (seed layout) or column (.csv/.jsonl) [default: prompts.txt / caption]."
    ),
    video_column: str = typer.Option(
        None, help="Video list file (seed layout) or column (.csv/.jsonl) [default: videos.txt / video]."
    ),
    dtype: str = typer.Option(None, help="bf16, fp16 or fp32 for the VAE and T5 [default: bf16]."),
    device: str = typer.Option(None, help="cuda, cuda:1, cpu [default: cuda if available, one GPU per rank]."),
    workers: int = typer.Option(None, help="Video decoding processes per rank [default: 2]."),
    vae_batch: int = typer.Option(None, help="Clips of one shape per VAE call [default: 1]."),
    vae_tiling: bool = typer.Option(None, "--vae-tiling/--no-vae-tiling", help="Encode in tiles (less memory)."),
    vae_slicing: bool = typer.Option(None, "--vae-slicing/--no-vae-slicing", help="Encode a batch one clip at a time."),
    shard_max_mb: int = typer.Option(None, help="Shard size limit in MiB [default: 512]."),
    validation_prompt: list[str] = typer.Option(
        None, help="Store this prompt's embedding for validation during training (repeatable)."
    ),
    repair: bool = typer.Option(
        None, "--repair", help="Also check every listed shard's sha256 and re-encode damaged ones' samples."
    ),
    allow_outside_paths: bool = typer.Option(
        None, "--allow-outside-paths", help="Let a metadata or videos.txt file name videos outside its folder."
    ),
    config: Path = typer.Option(None, help="TOML file with any of these settings (flags win)."),
) -> None:
    """Encode videos and captions once into a reusable cache of latent moments and prompt embeddings."""
    from cogvx.preprocess.run import PreprocessConfig, run

    flags = _given(locals(), "config", "PreprocessConfig", "run")
    # Repeatable flags arrive as lists (empty when not given) and map to the config's plural fields.
    for flag, name in (("validation_prompt", "validation_prompts"), ("resolution", "resolutions"),
                       ("frame_bucket", "frame_buckets")):  # fmt: skip
        values = flags.pop(flag, None)
        flags[name] = tuple(values) if values else None
    _guard(lambda: run(configfile.build(PreprocessConfig, config, **flags), show_progress=True))


@app.command()
def train(
    shards: Path = typer.Option(None, help="Cache folder written by `cogvx preprocess`."),
    output: Path = typer.Option(None, help="Run folder [default: runs/default]."),
    model: str = typer.Option(None, help="Base model [default: the one recorded in the cache]."),
    max_steps: int = typer.Option(None, help="Optimizer steps [default: 1000]."),
    batch_size: int = typer.Option(None, help="Samples per batch and process [default: 1]."),
    gradient_accumulation: int = typer.Option(None, help="Batches per optimizer step [default: 1]."),
    rank: int = typer.Option(None, help="LoRA rank [default: 128]."),
    alpha: float = typer.Option(None, help="LoRA alpha [default: 128]."),
    targets: str = typer.Option(None, help="Comma-separated modules [default: to_q,to_k,to_v,to_out.0]."),
    lora_dropout: float = typer.Option(None, help="[default: 0]"),
    optimizer: str = typer.Option(None, help="adamw, adam, prodigy, adamw8bit [default: adamw]."),
    learning_rate: float = typer.Option(None, help="[default: 1e-4]"),
    scale_lr: bool = typer.Option(None, "--scale-lr/--no-scale-lr", help="Multiply LR by the total batch size."),
    lr_scheduler: str = typer.Option(None, help="constant, constant_with_warmup, linear, cosine, ... [constant]."),
    lr_warmup_steps: int = typer.Option(None, help="[default: 0]"),
    max_grad_norm: float = typer.Option(None, help="[default: 1.0]"),
    mixed_precision: str = typer.Option(None, help="bf16, fp16 or no [default: bf16]."),
    checkpointing: str = typer.Option(
        None, help="full, selective (faster, more memory), offload (least memory) or none [default: full]."
    ),
    compile: bool = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the blocks [default: on with a GPU, off on a CPU]."
    ),
    fp8_base: bool = typer.Option(
        None, "--fp8-base/--no-fp8-base", help="Store frozen base weights in float8 [default: off]."
    ),
    seed: int = typer.Option(None, help="Seed for LoRA init, data order and noise [default: 0]."),
    workers: int = typer.Option(None, help="DataLoader worker processes [default: 2]."),
    validation_every: int = typer.Option(
        None, help="Steps between validation samples of the cache's validation prompts, 0 for none [default: 0]."
    ),
    validation_steps: int = typer.Option(None, help="Sampler steps for validation [default: 50]."),
    validation_guidance: float = typer.Option(None, help="Classifier-free guidance for validation [default: 6]."),
    validation_frames: int = typer.Option(None, help="Validation video frames, 4k+1 [default: the first bucket's]."),
    validation_height: int = typer.Option(None, help="Validation height in pixels [default: the first bucket's]."),
    validation_width: int = typer.Option(None, help="Validation width in pixels [default: the first bucket's]."),
    checkpoint_every: int = typer.Option(None, help="Steps between checkpoints, 0 for none [default: 500]."),
    keep_checkpoints: int = typer.Option(None, help="Checkpoints to keep [default: 3]."),
    resume: str = typer.Option(None, help="auto (newest checkpoint in --output) or a checkpoint folder."),
    report_to: str = typer.Option(None, help="none, tensorboard or wandb [default: none]."),
    config: Path = typer.Option(None, help="TOML file with any of these settings (flags win)."),
) -> None:
    """Train a LoRA on a cache. Never loads the VAE or the text encoder."""
    from cogvx.train.config import TrainConfig
    from cogvx.train.loop import run

    flags = _given(locals(), "config", "TrainConfig", "run")
    _guard(lambda: run(configfile.build(TrainConfig, config, **flags), show_progress=True))


@shards_app.command("verify")
def shards_verify(
    folder: Path = typer.Argument(..., help="Cache folder."),
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
            raise ValueError(report.advice())
        console.print(f"[green]ok[/green] {report.shards} shards, {report.samples} samples verified.")

    _guard(check)


@shards_app.command("rebuild-manifest")
def shards_rebuild_manifest(folder: Path = typer.Argument(..., help="Cache folder without manifest.json.")) -> None:
    """Re-create a lost manifest.json from the shards' own headers and metadata (every shard is checked)."""
    from cogvx.shards.tools import rebuild_manifest

    def rebuild():
        result = rebuild_manifest(folder)
        m = result.manifest
        for label in result.dropped_extras:
            console.print(f"[yellow]not listed[/yellow] side file {label!r}: missing or changed", soft_wrap=True)
        console.print(
            f"[green]rebuilt[/green] {folder / 'manifest.json'}: {len(m.shards)} shards, {m.sample_count} samples "
            f"({m.excluded_count} replaced).",
            soft_wrap=True,
        )

    _guard(rebuild)


@shards_app.command("inspect")
def shards_inspect(
    folder: Path = typer.Argument(..., help="Cache folder."),
    contact_sheet: Path = typer.Option(None, help="Also write a PNG of the samples' frame strips here."),
    max_strips: int = typer.Option(64, help="Samples on the contact sheet."),
) -> None:
    """Summarise a cache: samples, buckets, size, model and parameters."""
    from rich.table import Table

    from cogvx.shards.tools import InspectConfig, inspect

    def show():
        summary = inspect(InspectConfig(folder, contact_sheet, max_strips))
        table = Table(title=f"cache {folder}", show_header=False)
        for name, value in summary.rows():
            table.add_row(name, value)
        Console().print(table)

    _guard(show)


@app.command()
def sample(
    prompt: list[str] = typer.Option(None, help="Text to render; repeat for several (one mp4 each)."),
    lora: Path = typer.Option(None, help="Run folder written by `cogvx train` (or its .safetensors file)."),
    output: Path = typer.Option(None, help="mp4 file; NAME-KK.mp4 for several prompts [default: samples/lora.mp4]."),
    model: str = typer.Option(None, help="Base model [default: the one recorded in the LoRA's run folder]."),
    no_lora: bool = typer.Option(None, "--no-lora", help="Render the base model alone, same seed (to compare)."),
    lora_scale: float = typer.Option(None, help="Multiplies the LoRA's trained scale; 0 = base model [default: 1]."),
    steps: int = typer.Option(None, help="Denoising steps [default: 50]."),
    guidance: float = typer.Option(None, help="Classifier-free guidance scale [default: 6]."),
    dynamic_cfg: bool = typer.Option(None, "--dynamic-cfg", help="Ramp the guidance over the steps (5b-style)."),
    negative_prompt: str = typer.Option(None, help="[default: none]"),
    seed: int = typer.Option(None, help="Noise seed, the same for every prompt [default: 0]."),
    frames: int = typer.Option(None, help="Frames, 4k+1 [default: 49]."),
    height: int = typer.Option(None, help="Pixels [default: the model's native size, 480 for 2b/5b]."),
    width: int = typer.Option(None, help="Pixels [default: the model's native size, 720 for 2b/5b]."),
    fps: int = typer.Option(None, help="Frame rate written into the mp4 [default: 8]."),
    dtype: str = typer.Option(None, help="bf16, fp16 or fp32 [default: bf16 on a GPU, fp32 on a CPU]."),
    device: str = typer.Option(None, help="cuda, cuda:1, cpu [default: cuda if available]."),
    cpu_offload: bool = typer.Option(None, "--cpu-offload", help="Keep idle components in CPU memory (GPU only)."),
    vae_tiling: bool = typer.Option(None, "--vae-tiling", help="Decode in tiles: less GPU memory."),
    vae_slicing: bool = typer.Option(None, "--vae-slicing", help="Decode one video at a time: less GPU memory."),
    config: Path = typer.Option(None, help="TOML file with any of these settings (flags win)."),
) -> None:
    """Generate videos with a trained LoRA (or the base model) and a PNG contact sheet."""
    from cogvx.pipeline.generate import SampleConfig, run_sample

    flags = _given(locals(), "config", "prompt", "SampleConfig", "run_sample")
    flags["prompts"] = tuple(prompt) if prompt else None

    def go():
        result = run_sample(configfile.build(SampleConfig, config, **flags))
        for path in result.videos:
            console.print(f"[green]wrote[/green] {path}")
        console.print(f"[green]wrote[/green] {result.sheet} (contact sheet)")

    _guard(go)


@app.command()
def render(
    run: Path = typer.Argument(..., help="Run folder with validation/step-NNNNNN/sample-KK.safetensors."),
    model: str = typer.Option(None, help="Model whose VAE decodes [default: the run's model]."),
    fps: int = typer.Option(None, help="Frame rate written into the mp4 [default: 8]."),
    dtype: str = typer.Option(None, help="bf16, fp16 or fp32 [default: bf16 on a GPU, fp32 on a CPU]."),
    device: str = typer.Option(None, help="cuda, cuda:1, cpu [default: cuda if available]."),
    vae_tiling: bool = typer.Option(None, "--vae-tiling", help="Decode in tiles: less GPU memory."),
    vae_slicing: bool = typer.Option(None, "--vae-slicing", help="Decode one video at a time: less GPU memory."),
    force: bool = typer.Option(None, "--force", help="Render steps again that already have videos."),
) -> None:
    """Decode the validation latents saved by training into mp4s and contact sheets (VAE only)."""
    from cogvx.pipeline.generate import RenderConfig, run_render

    flags = _given(locals(), "RenderConfig", "run_render")

    def go():
        result = run_render(RenderConfig(**flags), show_progress=True)
        for step in result.rendered:
            console.print(f"[green]rendered[/green] step {step.step}: {len(step.samples)} video(s) in {step.folder}")
        if result.skipped:
            console.print(f"skipped {len(result.skipped)} step(s) already rendered (--force renders them again)")

    _guard(go)


@app.command()
def report(
    run: Path = typer.Argument(..., help="Run folder written by `cogvx train`."),
    output: Path = typer.Option(None, help="HTML file [default: RUN/report.html]."),
    render: bool = typer.Option(None, "--render/--no-render", help="Decode validation videos not yet rendered."),
    model: str = typer.Option(None, help="Model whose VAE renders [default: the run's model]."),
) -> None:
    """Write a self-contained HTML page: config, data, training curves, validation videos (prompts x steps)."""
    from cogvx.report import ReportConfig
    from cogvx.report import run as write_report

    flags = _given(locals(), "ReportConfig", "write_report")

    def go():
        result = write_report(ReportConfig(**flags))
        for note in result.notes:
            console.print(f"[yellow]note:[/yellow] {note}")
        console.print(f"[green]wrote[/green] {result.path}")

    _guard(go)


def _given(values: dict, *drop: str) -> dict:
    """The options the user gave (typer leaves the others None), without ``drop``: a config's fields."""
    return {k: v for k, v in values.items() if k not in drop and v is not None}


def _guard(action) -> None:
    """Run a command; user errors print one clear line and exit 1 instead of a traceback."""
    from cogvx.errors import CogvxError
    from cogvx.train.loop import TrainingDiverged

    try:
        action()
    except (*USER_ERRORS, CogvxError, TrainingDiverged) as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        raise typer.Exit(1) from err


def main() -> None:
    app()
