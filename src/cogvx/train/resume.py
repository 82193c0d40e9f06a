"""What a resumed run may change: one table classifies every setting of ``TrainConfig``.

A checkpoint records the settings it was trained with (``state.json``'s ``config``: the resolved
settings, model included). On resume each setting is compared with the new one:

- ``REFUSED``: the checkpoint's state means something else, or cannot be honoured, under another value
  (the model, the LoRA's shape, the optimizer's kind, the schedule's kind, the precision, the cache).
  A resume that changes any of them stops in one line that lists every such difference.
- ``APPLIED``: taken from the new settings on purpose and said aloud in one line. The optimizer and
  schedule states a checkpoint restores would override the learning rate and the optimizer's
  hyperparameters, so ``apply_to_optimizer`` sets the new ones after the checkpoint is loaded.
- ``DATA_ORDER``: allowed, but the samples each step sees differ from an uninterrupted run's; a warning
  says which changed (with the number of processes and data workers).
- ``NOT_COMPARED``: how this run starts, not what it trains.

``tests/train/test_resume_changes.py`` fails when a field of ``TrainConfig`` is missing from the table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cogvx import runs
from cogvx.errors import RunError
from cogvx.train import checkpoint
from cogvx.train.config import PRECISION_ALIASES

REFUSED = "refused"
APPLIED = "applied"
DATA_ORDER = "data order"
NOT_COMPARED = "not compared"

POLICY: dict[str, str] = {
    # What the checkpoint's weights and optimizer state belong to.
    "shards": REFUSED,  # another cache is other data (and its position in the stream means nothing there)
    "model": REFUSED,
    "model_revision": REFUSED,
    "model_variant": REFUSED,
    "rank": REFUSED,
    "alpha": REFUSED,
    "targets": REFUSED,
    "lora_dropout": REFUSED,
    "optimizer": REFUSED,  # another optimizer cannot read this one's state
    "lr_scheduler": REFUSED,  # the saved schedule position belongs to its kind
    "mixed_precision": REFUSED,  # the loss scaler's state and the numbers trained so far depend on it
    "random_flip": REFUSED,  # drawn from the data stream's generator: a change shifts every later sample
    # Held-out clips are not trained on: another request is other training data. (What is held out is also
    # compared as a whole, by ``check_held_out``: --eval-every 0 holds nothing out under the default rule.)
    "eval_holdout": REFUSED,
    # Honoured from the new settings from the resumed step on.
    "output": APPLIED,
    "max_steps": APPLIED,  # train further (a decaying schedule now ends at the new step)
    "epochs": APPLIED,  # resolved into max_steps before the comparison
    "learning_rate": APPLIED,
    "scale_lr": APPLIED,
    "lr_warmup_steps": APPLIED,
    "lr_num_cycles": APPLIED,
    "lr_power": APPLIED,
    "adam_beta1": APPLIED,
    "adam_beta2": APPLIED,
    "adam_epsilon": APPLIED,
    "weight_decay": APPLIED,
    "max_grad_norm": APPLIED,
    "checkpointing": APPLIED,
    "max_memory": APPLIED,
    "allow_tf32": APPLIED,
    "compile": APPLIED,
    "fp8_base": APPLIED,
    "fp8_matmul": APPLIED,
    "attention": APPLIED,  # a kernel computes the same attention: the checkpoint's state means the same
    "fp8_attention": APPLIED,  # only forwards without gradients: validation and the eval score
    "cache_dir": APPLIED,
    "skip_bad_shards": APPLIED,
    "noised_image_dropout": APPLIED,
    "validation_every": APPLIED,
    "validation_steps": APPLIED,
    "validation_guidance": APPLIED,
    "validation_frames": APPLIED,
    "validation_height": APPLIED,
    "validation_width": APPLIED,
    "checkpoint_every": APPLIED,
    "eval_every": APPLIED,
    "eval_shards": APPLIED,  # another cache to score takes nothing from training; --keep-best starts over on it
    "keep_best": APPLIED,
    "keep_checkpoints": APPLIED,
    "report_to": APPLIED,
    "push_to_hub": APPLIED,
    "hub_model_id": APPLIED,
    "hub_private": APPLIED,
    "push_checkpoints": APPLIED,
    # Which samples each step sees.
    "seed": DATA_ORDER,
    "batch_size": DATA_ORDER,
    "gradient_accumulation": DATA_ORDER,
    "shuffle_buffer": DATA_ORDER,
    "workers": DATA_ORDER,
    "resume": NOT_COMPARED,
}
MODEL_KEYS = ("model", "model_revision", "model_variant")
FOLDERS = ("shards", "output", "cache_dir", "eval_shards")  # the same folder may be spelled another way


@dataclass
class Start:
    """How a run starts in its folder: from ``checkpoint`` (or step 0), or not at all when ``finished``."""

    checkpoint: Path | None = None
    finished: int | None = None  # the steps of a finished run there is nothing more to do for
    note: str | None = None  # said aloud before training


def start(output: Path, resume: str | None, max_steps: int | None) -> Start:
    """Where a run into ``output`` starts; a folder that holds another run is refused unless resumed.

    ``--resume auto`` takes the newest checkpoint. Without one: a fresh folder starts at step 0; a run
    stopped before its first checkpoint starts again at step 0 (said aloud); a finished run without
    checkpoints (``--checkpoint-every 0``) has nothing to train when it reached ``max_steps`` (a failed
    ``--push-to-hub`` is tried again), and cannot be
    continued past them (refused in one line).
    """
    output = Path(output)
    if resume and resume != "auto":
        return Start(checkpoint.find(output, resume))
    parts = runs.run_parts(output)
    if not resume:
        if parts:
            raise RunError(
                f"{output} already holds a run ({', '.join(parts)}). Continue it with --resume auto, or start a "
                "new run with another --output."
            )
        return Start()
    found = checkpoint.find(output, resume)
    if found is not None or not parts:
        return Start(found)
    steps = [r["step"] for r in runs.read_metrics(output) if isinstance(r.get("step"), int)]
    done = max(steps, default=0)
    if not runs.lora_weights(output).is_file():
        return Start(
            note=f"{output} holds a run stopped before its first checkpoint ({runs.METRICS} reaches step {done}): "
            "there is nothing to resume from, so training starts again at step 0."
        )
    if max_steps is not None and done >= max_steps:
        return Start(
            finished=done,
            note=f"{output} holds a run that finished at step {done} (--max-steps {max_steps}): nothing more to train.",
        )
    raise RunError(
        f"{output} holds a run that finished at step {done} without a checkpoint to continue from (it ran with "
        "--checkpoint-every 0), so it cannot train further. Start a new run with another --output (this one "
        "stays as it is)."
    )


@dataclass
class Changes:
    """The settings that differ between a checkpoint and the resumed run, by class: name -> (old, new)."""

    refused: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    applied: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    data_order: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def compare(saved: dict[str, Any], new: dict[str, Any]) -> Changes:
    """How the settings ``new`` differ from the checkpoint's ``saved`` ones (both as ``config.as_dict`` gives
    them, a missing key meaning unset). A setting missing from ``POLICY`` is a bug: KeyError."""
    changes = Changes()
    buckets = {REFUSED: changes.refused, APPLIED: changes.applied, DATA_ORDER: changes.data_order}
    for name in sorted(set(saved) | set(new)):
        kind = POLICY[name]
        old, value = _normal(name, saved.get(name)), _normal(name, new.get(name))
        if kind != NOT_COMPARED and not _same(name, old, value):
            buckets[kind][name] = (old, value)
    return changes


def _normal(name: str, value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if name == "mixed_precision":
        return PRECISION_ALIASES.get(value, value)
    return value


def _same(name: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if name in FOLDERS and isinstance(old, str) and isinstance(new, str) and "://" not in old + new:
        try:  # one folder, spelled relative once and absolute once
            return os.path.samefile(old, new)
        except OSError:
            return False
    return False


def check(found: Path, saved: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Refuse a resume from ``found`` that changes a ``REFUSED`` setting (one line listing all of them);
    else the line that says which settings the resumed run changes on purpose, or None."""
    # A checkpoint written before the resolved model was recorded, from the cache's model: no record of it
    # to compare (its cache, which names the model, still is).
    if "model" not in saved:
        new = {k: v for k, v in new.items() if k not in MODEL_KEYS} | {k: saved.get(k) for k in MODEL_KEYS}
    changes = compare(saved, new)
    if changes.refused:
        raise RunError(
            f"Cannot resume from {found}: it was trained with other settings that a run cannot change "
            f"({_listed(changes.refused)}). Resume with the checkpoint's settings (cogvx train --config "
            f"{runs.config_toml(found.parent)} --resume {found}), or start a new run with another --output."
        )
    if not changes.applied:
        return None
    return f"Resuming from {found} with changed settings: {_listed(changes.applied)}."


def check_held_out(found: Path, saved: dict[str, Any], held_out: str) -> None:
    """Refuse a resume from ``found`` whose training would see other samples: ``saved`` is its state.json,
    ``held_out`` the hash of the keys this run holds out of training ("" for none)."""
    before = saved.get(checkpoint.HELD_OUT)
    if before is None or before == held_out:  # a checkpoint that recorded none: written before held-out sets
        return
    said = {"": "none"}
    raise RunError(
        f"Cannot resume from {found}: it held other clips out of training (held-out set "
        f"{said.get(before, before[:12])}, now {said.get(held_out, held_out[:12])}), so its data stream means other "
        f"samples. Resume with its --eval-every and --eval-holdout (cogvx train --config "
        f"{runs.config_toml(found.parent)} --resume {found}), or start a new run with another --output."
    )


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{name} {_shown(old)} -> {_shown(new)}" for name, (old, new) in changes.items())


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float) and float(f"{value:g}") == value:
        return f"{value:g}"  # 8 rather than 8.0, 0.0001 rather than 1e-04
    return str(value)


def data_order_warning(found: Path, saved: dict[str, Any], world: int, workers: int, new: dict[str, Any]) -> str | None:
    """The warning for a resume whose data order differs: ``saved`` is the checkpoint's state.json."""
    settings = saved.get("config", {})
    changed = [k for k, kind in POLICY.items() if kind == DATA_ORDER and k != "workers" and k in settings]
    changed = [k for k in changed if settings[k] != new.get(k)]
    if (saved["world_size"], saved["workers"]) != (world, workers):
        changed.append(f"processes x data workers {saved['world_size']}x{saved['workers']} -> {world}x{workers}")
    if not changed:
        return None
    return (
        f"[warning] {found} was written with other settings ({', '.join(changed)}). Training resumes, but "
        "the data order differs from an uninterrupted run."
    )


def apply_to_optimizer(optimizer: torch.optim.Optimizer, schedule: Any, lr: float, hyper: dict[str, Any]) -> str | None:
    """After a checkpoint is loaded: the new base learning rate ``lr`` and optimizer settings ``hyper``
    (``betas``, ``eps``, ``weight_decay``) in effect, overriding the loaded ones. The learning rate of the
    next step is the new schedule's (its warm-up, length and base rate are the new settings'). Returns the
    line that says a changed base learning rate aloud, or None."""
    before = list(schedule.base_lrs)
    schedule.base_lrs = [lr] * len(before)
    for index, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = lr
        for key, value in hyper.items():
            if key in group:
                group[key] = value
        # LambdaLR (every --lr-scheduler) computes each rate afresh as base * factor(step).
        factor = schedule.lr_lambdas[index](schedule.last_epoch)
        current = lr * factor
        if current != group["lr"]:
            group["lr"] = current
    if all(old == lr for old in before):
        return None
    return f"learning rate {before[0]:g} -> {lr:g} from step {schedule.last_epoch + 1}"
