"""The objective against the seed's formula, computed independently with diffusers' own parts.

No test here builds a model folder: each runs in well under a second, so mutation testing can afford them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cogvx.pipeline.objective import (
    Objective,
    add_noise,
    draw_latents,
    pad_for_temporal_patch,
    rotary_embedding,
    velocity_loss,
)

# CogVideoX-2b's published scheduler config (the tiny-2b model ships the same).
SCHEDULER_2B = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
    "snr_shift_scale": 3.0,
    "timestep_spacing": "trailing",
}


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler(**SCHEDULER_2B)


def test_objective_equals_the_seed_formula(scheduler):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 4, 6, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    velocity = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 457, 999])

    # The seed: add_noise, get_velocity and a 1 / (1 - alpha_bar) weight, all through the scheduler.
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    noisy_ref = scheduler.add_noise(x0, noise, t)
    x0_hat = scheduler.get_velocity(velocity, noisy_ref, t)
    weights = (1 / (1 - scheduler.alphas_cumprod[t])).reshape(-1, 1, 1, 1, 1)
    seed_loss = torch.mean((weights * (x0_hat - x0) ** 2).reshape(3, -1), dim=1).mean()

    alphas = scheduler.alphas_cumprod.float()
    noisy = add_noise(x0.float(), noise.float(), t, alphas)
    ours = velocity_loss(velocity.float(), noisy, x0.float(), t, alphas)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(noisy.double(), noisy_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.double(), seed_loss, rtol=1e-4, atol=0)

    # ... which is plain MSE against the true velocity sqrt(a) eps - sqrt(1 - a) x0.
    a = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
    v_true = a.sqrt() * noise - (1 - a).sqrt() * x0
    mse = ((velocity - v_true) ** 2).reshape(3, -1).mean(dim=1).mean()
    torch.testing.assert_close(ours.double(), mse, rtol=1e-4, atol=0)


def reference_loss(velocity, noisy, x0, t, scheduler) -> torch.Tensor:
    """The seed's loss in fp64: get_velocity, then the 1 / (1 - alpha_bar) weighted MSE on x0."""
    alphas = scheduler.alphas_cumprod.double()
    a = alphas[t].reshape(-1, *([1] * (x0.ndim - 1)))
    x0_hat = a.sqrt() * noisy.double() - (1 - a).sqrt() * velocity.double()
    return (((x0_hat - x0.double()) ** 2) / (1 - a)).flatten(1).mean(dim=1).mean()


def test_bf16_inputs_give_an_fp32_loss_equal_to_the_fp64_reference(scheduler):
    g = torch.Generator().manual_seed(3)
    x0, noise, velocity = (torch.randn(2, 3, 4, 6, 8, generator=g).to(torch.bfloat16) for _ in range(3))
    t = torch.tensor([17, 803])
    alphas = scheduler.alphas_cumprod.float()

    noisy = add_noise(x0, noise, t, alphas)
    loss = velocity_loss(velocity, noisy, x0, t, alphas)
    assert noisy.dtype == torch.float32 and loss.dtype == torch.float32

    # The same bf16 values, everything after them in fp64: bf16 arithmetic would be off by ~1e-3.
    noisy_ref = scheduler.add_noise(x0.double(), noise.double(), t)
    torch.testing.assert_close(noisy.double(), noisy_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), reference_loss(velocity, noisy_ref, x0, t, scheduler), rtol=1e-5, atol=0)


class SpyTransformer(torch.nn.Module):
    """Stands in for the transformer: records what the objective feeds it, answers a fixed velocity."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.calls: list[dict] = []

    def forward(self, hidden_states, encoder_hidden_states, timestep, image_rotary_emb, return_dict):
        self.calls.append(
            {
                "hidden_states": hidden_states,
                "encoder_hidden_states": encoder_hidden_states,
                "timestep": timestep,
                "image_rotary_emb": image_rotary_emb,
            }
        )
        g = torch.Generator().manual_seed(99)
        return (torch.randn(hidden_states.shape, generator=g, device=hidden_states.device).to(self.dtype),)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_the_transformer_is_fed_the_noisy_latents_and_the_loss_is_fp32(scheduler, compute_dtype):
    g = torch.Generator().manual_seed(5)
    moments = torch.cat([torch.randn(2, 4, 3, 4, 6, generator=g), torch.full((2, 4, 3, 4, 6), -4.0)], dim=1)
    prompt_embeds = torch.randn(2, 7, 32, generator=g)
    objective = Objective({"patch_size": 2}, scheduler.alphas_cumprod, scaling_factor=0.7)
    spy = SpyTransformer(compute_dtype)
    loss = objective(spy, moments, prompt_embeds, torch.Generator().manual_seed(11), compute_dtype)

    # The objective's draws, repeated from the same seed: x0 from the moments, a timestep and noise per sample.
    replay = torch.Generator().manual_seed(11)
    x0 = draw_latents(moments, 0.7, replay)
    t = torch.randint(0, 1000, (2,), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    expected = scheduler.add_noise(x0.double(), noise.double(), t)

    [call] = spy.calls
    assert torch.equal(call["timestep"], t)
    assert call["hidden_states"].dtype == compute_dtype
    tolerance = 1e-5 if compute_dtype == torch.float32 else 1e-2  # bf16 keeps 8 bits of mantissa
    torch.testing.assert_close(call["hidden_states"].double(), expected, rtol=tolerance, atol=tolerance)
    assert (call["hidden_states"].double() - x0.double()).abs().mean() > 0.1  # not the clean latents
    torch.testing.assert_close(call["encoder_hidden_states"], prompt_embeds.to(compute_dtype))

    # The loss is fp32 and uses the fp32 noisy latents, whatever the transformer's precision.
    velocity = SpyTransformer(compute_dtype)(call["hidden_states"], None, None, None, False)[0]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference_loss(velocity, expected, x0, t, scheduler), rtol=1e-5, atol=0)


def test_cogvideox_15_latents_are_padded_and_fed_with_the_rotary_of_the_padded_shape(scheduler):
    """Three latent frames, two per token: the first frame is repeated in front, as the pipeline does."""
    g = torch.Generator().manual_seed(6)
    moments = torch.cat([torch.randn(2, 4, 3, 4, 6, generator=g), torch.full((2, 4, 3, 4, 6), -3.0)], dim=1)
    prompt_embeds = torch.randn(2, 7, 32, generator=g)
    objective = Objective(ROTARY_15, scheduler.alphas_cumprod.double(), scaling_factor=1.15)
    spy = SpyTransformer(torch.float32)
    loss = objective(spy, moments, prompt_embeds, torch.Generator().manual_seed(12), torch.float32)

    replay = torch.Generator().manual_seed(12)
    x0 = draw_latents(moments, 1.15, replay)
    x0 = torch.cat([x0[:, :1], x0], dim=1)
    t = torch.randint(0, 1000, (2,), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    expected = scheduler.add_noise(x0.double(), noise.double(), t)

    [call] = spy.calls
    assert call["hidden_states"].shape == (2, 4, 4, 4, 6)
    assert torch.equal(call["timestep"], t)
    torch.testing.assert_close(call["hidden_states"].double(), expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(call["image_rotary_emb"], pipeline_rotary(ROTARY_15, 4, 32, 48), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    velocity = SpyTransformer(torch.float32)(call["hidden_states"], None, None, None, False)[0]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference_loss(velocity, expected, x0, t, scheduler), rtol=1e-5, atol=0)


def test_the_objective_draws_and_computes_on_the_batch_device(scheduler):
    """Every draw and constant follows the batch ("meta" stands in for a GPU: a CPU tensor would show)."""
    moments = torch.zeros(2, 8, 3, 4, 6, device="meta")
    prompt_embeds = torch.zeros(2, 7, 32, device="meta")
    objective = Objective(ROTARY_10, scheduler.alphas_cumprod, scaling_factor=0.7)
    spy = SpyTransformer(torch.bfloat16)
    loss = objective(spy, moments, prompt_embeds, None, torch.bfloat16)

    [call] = spy.calls
    assert loss.device.type == "meta" and loss.dtype == torch.float32 and loss.shape == ()
    assert call["hidden_states"].device.type == "meta" and call["timestep"].device.type == "meta"
    assert call["timestep"].dtype == torch.long
    assert {t.device.type for t in call["image_rotary_emb"]} == {"meta"}
    assert objective.alphas_cumprod.device.type == "meta"  # moved once, not at every step


def test_latents_are_fresh_draws_from_the_moments():
    mean = torch.randn(1, 4, 2, 3, 3)
    logvar = torch.full_like(mean, -2.0)
    moments = torch.cat([mean, logvar], dim=1)
    a = draw_latents(moments, 0.7, torch.Generator().manual_seed(1))
    b = draw_latents(moments, 0.7, torch.Generator().manual_seed(2))
    assert a.shape == (1, 2, 4, 3, 3)  # [B, F, C, H, W]
    assert not torch.equal(a, b)
    draws = torch.stack([draw_latents(moments, 0.7, torch.Generator().manual_seed(s)) for s in range(400)])
    expected_mean = mean.permute(0, 2, 1, 3, 4) * 0.7
    torch.testing.assert_close(draws.mean(0), expected_mean, atol=0.05, rtol=0)
    torch.testing.assert_close(draws.std(0).mean(), torch.tensor(0.7 * torch.e**-1.0), atol=0.02, rtol=0)


# Transformer configs as the pipeline reads them: CogVideoX 1.0 and 1.5 (two latent frames per token, the
# base grid as a maximum size). Base sizes are odd so that the integer divisions matter.
ROTARY_10 = {
    "use_rotary_positional_embeddings": True,
    "patch_size": 2,
    "patch_size_t": None,
    "attention_head_dim": 16,
    "sample_height": 9,
    "sample_width": 13,
}
ROTARY_15 = ROTARY_10 | {"patch_size_t": 2, "sample_height": 13, "sample_width": 21}


def pipeline_rotary(config: dict, latent_frames: int, height: int, width: int, device="cpu"):
    """CogVideoXPipeline's own rotary embeddings, for a transformer with this config."""
    from diffusers import CogVideoXPipeline
    from diffusers.configuration_utils import FrozenDict

    pipeline = SimpleNamespace(transformer=SimpleNamespace(config=FrozenDict(config)), vae_scale_factor_spatial=8)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(pipeline, height, width, latent_frames, device)


@pytest.mark.parametrize("config", [ROTARY_10, ROTARY_15], ids=["1.0", "1.5"])
@pytest.mark.parametrize("frames", [3, 4, 13])
@pytest.mark.parametrize("size", [(64, 96), (96, 64), (56, 88), (48, 160)])
def test_rotary_matches_the_diffusers_pipeline_at_any_size(config, frames, size):
    height, width = size
    expected = pipeline_rotary(config, frames, height, width)
    ours = rotary_embedding(config, frames, height // 8, width // 8)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rotary_is_none_for_sincos_models_and_built_on_the_given_device():
    assert rotary_embedding(ROTARY_10 | {"use_rotary_positional_embeddings": False}, 5, 8, 12) is None
    assert rotary_embedding({"patch_size": 2}, 5, 8, 12) is None  # a config without the key: sin-cos
    # "meta" stands in for a GPU here: a tensor left on the CPU would show.
    for config in (ROTARY_10, ROTARY_15):
        assert {t.device.type for t in rotary_embedding(config, 4, 8, 12, device="meta")} == {"meta"}


def test_objective_caches_rotary_embeddings_per_shape_and_device(scheduler):
    objective = Objective(ROTARY_10, scheduler.alphas_cumprod, scaling_factor=0.7)
    first = objective.rotary(4, 8, 12, torch.device("cpu"))
    assert objective.rotary(4, 8, 12, torch.device("cpu")) is first
    for a, b in zip(first, rotary_embedding(ROTARY_10, 4, 8, 12), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for other in [(5, 8, 12), (4, 6, 12), (4, 8, 10)]:
        for a, b in zip(
            objective.rotary(*other, torch.device("cpu")), rotary_embedding(ROTARY_10, *other), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert {t.device.type for t in objective.rotary(4, 8, 12, torch.device("meta"))} == {"meta"}


def test_latents_are_the_vae_posterior_sample_scaled_and_transposed():
    """Exactly diffusers' DiagonalGaussianDistribution.sample (log-variance clamped to [-30, 20]), times scaling."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    g = torch.Generator().manual_seed(4)
    mean = torch.randn(2, 4, 3, 5, 6, generator=g)
    logvar = torch.randn(2, 4, 3, 5, 6, generator=g) * 2
    logvar[0, 0, 0, 0, :3] = torch.tensor([-40.0, 21.0, 25.0])  # outside the clamp range
    moments = torch.cat([mean, logvar], dim=1).to(torch.bfloat16)

    ours = draw_latents(moments, 0.7, torch.Generator().manual_seed(9))
    posterior = DiagonalGaussianDistribution(moments.float()).sample(torch.Generator().manual_seed(9))
    assert ours.dtype == torch.float32 and ours.shape == (2, 3, 4, 5, 6)  # [B, F, C, H, W]
    torch.testing.assert_close(ours, (posterior * 0.7).permute(0, 2, 1, 3, 4), rtol=1e-6, atol=0)


def test_noise_and_loss_follow_the_batch_device_whatever_the_constants_device():
    """add_noise and velocity_loss move the scheduler constants to the batch ("meta" stands in for a GPU)."""
    alphas = torch.linspace(0.9, 0.1, 1000)  # on the CPU, as a scheduler holds them
    x0, noise, velocity = (torch.zeros(2, 3, 4, 2, 2, device="meta") for _ in range(3))
    t = torch.tensor([3, 700], device="meta")
    noisy = add_noise(x0, noise, t, alphas)
    assert noisy.device.type == "meta" and noisy.shape == x0.shape
    loss = velocity_loss(velocity, noisy, x0, t, alphas)
    assert loss.device.type == "meta" and loss.shape == ()


def test_draws_are_fp32_whatever_the_default_dtype(scheduler):
    """The explicit float32 draws hold under torch.set_default_dtype(torch.float64): same values, same dtype."""
    g = torch.Generator().manual_seed(7)
    moments = torch.cat([torch.randn(2, 4, 3, 4, 6, generator=g), torch.full((2, 4, 3, 4, 6), -2.0)], dim=1)
    prompt_embeds = torch.randn(2, 7, 32, generator=g)
    replay = torch.Generator().manual_seed(13)
    x0 = draw_latents(moments, 0.7, replay)
    t = torch.randint(0, 1000, (2,), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    expected = add_noise(x0, noise, t, scheduler.alphas_cumprod)

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        latents = draw_latents(moments, 0.7, torch.Generator().manual_seed(13))
        spy = SpyTransformer(torch.float32)
        Objective({"patch_size": 2}, scheduler.alphas_cumprod, 0.7)(
            spy, moments, prompt_embeds, torch.Generator().manual_seed(13), torch.float32
        )
    finally:
        torch.set_default_dtype(previous)
    assert latents.dtype == torch.float32
    torch.testing.assert_close(latents, x0, rtol=0, atol=0)
    torch.testing.assert_close(spy.calls[0]["hidden_states"], expected, rtol=0, atol=0)


def test_latents_are_drawn_on_the_moments_device():
    moments = torch.zeros(1, 8, 2, 3, 3, device="meta")
    assert draw_latents(moments, 0.7).device.type == "meta"


@pytest.mark.parametrize("patch_size_t", [None, 0, 1])
def test_no_temporal_patch_leaves_latents_as_they_are(patch_size_t):
    latents = torch.randn(2, 3, 4, 2, 2)
    assert pad_for_temporal_patch(latents, patch_size_t) is latents


@pytest.mark.parametrize(("frames", "patch_size_t", "padded"), [(3, 2, 1), (4, 2, 0), (4, 3, 2), (5, 3, 1), (6, 3, 0)])
def test_temporal_padding_repeats_the_first_frame_in_front(frames, patch_size_t, padded):
    """As CogVideoXPipeline pads 1.5's latents: copies of the first frame before the clip, up to a multiple."""
    latents = torch.randn(2, frames, 4, 2, 3)
    out = pad_for_temporal_patch(latents, patch_size_t)
    expected = torch.cat([latents[:, :1]] * padded + [latents], dim=1)
    assert out.shape[1] % patch_size_t == 0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
