"""Checkpoints that resume a run exactly: ``checkpoint-NNNNNN/`` folders, written atomically.

A checkpoint holds the LoRA weights (safetensors), optimizer, LR-schedule and loss-scaler states
(``torch.save``, read back with ``weights_only=True``), and ``state.json``: step, batches consumed,
world size, data workers and the resolved config. Random numbers are derived from (seed, step), so
no generator state needs saving.

The run folder belongs to one run at a time: ``lock_run_folder`` holds an exclusive lock on its
``.lock`` file for the whole run (the kernel drops it when the process ends, kill -9 included).
A checkpoint that cannot be written (full disk, read-only folder) is one line naming the folder and
the fix; its staging folder is removed and the earlier checkpoints stay as they were.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as encode_safetensors

_NAME = re.compile(r"^checkpoint-(\d{6,})$")
LORA_FILE = "lora.safetensors"
STATE_FILE = "state.json"
LOCK_NAME = ".lock"


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

    Files are written into a hidden staging folder named for this process, fsynced, and the folder is
    renamed into place: a crash at any moment leaves either the complete checkpoint or none (``find``
    ignores the rest). A write that fails removes the staging folder and raises a one-line ValueError.
    """
    output = Path(output)
    final = output / f"checkpoint-{step:06d}"
    staging = output / f".checkpoint-{step:06d}.{socket.gethostname()}-{os.getpid()}.partial"
    try:
        staging.mkdir(parents=True)
        _write(staging / LORA_FILE, lambda f: f.write(encode_safetensors(lora)))
        for name, state in states.items():
            _write(staging / f"{name}.pt", lambda f, state=state: torch.save(state, f))
        _write(staging / STATE_FILE, lambda f: f.write(json.dumps({"step": step, **info}, indent=1).encode()))
        _fsync(staging)
        if final.exists():
            _discard(final)
        os.replace(staging, final)
        _fsync(output)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):  # full disk, read-only or vanished folder, I/O error: not a bug
            raise ValueError(
                f"Could not write the checkpoint {final}: {err.strerror or err}. Free space there (or choose a "
                "writable --output) and continue with --resume auto: the earlier checkpoints are intact."
            ) from err
        raise
    for old in checkpoint_dirs(output)[:-keep]:
        _discard(old)
    return final


@contextlib.contextmanager
def lock_run_folder(output: Path) -> Iterator[None]:
    """Hold ``output`` for this run: a second run into the same folder is refused while this one lives.

    A POSIX record lock (``lockf``) rather than ``flock``: DataLoader workers forked by the run would
    share an ``flock`` and keep it after the run is killed; a record lock belongs to this process only,
    so the kernel releases it the moment the process ends, kill -9 included. The price: closing ANY
    handle of ``.lock`` in this process drops the lock, so nothing else may open that file while it is held.
    """
    import fcntl

    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        handle = open(output / LOCK_NAME, "a")  # noqa: SIM115 - held open for the whole run
    except OSError as err:
        raise ValueError(
            f"Cannot write to the run folder {output}: {err.strerror or err}. Choose a writable --output."
        ) from err
    with handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):  # not "held by another process"
                raise
            raise ValueError(
                f"Another `cogvx train` is running in {output}. Wait for it to finish, or use another --output."
            ) from err
        yield


def _write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


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
