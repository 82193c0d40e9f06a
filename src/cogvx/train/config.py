"""Every knob of ``cogvx train``: the TOML keys and the CLI flags are these fields, declared once.

``TrainConfig`` is composed of sections (the run, LoRA, optimizer, memory, data, validation, held-out eval,
checkpoints, hub, speed), each a dataclass with its fields and its own ``validate``; the fields stay flat
(``cfg.rank``, a ``rank = ...`` TOML line). This module imports no tensor library: the CLI's help reads it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from cogvx.config import (
    MAX_STEPS,
    PROBABILITY,
    SEED,
    check_choices,
    check_domains,
    integers,
    numbers,
    positive,
    setting,
    stage,
)
from cogvx.errors import ConfigError
from cogvx.locations import as_location
from cogvx.names import AUTO, DEFAULT_TARGETS, DTYPE_NAMES

OPTIMIZERS = ("adamw", "adam", "prodigy", "adamw8bit")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = DTYPE_NAMES  # bf16, fp16, fp32: the one dtype vocabulary
PRECISION_ALIASES = {"no": "fp32"}  # accelerate's word, still accepted (config.toml files of earlier runs say it)
REPORTERS = ("none", "tensorboard", "wandb")
DEFAULT_MAX_STEPS = 1000  # when neither --max-steps nor --epochs is given
REMOTE_OR_PATH = "a cache folder, or a URL that fsspec reads (s3://bucket/prefix, https://host/path/, gs://...)"


def _location(value: Path | str | None) -> Path | str | None:
    """A URL stays text (shards are streamed from it, never copied whole first), anything else is a path."""
    return None if value is None else as_location(value)


@dataclasses.dataclass
class RunSection:
    """What to train on, where to write, for how long."""

    # Required: a flag or a `shards = ...` line in the --config file; REMOTE_OR_PATH.
    shards: Path | str | None = setting(
        None, "Cache written by `cogvx preprocess`: a folder, or a URL (s3://bucket/prefix, https://host/path/)."
    )
    output: Path = setting(Path("runs/default"), "Run folder.")
    model: str | None = setting(None, "Base model.", rule="the one recorded in the cache")
    # A hub model's revision and weights variant (files NAME.VARIANT.safetensors); default: the cache's, when
    # the model is the cache's. Config-file settings (cogvx preprocess and sample take them as flags).
    model_revision: str | None = setting(None, file_only=True)
    model_variant: str | None = setting(None, file_only=True)
    max_steps: int | None = setting(
        None,
        "Optimizer steps.",
        rule=f"{DEFAULT_MAX_STEPS}, unless --epochs is given",
        domain=integers(1, MAX_STEPS),
    )
    epochs: float | None = setting(
        None, "Passes over the cache instead of --max-steps (samples / global batch each).", domain=positive(1e6)
    )
    batch_size: int = setting(
        1, "Samples per batch and process.", domain=integers(1, 4096, why="samples per batch and process")
    )
    gradient_accumulation: int = setting(1, "Batches per optimizer step.", domain=integers(1, 4096))

    def validate(self) -> None:
        if self.shards is None:
            raise ConfigError("cogvx train needs --shards (the cache folder), or `shards = ...` in the --config file.")
        self.shards = _location(self.shards)
        self.output = Path(self.output)
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError(f"Give --max-steps ({self.max_steps}) or --epochs ({self.epochs:g}), not both.")
        if self.max_steps is None and self.epochs is None:
            self.max_steps = DEFAULT_MAX_STEPS


@dataclasses.dataclass
class LoraSection:
    rank: int = setting(
        128,
        "LoRA rank.",
        domain=integers(1, 4096, why="a rank above the width of every CogVideoX layer (3072 in 5b) adds nothing"),
    )
    alpha: float = setting(128.0, "LoRA alpha.", domain=positive(1e6))
    targets: tuple[str, ...] = setting(DEFAULT_TARGETS, "Comma-separated modules.", comma_list=True)
    lora_dropout: float = setting(0.0, "Dropout on the LoRA input.", domain=numbers(0, 1, high_open=True))

    def validate(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if not self.targets:
            raise ConfigError("--targets names no module")


@dataclasses.dataclass
class OptimizerSection:
    optimizer: str = setting("adamw", "adamw, adam, prodigy, adamw8bit.", choices=OPTIMIZERS)
    learning_rate: float = setting(
        1e-4, "Peak learning rate.", domain=positive(10, why="prodigy's 1.0 is the largest in common use")
    )
    scale_lr: bool = setting(False, "Multiply LR by the total batch size.", decls=("--scale-lr/--no-scale-lr",))
    lr_scheduler: str = setting("constant", "constant, constant_with_warmup, linear, cosine, ...", choices=SCHEDULES)
    lr_warmup_steps: int = setting(0, "Steps of linear warm-up.", domain=integers(0, MAX_STEPS))
    lr_num_cycles: int = setting(1, domain=integers(1, 10**6), file_only=True)
    lr_power: float = setting(1.0, domain=positive(100), file_only=True)
    adam_beta1: float = setting(0.9, domain=numbers(0, 1, high_open=True), file_only=True)
    adam_beta2: float = setting(0.95, domain=numbers(0, 1, high_open=True), file_only=True)
    adam_epsilon: float = setting(1e-8, domain=positive(1), file_only=True)
    weight_decay: float = setting(1e-4, domain=numbers(0, 10), file_only=True)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.", domain=positive(1e9))

    def validate(self) -> None:
        """Choices are checked by ``check_choices``; nothing else here depends on another setting."""


@dataclasses.dataclass
class MemorySection:
    """Precision and memory."""

    mixed_precision: str = setting("bf16", "bf16, fp16 or fp32 (also: no).", choices=PRECISIONS)
    # auto: the fastest mode whose predicted peak fits the card (or max_memory); else none, selective (keeps
    # attention outputs), full (keeps block inputs), offload (block inputs in CPU RAM) or swap (also the
    # blocks' frozen weights in CPU RAM)
    checkpointing: str = setting(
        AUTO,
        "auto (the fastest mode predicted to fit), none (fastest), selective, full, offload or swap (least memory).",
    )
    max_memory: float | None = setting(
        None, "GB that --checkpointing auto may plan for.", rule="what the device has free", domain=positive(1e5)
    )
    allow_tf32: bool = setting(True, "TF32 matmuls for fp32 work on GPUs.", decls=("--allow-tf32/--no-allow-tf32",))

    def validate(self) -> None:
        from cogvx.pipeline.speed.checkpointing import MODES  # the registry of modes (it loads torch)

        self.mixed_precision = PRECISION_ALIASES.get(self.mixed_precision, self.mixed_precision)
        if self.checkpointing not in (AUTO, *MODES):
            raise ConfigError(
                f"--checkpointing must be one of {', '.join((AUTO, *MODES))} (got {self.checkpointing!r})"
            )


@dataclasses.dataclass
class DataSection:
    seed: int = setting(0, "Seed for LoRA init, data order and noise.", domain=SEED)
    workers: int = setting(2, "DataLoader worker processes.", domain=integers(0, 256))
    shuffle_buffer: int = setting(
        64, domain=integers(0, 65536, why="samples held in memory; 0 or 1 for no shuffling"), file_only=True
    )
    random_flip: float = setting(
        0.0, "Probability of drawing a sample's mirrored variant (preprocess --flip).", domain=PROBABILITY
    )
    cache_dir: Path | None = setting(
        None, "Keep a remote cache's verified shards here, to read them again locally."
    )  # kept by sha256 and read from here
    skip_bad_shards: bool = setting(False, "Skip (and report) missing or changed shards.", decls=("--skip-bad-shards",))
    # Image-to-video models: probability that a sample's image latents are all zeros (the reference I2V
    # script's --noised_image_dropout and default). A config-file setting.
    noised_image_dropout: float = setting(0.05, domain=PROBABILITY, file_only=True)

    def validate(self) -> None:
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)


@dataclasses.dataclass
class ValidationSection:
    """Latents sampled from the cache's validation prompts (transformer only), decoded later."""

    validation_every: int = setting(
        0, "Steps between validation samples of the cache's validation prompts, 0 for none.",
        domain=integers(0, MAX_STEPS),
    )  # fmt: skip
    validation_steps: int = setting(
        50, "Sampler steps for validation.", domain=integers(1, 1000, why="the sampler's schedule has 1000 timesteps")
    )
    validation_guidance: float = setting(6.0, "Classifier-free guidance for validation.", domain=numbers(0, 100))
    validation_frames: int | None = setting(
        None, "Validation video frames, 4k+1.", rule="the first bucket's", domain=integers(1, 1025)
    )
    validation_height: int | None = setting(
        None, "Validation height in pixels.", rule="the first bucket's", domain=integers(8, 8192)
    )
    validation_width: int | None = setting(
        None, "Validation width in pixels.", rule="the first bucket's", domain=integers(8, 8192)
    )

    def validate(self) -> None:
        if self.validation_frames is not None and self.validation_frames % 4 != 1:
            raise ConfigError(f"--validation-frames must be 4k+1, like 13 or 49 (got {self.validation_frames})")
        if any(v is not None and v % 8 for v in (self.validation_height, self.validation_width)):
            raise ConfigError("--validation-height and --validation-width must be positive multiples of 8")


@dataclasses.dataclass
class HeldOutSection:
    """The eval score: the loss on held-out clips at fixed timesteps and noise (docs/training.md)."""

    # 500 keeps the score within 5% of a 1000-step run's time at real size (BENCHMARKS.md, section 13).
    eval_every: int = setting(
        500, "Steps between eval scores (loss on held-out clips, fixed noise), 0 for none.",
        domain=integers(0, MAX_STEPS),
    )  # fmt: skip
    eval_holdout: float | None = setting(
        None,
        "Clips of --shards held out for the eval score: N clips, a fraction (0.1), or 0 for none.",
        rule="a tenth (at most 6) of a cache of 20 clips or more, else none",
        domain=numbers(0, 10**6, why="a number of clips, or a fraction of them below 1"),
    )
    eval_shards: Path | str | None = setting(
        None, "Score another cache (same encoders) instead of holding clips out, a folder or URL."
    )  # nothing is held out then
    keep_best: bool = setting(False, "Keep the LoRA of the lowest eval score in RUN/best/.", decls=("--keep-best",))

    def validate(self) -> None:
        from cogvx.train.heldout import check_request

        self.eval_shards = _location(self.eval_shards)
        check_request(self.eval_holdout)
        if self.eval_holdout is not None and self.eval_shards is not None:
            raise ConfigError(
                "Give --eval-holdout (clips held out of --shards) or --eval-shards (another cache), not both"
            )
        if self.eval_every == 0 and (self.eval_shards is not None or self.eval_holdout):
            raise ConfigError(
                "--eval-holdout and --eval-shards choose what --eval-every scores, and --eval-every 0 scores "
                "nothing; give --eval-every N, or drop them"
            )
        if self.keep_best and (self.eval_every == 0 or self.eval_holdout == 0):
            raise ConfigError(
                "--keep-best keeps the LoRA of the lowest eval score, and this run computes none (--eval-every 0 or "
                "--eval-holdout 0); give --eval-every N with held-out clips or --eval-shards DIR, or drop --keep-best"
            )


@dataclasses.dataclass
class CheckpointSection:
    """Checkpoints, resume, logging."""

    checkpoint_every: int = setting(500, "Steps between checkpoints, 0 for none.", domain=integers(0, MAX_STEPS))
    keep_checkpoints: int = setting(3, "Checkpoints to keep.", domain=integers(1, 10**4))
    resume: str | None = setting(None, "auto (newest checkpoint in --output) or a checkpoint folder.")
    report_to: str = setting("none", "none, tensorboard or wandb.", choices=REPORTERS)

    def validate(self) -> None:
        """Choices are checked by ``check_choices``; a --resume folder is checked when the run opens it."""


@dataclasses.dataclass
class HubSection:
    """The LoRA, model card, loss curve and config.toml to the Hugging Face Hub at the end (and each checkpoint's
    LoRA with push_checkpoints). The token comes from HF_TOKEN or `hf auth login`, never from here."""

    push_to_hub: bool = setting(
        False, "Upload the LoRA, model card, curve and config to the Hub at the end.", decls=("--push-to-hub",)
    )
    hub_model_id: str | None = setting(None, "The model repo, OWNER/NAME.")  # created if missing
    hub_private: bool = setting(False, file_only=True)  # a repo created by the push is private
    push_checkpoints: bool = setting(False, "Also upload each checkpoint's LoRA.", decls=("--push-checkpoints",))

    def validate(self) -> None:
        if (self.push_to_hub or self.push_checkpoints) and not self.hub_model_id:
            raise ConfigError("--push-to-hub needs --hub-model-id OWNER/NAME (the model repo to upload to)")


@dataclasses.dataclass
class SpeedSection:
    """Speed and memory levers (see BENCHMARKS.md for what each costs and saves)."""

    # One graph reused by every block; on with a GPU, where it measured 1.31x the seed-style step at less memory.
    compile: bool | None = setting(
        None, "torch.compile the blocks.", rule="on with a GPU, off on a CPU", decls=("--compile/--no-compile",)
    )
    fp8_base: bool = setting(False, "Store frozen base weights in float8.", decls=("--fp8-base/--no-fp8-base",))
    # Opt-in: it changes the numbers a little more than storage alone (BENCHMARKS.md has its loss curves).
    fp8_matmul: bool = setting(
        False,
        "Also multiply by the frozen base weights in float8 (Ada, Hopper or newer GPUs; implies --fp8-base).",
        decls=("--fp8-matmul/--no-fp8-matmul",),
    )

    # auto: FlashAttention-3 where it is installed, on a Hopper GPU, for each shape where it measured faster
    # than PyTorch's SDPA (timed once per shape at the start); sdpa: PyTorch's only; fa3: FlashAttention-3's.
    attention: str = setting(
        AUTO, "Attention kernel: auto (FlashAttention-3 where installed and faster, on Hopper), sdpa or fa3."
    )
    # Opt-in: float8 q, k, v change the validation samples a little; training and the eval score stay bf16.
    fp8_attention: bool = setting(
        False,
        "Float8 attention forward for validation sampling (FlashAttention-3 on Hopper); the eval score stays bf16.",
        decls=("--fp8-attention/--no-fp8-attention",),
    )

    def validate(self) -> None:
        from cogvx.pipeline.speed import attention  # the kernels and their check (it loads torch)

        precision = getattr(self, "mixed_precision", "bf16")
        if self.fp8_matmul and precision != "bf16":
            raise ConfigError(
                "--fp8-matmul needs --mixed-precision bf16 (its float8 products run only in bf16 compute)"
            )
        if self.fp8_attention and self.attention == attention.SDPA:
            raise ConfigError("--fp8-attention runs FlashAttention-3, which --attention sdpa rules out; drop one")
        wanted = [flag for flag, on in (("--attention fa3", self.attention == attention.FA3),
                                        ("--fp8-attention", self.fp8_attention)) if on]  # fmt: skip
        if wanted and precision == "fp32":
            raise ConfigError(
                f"{' and '.join(wanted)} needs --mixed-precision bf16 or fp16 (FlashAttention-3 has no fp32 kernels)"
            )
        attention.check(self.attention, self.fp8_attention)  # installed? (the GPU is checked when it is known)
        if self.fp8_attention and not getattr(self, "validation_every", 0):
            raise ConfigError(
                "--fp8-attention samples the validation videos with float8 attention, and this run samples none "
                "(--validation-every 0): add --validation-every N, or drop --fp8-attention"
            )


# Reversed: a dataclass lists the fields of its last base first, and the TOML files list them in this order.
SECTIONS = (
    SpeedSection,
    HubSection,
    CheckpointSection,
    HeldOutSection,
    ValidationSection,
    DataSection,
    MemorySection,
    OptimizerSection,
    LoraSection,
    RunSection,
)


@stage
class TrainConfig(*SECTIONS):
    def __post_init__(self):
        check_domains(self)
        for section in reversed(SECTIONS):
            section.validate(self)
        check_choices(self)

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
