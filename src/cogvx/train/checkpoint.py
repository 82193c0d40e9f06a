"""Checkpoints that resume a run exactly: ``checkpoint-NNNNNN/`` folders, written atomically.

A checkpoint is one state: a dict of named components, each with ``state_dict()`` and
``load_state_dict()`` (torchtitan's checkpoint manager works the same way). ``save`` writes every
component's state and ``load`` reads every one back into the same components: they are mirror images.
Where each component goes in the folder (``cogvx.runs`` names the files):

- ``lora``: the LoRA weights, ``lora.safetensors``;
- ``progress``: step, batches consumed, world size, data workers and the resolved config, ``state.json``
  (written last: a folder without it is incomplete; checked on load, so absurd numbers are refused);
- anything else (optimizer, lr_schedule, scaler): ``NAME.pt`` (``torch.save``, read back with
  ``weights_only=True``).

Random numbers are derived from (seed, step), so no generator state needs saving.

A damaged file (not readable as its format, a pickle that ``weights_only`` refuses, a state.json with
impossible numbers) is one line naming it and the checkpoint to resume from instead.

The run folder belongs to one run at a time: ``lock_run_folder`` holds an exclusive lock on its
``.lock`` file for the whole run (the kernel drops it when the process ends, kill -9 included). A run
that fails leaves no folder it created with nothing but ``.lock`` in it.
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

from cogvx import files, runs
from cogvx.errors import RunError

LORA = "lora"
PROGRESS = "progress"
BEST = "best"  # --keep-best: the lowest eval score so far and its step (evaluation.Best)
HELD_OUT = "held_out"  # state.json: the hash of the keys held out of training, "" for none
# A run resumed with fp16 (or --keep-best) from a checkpoint written without it has no scaler (or best)
# state: it starts fresh.
MAY_BE_MISSING = ("scaler", BEST)


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
    # The most batches one step took so far (resumes may change the accumulation): bounds batches_consumed.
    most_batches_per_step: int = 1
    held_out: str = ""  # heldout.EvalSet.keys_hash of the samples the stream skips, "" for none

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            HELD_OUT: self.held_out,
            "batches_consumed": self.batches_consumed,
            "most_batches_per_step": max(self.most_batches_per_step, self.config.get("gradient_accumulation", 1)),
            "world_size": self.world_size,
            "workers": self.workers,
            "config": self.config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.batches_consumed = state["step"], state["batches_consumed"]
        self.most_batches_per_step = _batches_per_step(state)
        self.written_by = dict(state)


def _batches_per_step(state: dict[str, Any]) -> int:
    # Checkpoints written before most_batches_per_step was recorded: their own accumulation.
    return state.get("most_batches_per_step", state.get("config", {}).get("gradient_accumulation", 1))


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
    """Mirror of ``_encode``: one component's state read from its file, tensors on the CPU.

    A file its reader refuses (cut short, not its format, a pickle of more than tensors) is a RunError
    naming it; a disk error (OSError) stays itself.
    """
    try:
        if name == LORA:
            return load_file(path)
        if name == PROGRESS:
            return json.loads(path.read_text())
        return torch.load(path, weights_only=True, map_location="cpu")
    except OSError:
        raise
    except Exception as err:  # each reader has its own error types (SafetensorError, UnpicklingError, ...)
        reason = " ".join(str(err).split()).split(". ")[0][:200] or type(err).__name__  # its first sentence
        raise RunError(f"{path} is damaged ({reason}). {_instead(path.parent)}") from err


def _instead(folder: Path) -> str:
    """What to do about a damaged checkpoint ``folder``: the one to resume from instead."""
    earlier = [
        p
        for p in checkpoint_dirs(folder.parent)
        if (runs.checkpoint_step(p) or 0) < (runs.checkpoint_step(folder) or 0)
    ]
    if earlier:
        return (
            f"Resume from an earlier checkpoint (--resume {earlier[-1]}), or delete {folder} and --resume auto "
            "takes the newest one left."
        )
    return f"There is no earlier checkpoint: delete {folder}, and --resume auto starts the run again from step 0."


def read_progress(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``state.json``, refused in one line when its numbers cannot be a run's.

    The step is the folder's; batches consumed are at most what that many steps take (a larger number
    would make the data stream skip forever); processes and data workers are counts.
    """
    path = runs.checkpoint_state(folder)
    state = _decode(PROGRESS, path)
    problem = _progress_problem(state, runs.checkpoint_step(folder))
    if problem:
        raise RunError(f"{path} is damaged: {problem}. {_instead(Path(folder))}")
    return state


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _progress_problem(state: Any, folder_step: int | None) -> str | None:
    if not isinstance(state, dict):
        return "it does not hold a JSON object"
    missing = [k for k in ("step", "batches_consumed", "world_size", "workers", "config") if k not in state]
    if missing:
        return f"it has no {', '.join(missing)}"
    step, consumed, config = state["step"], state["batches_consumed"], state["config"]
    if not isinstance(config, dict):
        return "its config is not a JSON object of settings"
    limit, per_step, world, workers = (
        config.get("max_steps"),
        _batches_per_step(state),
        state["world_size"],
        state["workers"],
    )
    # In order, each check evaluated only once the ones before it hold (they guard its types).
    checks = [
        (lambda: _count(step), f"step {step!r} is not a whole number of 0 or more"),
        (lambda: folder_step is None or step == folder_step, f"step {step!r} is not the folder's step {folder_step}"),
        (lambda: not _count(limit) or step <= limit, f"step {step!r} is past its run's max_steps {limit!r}"),
        (lambda: _count(per_step) and per_step >= 1, f"most_batches_per_step {per_step!r} is not a count of 1 or more"),
        (lambda: _count(consumed), f"batches_consumed {consumed!r} is not a whole number of 0 or more"),
        (
            lambda: consumed <= step * per_step,
            f"batches_consumed {consumed!r} is more than {step!r} steps of at most {per_step!r} batches take",
        ),
        (lambda: _count(world) and world >= 1, f"world_size {world!r} is not 1 or more"),
        (lambda: _count(workers), f"workers {workers!r} is not a whole number of 0 or more"),
    ]
    return next((message for ok, message in checks if not ok()), None)


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
        files.fsync_folder(staging)
        if final.exists():
            _discard(final)
        os.replace(staging, final)
        files.fsync_folder(output)
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
    """Read checkpoint ``path`` back into the components of ``state``: the mirror image of ``save``.

    The progress first: a checkpoint whose state.json is damaged is refused before anything is loaded.
    """
    path = Path(path)
    for name in sorted(state, key=lambda name: name != PROGRESS):
        file = _path(path, name)
        if not file.is_file():
            if name in MAY_BE_MISSING:
                continue
            raise RunError(f"The checkpoint {path} has no {file.name}: resume from another checkpoint.")
        state[name].load_state_dict(read_progress(path) if name == PROGRESS else _decode(name, file))


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
    created = [folder for folder in (output, *output.parents) if not folder.exists()]
    try:
        output.mkdir(parents=True, exist_ok=True)
        handle = open(runs.lock(output), "a")  # noqa: SIM115 - held open for the whole run
    except OSError as err:
        raise RunError(
            f"Cannot write to the run folder {output}: {err.strerror or err}. Choose a writable --output."
        ) from err
    try:
        with handle:
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EAGAIN):  # not "held by another process"
                    raise
                created = []  # the other run's folder
                raise RunError(
                    f"Another `cogvx train` is running in {output}. Wait for it to finish, or use another --output."
                ) from err
            yield
    except BaseException:
        _remove_if_unused(created, output)
        raise


def _remove_if_unused(created: list[Path], output: Path) -> None:
    """A run that failed leaves no folder it created holding nothing but its lock (never anything else)."""
    if not created or not output.is_dir() or [p.name for p in output.iterdir()] != [runs.LOCK]:
        return
    runs.lock(output).unlink()
    for folder in created:  # innermost first; stops at the first one that is not empty
        try:
            folder.rmdir()
        except OSError:
            return


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


def find(output: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: the newest in ``output`` for "auto", else the given folder."""
    if resume == "auto":
        found = checkpoint_dirs(output)
        return found[-1] if found else None
    path = Path(resume)
    if not runs.checkpoint_state(path).is_file():
        raise RunError(f"--resume {path} is not a complete cogvx checkpoint (no {runs.CHECKPOINT_STATE}).")
    return path
