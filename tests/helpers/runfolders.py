"""Run folders for the stages that read them: a trained tiny LoRA, validation files as training writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cogvx.media import to_uint8
from cogvx.pipeline import models
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train

PROMPTS = ("a red ball bounces", "a blue box & <b>bold</b> slides left")
SIZE = {"num_frames": 9, "height": 32, "width": 64}


def make_validation(run: Path, model: str = "tiny", steps: tuple[int, ...] = (2, 4), prompts=PROMPTS) -> dict:
    """Validation files as training writes them (the issue-4 contract), made with the diffusers pipeline.

    Returns {(step, k): frames the pipeline itself decodes from the same seed}, to compare decoding with.
    """
    from diffusers import CogVideoXPipeline
    from safetensors.torch import save_file

    pipe = CogVideoXPipeline.from_pretrained(models.resolve_model(model), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    expected = {}
    for step in steps:
        folder = run / "validation" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, prompt in enumerate(prompts):
            seed = 100 * step + k
            call = {"num_inference_steps": 2, "guidance_scale": 6.0, **SIZE}
            latents = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="latent", **call).frames
            pixels = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **call).frames
            expected[step, k] = to_uint8(np.asarray(pixels[0]))
            meta = {
                "prompt": prompt, "seed": seed, "step": step, "model": model, "guidance_scale": 6.0,
                "num_inference_steps": 2, **SIZE, "scaling_factor": pipe.vae.config.scaling_factor,
            }  # fmt: skip
            # Training stores JSON-encoded strings; render must read them (plain strings too).
            save_file(
                {"latents": latents.contiguous()},
                folder / f"sample-{k:02d}.safetensors",
                metadata={key: json.dumps(value) for key, value in meta.items()},
            )
    return expected


def train_lora(shards: Path, output: Path, model: str | None = None, steps: int = 3) -> Path:
    """A finished tiny LoRA run of ``steps`` steps in ``output`` (fp32, no checkpoints); the run folder."""
    cfg = TrainConfig(
        shards=shards, output=output, model=model, max_steps=steps, rank=4, learning_rate=1e-2,
        mixed_precision="no", workers=0, checkpoint_every=0,
    )  # fmt: skip
    train(cfg)
    return output
