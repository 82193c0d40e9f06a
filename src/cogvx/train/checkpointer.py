"""The checkpoint manager: which state a checkpoint holds, when one is written, where a run resumes, pushes.

The loop hands it the run's components once (``track``) and calls ``after_step`` after every step; the
manager alone decides whether to save (``should_save``), and alone calls ``checkpoint.save`` and
``checkpoint.load``, so save and load are mirror images of one state. Where a run starts is decided by
the main process and agreed on by every process before anything is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cogvx import config as configfile
from cogvx import runs
from cogvx.errors import CogvxError, RunError
from cogvx.train import checkpoint, resume
from cogvx.train.checkpoint import Stateful
from cogvx.train.config import TrainConfig

OPTIMIZER, LR_SCHEDULE, SCALER = "optimizer", "lr_schedule", "scaler"


class CheckpointManager:
    """One run's checkpoints: ``find_start``, ``check_settings``, ``restore`` at setup; ``after_step`` in the loop."""

    def __init__(self, accelerator, cfg: TrainConfig):
        self.accelerator, self.cfg = accelerator, cfg
        self.found: Path | None = None  # the checkpoint this run resumes from
        self.state: dict[str, Stateful] = {}

    def find_start(self) -> resume.Start:
        """Where the run starts, agreed on by every process (see ``agree_on_start``); said aloud."""
        start = agree_on_start(self.accelerator, self.cfg)
        if start.note:
            self.accelerator.print(start.note)
        self.found = start.checkpoint
        return start

    def check_settings(self, resolved: dict[str, Any], held_out: str) -> None:
        """Before any other check: a resume that cannot be honoured says all it changes."""
        if self.found is None:
            return
        saved = checkpoint.read_progress(self.found)
        changed = resume.check(self.found, saved["config"], resolved)
        resume.check_held_out(self.found, saved, held_out)
        if changed:
            self.accelerator.print(changed)

    def track(
        self,
        lora: Stateful,
        optimizer: torch.optim.Optimizer,
        schedule: Any,
        progress: checkpoint.Progress,
        best: Stateful | None = None,
    ) -> None:
        """The one state a checkpoint holds, saved and loaded as a whole.

        ``optimizer`` is the raw one: accelerate's wrapper shares its state. ``best`` is ``--keep-best``'s record.
        """
        self.state = {checkpoint.LORA: lora, OPTIMIZER: optimizer, LR_SCHEDULE: schedule, checkpoint.PROGRESS: progress}
        if self.accelerator.scaler is not None:
            self.state[SCALER] = self.accelerator.scaler
        if best is not None:
            self.state[checkpoint.BEST] = best

    def restore(self, cfg: TrainConfig, lr: float) -> None:
        """Load the checkpoint found into the tracked state, then put this run's ``cfg`` and ``lr`` in effect."""
        found = self.found
        if found is None:
            return
        checkpoint.load(found, self.state)
        best = self.state.get(checkpoint.BEST)
        if best is not None and best.discarded is not None:
            self.accelerator.print(
                f"[warning] {found} kept its best LoRA by scores on another eval set: --keep-best starts over "
                "from this run's scores."
            )
        # The loaded optimizer and schedule states hold the checkpoint's learning rate and hyperparameters.
        hyper = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon, "weight_decay": cfg.weight_decay}
        lr_changed = resume.apply_to_optimizer(self.state[OPTIMIZER], self.state[LR_SCHEDULE], lr, hyper)
        if lr_changed:
            self.accelerator.print(lr_changed)
        progress = self.state[checkpoint.PROGRESS]
        world = self.accelerator.num_processes
        warning = resume.data_order_warning(found, progress.written_by, world, cfg.workers, configfile.as_dict(cfg))
        if warning:
            self.accelerator.print(warning)
        self.accelerator.print(f"Resuming from {found} (step {progress.step}).")

    def should_save(self, step: int, last: bool) -> bool:
        every = self.cfg.checkpoint_every
        return bool(every) and (step % every == 0 or last)

    def after_step(self, step: int, last: bool) -> None:
        """Save (and with ``--push-checkpoints`` push) when a checkpoint is due; every process must call it."""
        if not self.should_save(step, last):
            return
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            saved = checkpoint.save(self.cfg.output, self.state, self.cfg.keep_checkpoints)
            if self.cfg.push_checkpoints:
                try:
                    push(self.cfg, f"cogvx: checkpoint {saved.name}", saved)
                except CogvxError as err:  # training goes on; the final push uploads the finished run
                    print(f"[warning] the push of {saved.name} failed, training goes on: {err}", flush=True)
        self.accelerator.wait_for_everyone()

    def push_run(self, steps: int) -> str:
        """``--push-to-hub``: the finished run, from the main process once the others are done."""
        return push(self.cfg, f"cogvx: LoRA after {steps} steps")


def push(cfg: TrainConfig, message: str, checkpoint_folder: Path | None = None) -> str:
    """Upload the run (or one checkpoint's LoRA) to ``--hub-model-id``; a failure says how to try again."""
    from cogvx import hub

    try:
        url = hub.push_run(
            cfg.output, cfg.hub_model_id, private=cfg.hub_private, commit_message=message, checkpoint=checkpoint_folder
        )
    except CogvxError as err:
        raise type(err)(
            f"{err} The run itself is complete in {cfg.output}: fix that and run the same command with "
            "--resume auto, which trains no more steps and pushes again."
        ) from err
    print(f"pushed to {url}", flush=True)
    return url


def agree_on_start(accelerator, cfg: TrainConfig) -> resume.Start:
    """Where the main process starts the run (``resume.start``): the checkpoint it resumes from, which
    every process must then be able to read, or a finished run with nothing to do.

    The main process decides, as it alone looked after the run folder: on several machines the folder
    may be on node 0's disk only, and a process deciding for itself would start from step 0 while the
    others resume (a hang, or a silently different run). Every process then checks it can read the
    checkpoint, and all stop with the same line if one cannot.
    """
    from accelerate.utils import broadcast_object_list, gather_object

    outcome: tuple = ("ok", None)
    if accelerator.is_main_process:
        try:
            start = resume.start(cfg.output, cfg.resume, cfg.max_steps)
            found = None if start.checkpoint is None else str(start.checkpoint)
            outcome = ("ok", (found, start.finished, start.note))
        except Exception as err:  # told to the others first (as the run-folder guard does), then raised here
            if accelerator.num_processes > 1:
                kind = type(err) if isinstance(err, CogvxError) else RuntimeError
                broadcast_object_list([("error", (kind, str(err)))])
            raise
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list([outcome])[0]
    status, value = outcome
    if status == "error":
        kind, message = value
        raise kind(message)
    found, finished, note = value
    found = None if found is None else Path(found)
    start = resume.Start(found, finished, note)
    if accelerator.num_processes == 1:
        return start
    readable = found is None or runs.checkpoint_state(found).is_file()
    blind = [rank for rank, ok in enumerate(gather_object([readable])) if not ok]
    if blind:
        raise RunError(
            f"The main process resumes from {found}, which process{'es' if len(blind) > 1 else ''} "
            f"{', '.join(map(str, blind))} cannot read (no {runs.CHECKPOINT_STATE} there). On several machines "
            "--output must be a folder every machine reads at the same path (a shared filesystem), or copy the run "
            "folder to each machine."
        )
    return start
