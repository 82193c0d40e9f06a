"""cogvx render: validation latents saved by training -> mp4 and contact sheets, with the VAE alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cogvx.cli import app
from cogvx.errors import ModelError, RunError
from cogvx.pipeline import models
from cogvx.pipeline.decode import decode_latents
from cogvx.render import RenderConfig, run_render
from cogvx.runs import read_validation_sample
from tests.helpers.runfolders import PROMPTS, make_validation


def read_video(path: Path) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


@pytest.fixture(scope="module")
def vae_only_model(tmp_path_factory) -> Path:
    """A copy of the tiny model without transformer and T5 weights: anything that loads them fails."""
    model = tmp_path_factory.mktemp("vae-only") / "model"
    shutil.copytree(models.resolve_model("tiny"), model)
    removed = [p for sub in ("transformer", "text_encoder") for p in (model / sub).glob("*.safetensors")]
    assert removed
    for path in removed:
        path.unlink()
    return model


def test_render_decodes_like_the_pipeline_with_the_vae_alone(tmp_path: Path, vae_only_model: Path):
    run = tmp_path / "run"
    expected = make_validation(run)
    (run / "config.json").write_text(json.dumps({"model": str(vae_only_model)}))

    result = run_render(RenderConfig(run))
    assert [s.step for s in result.rendered] == [2, 4] and not result.skipped
    for (step, k), frames in expected.items():
        folder = run / "validation" / f"step-{step:06d}"
        video = read_video(folder / f"sample-{k:02d}.mp4")
        assert video.shape == (9, 32, 64, 3)
        # H.264 (yuv420p) is lossy, and the random tiny VAE draws noise, its worst case: the mp4 is near
        # what the pipeline decodes for this sample, and far from the other prompt's video.
        own = np.abs(video.astype(float) - frames).mean()
        other = np.abs(video.astype(float) - expected[step, 1 - k]).mean()
        assert own < 12 and own < other / 2, (own, other)
        assert (folder / "sheet.png").is_file()

    # The decode itself is the pipeline's, exactly.
    vae = models.load_vae(str(vae_only_model), torch.float32)
    latents, meta = read_validation_sample(run / "validation" / "step-000004" / "sample-01.safetensors")
    assert meta["prompt"] == PROMPTS[1] and meta["num_frames"] == "9"
    np.testing.assert_allclose(
        decode_latents(vae, latents, float(meta["scaling_factor"])), expected[4, 1], atol=1, rtol=0
    )


def test_already_rendered_steps_are_skipped(tmp_path: Path):
    run = tmp_path / "run"
    make_validation(run, steps=(2,), prompts=PROMPTS[:1])
    (run / "config.json").write_text(json.dumps({"model": "tiny"}))
    first = run_render(RenderConfig(run))
    video = run / "validation" / "step-000002" / "sample-00.mp4"
    stamp = video.stat().st_mtime_ns
    assert [s.step for s in first.rendered] == [2]

    make_validation(run, steps=(6,), prompts=PROMPTS[:1])  # training went on
    second = CliRunner().invoke(app, ["render", str(run)])
    assert second.exit_code == 0, second.output
    assert "rendered step 6" in second.output and "skipped 1 step" in second.output
    assert video.stat().st_mtime_ns == stamp
    assert read_video(run / "validation" / "step-000006" / "sample-00.mp4").shape == (9, 32, 64, 3)

    third = run_render(RenderConfig(run))
    assert not third.rendered and [s.step for s in third.skipped] == [2, 6]
    forced = run_render(RenderConfig(run, force=True))
    assert [s.step for s in forced.rendered] == [2, 6]


def test_a_run_without_validation_latents_says_how_to_make_them(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "tiny"}))
    with pytest.raises(RunError, match="no validation latents") as err:
        run_render(RenderConfig(run))
    assert "--validation-every" in str(err.value) and "--validation-prompt" in str(err.value)
    out = CliRunner().invoke(app, ["render", str(run)])
    assert out.exit_code == 1 and "--validation-every" in out.output


def test_latents_of_another_model_are_refused(tmp_path: Path):
    from safetensors.torch import save_file

    run = tmp_path / "run"
    folder = run / "validation" / "step-000001"
    folder.mkdir(parents=True)
    save_file({"latents": torch.zeros(1, 3, 16, 4, 8)}, folder / "sample-00.safetensors", metadata={"prompt": "x"})
    with pytest.raises(ModelError, match="do not fit 'tiny'"):
        run_render(RenderConfig(run, model="tiny"))
