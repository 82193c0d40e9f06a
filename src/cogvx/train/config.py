"""Every knob of ``cogvx train``: the TOML keys and the CLI flags are these fields."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cogvx.config import MAX_STEPS, PROBABILITY, SEED, Domain, check_domains, integers, numbers, positive
from cogvx.errors import ConfigError
from cogvx.pipeline.lora import DEFAULT_TARGETS
from cogvx.pipeline.models import DTYPES
from cogvx.pipeline.speed.checkpointing import AUTO
from cogvx.pipeline.speed.checkpointing import MODES as CHECKPOINTING
from cogvx.shards.store import is_remote
from cogvx.train.heldout import check_request

OPTIMIZERS = ("adamw", "adam", "prodigy", "adamw8bit")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = tuple(DTYPES)  # bf16, fp16, fp32: the one dtype vocabulary
PRECISION_ALIASES = {"no": "fp32"}  # accelerate's word, still accepted (config.toml files of earlier runs say it)
REPORTERS = ("none", "tensorboard", "wandb")
DEFAULT_MAX_STEPS = 1000  # when neither --max-steps nor --epochs is given


@dataclass
class TrainConfig:
    # required: a flag or a `shards = ...` line in the --config file. A cache folder, or a URL that fsspec reads
    # (s3://bucket/prefix, https://host/path/, gs://...): shards are streamed, never copied whole first.
    shards: Path | str | None = None
    output: Path = Path("runs/default")
    model: str | None = None  # default: the model recorded in the cache's manifest
    # A hub model's revision and weights variant (files NAME.VARIANT.safetensors); default: the cache's, when
    # the model is the cache's. Config-file settings (cogvx preprocess and sample take them as flags).
    model_revision: str | None = None
    model_variant: str | None = None
    max_steps: int | None = None  # default: DEFAULT_MAX_STEPS, or as many as `epochs` makes (resolved by train)
    epochs: float | None = None  # passes over the cache: its sample count over the global batch, per epoch
    batch_size: int = 1
    gradient_accumulation: int = 1
    # LoRA (the seed's defaults)
    rank: int = 128
    alpha: float = 128.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_dropout: float = 0.0
    # Optimisation (the seed's defaults)
    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    # Precision and memory
    mixed_precision: str = "bf16"  # bf16, fp16 or fp32 (no: fp32)
    # auto: the fastest mode whose predicted peak fits the card (or max_memory); else none, selective (keeps
    # attention outputs), full (keeps block inputs), offload (block inputs in CPU RAM) or swap (also the
    # blocks' frozen weights in CPU RAM)
    checkpointing: str = AUTO
    max_memory: float | None = None  # GB that --checkpointing auto may plan for; default: what the device has free
    allow_tf32: bool = True
    # Data
    seed: int = 0
    workers: int = 2
    shuffle_buffer: int = 64
    random_flip: float = 0.0  # probability of drawing a sample's mirrored variant (a cache made with --flip)
    cache_dir: Path | None = None  # a remote cache's verified shards are kept here (by sha256) and read from here
    skip_bad_shards: bool = False  # a missing or changed shard is skipped and reported instead of stopping the run
    # Image-to-video models: probability that a sample's image latents are all zeros (the reference I2V
    # script's --noised_image_dropout and default). A config-file setting.
    noised_image_dropout: float = 0.05
    # Validation: latents sampled from the cache's validation prompts (transformer only), decoded later
    validation_every: int = 0  # steps; 0 for none
    validation_steps: int = 50  # sampler steps
    validation_guidance: float = 6.0
    validation_frames: int | None = None  # default: the cache's first bucket
    validation_height: int | None = None
    validation_width: int | None = None
    # The eval score: the loss on held-out clips at fixed timesteps and noise (docs/training.md)
    # Steps between scores (and at the end); 0 for none, and then nothing is held out. 500 is meant to keep the
    # pass at about 5% of a run's time or less (bench/eval_cost.py measures it).
    eval_every: int = 500
    # Clips held out of the cache: a whole number of clips, a fraction in (0, 1), or 0 for none; default: a
    # tenth (at most 8) of a cache of 20 clips or more, none of a smaller one
    eval_holdout: float | None = None
    eval_shards: Path | str | None = None  # score another cache instead (same encoders); nothing is held out
    keep_best: bool = False  # keep the LoRA of the lowest eval score in RUN/best/
    # Checkpoints, logging
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: str | None = None  # "auto" or a checkpoint folder
    report_to: str = "none"
    # The Hugging Face Hub: the LoRA, model card, loss curve and config.toml at the end (and each checkpoint's
    # LoRA with push_checkpoints). The token comes from HF_TOKEN or `hf auth login`, never from here.
    push_to_hub: bool = False
    hub_model_id: str | None = None  # OWNER/NAME of the model repo; created if missing
    hub_private: bool = False  # a repo created by the push is private
    push_checkpoints: bool = False
    # Speed and memory (see BENCHMARKS.md for what each costs and saves)
    # torch.compile of the transformer blocks (one graph, reused by every block); default: on with a GPU,
    # where it measured 1.31x the seed-style step at less memory (BENCHMARKS.md), off on a CPU.
    compile: bool | None = None
    fp8_base: bool = False  # frozen base weights stored in float8 with per-channel scales (half of bf16)
    # Also their forward products in float8, on GPUs with float8 units (Ada, Hopper or newer); implies fp8_base.
    # Opt-in: it changes the numbers a little more than storage alone (BENCHMARKS.md has its loss curves).
    fp8_matmul: bool = False

    # What each numeric setting may be (cogvx.config.Domain): checked where it is read, file or flag.
    DOMAINS: ClassVar[dict[str, Domain]] = {
        "max_steps": integers(1, MAX_STEPS),
        "epochs": positive(1e6),
        "batch_size": integers(1, 4096, why="samples per batch and process"),
        "gradient_accumulation": integers(1, 4096),
        "rank": integers(1, 4096, why="a rank above the width of every CogVideoX layer (3072 in 5b) adds nothing"),
        "alpha": positive(1e6),
        "lora_dropout": numbers(0, 1, high_open=True),
        "learning_rate": positive(10, why="prodigy's 1.0 is the largest in common use"),
        "lr_warmup_steps": integers(0, MAX_STEPS),
        "lr_num_cycles": integers(1, 10**6, file_only=True),
        "lr_power": positive(100, file_only=True),
        "adam_beta1": numbers(0, 1, high_open=True, file_only=True),
        "adam_beta2": numbers(0, 1, high_open=True, file_only=True),
        "adam_epsilon": positive(1, file_only=True),
        "weight_decay": numbers(0, 10, file_only=True),
        "max_grad_norm": positive(1e9),
        "max_memory": positive(1e5),  # GB
        "seed": SEED,
        "workers": integers(0, 256),
        "shuffle_buffer": integers(0, 65536, why="samples held in memory; 0 or 1 for no shuffling", file_only=True),
        "random_flip": PROBABILITY,
        "noised_image_dropout": dataclasses.replace(PROBABILITY, file_only=True),
        "validation_every": integers(0, MAX_STEPS),
        "validation_steps": integers(1, 1000, why="the sampler's schedule has 1000 timesteps"),
        "validation_guidance": numbers(0, 100),
        "validation_frames": integers(1, 1025),
        "validation_height": integers(8, 8192),
        "validation_width": integers(8, 8192),
        "eval_every": integers(0, MAX_STEPS),
        "eval_holdout": numbers(0, 10**6, why="a number of clips, or a fraction of them below 1"),
        "checkpoint_every": integers(0, MAX_STEPS),
        "keep_checkpoints": integers(1, 10**4),
    }

    def steps_for(self, samples: int, processes: int) -> TrainConfig:
        """This config with ``max_steps`` resolved: ``epochs`` passes over ``samples`` at the global batch."""
        if self.epochs is None:
            return self
        global_batch = self.batch_size * self.gradient_accumulation * processes
        steps = max(1, math.ceil(self.epochs * samples / global_batch))
        if steps > MAX_STEPS:
            raise ConfigError(
                f"--epochs {self.epochs:g} over {samples} samples at {global_batch} per step is {steps} steps, more "
                f"than {MAX_STEPS}; give fewer --epochs or --max-steps N."
            )
        return dataclasses.replace(self, max_steps=steps, epochs=None)

    def __post_init__(self):
        check_domains(self)
        if self.shards is None:
            raise ConfigError("cogvx train needs --shards (the cache folder), or `shards = ...` in the --config file.")
        self.shards = self.shards if is_remote(self.shards) else Path(self.shards)
        self.output = Path(self.output)
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
        if self.eval_shards is not None and not is_remote(self.eval_shards):
            self.eval_shards = Path(self.eval_shards)
        check_request(self.eval_holdout)
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        self.mixed_precision = PRECISION_ALIASES.get(self.mixed_precision, self.mixed_precision)
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError(f"Give --max-steps ({self.max_steps}) or --epochs ({self.epochs:g}), not both.")
        if self.max_steps is None and self.epochs is None:
            self.max_steps = DEFAULT_MAX_STEPS
        checks = [
            (bool(self.targets), "--targets names no module"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.lr_scheduler in SCHEDULES, f"--lr-scheduler must be one of {', '.join(SCHEDULES)}"),
            (self.mixed_precision in PRECISIONS, f"--mixed-precision must be one of {', '.join(PRECISIONS)}"),
            (
                self.checkpointing in (AUTO, *CHECKPOINTING),
                f"--checkpointing must be one of {', '.join((AUTO, *CHECKPOINTING))} (got {self.checkpointing!r})",
            ),
            (
                not self.fp8_matmul or self.mixed_precision == "bf16",
                "--fp8-matmul needs --mixed-precision bf16 (its float8 products run only in bf16 compute)",
            ),
            (
                not (self.push_to_hub or self.push_checkpoints) or bool(self.hub_model_id),
                "--push-to-hub needs --hub-model-id OWNER/NAME (the model repo to upload to)",
            ),
            (
                self.eval_holdout is None or self.eval_shards is None,
                "Give --eval-holdout (clips held out of --shards) or --eval-shards (another cache), not both",
            ),
            (
                self.eval_every > 0 or (self.eval_shards is None and not self.eval_holdout),
                "--eval-holdout and --eval-shards choose what --eval-every scores, and --eval-every 0 scores "
                "nothing; give --eval-every N, or drop them",
            ),
            (
                not self.keep_best or (self.eval_every > 0 and self.eval_holdout != 0),
                "--keep-best keeps the LoRA of the lowest eval score, and this run computes none (--eval-every 0 or "
                "--eval-holdout 0); give --eval-every N with held-out clips or --eval-shards DIR, or drop --keep-best",
            ),
            (self.report_to in REPORTERS, f"--report-to must be one of {', '.join(REPORTERS)}"),
            (
                self.validation_frames is None or self.validation_frames % 4 == 1,
                f"--validation-frames must be 4k+1, like 13 or 49 (got {self.validation_frames})",
            ),
            (
                all(v is None or v % 8 == 0 for v in (self.validation_height, self.validation_width)),
                "--validation-height and --validation-width must be positive multiples of 8",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
