"""The prompt length is the transformer's `max_text_seq_length`, read from its config, never a constant.

A tiny model configured to read prompts of 30 tokens (CogVideoX reads 226) goes through preprocess,
training with validation sampling, and `sample`; caches of one length are refused for the other.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from cogvx.cli import app
from cogvx.errors import ModelError
from cogvx.pipeline import models, tiny
from cogvx.preprocess.run import PreprocessConfig
from cogvx.preprocess.run import run as preprocess
from cogvx.shards import Manifest, read_shard
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train
from tests.conftest import CLIPS

TEXT_TOKENS = 30
LONG_CAPTION_CLIP = "blue_disc_diagonal"  # over 30 tokens with the tiny tokenizer
SHORT_CAPTION_CLIP = "red_disc_left"
VALIDATION_PROMPT = "a red ball bounces slowly over the blue box " * 4  # over 30 tokens too


@pytest.fixture(scope="module")
def short_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text-length") / "tiny-text30"
    tiny.build("tiny", folder, {"max_text_seq_length": TEXT_TOKENS})
    return folder


@pytest.fixture(scope="module")
def short_cache(short_model: Path, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("clips30")
    for name in (LONG_CAPTION_CLIP, SHORT_CAPTION_CLIP):
        for suffix in (".mp4", ".txt"):
            shutil.copy(CLIPS / f"{name}{suffix}", data / f"{name}{suffix}")
    out = data.parent / "shards30"
    result = preprocess(
        PreprocessConfig(
            data=data,
            output=out,
            model=str(short_model),
            dtype="fp32",
            workers=0,
            validation_prompts=(VALIDATION_PROMPT,),
        )
    )
    assert result.truncated_captions == 1
    return out


def test_the_length_is_read_from_the_transformer_config(short_model: Path):
    assert models.ModelInfo.read(str(short_model)).max_text_tokens == TEXT_TOKENS
    assert models.ModelInfo.read("tiny").max_text_tokens == 226
    assert models.ModelInfo.read(str(short_model)).encoder_identity()["max_text_tokens"] == TEXT_TOKENS


def test_preprocess_encodes_prompts_as_the_pipeline_does_at_the_models_length(short_model: Path, short_cache: Path):
    from diffusers import CogVideoXPipeline

    manifest = Manifest.load(short_cache)
    assert manifest.producer["encoders"]["max_text_tokens"] == TEXT_TOKENS
    samples = [s for record in manifest.shards for s in read_shard(short_cache, record)]
    assert len(samples) == 2

    # The reference: diffusers' own prompt encoding at the transformer's length.
    pipe = CogVideoXPipeline.from_pretrained(str(short_model), torch_dtype=torch.float32)
    for sample in samples:
        embeds = sample.tensors["prompt_embeds"]
        assert embeds.shape == (TEXT_TOKENS, tiny.TEXT_DIM)
        expected, _ = pipe.encode_prompt(
            sample.meta["caption"], do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS
        )
        torch.testing.assert_close(embeds, expected[0])
    truncated = {Path(s.meta["source"]).stem: s.meta["caption_truncated"] for s in samples}
    assert truncated == {LONG_CAPTION_CLIP: True, SHORT_CAPTION_CLIP: False}

    with safe_open(str(short_cache / "validation_prompts.safetensors"), framework="pt") as f:
        assert f.get_tensor("prompt_embeds").shape == (1, TEXT_TOKENS, tiny.TEXT_DIM)
        assert f.get_tensor("negative_prompt_embeds").shape == (1, TEXT_TOKENS, tiny.TEXT_DIM)


@pytest.mark.parametrize("variant", ["tiny", "tiny-2b"])
def test_training_with_validation_sampling_runs_at_the_models_length(variant, short_model, short_cache, tmp_path):
    # tiny (rotary) made the cache; tiny-2b adds sin-cos position embeddings over text and video tokens,
    # whose table has max_text_seq_length text positions. Both share the cache's VAE, T5 and length.
    model = short_model
    if variant == "tiny-2b":
        model = tmp_path / "tiny-2b-text30"
        tiny.build("tiny-2b", model, {"max_text_seq_length": TEXT_TOKENS})
    cfg = TrainConfig(
        shards=short_cache, output=tmp_path / "run", model=str(model), max_steps=2, rank=4, mixed_precision="no",
        workers=0, checkpoint_every=0, validation_every=2, validation_steps=2, validation_frames=9,
    )  # fmt: skip
    result = train(cfg)
    assert result.steps == 2 and len(result.losses) == 2
    assert all(torch.isfinite(torch.tensor(result.losses)))
    [latents_file] = result.validation
    with safe_open(str(latents_file), framework="pt") as f:
        # 9 frames -> 3 latent frames, 4 channels, the cache's 64x96 bucket / 8.
        assert tuple(f.get_tensor("latents").shape) == (1, 3, 4, 8, 12)


def test_a_cache_of_another_length_is_refused_in_one_line(
    short_model: Path, short_cache: Path, tiny_cache: Path, tmp_path
):
    cfg = TrainConfig(shards=tiny_cache, output=tmp_path / "a", model=str(short_model), max_steps=1, workers=0)
    with pytest.raises(ModelError, match=f"max_text_tokens: cache 226, model {TEXT_TOKENS}"):
        train(cfg)
    # ... and the other way round, through the CLI: one line, exit 1, no run folder.
    args = ["train", "--shards", str(short_cache), "--output", str(tmp_path / "b"), "--model", "tiny"]
    args += ["--max-steps", "1", "--workers", "0"]
    out = CliRunner(env={"COLUMNS": "1000"}).invoke(app, args)
    assert out.exit_code == 1 and "Traceback" not in out.output
    [line] = [text for text in out.output.splitlines() if text.strip()]
    assert line.startswith("error:") and f"max_text_tokens: cache {TEXT_TOKENS}, model 226" in line
    assert line.endswith("--model tiny.")
    assert not (tmp_path / "b" / "pytorch_lora_weights.safetensors").exists()


def test_sample_reads_prompts_at_the_models_length(short_model: Path, tmp_path: Path, capsys):
    from cogvx.sample import SampleConfig, run_sample

    cfg = SampleConfig(
        (VALIDATION_PROMPT, "a dog"), model=str(short_model), no_lora=True, output=tmp_path / "s.mp4",
        steps=2, frames=9, height=32, width=64,
    )  # fmt: skip
    result = run_sample(cfg)
    assert result.truncated == [True, False]
    assert f"the text encoder reads {TEXT_TOKENS}" in capsys.readouterr().err
