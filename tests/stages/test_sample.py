"""cogvx sample: a trained LoRA through diffusers' load_lora_weights, videos and a contact sheet out."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cogvx.cli import app
from cogvx.errors import ConfigError, ModelError, RunError
from cogvx.media import VideoWriteError, to_uint8
from cogvx.pipeline import models
from cogvx.sample import LORA_ADAPTER, SampleConfig, load_pipeline, plan_sample, run_sample
from tests.helpers.runfolders import train_lora

# Tiny requests keep every pipeline call well under a second on a CPU.
FAST = {"steps": 2, "frames": 9, "height": 32, "width": 64}


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


def lora_matrices(run: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(run / "pytorch_lora_weights.safetensors"))
    return state[f"transformer.{module}.lora_A.weight"], state[f"transformer.{module}.lora_B.weight"]


def merged_pipeline(run: Path, scale: float):
    """The base pipeline with W + scale * B @ A written into every LoRA target by hand: no peft, no diffusers LoRA."""
    from diffusers import CogVideoXPipeline
    from safetensors.torch import load_file

    pipe = CogVideoXPipeline.from_pretrained(models.resolve_model("tiny"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    modules = dict(pipe.transformer.named_modules())
    state = load_file(str(run / "pytorch_lora_weights.safetensors"))
    names = {k.removeprefix("transformer.").split(".lora_")[0] for k in state}
    with torch.no_grad():
        for name in names:
            down, up = lora_matrices(run, name)
            modules[name].weight += scale * up @ down
    return pipe


def test_lora_scale_is_alpha_over_rank_times_the_flag_applied_once(lora_run: Path, tmp_path: Path):
    """Every LoRA layer scales by alpha / rank * --lora-scale (128 / 4 * 0.5), and computes W x + that * B A x."""
    cfg = SampleConfig(("a cat",), lora=lora_run, lora_scale=0.5, output=tmp_path / "x.mp4", **FAST)
    pipe = load_pipeline(cfg, plan_sample(cfg))
    layers = {n: m for n, m in pipe.transformer.named_modules() if hasattr(m, "scaling") and LORA_ADAPTER in m.scaling}
    assert len(layers) == 2 * 4  # 2 blocks x to_q, to_k, to_v, to_out.0
    assert {m.scaling[LORA_ADAPTER] for m in layers.values()} == {128 / 4 * 0.5}

    name = "transformer_blocks.0.attn1.to_q"
    down, up = lora_matrices(lora_run, name)
    base = layers[name].base_layer
    x = torch.randn(3, base.in_features, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.linear(x, base.weight + 16.0 * up @ down, base.bias)
    with torch.no_grad():
        torch.testing.assert_close(layers[name](x), expected, rtol=1e-5, atol=1e-5)


def test_lora_scale_gives_the_video_of_a_manual_merge_and_zero_the_base_model(lora_run: Path, tmp_path: Path):
    prompt = ("a green square moves up",)
    with_lora = run_sample(SampleConfig(prompt, lora=lora_run, output=tmp_path / "lora.mp4", **FAST))
    scale_zero = run_sample(SampleConfig(prompt, lora=lora_run, lora_scale=0.0, output=tmp_path / "zero.mp4", **FAST))
    base = run_sample(SampleConfig(prompt, lora=lora_run, no_lora=True, output=tmp_path / "base.mp4", **FAST))
    half = run_sample(SampleConfig(prompt, lora=lora_run, lora_scale=0.5, output=tmp_path / "half.mp4", **FAST))

    difference = np.abs(with_lora.frames[0].astype(int) - base.frames[0].astype(int))
    assert difference.mean() > 1.0, "the LoRA did not change the video: the comparison is vacuous"
    np.testing.assert_array_equal(scale_zero.frames[0], base.frames[0])
    np.testing.assert_array_equal(read_video(tmp_path / "zero.mp4"), read_video(tmp_path / "base.mp4"))

    # --lora-scale 0.5 is the base weights plus 0.5 * alpha / rank * B A, merged by hand (up to uint8 rounding).
    reference = merged_pipeline(lora_run, 128 / 4 * 0.5)(
        prompt[0], num_inference_steps=2, num_frames=9, height=32, width=64, guidance_scale=6.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).frames[0]  # fmt: skip
    gap = np.abs(half.frames[0].astype(int) - to_uint8(np.asarray(reference)).astype(int))
    assert gap.max() <= 1, gap.max()
    assert np.abs(half.frames[0].astype(int) - with_lora.frames[0].astype(int)).max() > 1

    # Scale 1 is exactly what a user gets from diffusers alone: no hidden alpha / rank factor.
    from diffusers import CogVideoXPipeline

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

    with pytest.raises(ModelError, match="does not fit") as err:
        run_sample(SampleConfig(("a cat",), lora=run, model=str(other), output=tmp_path / "x.mp4", **FAST))
    assert "'tiny-2b'" in str(err.value) and str(other) in str(err.value)
    assert "--model tiny-2b" in str(err.value)
    assert not (tmp_path / "x.mp4").exists()

    output = tmp_path / "cli.mp4"  # not the default samples/ in the working folder
    args = ["sample", "--lora", str(run), "--model", str(other), "--prompt", "a cat", "--output", str(output)]
    out = CliRunner().invoke(app, args)
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
    with pytest.raises(ModelError, match="drop --vae-tiling"):
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
    with pytest.raises(ConfigError, match=message):
        SampleConfig(**settings)


def test_missing_lora_weights_say_where_to_point(tmp_path: Path):
    with pytest.raises(RunError, match="pytorch_lora_weights.safetensors"):
        run_sample(SampleConfig(("a cat",), lora=tmp_path, output=tmp_path / "x.mp4"))


def test_memory_flags_set_the_pipeline_state(lora_run: Path, tmp_path: Path, capsys):
    plain = SampleConfig(("a cat",), lora=lora_run, output=tmp_path / "x.mp4", **FAST)
    pipe = load_pipeline(plain, plan_sample(plain))
    assert (pipe.vae.use_tiling, pipe.vae.use_slicing) == (False, False)

    flagged = SampleConfig(
        ("a cat",), lora=lora_run, output=tmp_path / "x.mp4", vae_tiling=True, vae_slicing=True, cpu_offload=True,
        device="cpu", **FAST,
    )  # fmt: skip
    pipe = load_pipeline(flagged, plan_sample(flagged))
    assert (pipe.vae.use_tiling, pipe.vae.use_slicing) == (True, True)
    # On a CPU, offload is a no-op with a note: no accelerate hooks on any component, all on the CPU.
    assert "--cpu-offload only saves GPU memory" in capsys.readouterr().err
    components = (pipe.transformer, pipe.vae, pipe.text_encoder)
    assert not any(hasattr(c, "_hf_hook") for c in components)
    assert {p.device.type for c in components for p in c.parameters()} == {"cpu"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_offload_on_a_gpu_installs_offload_hooks(lora_run: Path, tmp_path: Path):
    cfg = SampleConfig(("a cat",), lora=lora_run, output=tmp_path / "x.mp4", cpu_offload=True, device="cuda", **FAST)
    pipe = load_pipeline(cfg, plan_sample(cfg))
    components = (pipe.transformer, pipe.vae, pipe.text_encoder)
    assert all(hasattr(c, "_hf_hook") for c in components)
    assert pipe._offload_device == torch.device("cuda:0")
    # Idle components wait in CPU memory until their turn.
    assert {p.device.type for c in components for p in c.parameters()} == {"cpu"}
    result = run_sample(cfg)
    assert result.frames[0].shape == (9, 32, 64, 3)


def test_sample_without_a_prompt_says_so_in_one_line(lora_run: Path):
    out = CliRunner(env={"COLUMNS": "1000"}).invoke(app, ["sample", "--lora", str(lora_run)])
    assert out.exit_code == 1
    assert out.output.strip().splitlines() == [
        'error: give at least one --prompt "..." (or prompts = ["..."] in a --config file)'
    ]


def fake_ffmpeg(folder: Path, lists_libx264: bool) -> Path:
    """An ffmpeg that answers `-encoders` (with or without libx264) and fails at any real work."""
    exe = folder / "ffmpeg"
    listing = " V....D libx264              libx264 H.264 / AVC" if lists_libx264 else " V....D mpeg4   MPEG-4"
    exe.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -encoders ] && echo \'{listing}\' && exit 0; done\nexit 1\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


@pytest.fixture
def weightless_model(tmp_path: Path) -> Path:
    """The tiny model without its transformer weights: loading the pipeline would fail, so a check that
    fires on it provably ran before the pipeline was loaded."""
    model = tmp_path / "weightless"
    shutil.copytree(models.resolve_model("tiny"), model)
    (model / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    return model


@pytest.mark.parametrize("problem", ["no ffmpeg", "no libx264", "folder is a file", "output is a folder", "size"])
def test_sample_checks_it_can_write_before_loading_the_pipeline(problem, weightless_model, tmp_path, monkeypatch):
    output, size = tmp_path / "out" / "clip.mp4", ["--height", "32", "--width", "64"]
    expected = {
        "no ffmpeg": "No usable ffmpeg",
        "no libx264": "cannot encode H.264",
        "folder is a file": f"Cannot write into {tmp_path / 'file'}",
        "output is a folder": f"{output} is a folder",
        "size": "--height/--width must be multiples of 16",
    }[problem]
    if problem == "no ffmpeg":
        monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "missing" / "ffmpeg"))
    elif problem == "no libx264":
        monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake_ffmpeg(tmp_path, lists_libx264=False)))
    elif problem == "folder is a file":
        (tmp_path / "file").write_text("not a folder")
        output = tmp_path / "file" / "clip.mp4"
    elif problem == "output is a folder":
        output.mkdir(parents=True)
    else:
        size = ["--height", "40", "--width", "64"]
    args = ["sample", "--no-lora", "--model", str(weightless_model), "--prompt", "a cat", "--output", str(output)]
    out = CliRunner(env={"COLUMNS": "1000"}).invoke(app, [*args, "--steps", "1", "--frames", "9", *size])
    assert out.exit_code == 1
    [line] = out.output.strip().splitlines()
    assert line.startswith("error: ") and expected in line, line


def test_frames_are_saved_when_the_mp4_cannot_be_written_after_generation(lora_run, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    prompts = ("a red ball", "a dog")
    good = run_sample(SampleConfig(prompts, lora=lora_run, output=tmp_path / "good" / "clip.mp4", **FAST))

    # An ffmpeg that passes the check (it lists libx264) but fails when asked to encode.
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake_ffmpeg(tmp_path, lists_libx264=True)))
    output = tmp_path / "bad" / "clip.mp4"
    with pytest.raises(VideoWriteError) as err:
        run_sample(SampleConfig(prompts, lora=lora_run, output=output, **FAST))
    saved = [output.with_name(f"clip-{k:02d}.frames.safetensors") for k in range(2)]
    message = str(err.value)
    assert "\n" not in message and "could not write 2 mp4 file(s)" in message
    assert all(str(path) in message for path in saved) and str(output.with_suffix(".png")) in message
    for path, frames in zip(saved, good.frames, strict=True):
        np.testing.assert_array_equal(load_file(str(path))["frames"], frames)  # exactly the generated frames
    assert not list(output.parent.glob("*.mp4")) and not list(output.parent.glob(".*partial*"))
    assert output.with_suffix(".png").is_file()
    settings = json.loads(output.with_suffix(".json").read_text())
    assert settings["frames_files"] == {"clip-00.mp4": saved[0].name, "clip-01.mp4": saved[1].name}

    # The CLI says the same in one line and exits 1.
    args = ["sample", "--lora", str(lora_run), "--prompt", "a dog", "--output", str(tmp_path / "cli" / "one.mp4")]
    out = CliRunner(env={"COLUMNS": "2000"}).invoke(
        app, [*args, "--steps", "2", "--frames", "9", "--height", "32", "--width", "64"]
    )
    assert out.exit_code == 1 and "Traceback" not in out.output
    # The error is the last line printed (after the pipeline's loading bars), and one line.
    [line] = [text for text in out.output.splitlines() if text.startswith("error:")]
    assert out.output.strip().splitlines()[-1] == line
    assert str(tmp_path / "cli" / "one.frames.safetensors") in line


def test_the_command_shows_denoising_progress_and_none_of_the_libraries_noise(lora_run: Path, tmp_path: Path):
    # A real process: the libraries' warnings and loading bars go straight to its stderr.
    import subprocess
    import sys

    args = ["sample", "--lora", str(lora_run), "--prompt", "a red disc", "--prompt", "a cat", "--steps", "3"]
    args += ["--frames", "9", "--output", str(tmp_path / "s.mp4")]
    done = subprocess.run([sys.executable, "-m", "cogvx", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "prompt 1/2" in output and "prompt 2/2" in output and "3/3" in output
    for noise in ("FutureWarning", "torch_dtype", "Loading pipeline components", "Loading weights"):
        assert noise not in output, output


def test_a_sample_never_replaces_an_earlier_one_silently(lora_run: Path, tmp_path: Path, monkeypatch):
    """Without --output each run takes the next number; an --output that exists needs --overwrite."""
    monkeypatch.chdir(tmp_path)
    args = ["sample", "--lora", str(lora_run), "--prompt", "a red ball", "--steps", "2", "--frames", "9"]
    args += ["--height", "32", "--width", "64"]
    runner = CliRunner(env={"COLUMNS": "2000"})
    for seed in (1, 2):
        result = runner.invoke(app, [*args, "--seed", str(seed)])
        assert result.exit_code == 0, result.output
    assert f"wrote {Path('samples', 'lora-002.mp4')}" in result.output
    assert sorted(p.name for p in Path("samples").iterdir()) == [
        f"lora-00{n}.{ext}" for n in (1, 2) for ext in ("json", "mp4", "png")
    ]
    first = Path("samples/lora-001.mp4").read_bytes()
    assert json.loads(Path("samples/lora-001.json").read_text())["seed"] == 1  # the first run's, kept

    refused = runner.invoke(app, [*args, "--seed", "3", "--output", "samples/lora-001.mp4"])
    assert refused.exit_code == 1
    [line] = refused.output.strip().splitlines()
    assert line.startswith("error: samples/lora-001.mp4 exists") and "--overwrite" in line, line
    assert Path("samples/lora-001.mp4").read_bytes() == first

    replaced = runner.invoke(app, [*args, "--seed", "3", "--output", "samples/lora-001.mp4", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(Path("samples/lora-001.json").read_text())["seed"] == 3
