"""Encoding pixels to VAE latent moments and captions to T5 embeddings (preprocessing only)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from cogvx.pipeline.models import DEFAULT_TEXT_TOKENS

# The image-to-video reference (diffusers' train_cogvideox_image_to_video_lora.py) noises the conditioning
# frame in pixel space before encoding it, once per clip: sigma = exp(N(-3, 0.5)), frame + sigma * randn,
# with pixels in [-1, 1]. The per-step draw from the resulting moments happens at train time.
IMAGE_NOISE_LOG_MEAN = -3.0
IMAGE_NOISE_LOG_STD = 0.5


@torch.no_grad()
def encode_video_moments(vae, frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames ``[B, F, H, W, 3]`` to posterior moments ``[B, 2C, F', H', W']`` (mean, logvar; unscaled)."""
    param = next(vae.parameters())
    pixels = frames.to(param.device, non_blocking=True).permute(0, 4, 1, 2, 3)  # [B, 3, F, H, W]
    pixels = pixels.to(param.dtype) / 127.5 - 1.0
    return vae.encode(pixels).latent_dist.parameters


def image_noise_seed(key: str) -> int:
    """The seed of a sample's image noise: the first 8 bytes of sha256(key), little-endian, as a 63-bit int."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def noised_first_frame(frame: torch.Tensor, key: str) -> tuple[torch.Tensor, float]:
    """A uint8 frame ``[H, W, 3]`` as the reference noises it: float32 pixels ``[3, H, W]`` and the sigma drawn.

    The draws come from a CPU generator seeded by the sample's key (``image_noise_seed``), in this order:
    ``log_sigma = normal(-3, 0.5, (1,))``, then ``noise = randn(3, H, W)``; ``pixels = frame / 127.5 - 1 +
    exp(log_sigma) * noise``, all in float32, so a re-run (or an added first frame) gets the same latents.
    """
    generator = torch.Generator().manual_seed(image_noise_seed(key))
    log_sigma = torch.normal(IMAGE_NOISE_LOG_MEAN, IMAGE_NOISE_LOG_STD, (1,), generator=generator)
    sigma = torch.exp(log_sigma)
    pixels = torch.as_tensor(frame).permute(2, 0, 1).float() / 127.5 - 1.0
    noise = torch.randn(pixels.shape, generator=generator)
    return pixels + sigma * noise, float(sigma)


@torch.no_grad()
def encode_image_moments(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Noised pixels ``[B, 3, H, W]`` (``noised_first_frame``), each encoded alone as a 1-frame video, to
    posterior moments ``[B, 2C, 1, H', W']`` (mean, logvar; unscaled), as the reference encodes its image."""
    param = next(vae.parameters())
    frames = pixels.to(param.device, non_blocking=True).to(param.dtype).unsqueeze(2)  # [B, 3, 1, H, W]
    return vae.encode(frames).latent_dist.parameters


@dataclass
class PromptEncoding:
    embeds: torch.Tensor  # [B, L, D], pads included: the pipeline encodes without an attention mask
    token_counts: list[int]  # tokens before truncation, with the end-of-sequence token
    max_length: int  # L, the transformer's max_text_seq_length

    @property
    def truncated(self) -> list[bool]:
        return [n > self.max_length for n in self.token_counts]


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder, prompts: list[str], max_length: int = DEFAULT_TEXT_TOKENS
) -> PromptEncoding:
    """T5 embeddings of all ``max_length`` positions (the model's ``ModelInfo.max_text_tokens``), as
    ``CogVideoXPipeline`` computes them with ``max_sequence_length=transformer.config.max_text_seq_length``."""
    device = next(text_encoder.parameters()).device
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    counts = [len(x) for x in tokenizer(prompts, add_special_tokens=True, verbose=False).input_ids]
    embeds = text_encoder(ids.to(device))[0]
    return PromptEncoding(embeds, counts, max_length)
