"""Transformer-only sampling: latents from prompt embeddings, with no T5 and no VAE in memory.

``sample_latents`` runs the same denoising loop as diffusers' ``CogVideoXPipeline`` (CogVideoX DPM
sampler, classifier-free guidance against the empty prompt) and returns what the pipeline returns with
``output_type="latent"``: ``[B, F, C, H, W]`` in the model's scaled latent space, padding frames of
CogVideoX 1.5 included. Same seed, same embeddings, same latents as the pipeline.

For an image-to-video transformer, ``image_latents`` (the first frame's scaled latents) are padded with
zeros to the latent length and concatenated on channels at every step, and 1.5's ``ofs`` is passed, as
``CogVideoXImageToVideoPipeline`` does.
"""

from __future__ import annotations

from typing import Any

import torch

from cogvx.pipeline.objective import OFS_VALUE, rotary_embedding


def latent_shape(
    transformer_config: dict[str, Any],
    num_frames: int,
    height: int,
    width: int,
    spatial_compression: int,
    temporal_compression: int,
) -> tuple[int, int, int, int]:
    """``(F, C, H, W)`` of the latents the pipeline denoises for a video of this size (1.5 padding included)."""
    frames = (num_frames - 1) // temporal_compression + 1
    patch_t = transformer_config.get("patch_size_t")
    if patch_t and frames % patch_t:
        frames += patch_t - frames % patch_t
    # What the transformer predicts: an I2V one reads twice as many channels (the image latents) as it writes.
    channels = transformer_config.get("out_channels") or transformer_config["in_channels"]
    return frames, channels, height // spatial_compression, width // spatial_compression


def _image_condition(
    image_latents: torch.Tensor, frames: int, device: torch.device, dtype: torch.dtype, guided: bool
) -> torch.Tensor:
    """The first frame's latents padded with zeros to ``frames`` latent frames (twice over when guided), as
    ``CogVideoXImageToVideoPipeline`` concatenates them on channels at every step."""
    image = image_latents.to(device, dtype)
    image = torch.cat([image, image.new_zeros((image.shape[0], frames - 1, *image.shape[2:]))], dim=1)
    return torch.cat([image] * 2) if guided else image


@torch.no_grad()
def sample_latents(
    transformer: torch.nn.Module,
    scheduler_config: dict[str, Any],
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    *,
    num_frames: int,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    generator: torch.Generator | None,
    spatial_compression: int,
    temporal_compression: int,
    image_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise fresh noise into latents for ``prompt_embeds`` ``[B, L, D]``, like the diffusers pipeline.

    The latents live in ``prompt_embeds.dtype`` (as in the pipeline); the guidance is computed in fp32.
    ``L`` is the transformer's ``max_text_seq_length`` (226 for every published CogVideoX).
    ``negative_prompt_embeds`` ``[B, L, D]`` (or ``[1, ...]``, broadcast) is needed when guidance > 1.
    ``image_latents`` ``[B, 1, C, H, W]``, already scaled: the first frame an I2V transformer conditions on.
    """
    from diffusers import CogVideoXDPMScheduler

    config = dict(transformer.config)
    device, dtype = prompt_embeds.device, prompt_embeds.dtype
    batch = prompt_embeds.shape[0]
    guided = guidance_scale > 1.0
    if guided:
        if negative_prompt_embeds is None:
            raise ValueError("Guidance above 1 needs negative_prompt_embeds (the empty prompt's embedding).")
        negative = negative_prompt_embeds.to(device, dtype).expand(batch, -1, -1)
        prompt_embeds = torch.cat([negative, prompt_embeds], dim=0)

    scheduler = CogVideoXDPMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps

    shape = (batch, *latent_shape(config, num_frames, height, width, spatial_compression, temporal_compression))
    # diffusers' randn_tensor: a CPU generator draws on the CPU, then the noise moves to the device.
    noise_device = generator.device if generator is not None else device
    latents = torch.randn(shape, generator=generator, device=noise_device, dtype=dtype).to(device)
    latents = latents * scheduler.init_noise_sigma
    rotary = rotary_embedding(config, shape[1], shape[3], shape[4], device)
    image = _image_condition(image_latents, shape[1], device, dtype, guided) if image_latents is not None else None
    extra = {"ofs": latents.new_full((1,), OFS_VALUE)} if config.get("ofs_embed_dim") else {}

    old_pred_original_sample = None
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if image is not None:
            model_input = torch.cat([model_input, image], dim=2)
        velocity = transformer(
            hidden_states=model_input,
            encoder_hidden_states=prompt_embeds,
            timestep=t.expand(model_input.shape[0]),
            image_rotary_emb=rotary,
            return_dict=False,
            **extra,
        )[0].float()
        if guided:
            uncond, cond = velocity.chunk(2)
            velocity = uncond + guidance_scale * (cond - uncond)
        latents, old_pred_original_sample = scheduler.step(
            velocity,
            old_pred_original_sample,
            t,
            timesteps[i - 1] if i > 0 else None,
            latents,
            eta=0.0,
            generator=generator,
            return_dict=False,
        )
        latents = latents.to(dtype)
    return latents
