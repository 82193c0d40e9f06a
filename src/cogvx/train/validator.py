"""The validator: samples the cache's validation prompts with the LoRA on the validation cadence, and times it.

It owns ``--validation-every`` (and the last step); the loop calls ``after_step`` after every step and
writes the seconds it took (``SECONDS_FIELD``) into that step's metrics line. Every process must call
it: the prompts are shared out across processes, and all of them wait for the others before training
goes on.
"""

from __future__ import annotations

from typing import Any

import torch

from cogvx import runs
from cogvx.pipeline import models
from cogvx.shards import Manifest
from cogvx.shards.store import Store
from cogvx.train.config import TrainConfig
from cogvx.train.validation import Validated, ValidationSet, load_validation_set, run_validation

SECONDS_FIELD = runs.VALIDATION_SECONDS  # named by the run folder's owner: the report reads it too


class Validator:
    """A run's validation: its prompts, the model facts sampling needs, and when it is due."""

    def __init__(
        self,
        accelerator,
        cfg: TrainConfig,
        validation: ValidationSet,
        *,
        model_name: str,
        info: models.ModelInfo,
        scheduler_config: dict[str, Any],
        dtype: torch.dtype,
    ):
        self.accelerator, self.cfg, self.validation = accelerator, cfg, validation
        self.model_name, self.info, self.scheduler_config, self.dtype = model_name, info, scheduler_config, dtype

    @classmethod
    def build(
        cls, accelerator, cfg: TrainConfig, store: Store, manifest: Manifest, info: models.ModelInfo, patch_size: int,
        **options: Any,
    ) -> Validator | None:  # fmt: skip
        """None without ``--validation-every``; else the cache's prompts read and checked now, before training."""
        if not cfg.validation_every:
            return None
        sizes = (cfg.validation_frames, cfg.validation_height, cfg.validation_width)
        validation = load_validation_set(store, manifest, info, patch_size, *sizes)
        return cls(accelerator, cfg, validation, info=info, **options)

    def should_validate(self, step: int, last: bool) -> bool:
        return step % self.cfg.validation_every == 0 or last

    def after_step(self, model: torch.nn.Module, step: int, last: bool) -> Validated | None:
        """Sample and write this process's prompts when due (None when not), then wait for the other processes."""
        if not self.should_validate(step, last):
            return None
        validated = run_validation(
            model,
            self.validation,
            output=self.cfg.output,
            step=step,
            seed=self.cfg.seed,
            model_name=self.model_name,
            info=self.info,
            scheduler_config=self.scheduler_config,
            num_inference_steps=self.cfg.validation_steps,
            guidance_scale=self.cfg.validation_guidance,
            dtype=self.dtype,
            autocast=self.accelerator.autocast,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
        )
        self.accelerator.wait_for_everyone()
        return validated
