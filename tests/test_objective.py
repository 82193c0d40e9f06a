"""The objective against the seed's formula, computed independently with the scheduler's own methods."""

from __future__ import annotations

import pytest
import torch

from cogvx.pipeline import models
from cogvx.pipeline.objective import Objective, add_noise, draw_latents, rotary_embedding, velocity_loss


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
            {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states, "timestep": timestep}
        )
        g = torch.Generator().manual_seed(99)
        return (torch.randn(hidden_states.shape, generator=g).to(self.dtype),)


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
