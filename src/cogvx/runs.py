"""The run folder ``cogvx train`` writes: the one place that names its parts.

::

    RUN/
      config.json, config.toml          the resolved settings (model included)
      metrics.jsonl                     one JSON line per optimizer step
      pytorch_lora_weights.safetensors  the LoRA, in the format diffusers loads
      README.md, loss.png, report.html  model card, loss curve, HTML report
      checkpoint-NNNNNN/                everything needed to resume exactly (newest few kept)
      validation/step-NNNNNN/sample-KK.safetensors (.mp4), sheet.png
      logs/                             tensorboard / wandb
      .lock                             held by the one `cogvx train` writing the folder

Train, sample, render and report build paths with these functions and read the folder through them;
no other module writes these names.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, BinaryIO

from cogvx.errors import RunError
from cogvx.files import save_safetensors

CONFIG_JSON = "config.json"
CONFIG_TOML = "config.toml"
# config.json only: what `--checkpointing auto` predicted for the mode it chose (a prediction, not a setting)
CHECKPOINTING_PLAN = "checkpointing_plan"
# config.json only: the attention kernel that ran (--attention, FlashAttention-3's state, auto's choice per shape)
ATTENTION_KERNELS = "attention_kernels"
# config.json only: the cache's identity (sha256 of its manifest), and the eval score's set and its sample count
CACHE_ID = "cache_id"
# metrics.jsonl, at a validation step: the main process's seconds sampling and writing its prompts
VALIDATION_SECONDS = "validation_seconds"
EVAL_SET = "eval_set"
# metrics.jsonl, on the first step a process trains: seconds from the process's start (interpreter and imports
# counted) to each phase of its launch, in the order they were reached
LAUNCH = "launch"
LAUNCH_IMPORTS = "imports"  # the training code and its libraries imported
LAUNCH_ACCELERATOR = "accelerator"  # accelerate's state built (the device initialised), the run folder held
LAUNCH_SETUP = "setup"  # the cache's manifest and the model's configs read, every check passed
LAUNCH_LOADER = "loader_started"  # the data loader's workers started, the first batches prefetching
LAUNCH_TRANSFORMER = "transformer_loaded"  # the transformer's weights read (onto the device, unless swap)
LAUNCH_LORA = "lora_added"
LAUNCH_LEVERS = "levers_installed"  # compile wrapper, checkpointing, float8, swap; the model on the device
LAUNCH_OPTIMIZER = "optimizer_built"  # and the checkpoint restored, on resume
LAUNCH_FIRST_BATCH = "first_batch"  # the first step's batches in hand
LAUNCH_FIRST_FORWARD = "first_forward"  # the first forward pass computed
LAUNCH_FIRST_STEP = "first_step"  # the first optimizer step computed
LAUNCH_PHASES = (
    LAUNCH_IMPORTS,
    LAUNCH_ACCELERATOR,
    LAUNCH_SETUP,
    LAUNCH_LOADER,
    LAUNCH_TRANSFORMER,
    LAUNCH_LORA,
    LAUNCH_LEVERS,
    LAUNCH_OPTIMIZER,
    LAUNCH_FIRST_BATCH,
    LAUNCH_FIRST_FORWARD,
    LAUNCH_FIRST_STEP,
)
EVAL_SAMPLES = "eval_samples"
METRICS = "metrics.jsonl"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
MODEL_CARD = "README.md"
LOSS_CURVE = "loss.png"
REPORT = "report.html"
LOGS = "logs"
LOCK = ".lock"
VALIDATION = "validation"
SHEET = "sheet.png"  # a contact sheet of one validation step's videos

_CHECKPOINT = re.compile(r"^checkpoint-(\d{6,})$")
CHECKPOINT_STATE = "state.json"  # written last: a checkpoint without it is incomplete
CHECKPOINT_LORA = "lora.safetensors"
_STEP = re.compile(r"^step-(\d+)$")
_SAMPLE = re.compile(r"^sample-(\d+)\.safetensors$")
VALIDATION_LAYOUT = f"{VALIDATION}/step-NNNNNN/sample-KK.safetensors"  # for messages that describe the layout


def config_json(run: Path) -> Path:
    return Path(run) / CONFIG_JSON


def config_toml(run: Path) -> Path:
    return Path(run) / CONFIG_TOML


def metrics(run: Path) -> Path:
    return Path(run) / METRICS


def lora_weights(run: Path) -> Path:
    return Path(run) / LORA_WEIGHTS


def model_card(run: Path) -> Path:
    return Path(run) / MODEL_CARD


def loss_curve(run: Path) -> Path:
    return Path(run) / LOSS_CURVE


def report(run: Path) -> Path:
    return Path(run) / REPORT


def logs(run: Path) -> Path:
    return Path(run) / LOGS


def lock(run: Path) -> Path:
    return Path(run) / LOCK


# --- checkpoints ---


def checkpoint(run: Path, step: int) -> Path:
    return Path(run) / f"checkpoint-{step:06d}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-NNNNNN`` folder name, None for any other name."""
    match = _CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_staging(run: Path, step: int, owner: str) -> Path:
    """The hidden folder a checkpoint is written into before it is renamed into place."""
    return Path(run) / f".checkpoint-{step:06d}.{owner}.partial"


def checkpoint_discarded(path: Path) -> Path:
    """Where an old checkpoint goes while it is deleted, so a half-deleted one never looks complete."""
    return Path(path).parent / f".{Path(path).name}.deleting"


def stale_checkpoint_files(run: Path) -> list[Path]:
    """What killed runs left half-written or half-deleted (never a complete checkpoint)."""
    return sorted(Path(run).glob(".checkpoint-*")) if Path(run).is_dir() else []


def checkpoint_state(folder: Path) -> Path:
    return Path(folder) / CHECKPOINT_STATE


def checkpoint_lora(folder: Path) -> Path:
    return Path(folder) / CHECKPOINT_LORA


def checkpoint_component(folder: Path, name: str) -> Path:
    """A ``torch.save``-d component state (optimizer, lr_schedule, scaler) of a checkpoint."""
    return Path(folder) / f"{name}.pt"


def checkpoint_components(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(Path(folder).glob("*.pt"))}


def run_parts(run: Path) -> list[str]:
    """The names in ``run`` that show a run was trained there (finished or not); [] for a fresh folder.

    Anything else (a stale ``.lock``, a user's own files) does not make the folder a run's.
    """
    if not Path(run).is_dir():
        return []
    names = {p.name for p in Path(run).iterdir()}
    made = [name for name in (CONFIG_JSON, CONFIG_TOML, METRICS, LORA_WEIGHTS) if name in names]
    return made + sorted(name for name in names if _CHECKPOINT.match(name))


def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints in ``run``, oldest first (an unfinished one has no state file)."""
    if not Path(run).is_dir():
        return []
    found = [p for p in Path(run).iterdir() if checkpoint_step(p) is not None and checkpoint_state(p).is_file()]
    return sorted(found, key=checkpoint_step)


# --- validation ---


def validation(run: Path) -> Path:
    return Path(run) / VALIDATION


def validation_step(run: Path, step: int) -> Path:
    return validation(run) / f"step-{step:06d}"


def validation_sample(step_folder: Path, index: int) -> Path:
    return Path(step_folder) / f"sample-{index:02d}.safetensors"


def sample_index(sample: Path) -> int:
    """KK of a ``sample-KK.safetensors`` (or ``.mp4``) path: the index of its validation prompt."""
    return int(Path(sample).stem.rsplit("-", 1)[-1])


def validation_video(sample: Path) -> Path:
    return Path(sample).with_suffix(".mp4")


def validation_sheet(step_folder: Path) -> Path:
    return Path(step_folder) / SHEET


def validation_steps(run: Path) -> list[tuple[int, Path, list[Path]]]:
    """Every ``validation/step-NNNNNN/`` with samples: (step, folder, sample-KK.safetensors in KK order)."""
    found = []
    root = validation(run)
    if root.is_dir():
        for folder in root.iterdir():
            match = _STEP.match(folder.name)
            if not (match and folder.is_dir()):
                continue
            samples = sorted(
                (p for p in folder.iterdir() if _SAMPLE.match(p.name)), key=lambda p: int(_SAMPLE.match(p.name)[1])
            )
            if samples:
                found.append((int(match.group(1)), folder, samples))
    return sorted(found, key=lambda item: item[0])


def write_validation_sample(
    path: Path, latents: Any, metadata: dict[str, Any], extra: dict[str, Any] | None = None
) -> Path:
    """Tensor ``latents`` (and ``extra`` tensors, e.g. an I2V sample's first frame ``image``) and metadata whose
    values are JSON strings, renamed into place when complete."""
    metadata = {k: json.dumps(v) for k, v in metadata.items()}
    tensors = {"latents": latents} | (extra or {})
    return save_safetensors(path, {k: t.detach().cpu().contiguous() for k, t in tensors.items()}, metadata)


def read_validation_sample(path: Path) -> tuple[Any, dict[str, str]]:
    """The ``latents`` tensor ``[1, F, C, H, W]`` and the metadata of a saved validation sample."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if "latents" not in f.keys():  # noqa: SIM118
                raise RunError(f"{path} holds no tensor named 'latents' (it has {list(f.keys())}).")
            return f.get_tensor("latents"), {k: _metadata_value(v) for k, v in (f.metadata() or {}).items()}
    except RunError:
        raise
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise RunError(f"{path} is not a readable safetensors file ({err}); delete it or re-run training.") from err


def _metadata_value(raw: str) -> str:
    """safetensors metadata are strings; training writes JSON-encoded values (``"\\"a prompt\\""``), read both."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    return value if isinstance(value, str) else json.dumps(value)


# --- readers and writers ---


def write_config(run: Path, resolved: dict[str, Any], toml: str) -> None:
    """The resolved settings, as JSON (for tools) and TOML (``cogvx train --config`` reads it back)."""
    _write_text(config_json(run), json.dumps(resolved, indent=1))
    _write_text(config_toml(run), toml)


def read_config(run: Path) -> dict[str, Any]:
    """A run's resolved settings from config.json; {} when it has none."""
    path = config_json(run)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not valid JSON ({err}); fix it, or pass --model explicitly.") from err
    if not isinstance(data, dict):
        raise RunError(f"{path} does not hold a JSON object of settings; fix it, or pass --model explicitly.")
    return data


def read_metrics_counted(run: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of metrics.jsonl, and how many lines were unreadable (cut short by a killed process)."""
    records, bad = [], 0
    path = metrics(run)
    if not path.is_file():
        return records, bad
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
        else:
            bad += 1
    return records, bad


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The readable records of metrics.jsonl."""
    return read_metrics_counted(run)[0]


def keep_metrics_until(run: Path, step: int) -> None:
    """On resume, keep one line per step up to the checkpoint: later steps will be trained again."""
    if metrics(run).is_file():
        kept = {r["step"]: r for r in read_metrics(run) if r.get("step", math.inf) <= step}
        _write_text(metrics(run), "".join(json.dumps(kept[s]) + "\n" for s in sorted(kept)))


def append_metrics(run: Path, record: dict[str, Any]) -> None:
    with open(metrics(run), "a") as f:
        f.write(json.dumps(record) + "\n")


def _write_text(path: Path, text: str) -> None:
    # Renamed into place but not fsynced: the settings and the metrics are rewritten by every (resumed) run,
    # and the checkpoints' own durable writes are what exact resume relies on (tests count those fsyncs).
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def final_loss(records: list[dict[str, Any]]) -> tuple[float, str] | None:
    """The one "final loss" cogvx reports (end of training, model card, report): the smoothed loss at the
    last step, with how it was smoothed; None before any finite loss."""
    from cogvx import media

    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    if not losses:
        return None
    return media.ema(losses)[-1], f"EMA {media.EMA_WEIGHT:g} of {len(losses)} step losses"


# --- reading a run folder through a listing (cogvx compare reads run folders on object stores too) ---

SAFETENSORS_HEADER_LIMIT = 100 << 20  # bytes: the largest header safetensors itself accepts


def validation_step_of(name: str) -> int | None:
    """The step of a ``step-NNNNNN`` folder name inside ``validation/``, None for any other name."""
    match = _STEP.match(name)
    return int(match.group(1)) if match else None


def validation_sample_of(name: str) -> int | None:
    """KK of a ``sample-KK.safetensors`` file name, None for any other name."""
    match = _SAMPLE.match(name)
    return int(match.group(1)) if match else None


def read_validation_metadata(f: BinaryIO, where: str) -> dict[str, str]:
    """A saved validation sample's metadata, from its safetensors header alone (the latents are not read)."""
    size = f.read(8)
    length = int.from_bytes(size, "little") if len(size) == 8 else -1
    header = f.read(length) if 0 < length <= SAFETENSORS_HEADER_LIMIT else b""
    try:
        data = json.loads(header) if len(header) == length else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise RunError(f"{where} is not a readable safetensors file (damaged header); delete it or re-run training.")
    return {k: _metadata_value(v) for k, v in (data.get("__metadata__") or {}).items()}


# --- the best LoRA (--keep-best) ---

BEST = "best"  # RUN/best/: pytorch_lora_weights.safetensors and score.json, of the lowest eval score so far
BEST_SCORE = "score.json"


def best(run: Path) -> Path:
    return Path(run) / BEST


def best_staging(run: Path, owner: str) -> Path:
    """The hidden folder ``best/`` is written into before it is renamed into place."""
    return Path(run) / f".{BEST}.{owner}.partial"


def best_score(folder: Path) -> Path:
    return Path(folder) / BEST_SCORE


def best_leftovers(run: Path) -> list[Path]:
    """What a killed run left half-written or half-deleted of ``best/`` (never ``best/`` itself)."""
    return sorted(Path(run).glob(f".{BEST}.*")) if Path(run).is_dir() else []
