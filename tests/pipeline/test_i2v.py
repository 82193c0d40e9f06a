"""Image-to-video LoRAs: trained from a cache with image latents, loaded by diffusers' I2V pipeline.

The 5b-I2V-shaped ``tiny-i2v`` and the 1.5-I2V-shaped ``tiny-1.5-i2v`` train a few steps each; their LoRAs
go through ``cogvx sample --image`` (diffusers' ``CogVideoXImageToVideoPipeline`` with
``load_lora_weights``) and must give exactly what that pipeline gives on its own, change the video,
and leave ``--no-lora`` equal to the base pipeline.
"""

from __future__ import annotations

import io
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cogvx.cli import app
from cogvx.errors import CacheError, ConfigError, ModelError
from cogvx.media import to_uint8
from cogvx.pipeline import models
from cogvx.pipeline.compat import check_packable
from cogvx.pipeline.sampling import sample_latents
from cogvx.runs import read_metrics
from cogvx.sample import LORA_ADAPTER, SampleConfig, load_pipeline, plan_sample, run_sample
from cogvx.shards import Manifest, ShardRecord, read_shard
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train
from tests.conftest import ROOT
from tests.helpers.i2vcache import with_image_latents

# tiny-i2v has learned position embeddings for its sample size (64x96) alone, as 5b-I2V has for 480x720.
FAST = {"steps": 2, "frames": 9, "height": 64, "width": 96}
MODELS = ["tiny-i2v", "tiny-1.5-i2v"]
PROMPTS = ("a red disc moves left", "a white square moves up")


@pytest.fixture(scope="module")
def i2v_cache(tiny_cache: Path, tmp_path_factory) -> Path:
    """The tiny cache with two validation prompts, and image latents for every sample."""
    return with_image_latents(tiny_cache, tmp_path_factory.mktemp("i2v") / "shards", validation_prompts=PROMPTS)


@pytest.fixture(scope="module")
def runs(i2v_cache: Path, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("i2v-runs")
    trained = {}
    for model in MODELS:
        cfg = TrainConfig(shards=i2v_cache, output=folder / model, model=model, max_steps=3, rank=4,
                          learning_rate=1e-2, mixed_precision="fp32", workers=0, checkpoint_every=0,
                          validation_every=3, validation_steps=2, validation_frames=9)  # fmt: skip
        result = train(cfg)
        assert result.steps == 3 and all(np.isfinite(result.losses))
        trained[model] = folder / model
    return trained


@pytest.mark.parametrize("model", MODELS)
def test_i2v_validation_starts_from_first_frames_in_the_cache(runs, i2v_cache: Path, model: str):
    """Prompt k starts from the k-th sample of the validation size by key; the file holds that first frame."""
    from safetensors import safe_open

    manifest = Manifest.load(i2v_cache)
    keys = sorted(e.key for e in manifest.live_entries() if e.bucket.endswith("x64x96") and not e.mirrored)
    for index, prompt in enumerate(PROMPTS):
        path = runs[model] / "validation" / "step-000003" / f"sample-{index:02d}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in f.metadata().items()}
            image, latents = f.get_tensor("image"), f.get_tensor("latents")
        assert meta["prompt"] == prompt and meta["image_key"] == keys[index % len(keys)]
        assert image.dtype == torch.uint8 and image.shape == (64, 96, 3)
        assert latents.shape[2] == 4  # the video's channels, not the transformer's input channels
        # The frame is the sample's own first.jpg, decoded.
        [record] = [s for s in manifest.shards if meta["image_key"] in {e.key for e in s.samples}]
        [sample] = [s for s in read_shard(i2v_cache, record) if s.key == meta["image_key"]]
        expected = np.asarray(Image.open(io.BytesIO(sample.extras["first.jpg"])).convert("RGB"))
        np.testing.assert_array_equal(image.numpy(), expected)


def test_the_report_shows_each_conditioning_image_beside_its_videos(runs):
    from cogvx.report import ReportConfig
    from cogvx.report import run as report

    result = report(ReportConfig(run=runs["tiny-i2v"]))
    page = result.path.read_text()
    assert page.count('<img class="conditioning"') == len(PROMPTS)
    assert page.count("<video ") == len(PROMPTS)
    for index in range(len(PROMPTS)):
        assert f'<img class="conditioning" data-sample="{index}"' in page


@pytest.mark.parametrize("model", MODELS)
def test_i2v_sampler_equals_the_diffusers_i2v_pipeline(model: str):
    """Transformer-only validation sampling is the I2V pipeline's loop, image latents and ofs included."""
    from diffusers import CogVideoXImageToVideoPipeline

    info = models.ModelInfo.read(model)
    transformer, scheduler = info.load_transformer(torch.float32), info.load_scheduler()
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 226, 32, generator=g), torch.randn(1, 226, 32, generator=g)
    image = torch.randn(1, 1, 4, 8, 12, generator=g)
    frames = 4 if model == "tiny-1.5-i2v" else 3  # 9 frames: 3 latent frames, padded to 4 for 1.5

    def prepare_latents(_image, batch, channels, _frames, height, width, dtype, device, generator, _latents):
        # What prepare_latents returns once the VAE has encoded the picture to `image`.
        noise = torch.randn((batch, frames, channels, height // 8, width // 8), generator=generator, dtype=dtype)
        padded = torch.cat([image, image.new_zeros(batch, frames - 1, 4, 8, 12)], dim=1)
        return noise * scheduler.init_noise_sigma, padded

    pipe = CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                         scheduler=scheduler)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.prepare_latents = prepare_latents
    size = {"num_frames": 9, "height": 64, "width": 96, "num_inference_steps": 3, "guidance_scale": 6.0}
    expected = pipe(image=Image.new("RGB", (96, 64)), prompt_embeds=embeds, negative_prompt_embeds=negative,
                    output_type="latent", generator=torch.Generator().manual_seed(7), **size).frames  # fmt: skip
    ours = sample_latents(transformer, dict(scheduler.config), embeds, negative, image_latents=image,
                          generator=torch.Generator().manual_seed(7), spatial_compression=8, temporal_compression=4,
                          **size)  # fmt: skip
    assert ours.shape == (1, frames, 4, 8, 12)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> Path:
    """A 96x64 picture: a red disc on a blue-green gradient."""
    y, x = np.mgrid[0:64, 0:96]
    pixels = np.stack([(x * 2.5).astype(np.uint8), (y * 4).astype(np.uint8), np.full_like(x, 160, np.uint8)], -1)
    pixels[(x - 30) ** 2 + (y - 32) ** 2 < 144] = (230, 30, 30)
    path = tmp_path_factory.mktemp("frame") / "frame.png"
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def diffusers_video(model: str, image: Path, lora: Path | None) -> np.ndarray:
    """What a user gets from diffusers alone: the I2V pipeline, the LoRA loaded as saved, the same seed."""
    from diffusers import CogVideoXImageToVideoPipeline

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(models.resolve_model(model), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    out = pipe(image=Image.open(image).convert("RGB"), prompt="a red disc moves left", num_inference_steps=2,
               num_frames=9, height=64, width=96, guidance_scale=6.0, generator=torch.Generator().manual_seed(0),
               output_type="np").frames[0]  # fmt: skip
    return to_uint8(np.asarray(out))


@pytest.mark.parametrize("model", MODELS)
def test_i2v_lora_loads_in_the_diffusers_i2v_pipeline_and_changes_the_video(runs, frame, model, tmp_path):
    run = runs[model]
    prompt = ("a red disc moves left",)
    cfg = SampleConfig(prompt, image=frame, lora=run, output=tmp_path / "lora.mp4", **FAST)
    pipe = load_pipeline(cfg, plan_sample(cfg))
    assert type(pipe).__name__ == "CogVideoXImageToVideoPipeline"
    scales = {m.scaling[LORA_ADAPTER] for m in pipe.transformer.modules() if LORA_ADAPTER in getattr(m, "scaling", {})}
    assert scales == {128 / 4}  # alpha / rank, exactly as trained

    with_lora = run_sample(cfg).frames[0]
    assert json.loads((tmp_path / "lora.json").read_text())["image"] == str(frame)
    base = run_sample(SampleConfig(prompt, image=frame, lora=run, no_lora=True, output=tmp_path / "b.mp4", **FAST))
    assert np.abs(with_lora.astype(int) - base.frames[0].astype(int)).mean() > 1.0, "the LoRA changed nothing"
    np.testing.assert_array_equal(base.frames[0], diffusers_video(model, frame, None))
    if model == "tiny-1.5-i2v":  # once is enough: the LoRA's video is what diffusers alone makes of it
        np.testing.assert_array_equal(with_lora, diffusers_video(model, frame, run))


def test_an_i2v_model_refuses_a_cache_without_image_latents(tiny_cache: Path, tmp_path: Path):
    args = ["train", "--shards", str(tiny_cache), "--output", str(tmp_path / "run"), "--model", "tiny-i2v"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 1
    data = shlex.quote(str(Manifest.load(tiny_cache).producer["data"]))
    fix = f"cogvx preprocess --data {data} --output {shlex.quote(str(tiny_cache))} --image-latents"
    assert fix in out.output and "tiny-i2v is an image-to-video model" in out.output
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


def _manifest(height: int, width: int) -> Manifest:
    layout = {"moments": {"dtype": "float32", "shape": [8, 4, height, width]}}
    shard = ShardRecord("s.tar", 1, 1, "0" * 64, layouts={f"13x{height * 8}x{width * 8}": layout})
    return Manifest(producer={}, params={}, schema={}, shards=[shard])


@pytest.mark.parametrize(
    ("model", "latents", "fits"),
    [
        ("tiny-1.5-i2v", (8, 12), True),
        ("tiny-1.5-i2v", (4, 6), True),  # smaller than its sample size: the rotary grid is cut from it
        ("tiny-1.5-i2v", (8, 16), False),  # wider than its position embeddings
        ("tiny-i2v", (8, 12), True),
        ("tiny-i2v", (4, 6), False),  # learned position embeddings exist for 64x96 alone
        ("tiny", (4, 6), True),
    ],
)
def test_buckets_a_model_cannot_pack_are_refused_before_its_weights_load(model, latents, fits):
    info = models.ModelInfo.read(model)
    manifest = _manifest(*latents)
    if fits:
        check_packable(manifest, info, info.read_config("transformer"), Path("cache"))
        return
    with pytest.raises(CacheError, match=f"{model} cannot pack bucket .* --resolution HxW"):
        check_packable(manifest, info, info.read_config("transformer"), Path("cache"))


def test_a_15_model_warns_of_frame_counts_it_was_not_trained_on(i2v_cache: Path):
    """13 and 21 frames (4 and 6 latent frames) pack without the padding frame 1.5's 8k+1 training had."""
    from cogvx.pipeline.compat import frame_count_warning

    manifest = Manifest.load(i2v_cache)
    assert sorted(manifest.bucket_counts()) == ["13x64x96", "17x64x96", "21x64x96"]
    warning = frame_count_warning(manifest, models.ModelInfo.read("tiny-1.5-i2v"))
    assert "trained on 8k+1 frames" in warning and "buckets 13x64x96, 21x64x96 are not" in warning
    assert frame_count_warning(manifest, models.ModelInfo.read("tiny-i2v")) is None


def test_image_of_another_aspect_is_refused_and_a_near_one_resized(frame: Path, tmp_path: Path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (200, 64)).save(wide)
    with pytest.raises(ConfigError, match=r"wide.png is 200x64 .* Crop it to 96:64"):
        plan_sample(SampleConfig(("a",), image=wide, no_lora=True, model="tiny-i2v", output=tmp_path / "a.mp4"))
    near = tmp_path / "near.png"
    Image.open(frame).resize((191, 128)).save(near)  # 0.5% off 3:2
    plan = plan_sample(SampleConfig(("a",), image=near, no_lora=True, model="tiny-i2v", output=tmp_path / "b.mp4"))
    assert plan.image.size == (96, 64)
    with pytest.raises(ConfigError, match="image-to-video model: pass --image"):
        plan_sample(SampleConfig(("a",), no_lora=True, model="tiny-i2v", output=tmp_path / "c.mp4"))
    with pytest.raises(ConfigError, match="tiny is text-to-video: drop --image"):
        plan_sample(SampleConfig(("a",), image=frame, no_lora=True, model="tiny", output=tmp_path / "d.mp4"))


def test_readme_i2v_quick_start_runs_as_written(tmp_path: Path, monkeypatch):
    """The README's image-to-video line, flag for flag, through the real `cogvx preprocess --image-latents`."""
    readme = (ROOT / "README.md").read_text()
    [line] = [ln for ln in readme.splitlines() if ln.startswith("cogvx preprocess") and "--image-latents" in ln]
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    for command in line.split(" && "):
        args = shlex.split(command)
        assert args[0] == "cogvx"
        out = CliRunner().invoke(app, args[1:])
        assert out.exit_code == 0, out.output
    manifest = Manifest.load(tmp_path / "shards-i2v")
    assert manifest.producer["model"] == "tiny-i2v"
    assert manifest.image_latent_count == manifest.sample_count == 6
    assert (tmp_path / "runs" / "i2v" / "pytorch_lora_weights.safetensors").is_file()
    assert "--image FRAME.png" in out.output  # the sample hint of an I2V run asks for the first frame
    card = (tmp_path / "runs" / "i2v" / "README.md").read_text()
    assert "CogVideoXImageToVideoPipeline.from_pretrained(" in card and 'image=load_image("' in card
    assert "image-to-video" in card and "CogVideoXPipeline" not in card


def test_a_transformer_of_another_channel_count_is_refused(tmp_path: Path):
    model = tmp_path / "odd"
    shutil.copytree(models.resolve_model("tiny"), model)
    config = json.loads((model / "transformer" / "config.json").read_text())
    (model / "transformer" / "config.json").write_text(json.dumps(config | {"in_channels": 12}))
    info = models.ModelInfo.read(str(model))  # configs are read as they are: preprocess needs only the encoders
    with pytest.raises(ModelError, match=r"takes 12 channels in, and its VAE makes 4 .* text-to-video \(4\) and "):
        info.check_task()
    with pytest.raises(ModelError, match="takes 12 channels in"):
        plan_sample(SampleConfig(("a",), no_lora=True, model=str(model), output=tmp_path / "a.mp4"))


def test_i2v_validation_of_a_size_without_image_latents_is_refused(i2v_cache: Path):
    from cogvx.train.validation import load_validation_set

    info = models.ModelInfo.read("tiny-i2v")
    with pytest.raises(CacheError, match="no sample of 32x48 with image latents. Pass --validation-height"):
        load_validation_set(i2v_cache, Manifest.load(i2v_cache), info, 2, 9, 32, 48)


def test_i2v_resume_repeats_the_uninterrupted_run(i2v_cache: Path, tmp_path: Path):
    """Image draws and noised_image_dropout (from the --config file) come from the seeded per-step generators."""
    from cogvx import config as configfile

    toml = tmp_path / "train.toml"
    toml.write_text("noised_image_dropout = 0.5\neval_every = 2\neval_holdout = 2\n")  # scored with image latents
    settings = {"shards": i2v_cache, "model": "tiny-1.5-i2v", "rank": 4, "learning_rate": 1e-2, "workers": 0,
                "mixed_precision": "fp32", "checkpoint_every": 2}  # fmt: skip
    full = train(configfile.build(TrainConfig, toml, output=tmp_path / "full", max_steps=4, **settings))
    first = configfile.build(TrainConfig, toml, output=tmp_path / "cut", max_steps=2, **settings)
    assert first.noised_image_dropout == 0.5
    train(first)
    resumed = train(
        configfile.build(TrainConfig, toml, output=tmp_path / "cut", max_steps=4, resume="auto", **settings)
    )
    assert resumed.resumed_from == 2 and resumed.losses == full.losses[2:]

    def scores(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if "eval" in k and k != "eval_seconds"} for r in read_metrics(run)]

    assert scores(tmp_path / "cut") == scores(tmp_path / "full")
    assert [r["step"] for r in read_metrics(tmp_path / "full") if "eval_loss" in r] == [2, 4]
    assert full.eval is not None and np.isfinite(full.eval.loss) and full.eval.base_loss is not None
    with pytest.raises(ConfigError, match="noised_image_dropout must be a probability"):
        TrainConfig(shards=i2v_cache, noised_image_dropout=1.5)
