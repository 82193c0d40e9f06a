"""Checkpoints that resume a run exactly: ``checkpoint-NNNNNN/`` folders, written atomically.

A checkpoint holds the LoRA weights (safetensors), optimizer, LR-schedule and loss-scaler states
(``torch.save``, read back with ``weights_only=True``), and ``state.json``: step, batches consumed,
world size, data workers and the resolved config. Random numbers are derived from (seed, step), so
no generator state needs saving.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^checkpoint-(\d{6,})$")
LORA_FILE = "lora.safetensors"
STATE_FILE = "state.json"


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints in ``output``, oldest first (an unfinished one has no state.json)."""
    if not Path(output).is_dir():
        return []
    found = [p for p in Path(output).iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save(
    output: Path,
    step: int,
    lora: dict[str, torch.Tensor],
    states: dict[str, Any],
    info: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``checkpoint-NNNNNN/`` beside the old ones, then drop all but the newest ``keep``.

    Files are written into a hidden staging folder, fsynced, and the folder is renamed into place: a
    crash at any moment leaves either the complete checkpoint or none (``find`` ignores the rest).
    """
    output = Path(output)
    final = output / f"checkpoint-{step:06d}"
    staging = output / f".checkpoint-{step:06d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(lora, staging / LORA_FILE)
    for name, state in states.items():
        torch.save(state, staging / f"{name}.pt")
    (staging / STATE_FILE).write_text(json.dumps({"step": step, **info}, indent=1))
    for path in staging.iterdir():
        _fsync(path)
    _fsync(staging)
    if final.exists():
        _discard(final)
    os.replace(staging, final)
    _fsync(output)
    for old in checkpoint_dirs(output)[:-keep]:
        _discard(old)
    return final


def clean_stale(output: Path) -> None:
    """Remove what a killed run left half-written or half-deleted (never a complete checkpoint)."""
    if Path(output).is_dir():
        for path in Path(output).glob(".checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)


def _discard(path: Path) -> None:
    # Rename first: a half-deleted folder must never look like a checkpoint.
    doomed = path.parent / f".{path.name}.deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find(output: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: the newest in ``output`` for "auto", else the given folder."""
    if resume == "auto":
        found = checkpoint_dirs(output)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume {path} is not a complete cogvx checkpoint (no {STATE_FILE}).")
    return path


def load(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(state.json, LoRA weights, named states) of one checkpoint."""
    info = json.loads((path / STATE_FILE).read_text())
    states = {p.stem: torch.load(p, weights_only=True, map_location="cpu") for p in path.glob("*.pt")}
    return info, load_file(path / LORA_FILE), states
