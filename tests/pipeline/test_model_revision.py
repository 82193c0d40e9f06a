"""``--model-variant`` and ``--model-revision``: which weights files a model is read from, recorded with the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cogvx import runs
from cogvx.errors import ModelError
from cogvx.pipeline import models
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train


@pytest.fixture(scope="module")
def fp16_variant_model(tmp_path_factory) -> Path:
    """The tiny model with its weights stored only as the ``fp16`` variant (as hub repos ship them)."""
    folder = tmp_path_factory.mktemp("variant") / "tiny-fp16"
    shutil.copytree(models.resolve_model("tiny"), folder)
    plain = models.ModelInfo.read(str(folder))
    components = {
        "transformer": plain.load_transformer(torch.float32),
        "vae": plain.load_vae(torch.float32),
        "text_encoder": plain.load_text_encoder(torch.float32)[1],
    }
    for name, module in components.items():
        for path in (folder / name).glob("*.safetensors"):
            path.unlink()
        module.to(torch.float16).save_pretrained(folder / name, variant="fp16")
    return folder


def test_a_variant_reads_its_own_files(fp16_variant_model):
    assert sorted(p.name for p in (fp16_variant_model / "transformer").glob("*.safetensors")) == [
        "diffusion_pytorch_model.fp16.safetensors"
    ]
    with pytest.raises(OSError):  # diffusers' own error: no plain weights file there
        models.ModelInfo.read(str(fp16_variant_model)).load_transformer(torch.float32)
    info = models.ModelInfo.read(str(fp16_variant_model), variant="fp16")
    loaded = info.load_transformer(torch.float32)
    reference = models.ModelInfo.read("tiny").load_transformer(torch.float32)
    weight = next(iter(loaded.state_dict()))
    torch.testing.assert_close(loaded.state_dict()[weight], reference.state_dict()[weight].half().float())
    assert info.recorded() == {"model": str(fp16_variant_model), "variant": "fp16"}


def test_training_records_the_variant_in_its_config(fp16_variant_model, tiny_cache, tmp_path):
    cfg = TrainConfig(
        shards=tiny_cache, output=tmp_path / "run", model=str(fp16_variant_model), model_variant="fp16",
        max_steps=1, rank=4, workers=0, checkpoint_every=0, mixed_precision="fp32",
    )  # fmt: skip
    assert train(cfg).steps == 1
    config = json.loads(runs.config_json(tmp_path / "run").read_text())
    assert config["model_variant"] == "fp16" and "model_revision" not in config


def test_a_revision_of_a_local_folder_is_one_line():
    with pytest.raises(ModelError, match="--model-revision v1 applies to hub models"):
        models.ModelInfo.read("tiny", revision="v1")


def test_a_cache_records_the_variant_and_training_reads_the_model_with_it(fp16_variant_model, tmp_path):
    from cogvx.preprocess.run import PreprocessConfig
    from cogvx.preprocess.run import run as preprocess
    from cogvx.shards import Manifest
    from tests.conftest import CLIPS

    cache = tmp_path / "cache"
    preprocess(PreprocessConfig(data=CLIPS, output=cache, model=str(fp16_variant_model), model_variant="fp16",
                                dtype="fp32", workers=0))  # fmt: skip
    producer = Manifest.load(cache).producer
    assert (producer["model"], producer["variant"]) == (str(fp16_variant_model), "fp16")
    assert "revision" not in producer
    # No --model, no model_variant: the cache's model comes with its variant.
    cfg = TrainConfig(shards=cache, output=tmp_path / "run", max_steps=1, rank=4, workers=0, checkpoint_every=0)
    assert train(cfg).steps == 1
    assert json.loads(runs.config_json(tmp_path / "run").read_text())["model_variant"] == "fp16"

    # Sampling the run reads the base model as it was trained: only its fp16 files exist.
    from cogvx.sample import SampleConfig, run_sample

    sampled = run_sample(
        SampleConfig(prompts=("a red disc",), lora=tmp_path / "run", steps=2, frames=5, output=tmp_path / "s.mp4")
    )
    assert all(path.is_file() for path in sampled.videos)
