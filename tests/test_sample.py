"""cogvx sample: a trained LoRA through diffusers' load_lora_weights, videos and a contact sheet out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cogvx.cli import app
from cogvx.pipeline import models
from cogvx.pipeline.generate import SampleConfig, run_sample, to_uint8
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train

# Tiny requests keep every pipeline call well under a second on a CPU.
FAST = {"steps": 2, "frames": 9, "height": 32, "width": 64}


def train_lora(shards: Path, output: Path, model: str | None = None, steps: int = 3) -> Path:
    cfg = TrainConfig(
        shards=shards, output=output, model=model, max_steps=steps, rank=4, learning_rate=1e-2,
        mixed_precision="no", workers=0, checkpoint_every=0,
    )  # fmt: skip
    train(cfg)
    return output


@pytest.fixture(scope="module")
def lora_run(tiny_cache: Path, tmp_path_factory) -> Path:
    return train_lora(tiny_cache, tmp_path_factory.mktemp("sample") / "run")


def read_video(path: Path) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def test_cli_writes_one_mp4_per_prompt_and_a_contact_sheet(lora_run: Path, tmp_path: Path):
    out = tmp_path / "out" / "clip.mp4"
    args = ["sample", "--lora", str(lora_run), "--prompt", "a red ball", "--prompt", "a blue box slides left"]
    args += ["--output", str(out), "--steps", "2", "--frames", "9", "--height", "32", "--width", "64", "--seed", "3"]
    # The memory options are accepted; offload only means something on a GPU and says so on a CPU.
    args += ["--cpu-offload", "--vae-slicing", "--dynamic-cfg"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "--cpu-offload only saves GPU memory" in result.output

    videos = [out.with_name("clip-00.mp4"), out.with_name("clip-01.mp4")]
    for path in videos:
        frames = read_video(path)
        assert frames.shape == (9, 32, 64, 3), path
    assert not np.array_equal(read_video(videos[0]), read_video(videos[1])), "two prompts gave the same video"

    sheet = Image.open(out.with_suffix(".png"))
    # Two rows (one per prompt) of 8 evenly spaced frames, each under a 14-pixel label, 2-pixel gaps.
    assert sheet.size == (2 + 8 * (64 + 2), 2 + 2 * (14 + 32 + 2))
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["prompts"] == ["a red ball", "a blue box slides left"]
    assert settings["model"] == "tiny" and settings["seed"] == 3 and settings["lora_scale"] == 1.0


def test_lora_changes_the_video_and_scale_zero_is_the_base_model(lora_run: Path, tmp_path: Path):
    from diffusers import CogVideoXPipeline

    prompt = ("a green square moves up",)
    with_lora = run_sample(SampleConfig(prompt, lora=lora_run, output=tmp_path / "lora.mp4", **FAST))
    scale_zero = run_sample(SampleConfig(prompt, lora=lora_run, lora_scale=0.0, output=tmp_path / "zero.mp4", **FAST))
    base = run_sample(SampleConfig(prompt, lora=lora_run, no_lora=True, output=tmp_path / "base.mp4", **FAST))
    half = run_sample(SampleConfig(prompt, lora=lora_run, lora_scale=0.5, output=tmp_path / "half.mp4", **FAST))

    difference = np.abs(with_lora.frames[0].astype(int) - base.frames[0].astype(int))
    assert difference.mean() > 1.0, "the LoRA did not change the video: the comparison is vacuous"
    np.testing.assert_array_equal(scale_zero.frames[0], base.frames[0])
    np.testing.assert_array_equal(read_video(tmp_path / "zero.mp4"), read_video(tmp_path / "base.mp4"))
    assert not np.array_equal(half.frames[0], with_lora.frames[0])
    assert not np.array_equal(half.frames[0], base.frames[0])

    # Scale 1 is exactly what a user gets from diffusers alone: no hidden alpha / rank factor.
    pipe = CogVideoXPipeline.from_pretrained(models.resolve_model("tiny"), torch_dtype=torch.float32)
    pipe.load_lora_weights(str(lora_run))
    reference = pipe(
        prompt[0], num_inference_steps=2, num_frames=9, height=32, width=64, guidance_scale=6.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).frames[0]  # fmt: skip
    np.testing.assert_array_equal(with_lora.frames[0], to_uint8(np.asarray(reference)))


def test_lora_for_another_base_is_refused_naming_both_models(tiny_cache: Path, tmp_path: Path):
    from diffusers import CogVideoXTransformer3DModel

    # The tiny cache trains tiny-2b too (they share VAE and text encoder, like the real 2b and 5b).
    run = train_lora(tiny_cache, tmp_path / "run-2b", model="tiny-2b", steps=1)
    other = tmp_path / "narrow-model"
    shutil.copytree(models.resolve_model("tiny-2b"), other)
    config = json.loads((other / "transformer" / "config.json").read_text())
    config["attention_head_dim"] = 8  # inner dim 16 instead of 32
    CogVideoXTransformer3DModel.from_config(config).save_pretrained(other / "transformer")

    with pytest.raises(ValueError, match="does not fit") as err:
        run_sample(SampleConfig(("a cat",), lora=run, model=str(other), output=tmp_path / "x.mp4", **FAST))
    assert "'tiny-2b'" in str(err.value) and str(other) in str(err.value)
    assert "--model tiny-2b" in str(err.value)
    assert not (tmp_path / "x.mp4").exists()

    out = CliRunner().invoke(app, ["sample", "--lora", str(run), "--model", str(other), "--prompt", "a cat"])
    assert out.exit_code == 1 and "tiny-2b" in out.output


def test_a_prompt_over_the_text_limit_is_truncated_with_a_warning(lora_run: Path, tmp_path: Path, capsys):
    long_prompt = "a red ball bounces over the blue box " * 40  # ~320 tokens, the limit is 226
    result = run_sample(SampleConfig((long_prompt, "a dog"), lora=lora_run, output=tmp_path / "long.mp4", **FAST))
    assert result.truncated == [True, False]
    err = capsys.readouterr().err
    assert "prompt 0 has" in err and "truncated" in err and "prompt 1" not in err
    assert json.loads((tmp_path / "long.json").read_text())["truncated"] == [True, False]
    assert all(p.is_file() for p in result.videos)


def test_settings_from_a_toml_file_with_flags_winning(lora_run: Path, tmp_path: Path):
    config = tmp_path / "sample.toml"
    config.write_text(
        'prompts = ["a cat on a car"]\nsteps = 2\nframes = 9\nheight = 32\nwidth = 64\nseed = 1\nlora_scale = 0.5\n'
    )
    out = tmp_path / "toml.mp4"
    args = ["sample", "--config", str(config), "--lora", str(lora_run), "--output", str(out), "--seed", "7"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["prompts"] == ["a cat on a car"] and settings["steps"] == 2 and settings["lora_scale"] == 0.5
    assert settings["seed"] == 7
    assert read_video(out).shape == (9, 32, 64, 3)


def test_a_frame_count_the_vae_rounds_up_is_reported(lora_run: Path, tmp_path: Path, capsys):
    # 13 frames = 4 latent frames; CogVideoX's VAE (and so the diffusers pipeline) decodes those to 16.
    result = run_sample(SampleConfig(("a cat",), lora=lora_run, output=tmp_path / "f.mp4", **(FAST | {"frames": 13})))
    assert len(result.frames[0]) == len(read_video(tmp_path / "f.mp4")) == 16
    assert "decoded 16 frames for --frames 13" in capsys.readouterr().err


def test_vae_tiling_never_writes_a_video_of_the_wrong_size(lora_run: Path, tmp_path: Path):
    # diffusers' tiled decode assumes tiles of real CogVideoX size; the tiny VAE's tiles are 32x48 pixels,
    # for which its overlap arithmetic returns extra pixels. cogvx refuses rather than write a wrong video.
    cfg = SampleConfig(("a cat",), lora=lora_run, output=tmp_path / "tiled.mp4", vae_tiling=True, **FAST)
    with pytest.raises(ValueError, match="drop --vae-tiling"):
        run_sample(cfg)
    assert not (tmp_path / "tiled.mp4").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"prompts": ()}, "at least one --prompt"),
        ({"prompts": ("  ",)}, "empty"),
        ({"frames": 10}, "4k\\+1"),
        ({"output": Path("clip.gif")}, "mp4"),
        ({"lora": None}, "--lora"),
        ({"no_lora": True, "lora_scale": 0.5}, "--lora-scale"),
        ({"steps": 0}, "--steps"),
        ({"dtype": "fp8"}, "Unknown dtype"),
    ],
)
def test_bad_settings_are_refused_before_loading_anything(changes, message):
    settings = {"prompts": ("a cat",), "lora": Path("runs/x")} | changes
    with pytest.raises(ValueError, match=message):
        SampleConfig(**settings)


def test_missing_lora_weights_say_where_to_point(tmp_path: Path):
    with pytest.raises(ValueError, match="pytorch_lora_weights.safetensors"):
        run_sample(SampleConfig(("a cat",), lora=tmp_path, output=tmp_path / "x.mp4"))
