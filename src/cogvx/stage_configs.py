"""The configs of the small commands (sample, render, report, compare, shards inspect/verify), declared once.

Each field is a TOML key (where the command takes ``--config``) and a CLI flag. This module imports no
tensor library: the CLI's help reads it; each stage's module re-exports its config.
"""

from __future__ import annotations

from pathlib import Path

from cogvx import runs
from cogvx.config import SEED, SHEET_WIDTH, VIDEO_FPS, check_domains, integers, numbers, setting, stage
from cogvx.errors import ConfigError
from cogvx.locations import as_location, display
from cogvx.names import DTYPE_NAMES, NATIVE_FPS, SHEET_COLUMNS

LABELS = "ABCDEFGH"  # compare: one letter per run on the page; also the most runs one page compares
CACHE_LOCATION = "Cache folder or URL (s3://bucket/prefix, https://host/path/)."
DTYPE_RULE = "bf16 on a GPU, fp32 on a CPU"


def _check_dtype(name: str | None) -> None:
    if name is not None and name not in DTYPE_NAMES:
        raise ConfigError(f"Unknown dtype {name!r}: use one of {', '.join(DTYPE_NAMES)}.")


@stage
class SampleConfig:
    prompts: tuple[str, ...] = setting((), "Text to render; repeat for several (one mp4 each).", name="prompt")
    image: Path | None = setting(
        None, "First frame for an image-to-video model (resized if its aspect ratio is within 1%)."
    )
    lora: Path | None = setting(None, "Run folder written by `cogvx train` (or its .safetensors file).")
    output: Path | None = setting(
        None,
        "mp4 file; NAME-KK.mp4 for several prompts.",
        rule="samples/lora-NNN.mp4, the next free number: nothing is replaced",
    )  # base-NNN.mp4 with --no-lora
    overwrite: bool = setting(False, "Replace the files of an --output that exists.", decls=("--overwrite",))
    model: str | None = setting(None, "Base model.", rule="the one recorded in the LoRA's run folder")
    no_lora: bool = setting(False, "Render the base model alone, same seed (to compare).", decls=("--no-lora",))
    lora_scale: float = setting(1.0, "Multiplies the LoRA's trained scale; 0 = base model.", domain=numbers(-100, 100))
    steps: int = setting(
        50, "Denoising steps.", domain=integers(1, 1000, why="the sampler's schedule has 1000 timesteps")
    )
    guidance: float = setting(6.0, "Classifier-free guidance scale.", domain=numbers(0, 100))
    dynamic_cfg: bool = setting(False, "Ramp the guidance over the steps (5b-style).", decls=("--dynamic-cfg",))
    negative_prompt: str = setting("", "Text to steer away from.", rule="none")
    seed: int = setting(0, "Noise seed, the same for every prompt.", domain=SEED)
    frames: int = setting(49, "Frames, 4k+1.", domain=integers(1, 1025))
    height: int | None = setting(
        None, "Pixels.", rule="the model's native size, 480 for 2b/5b", domain=integers(8, 8192)
    )
    width: int | None = setting(
        None, "Pixels.", rule="the model's native size, 720 for 2b/5b", domain=integers(8, 8192)
    )
    fps: int = setting(NATIVE_FPS, "Frame rate written into the mp4.", domain=VIDEO_FPS)
    dtype: str | None = setting(None, "bf16, fp16 or fp32.", rule=DTYPE_RULE)
    device: str | None = setting(None, "cuda, cuda:1, cpu.", rule="cuda if available")
    cpu_offload: bool = setting(False, "Keep idle components in CPU memory (GPU only).", decls=("--cpu-offload",))
    vae_tiling: bool = setting(False, "Decode in tiles: less GPU memory.", decls=("--vae-tiling",))
    vae_slicing: bool = setting(False, "Decode one video at a time: less GPU memory.", decls=("--vae-slicing",))
    sheet_columns: int = setting(SHEET_COLUMNS, domain=SHEET_WIDTH, file_only=True)

    def __post_init__(self):
        check_domains(self)
        if isinstance(self.prompts, str):
            self.prompts = (self.prompts,)
        self.prompts = tuple(self.prompts or ())
        self.lora = Path(self.lora) if self.lora is not None else None
        self.image = Path(self.image) if self.image is not None else None
        self.output = Path(self.output) if self.output is not None else None
        checks = [
            (bool(self.prompts), 'give at least one --prompt "..." (or prompts = ["..."] in a --config file)'),
            (all(p.strip() for p in self.prompts), "a --prompt is empty"),
            (self.lora is not None or (self.no_lora and self.model), "pass --lora RUN_FOLDER (or --no-lora --model M)"),
            (not (self.no_lora and self.lora_scale != 1.0), "--lora-scale has no effect with --no-lora; drop one"),
            (
                self.output is None or self.output.suffix.lower() == ".mp4",
                f"--output must name an .mp4 file (got {self.output})",
            ),
            ((self.frames - 1) % 4 == 0, f"--frames must be 4k+1: 9, 13, 49 (got {self.frames})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        _check_dtype(self.dtype)

    def video_paths(self) -> list[Path]:
        """One mp4 per prompt: ``--output`` itself for one prompt, ``NAME-KK.mp4`` for several."""
        if len(self.prompts) == 1:
            return [self.output]
        return [self.output.with_name(f"{self.output.stem}-{k:02d}.mp4") for k in range(len(self.prompts))]

    @property
    def sheet_path(self) -> Path:
        return self.output.with_suffix(".png")


@stage
class RenderConfig:
    run: Path = setting(help="Run folder with validation latents saved by `cogvx train`.", argument=True)
    model: str | None = setting(None, "Model whose VAE decodes.", rule="the run's model")
    fps: int = setting(NATIVE_FPS, "Frame rate written into the mp4.", domain=VIDEO_FPS)
    dtype: str | None = setting(None, "bf16, fp16 or fp32.", rule=DTYPE_RULE)
    device: str | None = setting(None, "cuda, cuda:1, cpu.", rule="cuda if available")
    vae_tiling: bool = setting(False, "Decode in tiles: less GPU memory.", decls=("--vae-tiling",))
    vae_slicing: bool = setting(False, "Decode one video at a time: less GPU memory.", decls=("--vae-slicing",))
    force: bool = setting(False, "Render steps again that already have videos.", decls=("--force",))
    sheet_columns: int = setting(SHEET_COLUMNS, domain=SHEET_WIDTH, file_only=True)

    def __post_init__(self):
        check_domains(self)
        self.run = Path(self.run)
        _check_dtype(self.dtype)


@stage
class ReportConfig:
    run: Path = setting(help="Run folder written by `cogvx train`.", argument=True)
    output: Path | None = setting(None, "HTML file.", rule=f"RUN/{runs.REPORT}")
    render: bool = setting(True, "Decode validation videos not yet rendered.", decls=("--render/--no-render",))
    model: str | None = setting(None, "Model whose VAE renders.", rule="the run's model")  # for rendering

    def __post_init__(self):
        self.run = Path(self.run)
        self.output = Path(self.output) if self.output is not None else runs.report(self.run)
        if self.output.suffix.lower() not in (".html", ".htm"):
            raise ConfigError(f"--output must name an .html file (got {self.output})")


@stage
class CompareConfig:
    runs: tuple[Path | str, ...] = setting(
        help="Run folders of one cache: local folders or URLs (s3://bucket/run, ...).",
        name="run_folders",
        argument=True,
        metavar="RUN",
    )  # two or more
    output: Path = setting(Path("compare.html"), "HTML file.")
    overwrite: bool = setting(False, "Replace an existing output file.", decls=("--overwrite/--no-overwrite",))

    def __post_init__(self):
        given = (self.runs,) if isinstance(self.runs, (str, Path)) else tuple(self.runs)
        self.runs = tuple(as_location(r) for r in given)
        self.output = Path(self.output)
        if len(self.runs) < 2:
            raise ConfigError(
                f"cogvx compare needs two or more run folders (got {len(self.runs)}); `cogvx report RUN` shows one."
            )
        if len(self.runs) > len(LABELS):
            raise ConfigError(f"cogvx compare sets at most {len(LABELS)} runs side by side (got {len(self.runs)}).")
        seen: set[str] = set()
        for run in self.runs:
            key = display(run).rstrip("/") if isinstance(run, str) else str(run.resolve())
            if key in seen:
                raise ConfigError(f"Run {run} is given twice; name each run once.")
            seen.add(key)
        if self.output.suffix.lower() not in (".html", ".htm"):
            raise ConfigError(f"--output must name an .html file (got {self.output})")


@stage
class InspectConfig:
    folder: Path | str = setting(help=CACHE_LOCATION, argument=True)  # read-only
    contact_sheet: Path | None = setting(None, "Also write a PNG of the samples' frame strips here.")
    max_strips: int = setting(64, "Samples on the contact sheet.", domain=integers(1, 4096))

    def __post_init__(self):
        check_domains(self)
        self.folder = as_location(self.folder)
        if self.contact_sheet is not None:
            self.contact_sheet = Path(self.contact_sheet)
            if self.contact_sheet.suffix.lower() != ".png":
                raise ConfigError(f"--contact-sheet {self.contact_sheet} must end in .png.")


@stage
class RebuildConfig:
    folder: Path | str = setting(help="Cache folder whose manifest is lost.", argument=True)

    def __post_init__(self):
        self.folder = as_location(self.folder)


@stage
class VerifyConfig:
    folder: Path | str = setting(help=CACHE_LOCATION, argument=True)  # read-only
    deep: bool = setting(
        True, "Also parse every sample (default) or only hash shards.", decls=("--deep/--quick",)
    )  # also parse every sample's tensors and metadata

    def __post_init__(self):
        self.folder = as_location(self.folder)
