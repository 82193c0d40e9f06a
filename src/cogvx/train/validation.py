"""Validation during training without T5 or the VAE: latents for the cache's validation prompts.

``cogvx preprocess --validation-prompt ...`` stores the prompts' T5 embeddings (and the empty prompt's,
for guidance) in ``<cache>/validation_prompts.safetensors``. Every ``--validation-every`` steps the
trainer samples latents for them with the transformer alone and writes
``validation/step-NNNNNN/sample-KK.safetensors``: tensor ``latents`` ``[1, F, C, H, W]`` in the model's
scaled latent space (what ``CogVideoXPipeline(..., output_type="latent")`` returns) and metadata whose
values are JSON strings (prompt, seed, step, model, guidance_scale, num_inference_steps, height,
width, num_frames, scaling_factor). ``cogvx render`` decodes them with the VAE later.

An image-to-video model conditions each prompt on a first frame stored in the cache (``cogvx preprocess
--image-latents``): prompt k gets the k-th (cycling) of the live samples of the validation size that carry
image latents, ordered by key, so every run and every step sees the same pairs. The sample's latents are
the posterior mean of its first frame, scaled as the I2V pipeline scales image latents; the file also
holds tensor ``image`` (the first frame, uint8 ``[H, W, 3]``) and metadata ``image_key``.

Sampling runs without gradients, so the transformer's blocks take the run's inference path
(``pipeline/speed/inference.py``: the compiled block, the float8 layers, swapped weights streamed in);
classifier-free guidance runs as one batch of two (``sample_latents``). ``run_validation`` times each prompt.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cogvx import runs
from cogvx.errors import CacheError, ConfigError
from cogvx.pipeline.models import ModelInfo
from cogvx.pipeline.sampling import sample_latents
from cogvx.shards import Manifest, paths, read_shard
from cogvx.shards.manifest import FIRST_FRAME, IMAGE_MOMENTS
from cogvx.shards.store import Store, open_store


@dataclass
class ValidationSet:
    prompts: list[str]
    prompt_embeds: torch.Tensor  # [N, L, D], L: the model's max_text_tokens
    negative_prompt_embeds: torch.Tensor  # [1, L, D], the empty prompt
    num_frames: int
    height: int
    width: int
    # Image-to-video models: per prompt, the first frame's scaled latents [N, 1, C, H, W], the frame itself
    # (uint8 [H, W, 3]) and the key of the cache sample it comes from.
    image_latents: torch.Tensor | None = None
    images: list[torch.Tensor] | None = None
    image_keys: list[str] | None = None


def load_conditioning(
    store: Store, manifest: Manifest, info: ModelInfo, count: int, height: int, width: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[str]]:
    """First frames for ``count`` prompts: samples of the validation size with image latents, by key, cycling."""
    import io

    import numpy as np
    from PIL import Image

    candidates = sorted(
        (entry.key, shard)
        for shard in manifest.shards
        for entry in shard.live_samples()
        if IMAGE_MOMENTS in entry.carries
        and not entry.mirrored
        and [int(v) for v in entry.bucket.split("x")[1:]] == [height, width]
    )
    if not candidates:
        raise CacheError(
            f"{info.name} is an image-to-video model, so validation starts from first frames stored in the cache, "
            f"and {store.location} has no sample of {height}x{width} with image latents. Pass --validation-height and "
            "--validation-width of one of its buckets, or add them: cogvx preprocess ... --image-latents"
        )
    chosen = [candidates[k % len(candidates)] for k in range(count)]
    wanted = {key for key, _ in chosen}
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for shard in {id(s): s for _, s in chosen}.values():
        for sample in read_shard(store, shard):
            if sample.key in wanted:
                mean = sample.tensors[IMAGE_MOMENTS].float().chunk(2, dim=0)[0]  # [C, 1, H, W]
                with Image.open(io.BytesIO(sample.extras[FIRST_FRAME])) as picture:
                    frame = torch.from_numpy(np.asarray(picture.convert("RGB")).copy())
                found[sample.key] = (mean.permute(1, 0, 2, 3) * info.image_latent_scale, frame)
    latents = torch.stack([found[key][0] for key, _ in chosen])  # [N, 1, C, H, W]
    return latents, [found[key][1] for key, _ in chosen], [key for key, _ in chosen]


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
    validation = ValidationSet(prompts, embeds, negative, frames, height, width)
    if info.image_to_video:
        conditioning = load_conditioning(store, manifest, info, len(prompts), height, width)
        validation.image_latents, validation.images, validation.image_keys = conditioning
    return validation


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob: its header is 8 bytes of length, then JSON."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length]) if 8 + length <= len(data) else {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


@dataclass
class Validated:
    """What one ``run_validation`` call did on this process: the files it wrote and each one's wall time."""

    paths: list[Path] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # per prompt, sampling and writing, in ``paths``' order

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds)

    def __iter__(self) -> Iterator[Path]:
        # The paths, so that a list of written files grows by ``files += run_validation(...)``.
        return iter(self.paths)


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
) -> Validated:
    """Sample this process's share of the prompts (prompt k on rank k % world) and write one file each, timed:
    each prompt's seconds run from its sampling's start until its file is written (the device's work done)."""
    folder = runs.validation_step(output, step)
    folder.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    done = Validated()
    try:
        for index in range(rank, len(validation.prompts), world_size):
            started = time.perf_counter()
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
                    image_latents=(
                        validation.image_latents[index : index + 1].to(device, dtype)
                        if validation.image_latents is not None
                        else None
                    ),
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
            extra = {}
            if validation.images is not None:
                metadata["image_key"] = validation.image_keys[index]
                extra["image"] = validation.images[index]
            path = runs.validation_sample(folder, index)
            done.paths.append(runs.write_validation_sample(path, latents, metadata, extra))
            done.seconds.append(time.perf_counter() - started)  # the write copied the latents off the device
    finally:
        model.train(was_training)
    return done
