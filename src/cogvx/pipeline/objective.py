"""The CogVideoX training objective, as small pure functions.

Layout conventions: cached moments are ``[B, 2C, F, H, W]`` (mean then log-variance on the channel
axis, exactly as the VAE's posterior parameters); the transformer works on ``[B, F, C, H, W]``.
Everything the loss touches is computed in float32, whatever precision the transformer runs in.

Image-to-video models (CogVideoX-5b-I2V, CogVideoX1.5-5B-I2V) also read the clip's first frame: its
cached VAE moments ``[B, 2C, 1, H, W]`` are drawn from like the video's, scaled as the I2V pipeline
scales image latents, padded with zeros along time to the video's latent length (after 1.5's temporal
padding, so the image sits on the first latent frame as in the pipeline), zeroed for a whole sample
with probability ``noised_image_dropout``, and concatenated with the noisy video latents on channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range before sampling.
LOGVAR_RANGE = (-30.0, 20.0)
# The ``ofs`` value CogVideoX 1.5 I2V transformers are given: what CogVideoXImageToVideoPipeline and the
# CogVideo team's I2V fine-tuning pass, whatever the clip.
OFS_VALUE = 2.0


def draw_latents(moments: torch.Tensor, scaling_factor: float, generator: torch.Generator | None = None):
    """A fresh posterior sample from cached moments, scaled, in the transformer's ``[B, F, C, H, W]``."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return ((mean + std * eps) * scaling_factor).permute(0, 2, 1, 3, 4).contiguous()


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.float().reshape(-1, *([1] * (ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor):
    """``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (what the DPM scheduler's add_noise does), in fp32."""
    a = _per_sample(alphas_cumprod.to(x0.device)[timesteps], x0.ndim)
    return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()


def velocity_loss(
    velocity: torch.Tensor,
    noisy: torch.Tensor,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Mean over the batch of ``mean((x0_hat - x0)^2 / (1 - a_t))``, with ``x0_hat`` from the velocity.

    ``x0_hat = sqrt(a_t) x_t - sqrt(1 - a_t) v`` is the scheduler's ``get_velocity(v, x_t, t)``; the
    weighting turns the error on x0 into plain MSE on the velocity.
    """
    a = _per_sample(alphas_cumprod.to(noisy.device)[timesteps], noisy.ndim)
    x0_hat = a.sqrt() * noisy.float() - (1 - a).sqrt() * velocity.float()
    per_sample = ((x0_hat - x0.float()) ** 2 / (1 - a)).flatten(1).mean(dim=1)
    return per_sample.mean()


def rotary_embedding(
    config: Mapping[str, Any],
    latent_frames: int,
    latent_height: int,
    latent_width: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """3D rotary embeddings for one latent shape, from the transformer's own config (None when unused)."""
    if not config.get("use_rotary_positional_embeddings", False):
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p = config["patch_size"]
    p_t = config.get("patch_size_t")
    grid = (latent_height // p, latent_width // p)
    base_h, base_w = config["sample_height"] // p, config["sample_width"] // p
    if p_t is None:
        # CogVideoX 1.0: the grid is centred in the base grid the model was trained at.
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        return get_3d_rotary_pos_embed(
            embed_dim=config["attention_head_dim"],
            crops_coords=get_resize_crop_region_for_grid(grid, base_w, base_h),
            grid_size=grid,
            temporal_size=latent_frames,
            device=device,
        )
    return get_3d_rotary_pos_embed(
        embed_dim=config["attention_head_dim"],
        crops_coords=None,
        grid_size=grid,
        temporal_size=(latent_frames + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(base_h, base_w),
        device=device,
    )


def pad_for_temporal_patch(latents: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """CogVideoX 1.5 packs ``patch_size_t`` latent frames per token: repeat the first frame to fit."""
    if not patch_size_t or latents.shape[1] % patch_size_t == 0:
        return latents
    extra = patch_size_t - latents.shape[1] % patch_size_t
    return torch.cat([latents[:, :1].expand(-1, extra, -1, -1, -1), latents], dim=1)


def image_condition(
    image_moments: torch.Tensor,
    latent_frames: int,
    scale: float,
    dropout: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The image latents an I2V transformer reads beside ``latent_frames`` noisy video frames, ``[B, F, C, H, W]``.

    A posterior draw of the first frame times ``scale``, then zeros for the other frames; each sample's
    whole tensor is zeroed with probability ``dropout`` (the reference's ``noised_image_dropout``).
    Draws, in this order: the posterior noise, then one uniform number per sample.
    """
    image = draw_latents(image_moments, scale, generator)
    batch, frames = image.shape[:2]
    if frames != 1:
        raise ValueError(f"image_moments hold {frames} latent frames; image-to-video conditions on one.")
    padding = image.new_zeros((batch, latent_frames - 1, *image.shape[2:]))
    image = torch.cat([image, padding], dim=1)
    dropped = torch.rand((batch,), generator=generator, device=image.device, dtype=torch.float32) < dropout
    return image * (~dropped).float().reshape(-1, 1, 1, 1, 1)


class Objective:
    """Loss of one batch for one model: scheduler constants, VAE scaling and rotary cache in one place."""

    def __init__(
        self,
        transformer_config: Mapping[str, Any],
        alphas_cumprod: torch.Tensor,
        scaling_factor: float,
        *,
        image_latent_scale: float | None = None,
        noised_image_dropout: float = 0.0,
    ):
        """``image_latent_scale``: set for an image-to-video model (``ModelInfo.image_latent_scale``), None for T2V."""
        self.config = dict(transformer_config)
        self.alphas_cumprod = alphas_cumprod.float()
        self.scaling_factor = scaling_factor
        self.image_latent_scale = image_latent_scale
        self.noised_image_dropout = noised_image_dropout
        self._rotary: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def rotary(self, frames: int, height: int, width: int, device: torch.device):
        key = (frames, height, width, str(device))
        if key not in self._rotary:
            self._rotary[key] = rotary_embedding(self.config, frames, height, width, device)
        return self._rotary[key]

    def __call__(
        self,
        transformer: torch.nn.Module,
        moments: torch.Tensor,
        prompt_embeds: torch.Tensor,
        generator: torch.Generator | None,
        compute_dtype: torch.dtype,
        image_moments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw x0 (and the image latents), a timestep and noise per sample; predict the velocity; fp32 loss."""
        device = moments.device
        x0 = self._clean_latents(moments, generator)
        image_moments = None if image_moments is None else image_moments.to(device)
        image = self._image_latents(image_moments, x0.shape[1], self.noised_image_dropout, generator)
        timesteps = torch.randint(
            0, len(self.alphas_cumprod), (x0.shape[0],), generator=generator, device=device, dtype=torch.long
        )
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32)
        return self._loss(transformer, x0, image, timesteps, noise, prompt_embeds, compute_dtype)

    def loss_at(
        self,
        transformer: torch.nn.Module,
        moments: torch.Tensor,
        prompt_embeds: torch.Tensor,
        timesteps: torch.Tensor,
        generator: torch.Generator,
        compute_dtype: torch.dtype,
        image_moments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of ``__call__`` at the given ``timesteps``, with no image dropout: a score, not a training step.

        x0, the image latents and the noise are drawn, in ``__call__``'s order, from ``generator`` on the
        generator's own device and then moved to ``prompt_embeds``' device, where the transformer runs: a CPU
        generator gives the same draws whatever the device.
        """
        on = generator.device
        x0 = self._clean_latents(moments.to(on), generator)
        image_moments = None if image_moments is None else image_moments.to(on)
        image = self._image_latents(image_moments, x0.shape[1], 0.0, generator)
        noise = torch.randn(x0.shape, generator=generator, device=on, dtype=torch.float32)
        device = prompt_embeds.device
        image = None if image is None else image.to(device)
        return self._loss(
            transformer, x0.to(device), image, timesteps.to(device), noise.to(device), prompt_embeds, compute_dtype
        )

    def _clean_latents(self, moments: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x0 = draw_latents(moments, self.scaling_factor, generator)
        return pad_for_temporal_patch(x0, self.config.get("patch_size_t"))

    def _image_latents(
        self, image_moments: torch.Tensor | None, frames: int, dropout: float, generator: torch.Generator | None
    ) -> torch.Tensor | None:
        """An I2V model's image condition (None for T2V), on the device of ``image_moments``."""
        if self.image_latent_scale is None:
            return None
        if image_moments is None:
            raise ValueError("An image-to-video objective needs the batch's image_moments.")
        return image_condition(image_moments, frames, self.image_latent_scale, dropout, generator)

    def _loss(
        self,
        transformer: torch.nn.Module,
        x0: torch.Tensor,
        image: torch.Tensor | None,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        prompt_embeds: torch.Tensor,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Noise ``x0`` at ``timesteps``, predict the velocity, and the fp32 loss: what every loss shares."""
        device = x0.device
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        _, frames, _, height, width = x0.shape
        noisy = add_noise(x0, noise, timesteps, self.alphas_cumprod)
        inputs = noisy if image is None else torch.cat([noisy, image], dim=2)
        extra = {}
        if self.config.get("ofs_embed_dim"):
            extra["ofs"] = torch.full((1,), OFS_VALUE, device=device, dtype=compute_dtype)
        velocity = transformer(
            hidden_states=inputs.to(compute_dtype),
            encoder_hidden_states=prompt_embeds.to(compute_dtype),
            timestep=timesteps,
            image_rotary_emb=self.rotary(frames, height, width, device),
            return_dict=False,
            **extra,
        )[0]
        return velocity_loss(velocity, noisy, x0, timesteps, self.alphas_cumprod)
