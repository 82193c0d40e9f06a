"""``--checkpointing auto`` (the default) in the training loop: what it plans for, what it says, what it installs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cogvx import config as configfile
from cogvx import runs
from cogvx.cli import app
from cogvx.pipeline import lora, memory, models
from cogvx.pipeline.speed.checkpointing import AUTO
from cogvx.shards import Manifest, merged_layouts
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train


def _train(cache: Path, out: Path, **settings):
    cfg = TrainConfig(
        shards=cache, output=out, max_steps=1, rank=4, mixed_precision="fp32", workers=0, checkpoint_every=0,
        **settings,
    )  # fmt: skip
    return train(cfg)


def _said(text: str) -> tuple[str, float, float]:
    """(mode, predicted peak, budget), sizes in bytes, from the line auto prints."""
    found = re.search(r"--checkpointing auto: (\w+) \(predicted peak ([\d.]+) ([MG])B of ([\d.]+) ([MG])B", text)
    assert found, text
    scale = {"M": 1e6, "G": 1e9}
    return found[1], float(found[2]) * scale[found[3]], float(found[4]) * scale[found[5]]


def test_auto_is_the_default_and_takes_no_recompute_when_memory_is_plenty(tiny_cache, tmp_path, capsys):
    assert TrainConfig(shards=tiny_cache).checkpointing == AUTO
    result = _train(tiny_cache, tmp_path / "run", max_memory=1000.0)
    mode, _peak, budget = _said(capsys.readouterr().out)
    assert (mode, budget) == ("none", 1000e9)
    assert not result.model.gradient_checkpointing


def test_auto_plans_for_the_largest_bucket_and_the_batch(tiny_cache, tmp_path, capsys):
    # The prediction it prints is the memory model's for the cache's largest bucket at this batch size.
    transformer = models.load_transformer(models.resolve_model("tiny"), models.DTYPES["fp32"])
    lora.add_lora(transformer, 4, 4.0, lora.DEFAULT_TARGETS, 0.0)
    shapes = [layout["moments"]["shape"][1:] for layout in merged_layouts(Manifest.load(tiny_cache).shards).values()]
    largest = max(shapes, key=lambda s: s[0] * s[1] * s[2])
    expected = memory.predict(
        memory.static_bytes(transformer), memory.StepSize.of(dict(transformer.config), *largest, batch=2), False
    )
    _train(tiny_cache, tmp_path / "run", max_memory=1000.0, batch_size=2, alpha=4.0)
    mode, peak, _budget = _said(capsys.readouterr().out)
    assert peak == pytest.approx(expected[mode], abs=0.051e6)  # printed in MB with one decimal


@pytest.mark.parametrize("pick", ["selective", "full"])
def test_auto_moves_down_to_the_fastest_mode_that_fits(tiny_cache, tmp_path, capsys, pick):
    transformer = models.load_transformer(models.resolve_model("tiny"), models.DTYPES["fp32"])
    lora.add_lora(transformer, 4, 128.0, lora.DEFAULT_TARGETS, 0.0)
    shapes = [layout["moments"]["shape"][1:] for layout in merged_layouts(Manifest.load(tiny_cache).shards).values()]
    size = memory.StepSize.of(dict(transformer.config), *max(shapes, key=lambda s: s[0] * s[1] * s[2]), batch=1)
    peaks = memory.predict(memory.static_bytes(transformer), size, False)
    budget_gb = peaks[pick] * (1 + memory.SAFETY) / 1e9 * 1.0001  # just enough for `pick`, not for anything faster
    result = _train(tiny_cache, tmp_path / pick, max_memory=budget_gb)
    out = capsys.readouterr().out
    assert _said(out)[0] == pick
    assert "none would need" in out
    assert result.model.gradient_checkpointing


def test_auto_with_nothing_that_fits_warns_and_takes_the_leanest(tiny_cache, tmp_path, capsys):
    result = _train(tiny_cache, tmp_path / "run", max_memory=1e-6)
    out = capsys.readouterr().out
    assert "[warning] --checkpointing auto: even swap is predicted to need" in out
    assert "--batch-size" in out
    assert result.model.gradient_checkpointing and result.steps == 1


def test_max_memory_must_be_positive(tiny_cache):
    from cogvx.errors import ConfigError

    with pytest.raises(ConfigError, match="--max-memory must be positive"):
        TrainConfig(shards=tiny_cache, max_memory=0)


def test_a_run_records_the_mode_auto_chose_and_its_plan(tiny_cache, tmp_path):
    """Through the CLI: config.json says the mode ``auto`` installed (not ``auto``) with the predicted peaks,
    the budget and the chosen one; config.toml says that mode and reruns it as is (``--config``)."""
    transformer = models.load_transformer(models.resolve_model("tiny"), models.DTYPES["fp32"])
    lora.add_lora(transformer, 4, 128.0, lora.DEFAULT_TARGETS, 0.0)
    shapes = [layout["moments"]["shape"][1:] for layout in merged_layouts(Manifest.load(tiny_cache).shards).values()]
    size = memory.StepSize.of(dict(transformer.config), *max(shapes, key=lambda s: s[0] * s[1] * s[2]), batch=1)
    peaks = memory.predict(memory.static_bytes(transformer), size, False)
    budget_gb = peaks["selective"] * (1 + memory.SAFETY) / 1e9 * 1.0001  # just enough for selective
    run_dir = tmp_path / "run"
    args = ["train", "--shards", str(tiny_cache), "--output", str(run_dir), "--max-steps", "1", "--rank", "4",
            "--workers", "0", "--checkpoint-every", "0", "--mixed-precision", "fp32", "--no-compile",
            "--max-memory", repr(budget_gb)]  # fmt: skip
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    mode, printed_peak, _budget = _said(out.output)
    recorded = runs.read_config(run_dir)
    assert mode == recorded["checkpointing"] == "selective"
    plan = recorded["checkpointing_plan"]
    assert plan == {
        "mode": "selective",
        "predicted_peak_bytes": peaks["selective"],
        "budget_bytes": int(budget_gb * 1e9),
        "fits": True,
        "predicted_peaks_bytes": peaks,
    }
    assert printed_peak == pytest.approx(plan["predicted_peak_bytes"], abs=0.051e6)
    again = configfile.build(TrainConfig, runs.config_toml(run_dir))
    assert again.checkpointing == "selective" and again.max_memory == pytest.approx(budget_gb)

    # A mode given by name is recorded as given, with no plan: nothing was predicted.
    fixed = tmp_path / "fixed"
    out = CliRunner().invoke(app, ["train", "--config", str(runs.config_toml(run_dir)), "--output", str(fixed)])
    assert out.exit_code == 0, out.output
    assert "--checkpointing auto" not in out.output
    assert runs.read_config(fixed)["checkpointing"] == "selective" and "checkpointing_plan" not in runs.read_config(
        fixed
    )
