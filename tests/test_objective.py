"""The objective against the seed's formula, computed independently with the scheduler's own methods."""

from __future__ import annotations

import pytest
import torch

from cogvx.pipeline import models
from cogvx.pipeline.objective import add_noise, draw_latents, rotary_embedding, velocity_loss


@pytest.fixture(scope="module")
def scheduler():
    return models.load_scheduler(models.resolve_model("tiny-2b"))


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


@pytest.mark.parametrize("size", [(64, 96), (96, 64), (48, 160)])
def test_rotary_matches_the_diffusers_pipeline_at_any_size(size):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(models.resolve_model("tiny"))
    height, width = size
    expected = pipe._prepare_rotary_positional_embeddings(height, width, 5, torch.device("cpu"))
    ours = rotary_embedding(pipe.transformer.config, 5, height // 8, width // 8)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert rotary_embedding(pipe.transformer.config | {"use_rotary_positional_embeddings": False}, 5, 8, 12) is None
