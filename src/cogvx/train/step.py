"""One optimizer step and what it steps: the optimizer, the learning-rate schedule, the per-step seeds.

``train_step`` is a free function so that benchmarks time exactly what training runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cogvx.errors import ConfigError, RunError
from cogvx.pipeline.objective import Objective
from cogvx.shards.manifest import IMAGE_MOMENTS
from cogvx.train.config import TrainConfig


class TrainingDiverged(RunError):
    """The loss or the gradients stopped being finite; nothing non-finite was saved."""


@dataclass
class StepOutput:
    loss: float  # mean over micro-batches and processes
    grad_norm: float  # before clipping
    skipped: bool = False  # fp16 only: the loss scaler found inf gradients and skipped the update


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed for one (step, micro-batch, rank): same inputs, same random numbers, on resume too."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer in ("adamw", "adam"):
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        fused = torch.cuda.is_available() and all(p.is_cuda for p in params)
        return cls(params, lr=lr, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    try:
        import prodigyopt
    except ImportError as err:
        raise ConfigError("--optimizer prodigy needs prodigyopt: pip install prodigyopt") from err
    return prodigyopt.Prodigy(params, lr=lr, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)


def build_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of ``--lr-scheduler``, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_steps,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )


def train_step(
    accelerator: Any,
    model: torch.nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    micro_batches: Sequence[dict[str, Any]],
    *,
    seed: int,
    step: int,
    compute_dtype: torch.dtype,
    max_grad_norm: float,
    schedule: Any = None,
) -> StepOutput:
    """One optimizer step over ``micro_batches`` (gradient accumulation): forward, backward, clip, update.

    ``model`` and ``optimizer`` come from ``accelerator.prepare``. Noise, timesteps and LoRA dropout are
    seeded from (seed, step, micro-batch, rank), so a step gives the same numbers whenever it runs.
    Raises ``TrainingDiverged`` before touching the weights when the loss or the gradients are not finite.
    """
    device, rank, count = accelerator.device, accelerator.process_index, len(micro_batches)
    total = torch.zeros((), device=device)
    for micro, batch in enumerate(micro_batches):
        generator = torch.Generator(device).manual_seed(step_seed(seed, step, micro, rank))
        torch.manual_seed(step_seed(seed, step, micro, rank, 1))  # LoRA dropout
        moments = batch["moments"].to(device, non_blocking=True)
        embeds = batch["prompt_embeds"].to(device, non_blocking=True)
        image = batch.get(IMAGE_MOMENTS)
        image = image.to(device, non_blocking=True) if image is not None else None
        # Gradients are all-reduced once per step, on the last micro-batch.
        sync = contextlib.nullcontext() if micro == count - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                loss = objective(model, moments, embeds, generator, compute_dtype, image_moments=image)
            accelerator.backward(loss / count)
        total += loss.detach() / count
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    grad_norm = float(grad_norm) if grad_norm is not None else math.nan
    mean_loss = accelerator.reduce(total, "mean").item()
    overflow = not math.isfinite(grad_norm) and accelerator.scaler is not None  # fp16: the scaler's business
    if not math.isfinite(mean_loss) or (not math.isfinite(grad_norm) and not overflow):
        what = f"loss {mean_loss}" if not math.isfinite(mean_loss) else f"gradient norm {grad_norm}"
        keys = [k for batch in micro_batches for k in batch.get("keys", [])]
        raise TrainingDiverged(
            f"Training diverged at step {step}: {what} (samples on process {rank}: {', '.join(keys) or '?'}). "
            "No weights were updated or written for this step; the checkpoints in the run folder are intact. "
            "Try a lower --learning-rate, more --lr-warmup-steps, --mixed-precision bf16 instead of fp16, or "
            "check the cache with `cogvx shards verify`."
        )
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(mean_loss, grad_norm, skipped=bool(overflow and accelerator.optimizer_step_was_skipped))
