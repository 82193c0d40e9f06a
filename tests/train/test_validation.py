"""Validation without T5 or VAE: the sampler equals diffusers' pipeline, and the files keep their contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from cogvx.cli import app
from cogvx.pipeline import models
from cogvx.pipeline.sampling import sample_latents
from cogvx.preprocess.run import PreprocessConfig
from cogvx.preprocess.run import run as preprocess
from cogvx.runs import read_metrics
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train
from tests.conftest import CLIPS
from tests.helpers.training import tiny_15

PROMPTS = ("a red disc moves left", "a white square moves up")


@pytest.mark.parametrize("variant", ["tiny", "tiny-2b", "tiny-15"])
def test_sampler_equals_the_diffusers_pipeline(variant: str, tmp_path: Path):
    from diffusers import CogVideoXPipeline

    source = str(tiny_15(tmp_path / "m")) if variant == "tiny-15" else models.resolve_model(variant)
    transformer = models.load_transformer(source, torch.float32)
    scheduler = models.load_scheduler(source)
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 226, 32, generator=g), torch.randn(1, 226, 32, generator=g)
    size = {"num_frames": 9, "height": 64, "width": 96, "num_inference_steps": 3, "guidance_scale": 6.0}

    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, output_type="latent",
                    generator=torch.Generator().manual_seed(7), **size).frames  # fmt: skip
    info = models.ModelInfo.read(source)
    ours = sample_latents(transformer, dict(scheduler.config), embeds, negative,
                          generator=torch.Generator().manual_seed(7), spatial_compression=info.spatial_compression,
                          temporal_compression=info.temporal_compression, **size)  # fmt: skip
    assert torch.equal(ours, expected)
    frames = 4 if variant == "tiny-15" else 3  # 1.5 pads 3 latent frames to a multiple of patch_size_t=2
    assert ours.shape == (1, frames, 4, 8, 12)


@pytest.fixture(scope="module")
def cache_with_prompts(tiny_cache: Path, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("validation") / "shards"
    shutil.copytree(tiny_cache, cache)
    preprocess(PreprocessConfig(data=CLIPS, output=cache, model="tiny", dtype="fp32", workers=0,
                                validation_prompts=PROMPTS))  # fmt: skip
    return cache


def test_validation_latents_follow_the_render_contract(cache_with_prompts: Path, tmp_path: Path):
    from diffusers import CogVideoXPipeline

    cfg = TrainConfig(shards=cache_with_prompts, output=tmp_path, max_steps=4, rank=4, learning_rate=1e-2,
                      mixed_precision="no", workers=0, checkpoint_every=0, validation_every=2, validation_steps=3,
                      validation_guidance=5.0, seed=11)  # fmt: skip
    result = train(cfg)
    names = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "validation").rglob("*.safetensors"))
    assert names == [f"validation/step-{s:06d}/sample-{k:02d}.safetensors" for s in (2, 4) for k in (0, 1)]
    assert sorted(str(p.relative_to(tmp_path)) for p in result.validation) == names

    path = tmp_path / "validation" / "step-000004" / "sample-01.safetensors"
    with safe_open(str(path), framework="pt") as f:
        latents, meta = f.get_tensor("latents"), {k: json.loads(v) for k, v in f.metadata().items()}
    assert meta == {
        "prompt": PROMPTS[1],
        "seed": 12,
        "step": 4,
        "model": "tiny",
        "guidance_scale": 5.0,
        "num_inference_steps": 3,
        "height": 64,
        "width": 96,
        "num_frames": 13,
        "scaling_factor": 0.7,
    }  # fmt: skip  (the first bucket: 13x64x96)
    assert latents.shape == (1, 4, 4, 8, 12)  # [1, F, C, H, W]

    # The same latents come out of diffusers' pipeline with the trained LoRA and the stored embeddings.
    with safe_open(str(cache_with_prompts / "validation_prompts.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in ("prompt_embeds", "negative_prompt_embeds")}
    pipe = CogVideoXPipeline.from_pretrained(models.resolve_model("tiny"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path))
    expected = pipe(prompt_embeds=stored["prompt_embeds"][1:2], negative_prompt_embeds=stored["negative_prompt_embeds"],
                    num_frames=meta["num_frames"], height=meta["height"], width=meta["width"],
                    num_inference_steps=meta["num_inference_steps"], guidance_scale=meta["guidance_scale"],
                    generator=torch.Generator().manual_seed(meta["seed"]), output_type="latent").frames  # fmt: skip
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    with safe_open(str(tmp_path / "validation" / "step-000002" / "sample-01.safetensors"), framework="pt") as f:
        assert not torch.allclose(f.get_tensor("latents"), latents)  # the LoRA changed between steps 2 and 4


def test_validation_does_not_change_training(cache_with_prompts: Path, tmp_path: Path):
    common = dict(shards=cache_with_prompts, max_steps=3, rank=4, mixed_precision="no", workers=0,
                  checkpoint_every=0, lora_dropout=0.1)  # fmt: skip
    plain = train(TrainConfig(output=tmp_path / "a", **common))
    validated = train(TrainConfig(output=tmp_path / "b", validation_every=1, validation_steps=2, **common))
    assert validated.losses == plain.losses


KILL_AFTER_PROMPTS = """
import os
from cogvx import files

_save = files.save_safetensors


def _save_then_die(path, *args, **kwargs):
    written = _save(path, *args, **kwargs)
    if str(path).endswith("validation_prompts.safetensors"):
        os._exit(137)  # killed between writing the prompts file and the manifest that names it
    return written


files.save_safetensors = _save_then_die
"""


def test_a_run_killed_while_it_replaces_validation_prompts_never_leaves_a_manifest_naming_other_bytes(
    cache_with_prompts: Path, tmp_path: Path
):
    import hashlib
    import os
    import subprocess
    import sys

    from cogvx.shards import Manifest, paths

    cache = tmp_path / "shards"
    shutil.copytree(cache_with_prompts, cache)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_AFTER_PROMPTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "cogvx", "preprocess", "--data", str(CLIPS), "--output", str(cache),
               "--model", "tiny", "--dtype", "fp32", "--workers", "0",
               "--validation-prompt", "a new prompt"]  # fmt: skip
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr[-2000:]

    entry = Manifest.load(cache).extras.get(paths.VALIDATION_ENTRY)
    data = paths.validation_prompts(cache).read_bytes()
    assert json.loads(safe_open_metadata(data)["prompts"]) == ["a new prompt"], "the kill came after the new file"
    assert entry is None or entry["sha256"] == hashlib.sha256(data).hexdigest()
    again = subprocess.run(command, env={**env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    entry = Manifest.load(cache).extras[paths.VALIDATION_ENTRY]
    assert entry["prompts"] == ["a new prompt"]
    assert entry["sha256"] == hashlib.sha256(paths.validation_prompts(cache).read_bytes()).hexdigest()


def safe_open_metadata(data: bytes) -> dict[str, str]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length])["__metadata__"]


def test_a_validation_step_records_its_seconds_in_the_metrics(cache_with_prompts: Path, tmp_path: Path):
    """Through the CLI: the steps that validate (every 2nd, the last) carry ``validation_seconds``, no other does."""
    run_dir = tmp_path / "run"
    args = ["train", "--shards", str(cache_with_prompts), "--output", str(run_dir), "--max-steps", "3", "--rank", "4",
            "--mixed-precision", "fp32", "--workers", "0", "--checkpoint-every", "0", "--validation-every", "2",
            "--validation-steps", "2"]  # fmt: skip
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    seconds = {r["step"]: r.get("validation_seconds") for r in read_metrics(run_dir)}
    assert set(seconds) == {1, 2, 3}
    assert seconds[1] is None and all(seconds[s] > 0 for s in (2, 3))
    assert (
        sorted(p.parent.name for p in (run_dir / "validation").rglob("*.safetensors"))
        == ["step-000002"] * 2 + ["step-000003"] * 2
    )
