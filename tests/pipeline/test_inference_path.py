"""Forwards without gradients (validation sampling, the eval score) take the run's inference path
(pipeline/speed/inference.py): the compiled block, the float8 layers, the swapped weights, and compute what
the eager blocks compute.

Dynamo's graph capture is what a compiled run executes; here the captured graphs run eagerly (backend
``eager``), because Inductor compiles each graph of the tiny model for about half a minute on this CPU (its
latents measured within 3e-6 of the eager ones there). bench/validation.py runs Inductor on the GPU and
compares cogvx's validation latents with the seed pipeline's.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvx import runs
from cogvx.pipeline import levers, lora, models
from cogvx.pipeline.objective import Objective
from cogvx.pipeline.sampling import sample_latents
from cogvx.pipeline.speed.checkpointing import MODES
from cogvx.train import evaluation
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train
from tests.conftest import CLIPS, ROOT


@pytest.fixture
def captured_graphs_run_eagerly(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _prepared(chosen: str, layers: int = 5) -> torch.nn.Module:
    """A tiny transformer of ``layers`` blocks with a non-zero LoRA, prepared with the ``+``-joined levers: a
    checkpointing mode, ``compile``, ``fp8`` (base weights in float8)."""
    from diffusers import CogVideoXTransformer3DModel

    source = models.resolve_model("tiny")
    config = dict(CogVideoXTransformer3DModel.load_config(source, subfolder="transformer"), num_layers=layers)
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel.from_config(config)
    lora.add_lora(transformer, 4, 8, lora.DEFAULT_TARGETS, 0.0)
    with torch.no_grad():  # non-zero B matrices, so the LoRA path counts
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    options = set(chosen.split("+"))
    mode = next(o for o in options if o in MODES)
    levers.prepare(transformer, levers.Levers(mode, "compile" in options, "fp8" in options), "cpu")
    return transformer


def _sampled(chosen: str) -> torch.Tensor:
    """Validation latents (3 steps, guidance batched) of ``_prepared(chosen)``."""
    transformer = _prepared(chosen)
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 226, 32, generator=g), torch.randn(1, 226, 32, generator=g)
    info = models.ModelInfo.read("tiny")
    latents = sample_latents(
        transformer, dict(info.load_scheduler().config), embeds, negative, num_frames=9, height=64, width=96,
        num_inference_steps=3, guidance_scale=6.0, generator=torch.Generator().manual_seed(7),
        spatial_compression=info.spatial_compression, temporal_compression=info.temporal_compression,
    )  # fmt: skip
    assert not any("forward" in vars(block) for block in transformer.transformer_blocks)  # handed back
    return latents


@pytest.mark.parametrize(
    "chosen", ["none+compile", "offload+compile", "selective+fp8+compile", "swap+compile", "swap+fp8+compile"]
)
def test_sampling_runs_the_compiled_block_and_matches_the_eager_blocks(captured_graphs_run_eagerly, chosen: str):
    """Every mode samples through one compiled block graph (two: the first block's text input is a strided
    view), whatever the number of blocks and steps, and gets the eager blocks' latents. Without the
    inference path, diffusers calls the blocks directly under ``no_grad``: no graph at all."""
    compiled = _sampled(chosen)
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(compiled, _sampled(chosen.replace("+compile", "")), rtol=1e-6, atol=1e-6)


def test_swapped_weights_stream_in_for_sampling_and_give_the_resident_latents():
    """Eager ``swap`` samples through its slots (the first block prefetched while the last one computes, pass
    after pass) and gets the latents of the weights kept on the device; fp8 storage is one more rounding."""
    resident = _sampled("none")
    torch.testing.assert_close(_sampled("swap"), resident, rtol=0, atol=0)
    torch.testing.assert_close(_sampled("swap+fp8"), _sampled("full+fp8"), rtol=0, atol=0)


def test_the_eval_score_runs_the_compiled_block_and_matches_the_eager_blocks(captured_graphs_run_eagerly):
    def losses(chosen: str) -> list[float]:
        transformer = _prepared(chosen)
        source = models.resolve_model("tiny")
        objective = Objective(transformer.config, models.load_scheduler(source).alphas_cumprod, 0.7)
        g = torch.Generator().manual_seed(3)
        moments, embeds = torch.randn(1, 8, 4, 8, 12, generator=g), torch.randn(1, 226, 32, generator=g)
        with evaluation.scoring(transformer):
            return [
                objective.loss_at(transformer, moments, embeds, torch.tensor([t]), torch.Generator().manual_seed(t),
                                  torch.float32).item()
                for t in (100, 500, 900)
            ]  # fmt: skip

    compiled = losses("selective+compile")
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    assert compiled == pytest.approx(losses("selective"), rel=1e-6)


def test_a_compiled_run_validates_on_the_inference_path_between_its_steps(
    captured_graphs_run_eagerly, tiny_cache: Path, tmp_path: Path, monkeypatch
):
    """Through the real loop (``compile`` and ``swap`` from the config): the first validation compiles the
    inference runner's two graphs (the first block's text input is a strided view), later ones compile none,
    and the validation latents are the eager run's."""
    from cogvx.preprocess.run import PreprocessConfig
    from cogvx.preprocess.run import run as preprocess
    from cogvx.train import validation, validator

    cache = tmp_path / "shards"
    shutil.copytree(tiny_cache, cache)  # its clips are encoded already: only the prompt is added
    preprocess(PreprocessConfig(data=CLIPS, output=cache, model="tiny", dtype="fp32", workers=0,
                                validation_prompts=("a red disc moves left",)))  # fmt: skip
    compiled_by_validation = []

    def counted(*args, **kwargs):
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        done = validation.run_validation(*args, **kwargs)
        compiled_by_validation.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
        assert len(done.seconds) == len(done.paths) == 1 and done.total_seconds > 0
        return done

    monkeypatch.setattr(validator, "run_validation", counted)

    def validated(name: str, **chosen) -> list[torch.Tensor]:
        cfg = TrainConfig(shards=cache, output=tmp_path / name, max_steps=3, rank=4, learning_rate=1e-2,
                          mixed_precision="no", workers=0, checkpoint_every=0, validation_every=1,
                          validation_steps=2, seed=3, **chosen)  # fmt: skip
        return [runs.read_validation_sample(path)[0] for path in train(cfg).validation]

    compiled = validated("compiled", checkpointing="swap", compile=True)
    assert compiled_by_validation == [2, 0, 0]
    eager = validated("eager", checkpointing="none", compile=False)
    assert len(compiled) == len(eager) == 3
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_validation_benchmark_runs_on_a_cpu(tmp_path: Path):
    out = tmp_path / "validation.json"
    command = [sys.executable, str(ROOT / "bench" / "validation.py"), "--models", "tiny", "--device", "cpu",
               "--steps", "2", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"environment", "command", "results"} <= set(report)
    (row,) = report["results"]
    assert row["model"] == "tiny" and row["steps"] == 2
    assert row["validation_s"] > 0 and row["seed_validation_s"] > 0
    assert row["latents_max_abs_diff"] < 0.1  # the same sampling: same weights, noise and embeddings
    assert "validation_s" in done.stdout.splitlines()[-2]  # the table comes last
