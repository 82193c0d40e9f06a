"""Validation during training without T5 or the VAE: latents for the cache's validation prompts.

``cogvx preprocess --validation-prompt ...`` stores the prompts' T5 embeddings (and the empty prompt's,
for guidance) in ``<cache>/validation_prompts.safetensors``. Every ``--validation-every`` steps the
trainer samples latents for them with the transformer alone and writes
``validation/step-NNNNNN/sample-KK.safetensors``: tensor ``latents`` ``[1, F, C, H, W]`` in the model's
scaled latent space (what ``CogVideoXPipeline(..., output_type="latent")`` returns) and metadata whose
values are JSON strings (prompt, seed, step, model, guidance_scale, num_inference_steps, height,
width, num_frames, scaling_factor). ``cogvx render`` decodes them with the VAE later.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cogvx import runs
from cogvx.errors import CacheError, ConfigError
from cogvx.pipeline.models import ModelInfo
from cogvx.pipeline.sampling import sample_latents
from cogvx.shards import Manifest, paths
from cogvx.shards.store import Store, open_store


@dataclass
class ValidationSet:
    prompts: list[str]
    prompt_embeds: torch.Tensor  # [N, L, D], L: the model's max_text_tokens
    negative_prompt_embeds: torch.Tensor  # [1, L, D], the empty prompt
    num_frames: int
    height: int
    width: int


def load_validation_set(
    shards: Path | str | Store,
    manifest: Manifest,
    info: ModelInfo,
    patch_size: int,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> ValidationSet:
    """The cache's validation prompts, and the video size to sample (default: the cache's first bucket)."""
    from safetensors.torch import load

    store = open_store(shards)
    entry = manifest.extras.get(paths.VALIDATION_ENTRY)
    name = (entry or {}).get("file", paths.VALIDATION_PROMPTS)
    path = store.url(name)
    size = store.size(name) if entry else None
    if size is None:
        raise CacheError(
            f"--validation-every needs validation prompts in the cache, but {path} does not exist. Add them with "
            f"`cogvx preprocess --data VIDEOS --output {store.location} --validation-prompt 'a prompt' ...` (clips "
            "already in the cache are not encoded again), or pass --validation-every 0."
        )
    data = store.read_bytes(name, limit=size)  # read once (from a URL too), hashed and parsed from memory
    if len(data) != size or (entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]):
        raise CacheError(f"{path} changed since the manifest recorded it; run `cogvx preprocess` again to rewrite it.")
    tensors = load(data)  # the bytes the manifest recorded: written by preprocess, so they parse
    prompts = json.loads(_metadata(data).get("prompts", "[]"))
    embeds, negative = tensors["prompt_embeds"], tensors["negative_prompt_embeds"]
    if len(prompts) != embeds.shape[0] or embeds.shape[-1] != info.text_embed_dim:
        raise CacheError(
            f"{path} holds {embeds.shape[0]} embeddings of width {embeds.shape[-1]} for {len(prompts)} prompts; "
            f"expected one per prompt of width {info.text_embed_dim}. Run `cogvx preprocess` again to rewrite it."
        )
    buckets = sorted(manifest.bucket_counts(), key=lambda b: tuple(int(v) for v in b.split("x")))
    first = [int(v) for v in buckets[0].split("x")] if buckets else [49, *info.native_size]
    frames, height, width = frames or first[0], height or first[1], width or first[2]
    multiple = info.spatial_compression * patch_size
    if height % multiple or width % multiple:
        raise ConfigError(
            f"--validation-height/--validation-width {height}x{width} must be multiples of {multiple} for "
            f"{info.name} (VAE compression {info.spatial_compression} x patch size {patch_size})."
        )
    return ValidationSet(prompts, embeds, negative, frames, height, width)


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob: its header is 8 bytes of length, then JSON."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length]) if 8 + length <= len(data) else {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def run_validation(
    model: torch.nn.Module,
    validation: ValidationSet,
    *,
    output: Path,
    step: int,
    seed: int,
    model_name: str,
    info: ModelInfo,
    scheduler_config: dict[str, Any],
    num_inference_steps: int,
    guidance_scale: float,
    dtype: torch.dtype,
    autocast: Any,
    rank: int = 0,
    world_size: int = 1,
) -> list[Path]:
    """Sample this process's share of the prompts (prompt k on rank k % world) and write one file each."""
    folder = runs.validation_step(output, step)
    folder.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    written = []
    try:
        for index in range(rank, len(validation.prompts), world_size):
            sample_seed = seed + index
            with autocast():
                latents = sample_latents(
                    model,
                    scheduler_config,
                    validation.prompt_embeds[index : index + 1].to(device, dtype),
                    validation.negative_prompt_embeds.to(device, dtype),
                    num_frames=validation.num_frames,
                    height=validation.height,
                    width=validation.width,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=torch.Generator().manual_seed(sample_seed),
                    spatial_compression=info.spatial_compression,
                    temporal_compression=info.temporal_compression,
                )
            metadata = {
                "prompt": validation.prompts[index],
                "seed": sample_seed,
                "step": step,
                "model": model_name,
                "guidance_scale": guidance_scale,
                "num_inference_steps": num_inference_steps,
                "height": validation.height,
                "width": validation.width,
                "num_frames": validation.num_frames,
                "scaling_factor": info.scaling_factor,
            }
            written.append(runs.write_validation_sample(runs.validation_sample(folder, index), latents, metadata))
    finally:
        model.train(was_training)
    return written
