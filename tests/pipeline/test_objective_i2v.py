"""The image-to-video objective against the reference, computed independently with diffusers' own parts.

The reference is diffusers' train_cogvideox_image_to_video_lora.py (posterior draws times the scaling
factor, the image latent zero-padded along time, ``noised_image_dropout`` zeroing a sample's image
latents, the noisy video and the image latents concatenated on channels, the v-prediction loss weighted
by 1 / (1 - alpha_bar)), with the image latents prepared exactly as ``CogVideoXImageToVideoPipeline``
prepares them at inference (its ``prepare_latents``: the VAE config's ``invert_scale_latents`` and 1.5's
temporal padding), and the CogVideo team's 1.5 I2V fine-tuning for the video's padding and ``ofs``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cogvx.pipeline import models
from cogvx.pipeline.objective import Objective, image_condition, rotary_embedding


class _Posterior:
    """What ``vae.encode(image).latent_dist`` is for the pipeline: here, the cached moments of one image."""

    def __init__(self, moments: torch.Tensor):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        self.latent_dist = DiagonalGaussianDistribution(moments.float())


def pipeline_image_latents(info, transformer_config, image_moments, latent_frames, generator):
    """CogVideoXImageToVideoPipeline.prepare_latents, with a VAE whose encoder returns the cached moments."""
    from diffusers import CogVideoXImageToVideoPipeline

    batch = image_moments.shape[0]
    queue = list(image_moments.split(1))
    vae = SimpleNamespace(
        encode=lambda _image: _Posterior(queue.pop(0)),
        config=SimpleNamespace(invert_scale_latents=info.invert_scale_latents),
    )
    pipe = SimpleNamespace(
        vae=vae,
        vae_scaling_factor_image=info.scaling_factor,
        vae_scale_factor_temporal=info.temporal_compression,
        vae_scale_factor_spatial=info.spatial_compression,
        transformer=SimpleNamespace(config=SimpleNamespace(patch_size_t=transformer_config.get("patch_size_t"))),
        scheduler=SimpleNamespace(init_noise_sigma=1.0),
    )
    channels, height, width = image_moments.shape[1] // 2, image_moments.shape[3], image_moments.shape[4]
    # The pipeline asks for pixel frames; 1.5's padded latent count is what it denoises.
    frames = (latent_frames - 1) * info.temporal_compression + 1
    images = torch.zeros(batch, 3, height * info.spatial_compression, width * info.spatial_compression)
    given = torch.zeros(batch, latent_frames, channels, height, width)  # no noise drawn from the generator
    _, image_latents = CogVideoXImageToVideoPipeline.prepare_latents(
        pipe, images, batch, channels, frames, height * 8, width * 8, torch.float32, "cpu", generator, given
    )
    return image_latents


def reference_loss(transformer, scheduler, info, moments, image_moments, embeds, generator, dropout):
    """The reference I2V step in fp64 where it can be, from the same random stream as the objective."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    config = dict(transformer.config)
    p_t = config.get("patch_size_t")
    video = DiagonalGaussianDistribution(moments.float()).sample(generator) * info.scaling_factor
    video = video.permute(0, 2, 1, 3, 4)  # [B, F, C, H, W]
    if p_t and video.shape[1] % p_t:  # CogVideo's 1.5 fine-tuning: copies of the first frame in front
        video = torch.cat([video[:, :1].repeat(1, p_t - video.shape[1] % p_t, 1, 1, 1), video], dim=1)
    batch, frames, _, height, width = video.shape
    image = pipeline_image_latents(info, config, image_moments, frames, generator)
    keep = torch.rand(batch, generator=generator) >= dropout  # the reference: random.random() < p drops
    image = image * keep.reshape(-1, 1, 1, 1, 1)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    noise = torch.randn(video.shape, generator=generator)
    noisy = scheduler.add_noise(video.double(), noise.double(), t)
    ofs = {"ofs": torch.full((1,), 2.0)} if config.get("ofs_embed_dim") else {}
    with torch.no_grad():
        out = transformer(
            hidden_states=torch.cat([noisy.float(), image], dim=2),
            encoder_hidden_states=embeds,
            timestep=t,
            image_rotary_emb=rotary_embedding(config, frames, height, width),
            return_dict=False,
            **ofs,
        )[0]
    pred = scheduler.get_velocity(out.double(), noisy, t)
    weights = (1 / (1 - scheduler.alphas_cumprod.double()[t])).reshape(-1, 1, 1, 1, 1)
    return torch.mean((weights * (pred - video.double()) ** 2).reshape(batch, -1), dim=1).mean(), keep


def _inputs(seed: int, batch: int, frames: int, channels: int = 4, height: int = 8, width: int = 12):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(batch, channels, frames, height, width, generator=g)
    moments = torch.cat([mean, torch.rand(mean.shape, generator=g) * -4 - 1], dim=1)
    image_mean = torch.randn(batch, channels, 1, height, width, generator=g)
    image_moments = torch.cat([image_mean, torch.full(image_mean.shape, -5.0)], dim=1)
    return moments, image_moments, torch.randn(batch, 226, 32, generator=g)


@pytest.fixture(scope="module", params=["tiny-i2v", "tiny-1.5-i2v"])
def i2v(request):
    info = models.ModelInfo.read(request.param)
    transformer = info.load_transformer(torch.float32).eval()
    scheduler = info.load_scheduler()
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    return info, transformer, scheduler


@pytest.mark.parametrize("frames", [3, 4])  # 1.5 pads 3 latent frames to 4
@pytest.mark.parametrize(("dropout", "seed"), [(0.0, 1), (1.0, 2), (0.5, 5)])
def test_i2v_loss_equals_the_reference(i2v, frames, dropout, seed):
    info, transformer, scheduler = i2v
    moments, image_moments, embeds = _inputs(seed, 3, frames)
    objective = Objective(
        transformer.config,
        scheduler.alphas_cumprod,
        info.scaling_factor,
        image_latent_scale=info.image_latent_scale,
        noised_image_dropout=dropout,
    )
    with torch.no_grad():
        ours = objective(transformer, moments, embeds, torch.Generator().manual_seed(9), torch.float32, image_moments)
    expected, kept = reference_loss(
        transformer, scheduler, info, moments, image_moments, embeds, torch.Generator().manual_seed(9), dropout
    )
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=0)
    if dropout == 0.5:  # the seed is chosen so that both branches are exercised
        assert 0 < int(kept.sum()) < 3


def test_i2v_models_are_shaped_like_the_published_ones():
    t2v, i2v, i2v_15 = (models.ModelInfo.read(n) for n in ("tiny", "tiny-i2v", "tiny-1.5-i2v"))
    assert (t2v.image_to_video, i2v.image_to_video, i2v_15.image_to_video) == (False, True, True)
    # One cache serves all three: the same VAE and text encoder.
    assert t2v.encoder_identity() == i2v.encoder_identity() == i2v_15.encoder_identity()
    # 5b-I2V multiplies image latents by the scaling factor; 1.5's VAE config says to divide.
    assert i2v.image_latent_scale == pytest.approx(0.7) and i2v_15.image_latent_scale == pytest.approx(1 / 0.7)
    config, config_15 = i2v.read_config("transformer"), i2v_15.read_config("transformer")
    assert config["in_channels"] == 2 * config["out_channels"] == 2 * i2v.latent_channels
    assert config["use_learned_positional_embeddings"] and config["use_rotary_positional_embeddings"]
    assert config.get("ofs_embed_dim") is None and config.get("patch_size_t") is None
    assert config_15["in_channels"] == 2 * config_15["out_channels"]
    assert (config_15["patch_size_t"], config_15["patch_bias"], config_15["use_learned_positional_embeddings"]) == (
        2,
        False,
        False,
    )
    assert config_15["ofs_embed_dim"] == config_15["time_embed_dim"]
    index = i2v_15.read_config("vae")
    assert index["invert_scale_latents"] is True


def test_t2v_objective_is_unchanged_by_image_latents_in_the_batch():
    """A text-to-video model ignores image_moments: same loss, same random numbers drawn."""
    info = models.ModelInfo.read("tiny")
    transformer = info.load_transformer(torch.float32).eval()
    scheduler = info.load_scheduler()
    moments, image_moments, embeds = _inputs(3, 2, 3)
    objective = Objective(transformer.config, scheduler.alphas_cumprod, info.scaling_factor, noised_image_dropout=0.5)
    a, b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    with torch.no_grad():
        plain = objective(transformer, moments, embeds, a, torch.float32)
        given = objective(transformer, moments, embeds, b, torch.float32, image_moments)
    assert torch.equal(plain, given)
    assert torch.equal(a.get_state(), b.get_state())


def test_noised_image_dropout_drops_whole_samples_at_its_rate():
    image_moments = torch.cat([torch.ones(4000, 2, 1, 2, 2), torch.full((4000, 2, 1, 2, 2), -30.0)], dim=1)
    out = image_condition(image_moments, 3, 0.5, 0.05, torch.Generator().manual_seed(0))
    assert out.shape == (4000, 3, 2, 2, 2)
    assert torch.count_nonzero(out[:, 1:]) == 0  # zeros after the first frame
    first = out[:, 0].flatten(1)
    dropped = (first == 0).all(dim=1)
    kept = ((first - 0.5).abs() < 1e-4).all(dim=1)  # the mean 1 times the scale, up to a std of e^-15
    assert (dropped ^ kept).all()  # a sample keeps its image latents whole or loses them whole
    assert 0.04 < dropped.float().mean() < 0.06
