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
    help="Fine-tune CogVideoX with LoRA from a latent cache.",
)
shards_app = typer.Typer(no_args_is_help=True, help="Look into a cache folder.")
app.add_typer(shards_app, name="shards")
console = Console(stderr=True)

USER_ERRORS = (ValueError, FileNotFoundError, ImportError)


@app.command()
def preprocess(
    data: Path = typer.Option(..., help="Folder of videos with .txt captions, or a root with prompts.txt/videos.txt."),
    output: Path = typer.Option(None, help="Cache folder to write [default: shards]."),
    model: str = typer.Option(None, help="Hub id, local diffusers folder, or tiny [default: THUDM/CogVideoX-2b]."),
    height: int = typer.Option(None, help="Frame height in pixels [default: the model's native size, 480 for 2b/5b]."),
    width: int = typer.Option(None, help="Frame width in pixels [default: the model's native size, 720 for 2b/5b]."),
    max_frames: int = typer.Option(None, help="Frames per sample, 4k+1 [default: 49]."),
    min_frames: int = typer.Option(None, help="Skip clips shorter than this after sampling [default: 5]."),
    fps: float = typer.Option(None, help="Sample frames at this rate, from each clip's real rate [default: 8]."),
    skip_frames_start: int = typer.Option(None, help="Source frames to drop at the start [default: 0]."),
    skip_frames_end: int = typer.Option(None, help="Source frames to drop at the end [default: 0]."),
    resize: str = typer.Option(None, help="crop (cover, centre crop) or stretch [default: crop]."),
    id_token: str = typer.Option(None, help="Prepended to every caption with a space."),
    caption_column: str = typer.Option(None, help="Caption file in the seed layout [default: prompts.txt]."),
    video_column: str = typer.Option(None, help="Video list file in the seed layout [default: videos.txt]."),
    dtype: str = typer.Option(None, help="bf16, fp16 or fp32 for the VAE and T5 [default: bf16]."),
    device: str = typer.Option(None, help="cuda, cuda:1, cpu [default: cuda if available]."),
    workers: int = typer.Option(None, help="Video decoding processes [default: 2]."),
    validation_prompt: list[str] = typer.Option(
        None, help="Store this prompt's embedding for validation during training (repeatable)."
    ),
    config: Path = typer.Option(None, help="TOML file with any of these settings (flags win)."),
) -> None:
    """Encode videos and captions once into a reusable cache of latent moments and prompt embeddings."""
    from cogvx.preprocess.run import PreprocessConfig, run

    flags = {k: v for k, v in locals().items() if k not in ("config", "PreprocessConfig", "run", "validation_prompt")}
    flags["validation_prompts"] = tuple(validation_prompt) if validation_prompt else None
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
    gradient_checkpointing: bool = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing", help="[default: on]"
    ),
    seed: int = typer.Option(None, help="Seed for LoRA init, data order and noise [default: 0]."),
    workers: int = typer.Option(None, help="DataLoader worker processes [default: 2]."),
    checkpoint_every: int = typer.Option(None, help="Steps between checkpoints, 0 for none [default: 500]."),
    keep_checkpoints: int = typer.Option(None, help="Checkpoints to keep [default: 3]."),
    resume: str = typer.Option(None, help="auto (newest checkpoint in --output) or a checkpoint folder."),
    report_to: str = typer.Option(None, help="none, tensorboard or wandb [default: none]."),
    config: Path = typer.Option(None, help="TOML file with any of these settings (flags win)."),
) -> None:
    """Train a LoRA on a cache. Never loads the VAE or the text encoder."""
    from cogvx.train.config import TrainConfig
    from cogvx.train.loop import run

    flags = {k: v for k, v in locals().items() if k not in ("config", "TrainConfig", "run")}
    _guard(lambda: run(configfile.build(TrainConfig, config, **flags), show_progress=True))


@shards_app.command("verify")
def shards_verify(folder: Path = typer.Argument(..., help="Cache folder.")) -> None:
    """Check every shard's size, sha256 and sample count against the manifest."""
    from cogvx.shards import Manifest, verify

    def check():
        manifest = Manifest.load(folder)
        problems = verify(folder, manifest.shards)
        for problem in problems:
            console.print(f"[red]bad[/red] {problem}")
        if problems:
            raise ValueError(f"{len(problems)} of {len(manifest.shards)} shards in {folder} failed verification.")
        console.print(f"[green]ok[/green] {len(manifest.shards)} shards, {manifest.sample_count} samples verified.")

    _guard(check)


@shards_app.command("inspect")
def shards_inspect(folder: Path = typer.Argument(..., help="Cache folder.")) -> None:
    """Summarise a cache: samples, buckets, size, model and parameters."""
    from rich.table import Table

    from cogvx.shards import Manifest

    def show():
        manifest = Manifest.load(folder)
        table = Table(title=f"cache {folder}", show_header=False)
        table.add_row("model", str(manifest.producer.get("model")))
        table.add_row("shards", str(len(manifest.shards)))
        table.add_row("samples", str(manifest.sample_count))
        table.add_row("size on disk", f"{manifest.total_bytes / 2**20:.1f} MiB")
        for bucket, count in manifest.bucket_counts().items():
            table.add_row(f"bucket {bucket}", str(count))
        for key, value in manifest.params.items():
            table.add_row(key, str(value))
        Console().print(table)

    _guard(show)


def _guard(action) -> None:
    """Run a command; user errors print one clear line and exit 1 instead of a traceback."""
    from cogvx.shards import CacheError
    from cogvx.train.loop import TrainingDiverged

    try:
        action()
    except (*USER_ERRORS, CacheError, TrainingDiverged) as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        raise typer.Exit(1) from err


def main() -> None:
    app()
