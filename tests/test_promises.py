"""Promises that only a real run can keep, checked through ``cogvx train --config FILE`` as a user sets them:
``max_grad_norm`` scales a large gradient down to it, and ``noised_image_dropout`` reaches the I2V objective.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cogvx import runs
from cogvx.cli import app
from cogvx.shards import Manifest, Sample, ShardWriter, read_shard
from cogvx.shards.io import INDEX
from tests.i2vcache import with_image_latents


def train_with_config(folder: Path, name: str, **settings) -> list[dict]:
    """``cogvx train --config NAME.toml`` with ``settings`` as the file's lines; the run's metrics records."""
    run = folder / name
    config = folder / f"{name}.toml"
    base = {"output": str(run), "rank": 4, "mixed_precision": "no", "workers": 0, "checkpoint_every": 0}
    config.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in (base | settings).items()))
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return runs.read_metrics(run)


def test_max_grad_norm_scales_a_large_gradient_down_to_it(tiny_cache, tmp_path):
    """With Adam's epsilon far above every gradient entry, its first step moves each weight by lr * g / (|g| + eps),
    the clipped gradient scaled: after one step the LoRA's B matrices (zero at the start; the A matrices get no
    gradient yet) hold exactly that, so their norm is lr * max_grad_norm / eps when clipping acts, and
    lr * grad_norm / eps (grad_norm, as metrics.jsonl records it, is before clipping) when it does not."""
    lr, eps, max_grad_norm = 1.0, 1.0, 1e-4
    settings = {"shards": str(tiny_cache), "max_steps": 1, "learning_rate": lr, "adam_epsilon": eps}
    [record] = train_with_config(tmp_path, "clipped", **settings, weight_decay=0.0, max_grad_norm=max_grad_norm)
    assert record["grad_norm"] > 100 * max_grad_norm, record  # a gradient clipping has to scale down

    weights = load_file(runs.lora_weights(tmp_path / "clipped"))
    step = math.sqrt(sum(float(t.double().square().sum()) for k, t in weights.items() if "lora_B" in k))
    assert step == pytest.approx(record["lr"] * max_grad_norm / eps, rel=1e-3), (step, record)


def blank_image_latents(cache: Path, out: Path) -> Path:
    """A copy of an I2V cache whose image latents draw zeros: mean 0, log-variance far below the draw's clamp."""
    shutil.copytree(cache, out)
    manifest = Manifest.load(out)
    old, manifest.shards = list(manifest.shards), []
    writer = ShardWriter(out, "blank", manifest.add_shard)
    for record in old:
        entries = {e.key: e for e in record.live_samples()}
        for sample in read_shard(out, record):
            mean, logvar = sample.tensors["image_moments"].chunk(2, dim=0)
            blank = torch.cat([torch.zeros_like(mean), torch.full_like(logvar, -1e4)])
            meta = {k: v for k, v in sample.meta.items() if k != INDEX}  # the writer adds it again
            tensors = dict(sample.tensors) | {"image_moments": blank}
            writer.write(Sample(sample.key, tensors, meta, dict(sample.extras)), entries[sample.key])
        (out / record.name).unlink()
    writer.flush()
    manifest.save(out)
    return out


def test_noised_image_dropout_from_the_config_file_reaches_the_i2v_objective(tiny_cache, tmp_path):
    """Dropout 1 zeroes every sample's image latents: its losses are those of a cache whose image latents are
    zeros, and differ from dropout 0's. Every run draws the same numbers (the dropout's uniform draw is made
    whatever its probability), so the losses compare step by step."""
    cache = with_image_latents(tiny_cache, tmp_path / "i2v")
    blank = blank_image_latents(cache, tmp_path / "i2v-blank")
    common = {"model": "tiny-i2v", "max_steps": 2, "learning_rate": 1e-2}

    def losses(name: str, shards: Path, dropout: float) -> list[float]:
        records = train_with_config(tmp_path, name, shards=str(shards), noised_image_dropout=dropout, **common)
        return [r["loss"] for r in records]

    dropped = losses("dropped", cache, 1.0)
    kept = losses("kept", cache, 0.0)
    zeros = losses("zeros", blank, 0.0)
    assert dropped == pytest.approx(zeros, rel=1e-5), (dropped, zeros)
    assert all(abs(a - b) > 1e-4 * abs(b) for a, b in zip(dropped, kept, strict=True)), (dropped, kept)
