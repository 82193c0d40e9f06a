"""preprocess -> train -> a LoRA that diffusers loads and that reproduces the trained model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cogvx.cli import app
from cogvx.errors import ModelError
from cogvx.pipeline import models
from cogvx.preprocess.run import PreprocessConfig
from cogvx.preprocess.run import run as preprocess
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train
from tests.conftest import CLIPS, SEED_LAYOUT


def _transformer_inputs(transformer, seed: int = 0):
    """Random inputs of the shape the tiny transformer takes, with rotary embeddings when it uses them."""
    from cogvx.pipeline.objective import rotary_embedding

    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    latents = torch.randn(1, 4, cfg.in_channels, 8, 12, generator=g)
    text = torch.randn(1, 226, cfg.text_embed_dim, generator=g)
    return {
        "hidden_states": latents,
        "encoder_hidden_states": text,
        "timestep": torch.tensor([500]),
        "image_rotary_emb": rotary_embedding(cfg, 4, 8, 12),
        "return_dict": False,
    }


@pytest.mark.parametrize("layout", [CLIPS, SEED_LAYOUT], ids=["folder", "seed-layout"])
def test_lora_loads_in_diffusers_and_reproduces_training(layout: Path, tmp_path: Path):
    from diffusers import CogVideoXPipeline

    shards = tmp_path / "shards"
    result = preprocess(PreprocessConfig(data=layout, output=shards, model="tiny", dtype="fp32", workers=0))
    expected = len(list(layout.rglob("*.mp4")))
    assert result.encoded == expected and not result.skipped

    run_dir = tmp_path / "run"
    cfg = TrainConfig(
        shards=shards, output=run_dir, max_steps=4, rank=4, alpha=12, learning_rate=1e-2, mixed_precision="no",
        workers=0, checkpoint_every=0,
    )  # fmt: skip
    trained = train(cfg)
    assert (run_dir / "pytorch_lora_weights.safetensors").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm"} <= m.keys() for m in metrics)
    assert json.loads((run_dir / "config.json").read_text())["model"] == "tiny"

    pipe = CogVideoXPipeline.from_pretrained(models.resolve_model("tiny"), torch_dtype=torch.float32)
    inputs = _transformer_inputs(pipe.transformer)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(str(run_dir))
        loaded = pipe.transformer(**inputs)[0]
        trained.model.eval()
        reference = trained.model(**inputs)[0]
    assert not torch.allclose(base, reference, atol=1e-4), "training did not change the model: test is vacuous"
    torch.testing.assert_close(loaded, reference, rtol=1e-5, atol=1e-5)


def test_cli_quick_start(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    # The README's main job, flag for flag (default workers, rank and checkpoints included).
    out = runner.invoke(app, ["preprocess", "--data", str(CLIPS), "--model", "tiny"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "shards" / "manifest.json").is_file()
    args = ["train", "--shards", "shards", "--output", "runs/first", "--max-steps", "20"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert (tmp_path / "runs" / "first" / "pytorch_lora_weights.safetensors").is_file()
    out = runner.invoke(app, ["shards", "verify", "shards"])
    assert out.exit_code == 0 and "6 samples verified" in out.output


def test_train_never_reads_vae_or_text_encoder_weights(tmp_path: Path):
    model = tmp_path / "model"
    shutil.copytree(models.resolve_model("tiny"), model)
    shards = tmp_path / "shards"
    preprocess(PreprocessConfig(data=CLIPS, output=shards, model=str(model), dtype="fp32", workers=0))
    removed = [p for sub in ("vae", "text_encoder") for p in (model / sub).glob("*.safetensors")]
    assert removed
    for path in removed:
        path.unlink()
    cfg = TrainConfig(shards=shards, output=tmp_path / "run", max_steps=2, rank=4, mixed_precision="no", workers=0)
    result = train(cfg)
    assert result.steps == 2
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_train_refuses_a_cache_from_other_encoders(tiny_cache: Path, tmp_path: Path):
    from diffusers import AutoencoderKLCogVideoX

    model = tmp_path / "other"
    shutil.copytree(models.resolve_model("tiny"), model)
    config = json.loads((model / "vae" / "config.json").read_text())
    config["latent_channels"] = 8
    AutoencoderKLCogVideoX.from_config(config).save_pretrained(model / "vae")
    cfg = TrainConfig(shards=tiny_cache, output=tmp_path / "run", model=str(model), max_steps=1, workers=0)
    with pytest.raises(ModelError, match="latent_channels"):
        train(cfg)
