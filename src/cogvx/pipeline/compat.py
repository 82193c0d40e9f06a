"""Whether a cache fits a model: the same encoders, whole patches, image latents, mirrors, frame counts.

Preprocess writes a cache for one model, and adds to an existing cache only with the encoders that made
it (``encoder_differences``); training (and anything else that reads a cache for a model) asks these
questions before reading weights, so a mismatch stops in one line naming the command that fixes it. Each
check takes the manifest, the model's facts and the cache's location as shown to users.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from cogvx.errors import CacheError, ModelError
from cogvx.pipeline import models
from cogvx.shards import Manifest


def encoder_differences(manifest: Manifest, info: models.ModelInfo) -> list[str]:
    """The encoder facts (VAE, text encoder, prompt length) in which the cache's producer and ``info`` differ."""
    return info.identity_mismatch(manifest.producer.get("encoders") or {})


def check_cache_fits(manifest: Manifest, info: models.ModelInfo, shards: Path | str) -> None:
    """Refuse a cache whose latents or prompt embeddings another VAE, text encoder or prompt length made."""
    stored, wanted = manifest.producer.get("encoders") or {}, info.encoder_identity()
    differs = encoder_differences(manifest, info)
    if differs:
        details = "; ".join(f"{k}: cache {stored.get(k)!r}, model {wanted[k]!r}" for k in differs)
        raise ModelError(
            f"The cache {shards} was encoded for {manifest.producer.get('model')!r}, whose VAE, text encoder or "
            f"prompt length differ from {info.name!r} ({details}). Preprocess the videos again with "
            f"--model {info.name}."
        )


def check_image_latents(manifest: Manifest, info: models.ModelInfo, shards: Path | str) -> None:
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


def check_packable(manifest: Manifest, info: models.ModelInfo, transformer: dict[str, Any], shards: Path | str) -> None:
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


def check_mirrors(manifest: Manifest, random_flip: float, cache: str) -> None:
    """``--random-flip`` needs a mirrored variant of every sample; say the command that adds them."""
    if random_flip == 0:
        return
    missing = manifest.missing_mirrors()
    if missing:
        data = shlex.quote(str(manifest.producer.get("data") or "VIDEOS"))
        model = shlex.quote(str(manifest.producer.get("model")))
        raise CacheError(
            f"--random-flip {random_flip:g} needs the mirrored variant of every sample, and {len(missing)} of "
            f"{manifest.original_count} samples in {cache} have none. Add them (only the mirrors are "
            f"encoded): cogvx preprocess --data {data} --output {shlex.quote(cache)} --model {model} --flip"
        )


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
