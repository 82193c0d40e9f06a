"""The ``cogvx`` command: each subcommand builds its stage's config from the flags given and calls its ``run``.

The flags are generated from the stage's config dataclass (``cogvx.cligen``): each option is spelled once,
in the config, with its help and default. The stages (and torch) are imported inside each command, so
``cogvx --help`` starts at once. A ``CogvxError`` prints as one line; anything else keeps its traceback.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console

from cogvx import __version__, interrupts, runs
from cogvx.cligen import command
from cogvx.cligen import help_text as _help  # noqa: F401 (tests call cli._help and cli._shown)
from cogvx.cligen import shown as _shown  # noqa: F401
from cogvx.errors import CogvxError
from cogvx.names import ALLOC_CONF
from cogvx.preprocess.config import PreprocessConfig
from cogvx.stage_configs import (
    CompareConfig,
    InspectConfig,
    RebuildConfig,
    RenderConfig,
    ReportConfig,
    SampleConfig,
    VerifyConfig,
)
from cogvx.train.config import TrainConfig

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


@command(app, PreprocessConfig)
def preprocess(build: Callable[[], PreprocessConfig]) -> None:
    """Encode videos and captions once into a reusable cache of latent moments and prompt embeddings."""
    from cogvx.preprocess.run import run

    def go():  # the config is built inside _guard: a bad setting is one line too
        cfg = build()
        built.append(cfg)
        run(cfg, show_progress=True)

    built: list[PreprocessConfig] = []  # the config, once built: a Ctrl-C names its cache
    _guard(go, lambda err: _preprocess_interrupted(err, built[0].output if built else None))


@command(app, TrainConfig)
def train(build: Callable[[], TrainConfig]) -> None:
    """Train a LoRA on a cache. Never loads the VAE or the text encoder."""
    from cogvx.train.loop import run

    def go():  # the config is built inside _guard: a bad setting is one line too
        cfg = build()
        built.append(cfg)
        result = run(cfg, show_progress=True)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun/accelerate, the main process tells
            eval_line = result.eval.line() if result.eval else None
            _say_where_the_run_is(result.output, result.steps, result.image_to_video, eval_line)
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


@command(shards_app, VerifyConfig, name="verify", config_file=False)
def shards_verify(build: Callable[[], VerifyConfig]) -> None:
    """Check every shard and sample against the manifest; say exactly what to run to repair a cache."""
    from cogvx.shards.tools import verify_cache

    def check():
        report = verify_cache(build())
        for problem in report.problems:
            console.print(f"[red]bad[/red] {problem}", soft_wrap=True)
        for name in report.unlisted:
            console.print(f"[yellow]unlisted[/yellow] {name} (not in the manifest, never read)", soft_wrap=True)
        if not report.ok:
            raise CogvxError(report.advice())
        console.print(f"[green]ok[/green] {report.shards} shards, {report.samples} samples verified.")

    _guard(check)


@command(shards_app, RebuildConfig, name="rebuild-manifest", config_file=False)
def shards_rebuild_manifest(build: Callable[[], RebuildConfig]) -> None:
    """Re-create a lost manifest from the shards' own headers and metadata (every shard is checked)."""
    from cogvx.shards import paths
    from cogvx.shards.tools import rebuild_manifest

    def rebuild():
        folder = build().folder
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


@command(shards_app, InspectConfig, name="inspect", config_file=False)
def shards_inspect(build: Callable[[], InspectConfig]) -> None:
    """Summarise a cache: samples, buckets, size, model and parameters."""
    from rich.table import Table

    from cogvx.shards.tools import inspect

    def show():
        summary = inspect(build())
        table = Table(title=f"cache {summary.folder}", show_header=False)
        for name, value in summary.rows():
            table.add_row(name, value)
        Console().print(table)

    _guard(show)


@command(app, SampleConfig)
def sample(build: Callable[[], SampleConfig]) -> None:
    """Generate videos with a trained LoRA (or the base model) and a PNG contact sheet."""
    from cogvx.sample import run_sample

    def go():
        result = run_sample(build(), show_progress=True)
        for path in result.videos:
            console.print(f"[green]wrote[/green] {path}")
        console.print(f"[green]wrote[/green] {result.sheet} (contact sheet)")

    _guard(go)


@command(app, RenderConfig, config_file=False)
def render(build: Callable[[], RenderConfig]) -> None:
    """Decode the validation latents saved by training into mp4s and contact sheets (VAE only)."""
    from cogvx.render import run_render

    def go():
        result = run_render(build(), show_progress=True)
        for step in result.rendered:
            console.print(f"[green]rendered[/green] step {step.step}: {len(step.samples)} video(s) in {step.folder}")
        if result.skipped:
            console.print(f"skipped {len(result.skipped)} step(s) already rendered (--force renders them again)")

    _guard(go)


@command(app, ReportConfig, config_file=False)
def report(build: Callable[[], ReportConfig]) -> None:
    """Write a self-contained HTML page: config, data, training curves, validation videos (prompts x steps)."""
    from cogvx.report import run as write_report

    def go():
        result = write_report(build())
        for note in result.notes:
            console.print(f"[yellow]note:[/yellow] {note}")
        console.print(f"[green]wrote[/green] {result.path}")

    _guard(go)


@command(app, CompareConfig, config_file=False)
def compare(build: Callable[[], CompareConfig]) -> None:
    """Runs of one cache side by side on one HTML page: differing settings, held-out and training curves,
    best steps, validation videos."""
    from cogvx.compare import run as write_compare

    def go():
        result = write_compare(build())
        for note in result.notes:
            console.print(f"[yellow]note:[/yellow] {note}")
        console.print(f"[green]wrote[/green] {result.path}")

    _guard(go)


def _guard(action, on_interrupt: Callable[[KeyboardInterrupt], list[tuple[str, str]]] | None = None) -> None:
    """Run a command: a user error (CogvxError) prints one line and exits 1; a Ctrl-C says what was kept and
    how to go on (``on_interrupt``'s rows) and exits 130, as typer does; anything else keeps its traceback."""
    try:
        with interrupts.catching():
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


def _command_again(resuming: str | None = None) -> str:
    """This command as it was given, shell-quoted; with ``resuming``, ``--resume RESUMING`` replaces any --resume."""
    args = sys.argv[1:]
    if resuming is not None:
        kept, value_next = [], False
        for arg in args:
            if value_next or arg == "--resume" or arg.startswith("--resume="):
                value_next = arg == "--resume"
                continue
            kept.append(arg)
        args = [*kept, "--resume", resuming]
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
            ("continue", _command_again(resuming="auto")),
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
    # pipeline.memory.use_expandable_segments, without importing torch (--help must not): before anything
    # touches CUDA, let its allocator grow segments, unless the user chose.
    os.environ.setdefault(*ALLOC_CONF)
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
