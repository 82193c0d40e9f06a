"""The eval score is a number, not a draw: the same for one LoRA on every call and every process count, the
base model's when the LoRA is scaled to 0, lower after training; ``best/`` and the metrics fields around it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from cogvx import runs
from cogvx.errors import RunError
from cogvx.pipeline import lora, models
from cogvx.pipeline.objective import Objective, add_noise, draw_latents, rotary_embedding, velocity_loss
from cogvx.shards import Manifest
from cogvx.shards.store import open_store
from cogvx.train import checkpoint, evaluation, heldout
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train
from tests.conftest import property_examples


def _objective(info: models.ModelInfo, transformer, dropout: float = 0.0) -> Objective:
    image_scale = info.image_latent_scale if info.image_to_video else None
    alphas = info.load_scheduler().alphas_cumprod
    return Objective(
        transformer.config, alphas, info.scaling_factor, image_latent_scale=image_scale, noised_image_dropout=dropout
    )


def _with_lora(transformer, seed: int) -> None:
    """A LoRA with dropout (eval mode must switch it off) and non-zero B, so it changes the model's output."""
    torch.manual_seed(seed)
    lora.add_lora(transformer, 4, 8.0, lora.DEFAULT_TARGETS, 0.1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


@pytest.fixture(scope="module")
def scored(tiny_cache: Path):
    """The tiny model with a LoRA, its objective, and two clips of the tiny cache held out with their tensors."""
    info = models.ModelInfo.read("tiny", None, None)
    transformer = info.load_transformer(torch.float32, "cpu")
    _with_lora(transformer, 0)
    store = open_store(tiny_cache)
    manifest = Manifest.load(store)
    eval_set = heldout.held_out(manifest, 2, store.location)
    objective = _objective(info, transformer)
    pairs = evaluation.pairs(eval_set.scored, len(objective.alphas_cumprod))
    samples = evaluation.load_samples(store, manifest, eval_set.scored)
    return transformer, objective, pairs, samples, store, manifest


def _score(model, objective, pairs, samples, **kwargs) -> evaluation.Score:
    return evaluation.score(model, objective, samples, pairs, compute_dtype=torch.float32, device="cpu", **kwargs)


def _numbers(score: evaluation.Score) -> tuple:
    return score.loss, score.bands, score.samples, score.pairs


def test_timesteps_are_band_midpoints_and_thirds_name_the_noise():
    assert evaluation.timesteps(1000) == [83, 249, 416, 583, 749, 916]
    bands = [evaluation.band(t, 1000) for t in evaluation.timesteps(1000)]
    assert bands == ["low"] * 2 + ["mid"] * 2 + ["high"] * 2  # two per band
    assert evaluation.pair_seed("a", 83) == evaluation.pair_seed("a", 83) != evaluation.pair_seed("a", 249)


def test_a_scores_identity_names_its_samples_and_how_they_were_scored(monkeypatch):
    # Scores of another protocol (another version, other timesteps) never compare as equal, nor other samples.
    eval_set = heldout.EvalSet(frozenset({"a", "b"}), 2, "cache")
    same = evaluation.identity(heldout.EvalSet(frozenset({"b", "a"}), 2, "elsewhere"), 1000)
    assert evaluation.identity(eval_set, 1000) == same != eval_set.keys_hash
    assert evaluation.identity(heldout.EvalSet(frozenset({"a"}), 1, "cache"), 1000) != same
    assert evaluation.identity(eval_set, 500) != same  # other timesteps
    monkeypatch.setattr(evaluation, "EVAL_TIMESTEPS", 8)
    assert evaluation.identity(eval_set, 1000) != same
    monkeypatch.setattr(evaluation, "EVAL_TIMESTEPS", 6)
    monkeypatch.setattr(evaluation, "PROTOCOL", evaluation.PROTOCOL + 1)
    assert evaluation.identity(eval_set, 1000) != same


def test_the_score_is_the_same_on_every_call_and_leaves_the_model_as_it_was(scored):
    transformer, objective, pairs, samples, *_ = scored
    transformer.train()
    trainable = [name for name, p in transformer.named_parameters() if p.requires_grad]
    first, second = (_score(transformer, objective, pairs, samples) for _ in range(2))
    assert _numbers(first) == _numbers(second)  # exactly: LoRA dropout off, every draw seeded by (key, timestep)
    assert first.samples == 2 and first.pairs == 2 * evaluation.EVAL_TIMESTEPS and math.isfinite(first.loss)
    assert all(math.isfinite(v) for v in first.bands.values())
    assert first.loss == pytest.approx(sum(first.bands.values()) / 3)  # two timesteps in each band
    assert transformer.training and trainable == [n for n, p in transformer.named_parameters() if p.requires_grad]
    base = _score(transformer, objective, pairs, samples, base=True)
    assert base.loss != first.loss  # the LoRA changes the model, and base switches it off
    assert trainable == [n for n, p in transformer.named_parameters() if p.requires_grad]


@settings(max_examples=property_examples(4))
@given(world=st.integers(2, 5), caller=st.integers(0, 4))
def test_processes_that_split_the_pairs_give_the_same_score(scored, world, caller):
    """Each simulated process reads only its own share's samples; the gathered losses reduce to one number."""
    transformer, objective, pairs, samples, store, manifest = scored
    whole = _score(transformer, objective, pairs, samples)
    caller = caller % world
    losses, own = {}, {}
    for rank in reversed(range(world)):  # gathered in any order
        mine = evaluation.share(len(pairs), rank, world)
        own[rank] = evaluation.load_samples(store, manifest, {pairs[i].key for i in mine})
        if rank != caller:
            with evaluation.scoring(transformer):
                losses[rank] = evaluation.pair_losses(
                    transformer, objective, own[rank], pairs, mine, compute_dtype=torch.float32, device="cpu"
                )
    everyone = [loss for rank in sorted(losses) for loss in losses[rank]]
    split = _score(
        transformer, objective, pairs, own[caller], rank=caller, world_size=world, gather=lambda mine: everyone + mine
    )
    assert _numbers(split) == _numbers(whole)


def test_the_lora_at_scale_zero_scores_the_base_model(scored):
    from peft.tuners.lora import LoraLayer

    transformer, objective, pairs, samples, *_ = scored
    base = _score(transformer, objective, pairs, samples, base=True)
    layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.set_scale("default", 0.0)
    try:
        assert _numbers(_score(transformer, objective, pairs, samples)) == _numbers(base)
    finally:
        for layer in layers:
            layer.set_scale("default", 1.0)
    assert _score(transformer, objective, pairs, samples).loss != base.loss


def test_loss_at_is_the_training_loss_at_that_timestep(scored):
    transformer, objective, _, samples, *_ = scored
    sample = next(iter(samples.values()))
    moments, embeds = sample.moments.unsqueeze(0), sample.prompt_embeds.unsqueeze(0)
    t = torch.tensor([437])
    transformer.eval()
    with torch.no_grad():
        ours = objective.loss_at(transformer, moments, embeds, t, torch.Generator().manual_seed(5), torch.float32)
        g = torch.Generator().manual_seed(5)
        x0 = draw_latents(moments, objective.scaling_factor, g)
        noise = torch.randn(x0.shape, generator=g)
        noisy = add_noise(x0, noise, t, objective.alphas_cumprod)
        _, frames, _, height, width = x0.shape
        velocity = transformer(
            hidden_states=noisy,
            encoder_hidden_states=embeds,
            timestep=t,
            image_rotary_emb=rotary_embedding(dict(transformer.config), frames, height, width),
            return_dict=False,
        )[0]
        expected = velocity_loss(velocity, noisy, x0, t, objective.alphas_cumprod)
    transformer.train()
    assert torch.equal(ours, expected)


def test_an_image_to_video_score_keeps_every_image():
    info = models.ModelInfo.read("tiny-i2v")
    transformer = info.load_transformer(torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    moments = torch.cat([torch.randn(1, 4, 3, 8, 12, generator=g), torch.full((1, 4, 3, 8, 12), -4.0)], dim=1)
    image = torch.cat([torch.randn(1, 4, 1, 8, 12, generator=g), torch.full((1, 4, 1, 8, 12), -5.0)], dim=1)
    embeds = torch.randn(1, 226, 32, generator=g)

    def loss(dropout: float, image_moments: torch.Tensor) -> torch.Tensor:
        objective = _objective(info, transformer, dropout)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(3)
            return objective.loss_at(
                transformer, moments, embeds, torch.tensor([500]), generator, torch.float32, image_moments
            )

    assert torch.equal(loss(0.0, image), loss(1.0, image))  # noised-image dropout never applies to a score
    assert not torch.equal(loss(0.0, image), loss(0.0, torch.zeros_like(image)))


def test_training_lowers_the_score_below_the_base_models(tiny_cache: Path, tmp_path: Path):
    # Until the loop holds clips out, the run trains on the whole cache: the score shows that the LoRA learns.
    cfg = TrainConfig(
        shards=tiny_cache, output=tmp_path / "run", max_steps=12, rank=8, alpha=8, learning_rate=1e-2,
        mixed_precision="fp32", workers=0, shuffle_buffer=4, checkpoint_every=0,
    )  # fmt: skip
    result = train(cfg)
    info = models.ModelInfo.read("tiny", None, None)
    store, manifest, eval_set = heldout.separate_set(tiny_cache)
    evaluator = evaluation.Evaluator(
        eval_set, store, manifest, _objective(info, result.model), every=5, compute_dtype=torch.float32,
        device="cpu", keep_best=cfg.output,
    )  # fmt: skip
    base = evaluator.base_fields(result.model)
    assert base["step"] == 0 and base["eval_set"] == evaluator.identity == evaluation.identity(eval_set, 1000)
    assert evaluator.after_step(result.model, 4, last=False) == {}  # not due
    trained = evaluator.after_step(result.model, 10, last=False)
    assert trained["eval_loss"] < base["eval_base_loss"], (trained, base)
    assert evaluation.read_best(cfg.output) == {
        "eval_set": evaluator.identity,
        "eval_loss": trained["eval_loss"],
        "step": 10,
    }
    again = evaluator.after_step(result.model, 12, last=True)  # the last step is always scored; not lower: kept
    assert again["eval_loss"] == trained["eval_loss"] and evaluation.read_best(cfg.output)["step"] == 10


def test_best_is_a_checkpoint_component_and_best_folder_holds_its_lora(scored, tmp_path: Path):
    transformer, *_ = scored
    identity = "a" * 64
    best = evaluation.Best(identity)
    assert best.update(0.5, 10) and not best.update(0.6, 20) and not best.update(math.nan, 30)
    assert best.update(0.4, 40) and (best.loss, best.step) == (0.4, 40)
    run = tmp_path / "run"
    run.mkdir()
    progress = checkpoint.Progress(world_size=1, workers=0, config={}, step=40)
    saved = checkpoint.save(run, {checkpoint.PROGRESS: progress, "best": best}, keep=2)
    again = evaluation.Best(identity)
    checkpoint.load(saved, {"best": again})
    assert again.state_dict() == best.state_dict()
    elsewhere = evaluation.Best("b" * 64)  # scored on another set: no comparison, the run starts over
    checkpoint.load(saved, {"best": elsewhere})
    assert (elsewhere.loss, elsewhere.step) == (math.inf, None) and elsewhere.discarded["eval_loss"] == 0.4

    (run / runs.best_staging(run, "killed").name).mkdir()  # what a killed writer left
    folder = evaluation.write_best(run, transformer, best)
    assert folder == runs.best(run) and runs.best_leftovers(run) == []
    weights = load_file(runs.lora_weights(folder))
    expected = lora.lora_state_dict(transformer)
    assert weights.keys() == {f"transformer.{k}" for k in expected}  # diffusers' LoRA format, as the run's own
    assert evaluation.read_best(run) == best.state_dict()
    best.update(0.3, 50)
    evaluation.write_best(run, transformer, best)  # replaces the old one whole
    assert evaluation.read_best(run)["step"] == 50 and runs.best_leftovers(run) == []
    runs.best_score(folder).write_text("{")
    with pytest.raises(RunError, match="delete"):
        evaluation.read_best(run)


def test_scores_go_into_the_lines_of_their_steps_and_survive_a_resume(scored, tmp_path: Path):
    transformer, objective, pairs, samples, *_ = scored
    result = _score(transformer, objective, pairs, samples)
    identity = "c" * 64
    run = tmp_path / "run"
    run.mkdir()
    runs.append_metrics(run, {"step": 0} | evaluation.eval_fields(result, identity, base=True))
    assert evaluation.needs_base(runs.read_metrics(run), "d" * 64)
    for step in (1, 2, 3):
        record = {"step": step, "loss": 0.1}
        if step % 2:
            record |= evaluation.eval_fields(result, identity)
        runs.append_metrics(run, record)
    runs.keep_metrics_until(run, 2)  # a resume from step 2: one line per step, the scores in them
    records = runs.read_metrics(run)
    line = json.loads(runs.metrics(run).read_text().splitlines()[1])
    assert set(line) == {"step", "loss", "eval_loss", "eval_high", "eval_mid", "eval_low", "eval_set",
                         "eval_samples", "eval_seconds"}  # fmt: skip
    assert [r["step"] for r in evaluation.eval_records(records, identity)] == [1]
    assert evaluation.eval_records(records, identity, base=True)[0]["eval_base_loss"] == result.loss
    assert not evaluation.needs_base(records, identity)
    assert runs.final_loss(records)[0] == pytest.approx(0.1)  # the score lines do not disturb the loss
