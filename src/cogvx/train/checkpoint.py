"""Checkpoints that resume a run exactly: ``checkpoint-NNNNNN/`` folders, written atomically.

A checkpoint is one state: a dict of named components, each with ``state_dict()`` and
``load_state_dict()`` (torchtitan's checkpoint manager works the same way). ``save`` writes every
component's state and ``load`` reads every one back into the same components: they are mirror images.
Where each component goes in the folder (``cogvx.runs`` names the files):

- ``lora``: the LoRA weights, ``lora.safetensors``;
- ``progress``: step, batches consumed, world size, data workers and the resolved config, ``state.json``
  (written last: a folder without it is incomplete);
- anything else (optimizer, lr_schedule, scaler): ``NAME.pt`` (``torch.save``, read back with
  ``weights_only=True``).

Random numbers are derived from (seed, step), so no generator state needs saving.

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
import shutil
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file
from safetensors.torch import save as encode_safetensors

from cogvx import runs
from cogvx.errors import RunError

LORA = "lora"
PROGRESS = "progress"
# A run resumed with fp16 from a checkpoint written without it has no scaler state: the scaler starts fresh.
MAY_BE_MISSING = ("scaler",)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Progress:
    """Where the run stands (step, batches consumed) and what wrote it (processes, data workers, config).

    ``load_state_dict`` restores the position and keeps the writer's description in ``written_by``, so
    a resumed run can say when its data order differs from the one it continues.
    """

    world_size: int
    workers: int
    config: dict[str, Any]
    step: int = 0
    batches_consumed: int = 0
    written_by: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            "world_size": self.world_size,
            "workers": self.workers,
            "config": self.config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.batches_consumed = state["step"], state["batches_consumed"]
        self.written_by = dict(state)


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints in ``output``, oldest first (an unfinished one has no state file)."""
    return runs.checkpoints(output)


def _path(folder: Path, name: str) -> Path:
    if name == LORA:
        return runs.checkpoint_lora(folder)
    if name == PROGRESS:
        return runs.checkpoint_state(folder)
    return runs.checkpoint_component(folder, name)


def _encode(name: str, state: Any):
    """How one component's state is written to its file."""
    if name == LORA:
        return lambda f: f.write(encode_safetensors(state))
    if name == PROGRESS:
        return lambda f: f.write(json.dumps(state, indent=1).encode())
    return lambda f: torch.save(state, f)


def _decode(name: str, path: Path) -> Any:
    """Mirror of ``_encode``: one component's state read from its file, tensors on the CPU."""
    if name == LORA:
        return load_file(path)
    if name == PROGRESS:
        return json.loads(path.read_text())
    return torch.load(path, weights_only=True, map_location="cpu")


def save(output: Path, state: Mapping[str, Stateful], keep: int) -> Path:
    """Write ``state`` as ``checkpoint-NNNNNN/`` beside the old ones, then drop all but the newest ``keep``.

    ``state`` holds a ``progress`` component, whose step names the folder. Files are written into a
    hidden staging folder named for this process, fsynced, and the folder is renamed into place: a crash
    at any moment leaves either the complete checkpoint or none (``find`` ignores the rest). A write that
    fails removes the staging folder and raises a one-line RunError.
    """
    output = Path(output)
    states = {name: component.state_dict() for name, component in state.items()}
    step = states[PROGRESS]["step"]
    final = runs.checkpoint(output, step)
    staging = runs.checkpoint_staging(output, step, f"{socket.gethostname()}-{os.getpid()}")
    try:
        staging.mkdir(parents=True)
        for name in sorted(states, key=lambda name: name == PROGRESS):  # the state file last
            _write(_path(staging, name), _encode(name, states[name]))
        _fsync(staging)
        if final.exists():
            _discard(final)
        os.replace(staging, final)
        _fsync(output)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):  # full disk, read-only or vanished folder, I/O error: not a bug
            raise RunError(
                f"Could not write the checkpoint {final}: {err.strerror or err}. Free space there (or choose a "
                "writable --output) and continue with --resume auto: the earlier checkpoints are intact."
            ) from err
        raise
    for old in checkpoint_dirs(output)[:-keep]:
        _discard(old)
    return final


def load(path: Path, state: Mapping[str, Stateful]) -> None:
    """Read checkpoint ``path`` back into the components of ``state``: the mirror image of ``save``."""
    for name, component in state.items():
        file = _path(path, name)
        if not file.is_file():
            if name in MAY_BE_MISSING:
                continue
            raise RunError(f"The checkpoint {path} has no {file.name}: resume from another checkpoint.")
        component.load_state_dict(_decode(name, file))


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
        handle = open(runs.lock(output), "a")  # noqa: SIM115 - held open for the whole run
    except OSError as err:
        raise RunError(
            f"Cannot write to the run folder {output}: {err.strerror or err}. Choose a writable --output."
        ) from err
    with handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):  # not "held by another process"
                raise
            raise RunError(
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
    for path in runs.stale_checkpoint_files(output):
        shutil.rmtree(path, ignore_errors=True)


def _discard(path: Path) -> None:
    # Rename first: a half-deleted folder must never look like a checkpoint.
    doomed = runs.checkpoint_discarded(path)
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
    if not runs.checkpoint_state(path).is_file():
        raise RunError(f"--resume {path} is not a complete cogvx checkpoint (no {runs.CHECKPOINT_STATE}).")
    return path
