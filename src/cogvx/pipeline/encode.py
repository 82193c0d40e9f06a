"""Encoding pixels to VAE latent moments and captions to T5 embeddings (preprocessing only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cogvx.pipeline.models import DEFAULT_TEXT_TOKENS


@torch.no_grad()
def encode_video_moments(vae, frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames ``[B, F, H, W, 3]`` to posterior moments ``[B, 2C, F', H', W']`` (mean, logvar; unscaled)."""
    param = next(vae.parameters())
    pixels = frames.to(param.device, non_blocking=True).permute(0, 4, 1, 2, 3)  # [B, 3, F, H, W]
    pixels = pixels.to(param.dtype) / 127.5 - 1.0
    return vae.encode(pixels).latent_dist.parameters


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
