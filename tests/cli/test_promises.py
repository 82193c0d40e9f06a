"""Promises no other test guards: ``max_grad_norm`` scales a large gradient down to it and ``noised_image_dropout``
reaches the I2V objective (real runs, set through ``cogvx train --config FILE`` as a user sets them), and
every file the README's quick start writes is ignored by git.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cogvx import runs
from cogvx.cli import app
from cogvx.preprocess.run import PreprocessConfig
from cogvx.sample import SampleConfig
from cogvx.shards import Manifest, Sample, ShardWriter, read_shard
from cogvx.shards.codec import INDEX
from cogvx.train.config import TrainConfig
from tests.conftest import ROOT
from tests.helpers.i2vcache import with_image_latents


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


# --------------------------------------------------------------------------- the README's outputs stay out of git


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def readme_commands() -> list[list[str]]:
    """Each ``cogvx`` command of the quick start's bash blocks and of "Seeing results" (inline), as its words."""
    quick = readme_section("Quick start")
    lines = [line for block in re.findall(r"```bash\n(.*?)```", quick, re.S) for line in block.splitlines()]
    lines += re.findall(r"`(cogvx [^`]+)`", readme_section("Seeing results"))
    commands = []
    for line in lines:
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words[:1] == ["cogvx"]:
                commands.append(words[1:])
    return commands


def written_paths(words: list[str]) -> list[str]:
    """A file each command writes, by its flags or, where it gives none, the stage's default."""
    command, flags, positional, rest = words[0], {}, [], iter(words[1:])
    for word in rest:
        if word.startswith("--"):
            flags[word] = next(rest, "")
        else:
            positional.append(word)
    if command == "preprocess":
        return [f"{flags.get('--output', PreprocessConfig.output)}/manifest.json"]
    if command == "train":
        run = flags.get("--output", str(TrainConfig.output))
        return [str(runs.config_json(Path(run))), str(runs.checkpoint(Path(run), 1) / "state.json")]
    if command == "sample":
        cfg = SampleConfig(prompts=("a", "b"), lora=Path("run"), output=flags.get("--output"))
        return [str(path) for path in [*cfg.video_paths(), cfg.sheet_path]]
    if command == "render":
        return [str(runs.validation_video(runs.validation_sample(runs.validation_step(Path(positional[0]), 1), 0)))]
    if command == "report":
        return [flags.get("--output") or str(runs.report(Path(positional[0])))]
    raise AssertionError(f"the README runs `cogvx {command}`: say here which files it writes")


def test_every_file_the_readme_quick_start_writes_is_ignored_by_git():
    commands = readme_commands()
    assert {words[0] for words in commands} >= {"preprocess", "train", "sample", "render", "report"}, commands
    written = sorted({path for words in commands for path in written_paths(words)})
    checked = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(written), capture_output=True,
        text=True,
    )  # fmt: skip
    ignored = set(checked.stdout.splitlines())
    assert checked.returncode in (0, 1), checked.stderr
    assert [path for path in written if path not in ignored] == [], "add these to .gitignore"
