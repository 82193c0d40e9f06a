"""Test caches for image-to-video training, written through the shards API with the real tiny VAE.

``with_image_latents`` copies a preprocessed tiny cache and gives every sample what the cache contract's
``cogvx preprocess --image-latents`` adds: tensor ``image_moments`` ``[2C, 1, H, W]`` (the VAE posterior of
the first frame after the pixel-space noise augmentation, sigma = exp(N(-3, 0.5)), drawn from a
generator seeded by the key) and the member ``first.jpg``. The first frame is the cached video's first
latent frame decoded by the VAE: a picture of the clip's start, which is all training needs from it.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
import torch

from cogvx.pipeline import models
from cogvx.pipeline.encode import encode_prompts, image_noise_seed
from cogvx.preprocess.run import save_validation_prompts
from cogvx.shards import Manifest, Sample, ShardWriter, read_shard
from cogvx.shards.codec import INDEX
from cogvx.shards.manifest import IMAGE_MOMENTS


@torch.no_grad()
def first_frame_latents(vae, moments: torch.Tensor, key: str) -> tuple[torch.Tensor, bytes]:
    """(image_moments [2C, 1, H, W], first.jpg) for a sample whose video moments are ``moments``."""
    from PIL import Image

    mean = moments.float().chunk(2, dim=0)[0][:, :1].unsqueeze(0)  # [1, C, 1, H, W]
    frame = vae.decode(mean).sample.clamp(-1, 1)  # [1, 3, 1, h, w] in [-1, 1]
    g = torch.Generator().manual_seed(image_noise_seed(key))
    sigma = torch.exp(torch.normal(-3.0, 0.5, (1,), generator=g))
    noisy = frame + torch.randn(frame.shape, generator=g) * sigma
    image_moments = vae.encode(noisy).latent_dist.parameters[0].to(moments.dtype)  # [2C, 1, H, W]
    pixels = ((frame[0, :, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    jpeg = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(jpeg, format="JPEG", quality=95)
    return image_moments, jpeg.getvalue()


def with_image_latents(cache: Path, out: Path, model: str = "tiny", validation_prompts: tuple[str, ...] = ()) -> Path:
    """A copy of ``cache`` in ``out`` whose every live sample also carries image latents and its first frame.

    ``validation_prompts`` are encoded into it as ``cogvx preprocess --validation-prompt`` does (its own
    function, without re-scanning the clips).
    """
    shutil.copytree(cache, out)
    manifest = Manifest.load(out)
    vae = models.ModelInfo.read(model).load_vae(torch.float32)
    old = list(manifest.shards)
    manifest.shards = []
    writer = ShardWriter(out, "i2v", manifest.add_shard)
    for record in old:
        entries = {e.key: e for e in record.live_samples()}
        for sample in read_shard(out, record):
            image_moments, jpeg = first_frame_latents(vae, sample.tensors["moments"], sample.key)
            tensors = dict(sample.tensors) | {"image_moments": image_moments}
            # The writer adds the index line again, now with its carries.
            meta = {k: v for k, v in sample.meta.items() if k != INDEX} | {"image_latents": True}
            extras = dict(sample.extras) | {"first.jpg": jpeg}
            entry = dataclasses.replace(entries[sample.key], carries=(IMAGE_MOMENTS,))
            writer.write(Sample(sample.key, tensors, meta, extras), entry)
        (out / record.name).unlink()
    writer.flush()
    manifest.save(out)
    if validation_prompts:
        info = models.ModelInfo.read(model)
        tokenizer, text_encoder = info.load_text_encoder(torch.float32)

        def encode(texts: list[str]):
            encoding = encode_prompts(tokenizer, text_encoder, texts, info.max_text_tokens)
            return encoding.embeds, encoding.truncated

        save_validation_prompts(out, manifest, list(validation_prompts), encode)
    return out
