"""``cogvx train``: one training run, setup -> build -> fit, its parts each owning their own job and cadence.

``run`` builds a ``TrainingRun`` once from the config. Its loop steps the optimizer (``step.train_step``)
and after each step calls the parts that decide for themselves whether it is their turn: the held-out
scorer (``evaluation.Evaluator``), the log (``logbook``), the validator and the checkpoint manager. The
run folder is held by ``folder.guard`` from start to end. Only the transformer's weights are read: the
VAE and the text encoder stay on disk (their configs tell whether the cache fits the model).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cogvx import config as configfile
from cogvx import interrupts, runs
from cogvx.pipeline import levers, lora, memory, models
from cogvx.pipeline.objective import Objective
from cogvx.pipeline.speed import attention, checkpointing, compiling, float8
from cogvx.train import checkpoint, evaluation, folder, launch, report, setup
from cogvx.train.auto import choose_checkpointing
from cogvx.train.checkpointer import CheckpointManager
from cogvx.train.config import TrainConfig
from cogvx.train.data import SKIPPED_SHARDS, ShardStream, make_loader
from cogvx.train.logbook import Logbook
from cogvx.train.step import build_optimizer, build_schedule, train_step
from cogvx.train.validator import SECONDS_FIELD, Validator


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
    image_to_video: bool = False  # the model conditions on a first frame: sampling its LoRA needs one


def run(
    cfg: TrainConfig, on_step: Callable[[dict[str, Any]], None] | None = None, show_progress: bool = False
) -> TrainResult:
    """Train a LoRA as ``cfg`` says, holding the run folder against other runs from start to end."""
    timeline = launch.Timeline()
    timeline.mark(runs.LAUNCH_IMPORTS)  # this module's imports: torch, diffusers' and peft's are the bulk
    memory.use_expandable_segments()  # before the accelerator touches CUDA
    accelerator = launch.make_accelerator(cfg)
    with folder.guard(accelerator, cfg.output):
        timeline.mark(runs.LAUNCH_ACCELERATOR)
        training = TrainingRun(accelerator, cfg, timeline)
        finished = training.setup()
        if finished is not None:
            return finished
        training.build()
        return training.fit(on_step, show_progress)


class TrainingRun:
    """One run: ``setup`` (what it trains on, checked), ``build`` (the model and the parts), ``fit`` (the loop)."""

    def __init__(self, accelerator, cfg: TrainConfig, timeline: launch.Timeline | None = None):
        self.accelerator, self.cfg = accelerator, cfg
        self.timeline = timeline or launch.Timeline()
        self.main, self.world = accelerator.is_main_process, accelerator.num_processes
        self.checkpoints = CheckpointManager(accelerator, cfg)
        self.log = Logbook(accelerator, cfg)
        self.evaluator: evaluation.Evaluator | None = None
        self.validator: Validator | None = None

    def setup(self) -> TrainResult | None:
        """Where the run starts and what it trains on; a finished run (nothing to train) comes back at once."""
        start = self.checkpoints.find_start()  # first: a run that cannot resume stops at once
        if start.finished is not None:  # a finished run without checkpoints: nothing to train, maybe to push
            done = TrainResult(self.cfg.output, start.finished, resumed_from=start.finished)
            if self.main and self.cfg.push_to_hub:
                done.pushed = self.checkpoints.push_run(start.finished)
            return done
        self.prepared = setup.prepare(self.accelerator, self.cfg, self.checkpoints)
        self.cfg = self.prepared.cfg
        self.timeline.mark(runs.LAUNCH_SETUP)
        return None

    def build(self) -> None:
        """The stream, the transformer with its LoRA and speed levers, the optimizer, the parts; resumed if asked."""
        accelerator, cfg, prepared, timeline = self.accelerator, self.cfg, self.prepared, self.timeline
        if cfg.fp8_matmul:  # before the model loads, not after
            float8.check_fp8_matmul(accelerator.device)
        attention.check(cfg.attention, cfg.fp8_attention, accelerator.device)  # FA3 on Hopper, before the model loads
        self.compute_dtype = models.DTYPES[cfg.mixed_precision]
        self.progress = checkpoint.Progress(
            world_size=self.world, workers=cfg.workers, config=prepared.resolved, held_out=prepared.held_out
        )
        # The loader's workers start first and fetch the first batches while the weights load.
        resumed_at = self._batches_resumed()
        self.batches = self._batches(resumed_at)
        timeline.mark(runs.LAUNCH_LOADER)
        compile_blocks = cfg.compile if cfg.compile is not None else accelerator.device.type == "cuda"
        mode, plan = self._checkpointing(compile_blocks)
        # Read straight onto the device, but for ``swap``, whose blocks' weights live in CPU memory: levers.prepare
        # moves all the rest there, one block at a time, so the device never holds the whole model.
        transformer = prepared.info.load_transformer(
            self.compute_dtype, "cpu" if mode.swaps_weights else accelerator.device
        )
        timeline.mark(runs.LAUNCH_TRANSFORMER)
        noise_scheduler = prepared.info.load_scheduler()
        self.validator = Validator.build(
            accelerator, cfg, prepared.store, prepared.manifest, prepared.info, transformer.config.patch_size,
            model_name=prepared.model_name, scheduler_config=dict(noise_scheduler.config), dtype=self.compute_dtype,
        )  # fmt: skip
        torch.manual_seed(cfg.seed)  # LoRA A matrices start random: same seed, same start
        self.params = lora.add_lora(transformer, cfg.rank, cfg.alpha, cfg.targets, cfg.lora_dropout)
        timeline.mark(runs.LAUNCH_LORA)
        if compile_blocks:  # later launches load the compiled blocks instead of compiling them again
            compiling.use_persistent_compile_cache()
        levers.prepare(
            transformer,
            levers.Levers(
                mode,
                compile_blocks,
                cfg.fp8_base,
                cfg.fp8_matmul,
                attention=cfg.attention,
                fp8_attention=cfg.fp8_attention,
            ),  # fmt: skip
            accelerator.device,
        )
        timeline.mark(runs.LAUNCH_LEVERS)
        lr = cfg.learning_rate * (cfg.batch_size * cfg.gradient_accumulation * self.world if cfg.scale_lr else 1)
        optimizer = build_optimizer(cfg, self.params, lr)
        self.schedule = build_schedule(cfg, optimizer)
        self.objective = Objective(
            transformer.config,
            noise_scheduler.alphas_cumprod,
            prepared.info.scaling_factor,
            image_latent_scale=prepared.info.image_latent_scale if prepared.info.image_to_video else None,
            noised_image_dropout=cfg.noised_image_dropout,
        )
        self.evaluator = self._evaluator()
        best = self.evaluator.best if self.evaluator is not None and cfg.keep_best else None
        self.checkpoints.track(lora.LoraState(transformer), optimizer, self.schedule, self.progress, best)
        self.checkpoints.restore(cfg, lr)
        if self.progress.batches_consumed != resumed_at:  # the stream started where the checkpoint says
            raise RuntimeError(
                f"The data stream started after {resumed_at} batches, the checkpoint restored "
                f"{self.progress.batches_consumed}: the resumed run would train on other batches."
            )
        self.model, self.optimizer = accelerator.prepare(transformer, optimizer)
        timeline.mark(runs.LAUNCH_OPTIMIZER)
        self._record_run(mode, plan)
        if self.evaluator is not None:
            self._score_base()

    def _checkpointing(self, compile_blocks: bool) -> tuple[checkpointing.Mode, memory.Plan | None]:
        """The checkpointing mode, and for ``auto`` its plan, known before any weight is read.

        ``auto`` plans on the transformer's shapes alone (on the meta device, its LoRA added as training adds
        it): the same sizes as the loaded model's, so the same plan.
        """
        cfg = self.cfg
        if cfg.checkpointing != checkpointing.AUTO:
            return checkpointing.named(cfg.checkpointing), None
        shapes = self.prepared.info.load_transformer(self.compute_dtype, "meta")
        lora.add_lora(shapes, cfg.rank, cfg.alpha, cfg.targets, cfg.lora_dropout)
        plan = choose_checkpointing(self.accelerator, cfg, shapes, self.prepared.manifest, compile_blocks)
        return plan.mode, plan

    def _evaluator(self) -> evaluation.Evaluator | None:
        """The held-out scorer, when the run has an eval set: every process reads the samples of its own share."""
        from accelerate.utils import gather_object

        prepared, accelerator = self.prepared, self.accelerator
        if prepared.eval_set is None:
            return None
        return evaluation.Evaluator(
            prepared.eval_set,
            prepared.eval_store,
            prepared.eval_manifest,
            self.objective,
            every=self.cfg.eval_every,
            compute_dtype=self.compute_dtype,
            device=accelerator.device,
            rank=accelerator.process_index,
            world_size=self.world,
            gather=gather_object,
            autocast=accelerator.autocast,
            keep_best=self.cfg.output if self.cfg.keep_best else None,
        )

    def _batches_resumed(self) -> int:
        """The batches the run had consumed at the checkpoint it resumes from (0 for a new run)."""
        found = self.checkpoints.found
        return 0 if found is None else checkpoint.read_progress(found)["batches_consumed"]

    def _batches(self, skip_batches: int):
        """This process's batches after the first ``skip_batches``, its loader's workers started now."""
        cfg, accelerator = self.cfg, self.accelerator
        stream = ShardStream(
            self.prepared.store,
            self.prepared.train_shards,
            cfg.batch_size,
            cfg.seed,
            accelerator.process_index,
            self.world,
            shuffle_buffer=cfg.shuffle_buffer,
            random_flip=cfg.random_flip,
            skip_batches=skip_batches,
            skip_bad=cfg.skip_bad_shards,
        )
        return iter(make_loader(stream, cfg.workers, pin_memory=accelerator.device.type == "cuda"))

    def _record_run(self, mode: checkpointing.Mode, plan: memory.Plan | None) -> None:
        """The run folder's config files, and the log opened with the settings in effect.

        They record the mode actually installed, not ``auto``: the TOML reruns it as is, and the JSON also
        keeps auto's plan. A checkpoint keeps the setting as given, which resume compares.
        """
        prepared = self.prepared
        self.resolved = prepared.resolved | {"checkpointing": mode.name}
        if self.main:
            recorded = {runs.CACHE_ID: prepared.manifest.sha256}  # `cogvx compare` knows a cache by it
            if plan is not None:
                recorded[runs.CHECKPOINTING_PLAN] = plan.recorded()
            recorded[runs.ATTENTION_KERNELS] = attention.installed(self.accelerator.unwrap_model(self.model)).recorded()
            if self.evaluator is not None:
                recorded |= {runs.EVAL_SET: self.evaluator.identity, runs.EVAL_SAMPLES: len(prepared.eval_set.scored)}
            runs.keep_metrics_until(self.cfg.output, self.progress.step)
            toml = configfile.to_toml(TrainConfig(**self.resolved))
            runs.write_config(self.cfg.output, self.resolved | recorded, toml)
            self.recorded, self.toml = recorded, toml
        self.log.start(self.resolved, self.progress.step)

    def _record_kernels(self) -> None:
        """config.json again when ``--attention auto`` has chosen kernels for new shapes (the first step's,
        the first validation's, the first eval score's) or attention replay has started or grown its host
        buffers (a larger shape): the run folder says which kernel ran and what replay holds."""
        if not self.main:
            return
        kernels = attention.installed(self.accelerator.unwrap_model(self.model))
        before = self.recorded[runs.ATTENTION_KERNELS]
        # A choice is never undone, so counting them tells a new one; replay's record is a few numbers.
        if len(kernels.chosen) != len(before["chosen"]) or kernels.replay.recorded() != before["replay"]:
            self.recorded[runs.ATTENTION_KERNELS] = kernels.recorded()
            runs.write_config(self.cfg.output, self.resolved | self.recorded, self.toml)

    def _score_base(self) -> None:
        """The base model's score (the LoRA off), once per run folder and eval set: step 0 of every eval curve.

        The main process decides from the run's metrics (its folder alone may hold them) and tells the others:
        the score is split across processes, so all of them compute it or none.
        """
        from accelerate.utils import broadcast_object_list

        accelerator, evaluator = self.accelerator, self.evaluator
        needed = evaluation.needs_base(runs.read_metrics(self.cfg.output), evaluator.identity) if self.main else None
        if self.world > 1:
            needed = broadcast_object_list([needed])[0]
        if not needed:
            return
        fields = evaluator.base_fields(accelerator.unwrap_model(self.model))
        self.log.write_base(fields, self.progress.step)
        accelerator.print(
            f"Base model's eval loss {fields['eval_base_loss']:.4g} on {fields['eval_samples']} held-out samples "
            f"({fields['eval_seconds']:.1f} s); the LoRA is scored every {self.cfg.eval_every} steps."
        )

    def fit(self, on_step: Callable[[dict[str, Any]], None] | None, show_progress: bool) -> TrainResult:
        """Train to ``max_steps``; after each step, every part does what is due, then ``on_step`` sees the record."""
        cfg, start = self.cfg, self.progress.step
        result = TrainResult(cfg.output, start, resumed_from=start, image_to_video=self.prepared.info.image_to_video)
        self.model.train()
        with self.log.progress(show_progress, start):
            for step in range(start + 1, cfg.max_steps + 1):
                interrupts.check()  # a Ctrl-C swallowed inside some __del__ stops the run here
                record = self._step(step, result)
                last = step == cfg.max_steps
                trained = self.accelerator.unwrap_model(self.model)
                scored = {} if self.evaluator is None else self.evaluator.after_step(trained, step, last)
                record |= scored
                validated = None if self.validator is None else self.validator.after_step(trained, step, last)
                if validated is not None:  # before the record is written, so that it carries the time
                    result.validation += validated
                    record[SECONDS_FIELD] = validated.total_seconds
                self.log.write(record, scored)
                self.checkpoints.after_step(step, last)
                self._record_kernels()
                if on_step:
                    on_step(record)
        return self._finish(result)

    def _step(self, step: int, result: TrainResult) -> dict[str, Any]:
        """One optimizer step on the next batches; its metrics record, also kept in ``result``."""
        from accelerate.utils import gather_object

        cfg = self.cfg
        first = not result.losses  # this process's first step: the end of its launch
        started = time.perf_counter()
        micro_batches = [next(self.batches) for _ in range(cfg.gradient_accumulation)]
        self.progress.batches_consumed += cfg.gradient_accumulation
        if first:
            self.timeline.mark(runs.LAUNCH_FIRST_BATCH)
            forwarded = self.accelerator.unwrap_model(self.model).register_forward_hook(self._first_forward)
        out = train_step(
            self.accelerator,
            self.model,
            self.objective,
            self.optimizer,
            self.params,
            micro_batches,
            seed=cfg.seed,
            step=step,
            compute_dtype=self.compute_dtype,
            max_grad_norm=cfg.max_grad_norm,
            schedule=self.schedule,
        )
        seconds = time.perf_counter() - started
        if first:
            forwarded.remove()
            self._synchronize()
            self.timeline.mark(runs.LAUNCH_FIRST_STEP)
        keys = [k for batch in micro_batches for k in batch["keys"]]
        skipped = sorted({s for b in micro_batches for s in b.get(SKIPPED_SHARDS, ())} - set(result.skipped_shards))
        record = {
            "step": step,
            "loss": out.loss,
            "lr": self.schedule.get_last_lr()[0],
            "grad_norm": out.grad_norm,
            "samples_per_s": cfg.batch_size * cfg.gradient_accumulation * self.world / seconds,
            "step_seconds": seconds,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0,
            "samples": gather_object([keys]) if self.world > 1 else [keys],  # per process
        }
        if first:
            record[runs.LAUNCH] = dict(self.timeline.phases)
        if out.skipped:
            record["skipped"] = True
        if skipped:  # --skip-bad-shards: said once, at the step that first went without them
            record[SKIPPED_SHARDS] = skipped
            result.skipped_shards += skipped
        result.losses.append(out.loss)
        result.steps = self.progress.step = step
        return record

    def _first_forward(self, *_) -> None:
        """The forward hook of the first step: its first forward computed (the device waited for), marked."""
        if runs.LAUNCH_FIRST_FORWARD in self.timeline.phases:  # a later micro-batch of the first step
            return
        self._synchronize()
        self.timeline.mark(runs.LAUNCH_FIRST_FORWARD)

    def _synchronize(self) -> None:
        """Wait for the device's queued work: once per launch, so that the timeline says when work was done."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)

    def _finish(self, result: TrainResult) -> TrainResult:
        """The LoRA, loss curve and model card written; the processes taken down together; the push."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        result.model = accelerator.unwrap_model(self.model)
        launch.check_replicas_agree(accelerator, self.params)
        if self.main:
            self._write_outputs(result)
        # torch frees a gloo process group holding the GIL and joins gloo's worker threads, which may still
        # need the GIL to drop the last gather's tensors: one rank deadlocked in a few CPU runs. The barrier
        # lets those threads finish; dropping the DDP wrapper first means its reducer does not hold the last
        # reference, so end_training frees the group once, with idle workers.
        accelerator.wait_for_everyone()
        del self.model, self.optimizer
        accelerator.free_memory()
        accelerator.end_training()
        if self.main and self.cfg.push_to_hub:  # after the other processes are done: a failed upload must not hang them
            result.pushed = self.checkpoints.push_run(result.steps)
        return result

    def _write_outputs(self, result: TrainResult) -> None:
        """The main process's end of run: the LoRA weights, the loss curve, the model card."""
        output, prepared = self.cfg.output, self.prepared
        weights = lora.save_lora(result.model, output)
        records = runs.read_metrics(output)
        result.eval = evaluation.summary(records)
        report.draw_loss_curve(records, runs.loss_curve(output))
        card = report.model_card(
            model_name=prepared.model_name,
            model_source=prepared.info.source,
            config=self.resolved,
            steps=result.steps,
            records=records,
            manifest=prepared.manifest,
            weights_name=weights.name,
            world_size=self.world,
            image_to_video=prepared.info.image_to_video,
            eval_summary=result.eval,
        )
        runs.model_card(output).write_text(card)
