"""The run-folder guard: one run at a time in a folder, every process told, disk failures in one line.

The main process alone writes the run folder, so it alone locks it; under DDP the others learn the
outcome by broadcast instead of waiting at a barrier the refused main process would never reach.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

from cogvx.errors import CogvxError, RunError
from cogvx.train import checkpoint


@contextlib.contextmanager
def guard(accelerator, output: Path) -> Iterator[None]:
    """Hold ``output`` for the whole run: locked, stale staging folders cleared, disk errors said in one line."""
    with _hold_run_folder(accelerator, output), _disk_errors_in_one_line(output):
        if accelerator.is_main_process:  # the folder exists: _hold_run_folder made it
            checkpoint.clean_stale(output)
        yield


@contextlib.contextmanager
def _hold_run_folder(accelerator, output: Path):
    """The main process locks the run folder (it alone writes there); every process learns the outcome.

    Under DDP the other processes wait for the answer instead of a barrier the refused main process
    would never reach, and all of them stop with the same one-line message.
    """
    from accelerate.utils import broadcast_object_list

    with contextlib.ExitStack() as held:
        failure: BaseException | None = None
        if accelerator.is_main_process:
            try:
                held.enter_context(checkpoint.lock_run_folder(output))
            except Exception as err:  # told to the others first, then raised here as it is
                failure = err
        # A user error reaches the other processes as its own kind (one line); anything else as a RuntimeError.
        kind = type(failure) if isinstance(failure, CogvxError) else RuntimeError
        outcome = None if failure is None else (kind, str(failure))
        if accelerator.num_processes > 1:
            outcome = broadcast_object_list([outcome])[0]
        if failure is not None:
            raise failure
        if outcome is not None:
            kind, message = outcome
            raise kind(message)
        yield


@contextlib.contextmanager
def _disk_errors_in_one_line(output: Path):
    """A disk that fills up or turns read-only under a run (metrics, loss curve, weights): one line, no traceback.

    Checkpoints say it themselves (checkpoint.save); what is written between them goes through here.
    """
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        where = err.filename or f"into the run folder {output}"
        raise RunError(
            f"Could not write {where}: {err.strerror}. Free space there (or choose a writable --output) and "
            "continue with --resume auto: the checkpoints already written are intact."
        ) from err
