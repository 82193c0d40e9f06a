"""``cogvx train``: the LoRA loop, setup -> build -> fit, in one readable function.

It reads only the transformer's weights: the VAE and the text encoder stay on disk (their configs
are read to check that the cache fits the model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cogvx import config as configfile
from cogvx.pipeline import lora, models
from cogvx.pipeline.objective import Objective
from cogvx.progress import progress_bar
from cogvx.shards import Manifest
from cogvx.train import checkpoint
from cogvx.train.config import TrainConfig
from cogvx.train.data import ShardStream, make_loader

WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
METRICS_NAME = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite; nothing non-finite was saved."""


@dataclass
class TrainResult:
    output: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    model: torch.nn.Module | None = None  # the trained transformer with its LoRA, unwrapped


def check_cache_fits(manifest: Manifest, info: models.ModelInfo, shards: Path) -> None:
    """Refuse a cache whose latents or prompt embeddings another VAE or text encoder made."""
    stored, wanted = manifest.producer.get("encoders", {}), info.encoder_identity()
    differs = [k for k in wanted if stored.get(k) != wanted[k]]
    if differs:
        details = "; ".join(f"{k}: cache {stored.get(k)!r}, model {wanted[k]!r}" for k in differs)
        raise ValueError(
            f"The cache {shards} was encoded for {manifest.producer.get('model')!r}, whose VAE/text encoder "
            f"differ from {info.name!r} ({details}). Preprocess the videos again with --model {info.name}."
        )


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
            raise ImportError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    try:
        import prodigyopt
    except ImportError as err:
        raise ImportError("--optimizer prodigy needs prodigyopt: pip install prodigyopt") from err
    return prodigyopt.Prodigy(params, lr=lr, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)


def _keep_metrics_until(path: Path, step: int) -> None:
    """On resume, drop the lines of steps after the checkpoint: they will be trained again."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def run(
    cfg: TrainConfig, on_step: Callable[[dict[str, Any]], None] | None = None, show_progress: bool = False
) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler

    # --- setup ---
    # Accelerate keeps its settings process-wide; a second run in one process (tests, notebooks) may differ.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(cfg.output),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    manifest = Manifest.load(cfg.shards)
    model_name = cfg.model or manifest.producer["model"]
    info = models.ModelInfo.read(model_name)
    check_cache_fits(manifest, info, cfg.shards)
    torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    cfg.output.mkdir(parents=True, exist_ok=True)

    # --- build ---
    transformer = models.load_transformer(info.source, WEIGHT_DTYPES[cfg.mixed_precision], accelerator.device)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    torch.manual_seed(cfg.seed)  # LoRA A matrices start random: same seed, same start
    params = lora.add_lora(transformer, cfg.rank, cfg.alpha, cfg.targets, cfg.lora_dropout)
    lr = cfg.learning_rate * (cfg.batch_size * cfg.gradient_accumulation * world if cfg.scale_lr else 1)
    optimizer = build_optimizer(cfg, params, lr)
    schedule = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_steps,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
    objective = Objective(transformer.config, models.load_scheduler(info.source).alphas_cumprod, info.scaling_factor)

    start_step, batches_consumed = 0, 0
    found = checkpoint.find(cfg.output, cfg.resume) if cfg.resume else None
    saved_states: dict[str, Any] = {}
    if found is not None:
        state, lora_weights, saved_states = checkpoint.load(found)
        if (state["world_size"], state["workers"]) != (world, cfg.workers):
            accelerator.print(
                f"[warning] {found} was written with {state['world_size']} process(es) x {state['workers']} "
                f"data worker(s); now {world} x {cfg.workers}. Training resumes, but the data order differs."
            )
        lora.load_lora_state(transformer, lora_weights)
        optimizer.load_state_dict(saved_states["optimizer"])
        schedule.load_state_dict(saved_states["lr_schedule"])
        start_step, batches_consumed = state["step"], state["batches_consumed"]
    elif cfg.resume and cfg.resume != "auto":
        raise ValueError(f"--resume {cfg.resume}: no checkpoint found.")

    model, optimizer = accelerator.prepare(transformer, optimizer)
    if "scaler" in saved_states and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved_states["scaler"])
    stream = ShardStream(
        cfg.shards, manifest.shards, cfg.batch_size, cfg.seed, rank, world, cfg.shuffle_buffer, batches_consumed
    )
    batches = iter(make_loader(stream, cfg.workers, pin_memory=accelerator.device.type == "cuda"))
    metrics_path = cfg.output / METRICS_NAME
    if accelerator.is_main_process:
        _keep_metrics_until(metrics_path, start_step)
        resolved = configfile.as_dict(cfg) | {"model": model_name}
        (cfg.output / "config.json").write_text(json.dumps(resolved, indent=1))
        (cfg.output / "config.toml").write_text(configfile.to_toml(TrainConfig(**resolved)))
    if cfg.report_to != "none":
        accelerator.init_trackers("cogvx", config={k: str(v) for k, v in configfile.as_dict(cfg).items()})

    # --- fit ---
    compute_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    result = TrainResult(cfg.output, start_step, resumed_from=start_step)
    model.train()
    bar = progress_bar(
        show_progress and accelerator.is_main_process,
        "train",
        cfg.max_steps,
        "loss {task.fields[loss]:.4f}  {task.fields[rate]:.2f} steps/s",
        loss=float("nan"),
        rate=0.0,
    )
    with bar as update:
        update(start_step)
        for step in range(start_step + 1, cfg.max_steps + 1):
            started = time.perf_counter()
            total_loss = torch.zeros((), device=accelerator.device)
            for micro in range(cfg.gradient_accumulation):
                batch = next(batches)
                batches_consumed += 1
                generator = torch.Generator(accelerator.device).manual_seed(step_seed(cfg.seed, step, micro, rank))
                torch.manual_seed(step_seed(cfg.seed, step, micro, rank, 1))  # LoRA dropout
                moments = batch["moments"].to(accelerator.device, non_blocking=True)
                embeds = batch["prompt_embeds"].to(accelerator.device, non_blocking=True)
                last = micro == cfg.gradient_accumulation - 1
                with accelerator.no_sync(model) if not last else contextlib.nullcontext(), accelerator.autocast():
                    loss = objective(model, moments, embeds, generator, compute_dtype)
                    accelerator.backward(loss / cfg.gradient_accumulation)
                total_loss += loss.detach() / cfg.gradient_accumulation
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            mean_loss = accelerator.reduce(total_loss, "mean").item()
            if not math.isfinite(mean_loss) or not torch.isfinite(torch.as_tensor(grad_norm)).item():
                what = f"loss {mean_loss}" if not math.isfinite(mean_loss) else f"gradient norm {float(grad_norm)}"
                raise TrainingDiverged(
                    f"Training diverged at step {step}: {what}. No weights were written for this step; the last "
                    f"checkpoint in {cfg.output} is intact. Try a lower --learning-rate, --mixed-precision bf16 "
                    "instead of fp16, or check the cache with `cogvx shards verify`."
                )
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)

            seconds = time.perf_counter() - started
            record = {
                "step": step,
                "loss": mean_loss,
                "lr": schedule.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "samples_per_s": cfg.batch_size * cfg.gradient_accumulation * world / seconds,
                "step_seconds": seconds,
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0,
            }
            result.losses.append(mean_loss)
            result.steps = step
            if accelerator.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if cfg.report_to != "none":
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            update(step, loss=mean_loss, rate=1.0 / seconds)
            if on_step:
                on_step(record)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                _save_checkpoint(accelerator, cfg, model, optimizer, schedule, step, batches_consumed, world)

    # --- finish ---
    accelerator.wait_for_everyone()
    result.model = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        lora.save_lora(result.model, cfg.output)
    accelerator.end_training()
    return result


def _save_checkpoint(accelerator, cfg, model, optimizer, schedule, step, batches_consumed, world) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        states = {"optimizer": optimizer.state_dict(), "lr_schedule": schedule.state_dict()}
        if accelerator.scaler is not None:
            states["scaler"] = accelerator.scaler.state_dict()
        info = {
            "batches_consumed": batches_consumed,
            "world_size": world,
            "workers": cfg.workers,
            "config": configfile.as_dict(cfg),
        }
        lora_weights = lora.lora_state_dict(accelerator.unwrap_model(model))
        checkpoint.save(cfg.output, step, lora_weights, states, info, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
