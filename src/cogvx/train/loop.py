"""``cogvx train``: the LoRA loop, setup -> build -> fit, in one readable function.

It reads only the transformer's weights: the VAE and the text encoder stay on disk (their configs
are read to check that the cache fits the model). ``train_step`` is one optimizer step on its own,
so benchmarks time exactly what training runs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cogvx import config as configfile
from cogvx import media, runs
from cogvx.errors import CacheError, CogvxError, ConfigError, ModelError, RunError
from cogvx.pipeline import levers, lora, memory, models
from cogvx.pipeline.objective import Objective
from cogvx.pipeline.speed import checkpointing, compiling, float8, swap
from cogvx.progress import progress_bar
from cogvx.shards import Manifest, ShardRecord, paths
from cogvx.shards.manifest import IMAGE_MOMENTS
from cogvx.shards.store import Store, display, open_store
from cogvx.train import checkpoint, evaluation, heldout, report, resume
from cogvx.train.config import TrainConfig
from cogvx.train.data import SKIPPED_SHARDS, ShardStream, check_batch_fits, make_loader, unit_count
from cogvx.train.heldout import EvalSet
from cogvx.train.validation import load_validation_set, run_validation

# accelerate's word for each of our precisions (models.DTYPES names); used only where the Accelerator is built.
ACCELERATE_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


class TrainingDiverged(RunError):
    """The loss or the gradients stopped being finite; nothing non-finite was saved."""


@dataclass
class TrainResult:
    output: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    skipped_shards: list[str] = field(default_factory=list)  # --skip-bad-shards: the shards this process skipped
    resumed_from: int = 0
    model: torch.nn.Module | None = None  # the trained transformer with its LoRA, unwrapped
    validation: list[Path] = field(default_factory=list)  # latents this process wrote
    pushed: str | None = None  # the Hub commit URL of --push-to-hub
    eval: evaluation.Summary | None = None  # the eval scores (main process), for the end message


@dataclass
class StepOutput:
    loss: float  # mean over micro-batches and processes
    grad_norm: float  # before clipping
    skipped: bool = False  # fp16 only: the loss scaler found inf gradients and skipped the update


def check_cache_fits(manifest: Manifest, info: models.ModelInfo, shards: Path | str) -> None:
    """Refuse a cache whose latents or prompt embeddings another VAE, text encoder or prompt length made."""
    stored, wanted = manifest.producer.get("encoders", {}), info.encoder_identity()
    differs = info.identity_mismatch(stored)
    if differs:
        details = "; ".join(f"{k}: cache {stored.get(k)!r}, model {wanted[k]!r}" for k in differs)
        raise ModelError(
            f"The cache {shards} was encoded for {manifest.producer.get('model')!r}, whose VAE, text encoder or "
            f"prompt length differ from {info.name!r} ({details}). Preprocess the videos again with "
            f"--model {info.name}."
        )


def check_mirrors(manifest: Manifest, cfg: TrainConfig) -> None:
    """``--random-flip`` needs a mirrored variant of every sample; say the command that adds them."""
    if cfg.random_flip == 0:
        return
    missing = manifest.missing_mirrors()
    if missing:
        data = shlex.quote(str(manifest.producer.get("data") or "VIDEOS"))
        model = shlex.quote(str(manifest.producer.get("model")))
        cache = display(cfg.shards)
        raise CacheError(
            f"--random-flip {cfg.random_flip:g} needs the mirrored variant of every sample, and {len(missing)} of "
            f"{manifest.original_count} samples in {cache} have none. Add them (only the mirrors are "
            f"encoded): cogvx preprocess --data {data} --output {shlex.quote(cache)} --model {model} --flip"
        )


def check_image_latents(manifest: Manifest, info: models.ModelInfo, shards: Path) -> None:
    """An image-to-video model conditions on each clip's first frame: refuse a cache without its latents."""
    if not info.image_to_video:
        return
    missing = manifest.sample_count - manifest.image_latent_count
    if missing:
        data = shlex.quote(str(manifest.producer.get("data") or "VIDEOS"))
        raise CacheError(
            f"{info.name} is an image-to-video model, and {missing} of {manifest.sample_count} samples in {shards} "
            f"have no image latents. Add them (videos are not encoded again): cogvx preprocess --data {data} "
            f"--output {shlex.quote(str(shards))} --image-latents"
        )


def check_packable(manifest: Manifest, info: models.ModelInfo, transformer: dict[str, Any], shards: Path) -> None:
    """Every bucket must make whole patches this transformer can place, before its weights are read.

    Latent frames always pack: 1.5 pads them in front to a multiple of ``patch_size_t``, as its pipeline
    does. Sizes may not: 1.5's rotary grid is cut from one of the transformer's sample size, so a bucket
    may not exceed it, and learned position embeddings (5b-I2V) exist for the sample size alone.
    """
    p, p_t = transformer.get("patch_size") or 1, transformer.get("patch_size_t")
    sample = (transformer.get("sample_height", 0), transformer.get("sample_width", 0))
    pixels = "x".join(str(n * info.spatial_compression) for n in sample)
    for bucket, layout in sorted(manifest.layouts().items()):
        height, width = layout["moments"]["shape"][2:]
        problem = None
        if height % p or width % p:
            problem = f"its latents are {height}x{width}, not a multiple of the patch size {p}"
        elif transformer.get("use_learned_positional_embeddings") and (height, width) != sample:
            problem = f"its learned position embeddings exist for {pixels} pixels only"
        elif p_t and (height > sample[0] or width > sample[1]):
            problem = f"it is larger than the {pixels} pixels its position embeddings cover"
        if problem:
            raise CacheError(
                f"{info.name} cannot pack bucket {bucket} of {shards}: {problem}. Preprocess again with buckets "
                f"it packs: cogvx preprocess --data VIDEOS --output NEW_CACHE --model {info.name} --resolution HxW"
            )


def choose_eval_set(
    cfg: TrainConfig, store: Store, manifest: Manifest
) -> tuple[EvalSet | None, Store, Manifest, str | None]:
    """What the eval score is computed on (None: no score), the cache it is read from, and the line to print.

    ``--eval-shards``: all of another cache, nothing held out; else, with ``--eval-every``, the clips of the
    training cache that ``--eval-holdout`` (or the default rule) holds out.
    """
    if cfg.eval_shards is not None:
        eval_store, eval_manifest, eval_set = heldout.separate_set(cfg.eval_shards, cfg.cache_dir)
        line = (
            f"Eval score on the {eval_set.clips} clips ({len(eval_set.scored)} samples) of {eval_store.location} "
            f"({heldout.flag(heldout.EVAL_SHARDS_FIELD)}); nothing is held out of training."
        )
        return eval_set, eval_store, eval_manifest, line
    if not cfg.eval_every:
        return None, store, manifest, None
    eval_set, line = heldout.choose(manifest, cfg.eval_holdout, store.location)
    if eval_set is None and cfg.keep_best:
        raise ConfigError(f"--keep-best keeps the LoRA of the lowest eval score, and this run has none. {line}")
    return eval_set, store, manifest, line


def check_eval_cache(manifest: Manifest, info: models.ModelInfo, transformer: dict[str, Any], location: str) -> None:
    """``--eval-shards``: the same checks as the training cache's, the message saying which cache it was."""
    try:
        check_cache_fits(manifest, info, location)
        check_image_latents(manifest, info, location)
        check_packable(manifest, info, transformer, location)
    except CogvxError as err:
        raise type(err)(f"{heldout.flag(heldout.EVAL_SHARDS_FIELD)} {location}: {err}") from err


def check_training_left(
    shards: list[ShardRecord], eval_set: EvalSet | None, batch_size: int, world: int, location: str
) -> None:
    """The samples left to train on (held-out ones taken away) must fill one forward pass."""
    left, batch = unit_count(shards), batch_size * world
    if eval_set is not None and not eval_set.separate and left < batch:
        raise ConfigError(
            f"The {eval_set.clips} clips held out for the eval score leave {left} samples of {location} to train on, "
            f"fewer than the {batch} of one forward pass (--batch-size {batch_size} x {world} process(es)). Hold out "
            f"fewer ({heldout.flag(heldout.HOLDOUT_FIELD)} N, 0 for none), take a smaller --batch-size, or score a "
            f"cache of its own with {heldout.flag(heldout.EVAL_SHARDS_FIELD)} DIR."
        )
    check_batch_fits(shards, batch_size, world, location)


def frame_count_warning(manifest: Manifest, info: models.ModelInfo) -> str | None:
    """CogVideoX 1.5 was trained on 8k+1 frames (``frame_step``): odd latent counts, one padding frame in front.

    Other 4k+1 counts pack too (an even latent count needs no padding), so they train, with a word on it.
    """
    if info.frame_step == info.temporal_compression:
        return None
    odd = sorted(b for b in manifest.bucket_counts() if (int(b.split("x")[0]) - 1) % info.frame_step)
    if not odd:
        return None
    return (
        f"[warning] {info.name} was trained on {info.frame_step}k+1 frames (latents padded to whole tokens, as "
        f"its pipeline pads them); buckets {', '.join(odd)} are not, so they train without that padding frame. "
        f"A cache preprocessed with --model {info.name} has {info.frame_step}k+1 buckets."
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
            raise ConfigError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    try:
        import prodigyopt
    except ImportError as err:
        raise ConfigError("--optimizer prodigy needs prodigyopt: pip install prodigyopt") from err
    return prodigyopt.Prodigy(params, lr=lr, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)


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


def run(
    cfg: TrainConfig, on_step: Callable[[dict[str, Any]], None] | None = None, show_progress: bool = False
) -> TrainResult:
    """Train a LoRA as ``cfg`` says, holding the run folder against other runs from start to end."""
    memory.use_expandable_segments()  # before the accelerator touches CUDA
    accelerator = _accelerator(cfg)
    with _hold_run_folder(accelerator, cfg.output), _disk_errors_in_one_line(cfg.output):
        return _run(accelerator, cfg, on_step, show_progress)


def _run(accelerator, cfg: TrainConfig, on_step, show_progress: bool) -> TrainResult:
    from accelerate.utils import gather_object

    # --- setup ---
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if main:  # the folder exists: _hold_run_folder made it
        checkpoint.clean_stale(cfg.output)
    start = _checkpoint_to_resume(accelerator, cfg)  # first: a run that cannot resume stops at once
    if start.note:
        accelerator.print(start.note)
    if start.finished is not None:  # a finished run without checkpoints: nothing to train, maybe to push
        done = TrainResult(cfg.output, start.finished, resumed_from=start.finished)
        if main and cfg.push_to_hub:
            done.pushed = _push(cfg, f"cogvx: LoRA after {start.finished} steps")
        return done
    found = start.checkpoint
    # A remote cache is streamed (shards verified as they are copied); its display form is what the run records.
    store = open_store(cfg.shards, cache_dir=cfg.cache_dir)
    manifest = Manifest.load(store)
    model_name = models.choose_model(cfg.model, (manifest.producer.get("model"), store.url(paths.MANIFEST)))
    from_cache = cfg.model is None  # the cache's model comes with the revision and variant it was read at
    info = models.ModelInfo.read(
        model_name,
        cfg.model_revision or (manifest.producer.get("revision") if from_cache else None),
        cfg.model_variant or (manifest.producer.get("variant") if from_cache else None),
    )
    eval_set, eval_store, eval_manifest, eval_line = choose_eval_set(cfg, store, manifest)
    originals = heldout.training_originals(manifest, eval_set)  # what --epochs counts
    held_out = eval_set.keys_hash if eval_set is not None and not eval_set.separate else ""
    # What the run records and a checkpoint compares on resume: the settings in effect (never a URL's credentials).
    settings = configfile.as_dict(cfg.steps_for(originals, world)) | {"shards": store.location}
    if eval_set is not None and eval_set.separate:
        settings["eval_shards"] = eval_store.location
    resolved = settings | {"model": model_name}
    resolved |= {f"model_{key}": value for key, value in info.recorded().items() if key != "model"}
    if found is not None:  # before any other check: a resume that cannot be honoured says all it changes
        saved = checkpoint.read_progress(found)
        changed = resume.check(found, saved["config"], resolved)
        resume.check_held_out(found, saved, held_out)
        if changed:
            accelerator.print(changed)
    check_cache_fits(manifest, info, store.location)
    info.check_task()
    check_image_latents(manifest, info, store.location)
    transformer_config = info.read_config("transformer")
    check_packable(manifest, info, transformer_config, store.location)
    check_mirrors(manifest, cfg)
    if eval_set is not None and eval_set.separate:
        check_eval_cache(eval_manifest, info, transformer_config, eval_store.location)
    train_shards = heldout.training_shards(manifest.shards, eval_set)  # never a held-out sample, on any rank
    check_training_left(train_shards, eval_set, cfg.batch_size, world, store.location)
    if eval_line:
        accelerator.print(eval_line)
    warning = frame_count_warning(manifest, info)
    if warning:
        accelerator.print(warning)
    if cfg.epochs is not None:
        epochs, cfg = cfg.epochs, cfg.steps_for(originals, world)
        counted = "samples not held out" if held_out else "samples"
        accelerator.print(
            f"--epochs {epochs:g}: {cfg.max_steps} steps ({originals} {counted}, "
            f"{cfg.batch_size * cfg.gradient_accumulation * world} per step)."
        )
    torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.allow_tf32

    # --- build ---
    if cfg.fp8_matmul:  # before the model loads, not after
        float8.check_fp8_matmul(accelerator.device)
    compute_dtype = models.DTYPES[cfg.mixed_precision]
    # Loaded into CPU memory: levers.prepare moves it to the device, all but the swapped weights for ``swap``.
    transformer = info.load_transformer(compute_dtype, "cpu")
    validation = None
    if cfg.validation_every:
        patch = transformer.config.patch_size
        sizes = (cfg.validation_frames, cfg.validation_height, cfg.validation_width)
        validation = load_validation_set(store, manifest, info, patch, *sizes)
    torch.manual_seed(cfg.seed)  # LoRA A matrices start random: same seed, same start
    params = lora.add_lora(transformer, cfg.rank, cfg.alpha, cfg.targets, cfg.lora_dropout)
    compile_blocks = cfg.compile if cfg.compile is not None else accelerator.device.type == "cuda"
    if compile_blocks:  # later launches load the compiled blocks instead of compiling them again
        compiling.use_persistent_compile_cache()
    plan = None
    if cfg.checkpointing == checkpointing.AUTO:
        plan = _choose_checkpointing(accelerator, cfg, transformer, manifest, compile_blocks)
    mode = plan.mode if plan is not None else checkpointing.named(cfg.checkpointing)
    chosen = levers.Levers(mode, compile_blocks, cfg.fp8_base, fp8_matmul=cfg.fp8_matmul)
    levers.prepare(transformer, chosen, accelerator.device)
    lr = cfg.learning_rate * (cfg.batch_size * cfg.gradient_accumulation * world if cfg.scale_lr else 1)
    optimizer = build_optimizer(cfg, params, lr)
    schedule = build_schedule(cfg, optimizer)
    noise_scheduler = info.load_scheduler()
    objective = Objective(
        transformer.config,
        noise_scheduler.alphas_cumprod,
        info.scaling_factor,
        image_latent_scale=info.image_latent_scale if info.image_to_video else None,
        noised_image_dropout=cfg.noised_image_dropout,
    )
    evaluator = None
    if eval_set is not None:  # every process reads the samples of its own share of the score
        evaluator = evaluation.Evaluator(
            eval_set,
            eval_store,
            eval_manifest,
            objective,
            every=cfg.eval_every,
            compute_dtype=compute_dtype,
            device=accelerator.device,
            rank=rank,
            world_size=world,
            gather=gather_object,
            autocast=accelerator.autocast,
            keep_best=cfg.output if cfg.keep_best else None,
        )

    # The one state a checkpoint holds, saved and loaded as a whole (the raw optimizer: accelerate's wrapper
    # shares its state).
    progress = checkpoint.Progress(world_size=world, workers=cfg.workers, config=resolved, held_out=held_out)
    state = {
        checkpoint.LORA: lora.LoraState(transformer),
        "optimizer": optimizer,
        "lr_schedule": schedule,
        checkpoint.PROGRESS: progress,
    }
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler
    if evaluator is not None and cfg.keep_best:
        state[checkpoint.BEST] = evaluator.best
    if found is not None:
        checkpoint.load(found, state)
        if evaluator is not None and evaluator.best.discarded is not None:
            accelerator.print(
                f"[warning] {found} kept its best LoRA by scores on another eval set: --keep-best starts over "
                "from this run's scores."
            )
        # The loaded optimizer and schedule states hold the checkpoint's learning rate and hyperparameters.
        hyper = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon, "weight_decay": cfg.weight_decay}
        lr_changed = resume.apply_to_optimizer(optimizer, schedule, lr, hyper)
        if lr_changed:
            accelerator.print(lr_changed)
        _warn_if_data_order_changes(accelerator, found, progress.written_by, cfg, world)
        accelerator.print(f"Resuming from {found} (step {progress.step}).")
    start_step = progress.step

    model, optimizer = accelerator.prepare(transformer, optimizer)
    stream = ShardStream(
        store,
        train_shards,
        cfg.batch_size,
        cfg.seed,
        rank,
        world,
        shuffle_buffer=cfg.shuffle_buffer,
        random_flip=cfg.random_flip,
        skip_batches=progress.batches_consumed,
        skip_bad=cfg.skip_bad_shards,
    )
    batches = iter(make_loader(stream, cfg.workers, pin_memory=accelerator.device.type == "cuda"))
    # The run folder records the mode actually installed, not ``auto``: its TOML reruns it as is, and the JSON
    # also keeps auto's plan. A checkpoint keeps the setting as given, which resume compares.
    resolved = resolved | {"checkpointing": mode.name}
    if main:
        runs.keep_metrics_until(cfg.output, start_step)
        recorded = {runs.CACHE_ID: Manifest.identity(store)}  # `cogvx compare` knows a cache by it
        if plan is not None:
            recorded[runs.CHECKPOINTING_PLAN] = plan.recorded()
        if evaluator is not None:
            recorded |= {runs.EVAL_SET: evaluator.identity, runs.EVAL_SAMPLES: len(eval_set.scored)}
        runs.write_config(cfg.output, resolved | recorded, configfile.to_toml(TrainConfig(**resolved)))
    if cfg.report_to != "none":
        accelerator.init_trackers("cogvx", config={k: str(v) for k, v in resolved.items()})
    if evaluator is not None:
        _score_base(accelerator, cfg, evaluator, accelerator.unwrap_model(model), start_step)

    # --- fit ---
    result = TrainResult(cfg.output, start_step, resumed_from=start_step)
    model.train()
    bar = progress_bar(
        show_progress and main,
        "train",
        cfg.max_steps,
        f"loss (EMA {media.EMA_WEIGHT:g}) {{task.fields[loss]:.4f}}  {{task.fields[rate]:.2f}} steps/s",
        loss=float("nan"),
        rate=0.0,
    )
    smoothed = media.Ema()  # the bar shows the loss as the card, the report and the final line do
    for earlier in runs.read_metrics(cfg.output) if main else []:
        if math.isfinite(earlier.get("loss", math.nan)):
            smoothed.update(earlier["loss"])
    with bar as update:
        update(start_step)
        for step in range(start_step + 1, cfg.max_steps + 1):
            started = time.perf_counter()
            micro_batches = [next(batches) for _ in range(cfg.gradient_accumulation)]
            progress.batches_consumed += cfg.gradient_accumulation
            out = train_step(
                accelerator,
                model,
                objective,
                optimizer,
                params,
                micro_batches,
                seed=cfg.seed,
                step=step,
                compute_dtype=compute_dtype,
                max_grad_norm=cfg.max_grad_norm,
                schedule=schedule,
            )
            seconds = time.perf_counter() - started
            keys = [k for batch in micro_batches for k in batch["keys"]]
            skipped = sorted({s for b in micro_batches for s in b.get(SKIPPED_SHARDS, ())} - set(result.skipped_shards))
            record = {
                "step": step,
                "loss": out.loss,
                "lr": schedule.get_last_lr()[0],
                "grad_norm": out.grad_norm,
                "samples_per_s": cfg.batch_size * cfg.gradient_accumulation * world / seconds,
                "step_seconds": seconds,
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0,
                "samples": gather_object([keys]) if world > 1 else [keys],  # per process
            }
            if out.skipped:
                record["skipped"] = True
            if skipped:  # --skip-bad-shards: said once, at the step that first went without them
                record[SKIPPED_SHARDS] = skipped
                result.skipped_shards += skipped
            result.losses.append(out.loss)
            result.steps = progress.step = step
            last = step == cfg.max_steps
            scored = {} if evaluator is None else evaluator.after_step(accelerator.unwrap_model(model), step, last)
            record |= scored
            if main:
                runs.append_metrics(cfg.output, record)
            if cfg.report_to != "none":
                scalars = ("loss", "lr", "grad_norm", "samples_per_s", "peak_memory_gb")
                logged = {f"train/{k}": record[k] for k in scalars} | evaluation.tracker_scalars(scored)
                accelerator.log(logged, step=step)
            update(step, loss=smoothed.update(out.loss) if math.isfinite(out.loss) else out.loss, rate=1.0 / seconds)
            if validation is not None and (step % cfg.validation_every == 0 or last):
                result.validation += run_validation(
                    accelerator.unwrap_model(model),
                    validation,
                    output=cfg.output,
                    step=step,
                    seed=cfg.seed,
                    model_name=model_name,
                    info=info,
                    scheduler_config=dict(noise_scheduler.config),
                    num_inference_steps=cfg.validation_steps,
                    guidance_scale=cfg.validation_guidance,
                    dtype=compute_dtype,
                    autocast=accelerator.autocast,
                    rank=rank,
                    world_size=world,
                )
                accelerator.wait_for_everyone()
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or last):
                _save_checkpoint(accelerator, cfg, state)
            if on_step:
                on_step(record)

    # --- finish ---
    accelerator.wait_for_everyone()
    result.model = accelerator.unwrap_model(model)
    _check_replicas_agree(accelerator, params)
    if main:
        weights = lora.save_lora(result.model, cfg.output)
        records = runs.read_metrics(cfg.output)
        result.eval = evaluation.summary(records)
        report.draw_loss_curve(records, runs.loss_curve(cfg.output))
        card = report.model_card(
            model_name=model_name,
            model_source=info.source,
            config=resolved,
            steps=result.steps,
            records=records,
            manifest=manifest,
            weights_name=weights.name,
            world_size=world,
            image_to_video=info.image_to_video,
            eval_summary=result.eval,
        )
        runs.model_card(cfg.output).write_text(card)
    # torch frees a gloo process group holding the GIL and joins gloo's worker threads, which may still
    # need the GIL to drop the last gather's tensors: one rank deadlocked in a few CPU runs. The barrier
    # lets those threads finish; dropping the DDP wrapper first means its reducer does not hold the last
    # reference, so end_training frees the group once, with idle workers.
    accelerator.wait_for_everyone()
    del model, optimizer
    accelerator.free_memory()
    accelerator.end_training()
    if main and cfg.push_to_hub:  # after the other processes are done: a failed upload must not hang them
        result.pushed = _push(cfg, f"cogvx: LoRA after {result.steps} steps")
    return result


def _score_base(
    accelerator, cfg: TrainConfig, evaluator: evaluation.Evaluator, model: torch.nn.Module, start_step: int
) -> None:
    """The base model's score (the LoRA off), once per run folder and eval set: step 0 of every eval curve.

    The main process decides from the run's metrics (its folder alone may hold them) and tells the others:
    the score is split across processes, so all of them compute it or none.
    """
    from accelerate.utils import broadcast_object_list

    needed = (
        evaluation.needs_base(runs.read_metrics(cfg.output), evaluator.identity)
        if accelerator.is_main_process
        else None
    )
    if accelerator.num_processes > 1:
        needed = broadcast_object_list([needed])[0]
    if not needed:
        return
    fields = evaluator.base_fields(model)
    if accelerator.is_main_process:
        runs.append_metrics(cfg.output, fields)
        if start_step:  # a resumed run scoring a new eval set: its line goes first, as the steps are in order
            runs.keep_metrics_until(cfg.output, start_step)
    if cfg.report_to != "none":
        accelerator.log(evaluation.tracker_scalars(fields), step=0)
    accelerator.print(
        f"Base model's eval loss {fields['eval_base_loss']:.4g} on {fields['eval_samples']} held-out samples "
        f"({fields['eval_seconds']:.1f} s); the LoRA is scored every {cfg.eval_every} steps."
    )


def _push(cfg: TrainConfig, message: str, checkpoint_folder: Path | None = None) -> str:
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


def _checkpoint_to_resume(accelerator, cfg: TrainConfig) -> resume.Start:
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
        except Exception as err:  # told to the others first (as _hold_run_folder does), then raised here
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


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available

    if cfg.report_to == "tensorboard" and not is_tensorboard_available():
        raise ConfigError("--report-to tensorboard needs tensorboard: pip install tensorboard")
    if cfg.report_to == "wandb" and not is_wandb_available():
        raise ConfigError("--report-to wandb needs wandb: pip install wandb, then `wandb login`")
    asked = _processes_asked_of_accelerate()
    if asked > 1:
        raise ConfigError(
            f"`accelerate launch` was asked for {asked} processes but started one (without several GPUs its plain "
            f"launcher runs a single process). Add --multi-gpu, which starts them through torch's launcher (gloo on "
            f"CPUs): accelerate launch --multi-gpu --num-processes {asked} -m cogvx train ..."
        )
    # Accelerate keeps its settings process-wide; a second run in one process (tests, notebooks) may differ.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        # Without a GPU, accelerate joins torchrun's processes (gloo) only when told to run on the CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=ACCELERATE_PRECISION[cfg.mixed_precision],
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(cfg.output), logging_dir=str(runs.logs(cfg.output))),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise ConfigError(
            f"The launcher started {launched} processes but accelerate sees {accelerator.num_processes}: each would "
            "train alone and overwrite the others' files. Launch with `torchrun` or `accelerate launch`."
        )
    return accelerator


def _processes_asked_of_accelerate() -> int:
    """The --num-processes of an `accelerate launch` that started this process alone (1 when none did).

    accelerate's plain launcher (chosen without --multi-gpu when fewer than two GPUs are visible) runs
    one process and tells it nothing of --num-processes: only the launcher's command line says it.
    """
    if "ACCELERATE_USE_CPU" not in os.environ or "WORLD_SIZE" in os.environ:
        return 1  # not started by accelerate's plain launcher
    import psutil

    launcher = psutil.Process().parent()
    args = launcher.cmdline() if launcher is not None else []
    if not any("accelerate" in arg for arg in args[:3]):
        return 1
    for index, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name in ("--num-processes", "--num_processes"):
            value = value or (args[index + 1] if index + 1 < len(args) else "")
            return int(value) if value.isdigit() else 1
    return 1


def _warn_if_data_order_changes(accelerator, found: Path, state: dict[str, Any], cfg: TrainConfig, world: int) -> None:
    """``state`` is the checkpoint's progress as written: its settings, processes and data workers."""
    warning = resume.data_order_warning(found, state, world, cfg.workers, configfile.as_dict(cfg))
    if warning:
        accelerator.print(warning)


def _choose_checkpointing(
    accelerator, cfg: TrainConfig, transformer, manifest: Manifest, compiled: bool
) -> memory.Plan:
    """``--checkpointing auto``: the fastest mode whose predicted peak fits every process's device, said aloud.

    Planned for the cache's largest bucket, so no batch of the run needs more than the prediction.
    """
    from accelerate.utils import gather_object

    shapes = [layout["moments"]["shape"][1:] for layout in manifest.layouts().values()]
    frames, height, width = max(shapes, key=lambda shape: shape[0] * shape[1] * shape[2])
    size = memory.StepSize.of(dict(transformer.config), frames, height, width, cfg.batch_size)
    fp8 = cfg.fp8_base or cfg.fp8_matmul  # both store the blocks' frozen weights in float8
    static = memory.static_bytes(transformer) - (float8.fp8_saving(transformer) if fp8 else 0)
    peaks = memory.predict(static, size, compiled, swap.swap_saving(transformer, fp8))
    budget = memory.device_budget(accelerator.device, cfg.max_memory)
    if accelerator.num_processes > 1:  # one mode for all: the tightest device decides
        budget = min(gather_object([budget]))
    plan = memory.plan(peaks, budget)
    where = f"{_size(budget)} " + ("allowed by --max-memory" if cfg.max_memory else "available")
    if not plan.fits:
        accelerator.print(
            f"[warning] --checkpointing auto: even {plan.mode.name} is predicted to need {_size(plan.peak)}, more "
            f"than the {where}; trying it anyway. A smaller --batch-size, --fp8-base or smaller buckets need less."
        )
        return plan
    why = "; ".join(f"{name} would need {_size(peak)}" for name, peak in plan.faster().items())
    accelerator.print(
        f"--checkpointing auto: {plan.mode.name} (predicted peak {_size(plan.peak)} of {where}"
        + (f"; {why}" if why else "")
        + ")."
    )
    return plan


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _check_replicas_agree(accelerator, params: Sequence[torch.nn.Parameter]) -> None:
    """Data-parallel processes must end with the same LoRA; a mismatch means a silent desync."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        summary = torch.stack([sum(p.double().sum() for p in params), sum(p.double().square().sum() for p in params)])
    everyone = accelerator.gather(summary.to(accelerator.device).unsqueeze(0))
    if not torch.equal(everyone, everyone[:1].expand_as(everyone)):
        raise RuntimeError(
            f"The LoRA weights differ between processes at the end of training ({everyone.tolist()}); "
            f"data-parallel training went out of sync. Please report this with the run's {runs.CONFIG_TOML}."
        )


def _save_checkpoint(accelerator, cfg: TrainConfig, state: dict[str, checkpoint.Stateful]) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        saved = checkpoint.save(cfg.output, state, cfg.keep_checkpoints)
        if cfg.push_checkpoints:
            try:
                _push(cfg, f"cogvx: checkpoint {saved.name}", saved)
            except CogvxError as err:  # training goes on; the final push uploads the finished run
                print(f"[warning] the push of {saved.name} failed, training goes on: {err}", flush=True)
    accelerator.wait_for_everyone()
