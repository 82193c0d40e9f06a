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
    """The tiny model with its transformer stored only as the ``fp16`` variant (as hub repos ship it)."""
    folder = tmp_path_factory.mktemp("variant") / "tiny-fp16"
    shutil.copytree(models.resolve_model("tiny"), folder)
    transformer = models.ModelInfo.read(str(folder)).load_transformer(torch.float32)
    for path in (folder / "transformer").glob("diffusion_pytorch_model*"):
        path.unlink()
    transformer.to(torch.float16).save_pretrained(folder / "transformer", variant="fp16")
    return folder


def test_a_variant_reads_its_own_files(fp16_variant_model):
    assert sorted(p.name for p in (fp16_variant_model / "transformer").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
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
