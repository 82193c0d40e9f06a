"""Decoding latents to frames with the VAE alone (rendering), and the device both inference stages use."""

from __future__ import annotations

import numpy as np
import torch

from cogvx.errors import ModelError
from cogvx.media import to_uint8
from cogvx.pipeline import models


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The device asked for (else a GPU if there is one) and the dtype asked for (else bf16 on a GPU, fp32 on a CPU)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dev, models.parse_dtype(dtype or ("bf16" if dev.type == "cuda" else "fp32"))


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scaling_factor: float) -> np.ndarray:
    """Scaled latents ``[1, F, C, H, W]`` to uint8 frames ``[F, H, W, 3]``, as ``CogVideoXPipeline`` does it."""
    from diffusers.video_processor import VideoProcessor

    param = next(vae.parameters())
    video = vae.decode(latents.to(param.device, param.dtype).permute(0, 2, 1, 3, 4) / scaling_factor).sample
    spatial = 2 ** (len(vae.config.block_out_channels) - 1)
    frames = VideoProcessor(vae_scale_factor=spatial).postprocess_video(video=video, output_type="np")
    return to_uint8(np.asarray(frames[0]))


def check_decoded_size(frames: np.ndarray, height: int, width: int, tiling: bool) -> None:
    """Refuse to write a video of another size than asked (diffusers' VAE tiling miscounts with tiny tiles)."""
    if tuple(frames.shape[1:3]) != (height, width):
        hint = " VAE tiling assumes tiles of real CogVideoX size; drop --vae-tiling for this model." if tiling else ""
        raise ModelError(
            f"Decoding gave frames of {frames.shape[2]}x{frames.shape[1]} instead of {width}x{height}.{hint}"
        )
