"""cogvx preprocess: frame sampling, buckets, layouts, bad input, and incremental re-runs.

Test videos are generated here with imageio (H.264, a few frames, 64x96 or so) so fixtures stay small.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cogvx import clock
from cogvx.cli import app
from cogvx.errors import CacheError, ConfigError, InputError
from cogvx.preprocess.run import PreprocessConfig, run
from cogvx.preprocess.sources import discover
from cogvx.preprocess.video import SkipClip, closest_resolution, plan_clip, plan_frames
from cogvx.shards import Manifest, read_shard, verify
from tests.conftest import CLIPS, SEED_LAYOUT
from tests.helpers.clipgen import frame_spec
from tests.helpers.preprocessing import captioned_clip, make_video, tiny_config


def live_samples(folder: Path) -> list:
    manifest = Manifest.load(folder)
    return [s for record in manifest.shards for s in read_shard(folder, record)]


# --- frame sampling -------------------------------------------------------------------------------


def test_sampling_is_by_time_and_covers_the_whole_clip():
    # The seed's defect: a 97-frame 24 fps clip used only its first 49 frames. At 8 fps, 49 frames span
    # 6 s, longer than the clip, so the longest 4k+1 prefix at 8 fps is taken: every 3rd frame, to the end.
    frames, windows, available = plan_frames(97, 24.0, frame_spec(frame_buckets=(49,)))
    assert available == 33 and frames == 33
    assert windows == [list(range(0, 97, 3))]
    # Sampling at the source rate takes consecutive frames.
    _, windows, _ = plan_frames(97, 24.0, frame_spec(frame_buckets=(49,), fps=24))
    assert windows == [list(range(49))]
    # A 12 fps source sampled at 8 fps: a stride of 1.5 source frames, rounded to the nearest frame.
    _, windows, _ = plan_frames(40, 12.0, frame_spec(frame_buckets=(9,)))
    assert windows[0][:5] == [0, 2, 3, 5, 6]
    # Never denser than the source: an 8 fps request on a 4 fps clip uses each frame once.
    _, windows, _ = plan_frames(20, 4.0, frame_spec(frame_buckets=(9,)))
    assert windows == [list(range(9))]


def test_long_clips_give_evenly_spaced_non_overlapping_windows():
    spec = frame_spec(frame_buckets=(9,), windows=3)
    frames, windows, available = plan_frames(240, 24.0, spec)  # 80 frames at 8 fps
    assert frames == 9 and available == 80 and len(windows) == 3
    firsts = [w[0] for w in windows]
    assert firsts == [0, 3 * round(35.5), 3 * 71]  # from the first frame to the very end
    assert windows[-1][-1] == 237
    assert all(a[-1] < b[0] for a, b in zip(windows[:-1], windows[1:], strict=True))
    # Room for only two windows: two, not three overlapping ones.
    _, windows, _ = plan_frames(54, 24.0, spec)  # 18 frames at 8 fps
    assert [w[0] for w in windows] == [0, 27]
    # Default: one window, the first.
    _, windows, _ = plan_frames(240, 24.0, frame_spec(frame_buckets=(9,)))
    assert windows == [list(range(0, 27, 3))]


def test_short_clips_take_the_longest_4k1_prefix_or_are_skipped():
    spec = frame_spec(frame_buckets=(49,), min_frames=5)
    frames, windows, _ = plan_frames(36, 24.0, spec)  # 12 frames at 8 fps -> 9
    assert frames == 9 and windows[0] == list(range(0, 27, 3))
    with pytest.raises(SkipClip, match="at least 5") as err:
        plan_frames(10, 24.0, spec)  # 4 frames at 8 fps
    assert err.value.reason == "too short"
    with pytest.raises(SkipClip) as err:
        plan_frames(20, 24.0, frame_spec(skip_frames_start=15, skip_frames_end=5))
    assert err.value.reason == "no frames left"
    _, windows, _ = plan_frames(120, 24.0, frame_spec(frame_buckets=(9,), skip_frames_start=30, skip_frames_end=60))
    assert windows[0][0] == 30 and windows[0][-1] == 54


def test_buckets_pick_the_longest_fitting_length_and_the_closest_aspect():
    spec = frame_spec(resolutions=((64, 96), (96, 64), (80, 80)), frame_buckets=(9, 17, 25))
    assert plan_clip(60, 24.0, 720, 1280, spec).bucket.name == "17x64x96"  # 20 frames at 8 fps
    assert plan_clip(200, 24.0, 1280, 720, spec).bucket.name == "25x96x64"
    assert plan_clip(30, 24.0, 500, 520, spec).bucket.name == "9x80x80"
    assert closest_resolution(100, 100, ((64, 96), (96, 64))) == (64, 96), "ties go to the first listed"
    with pytest.raises(SkipClip, match="8x8 would need 10.0x enlarging to 80x80") as err:
        plan_clip(60, 24.0, 8, 8, spec)
    assert err.value.reason == "too small"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"resolutions": ("480by720",)}, "HEIGHTxWIDTH"),
        ({"resolutions": ("480x700",)}, "multiples of 16"),
        ({"resolutions": ("480x720",), "height": 480}, "not both"),
        ({"frame_buckets": (49, 48)}, "4k\\+1"),
        ({"max_frames": 50}, "4k\\+1"),
        ({"min_frames": 60, "max_frames": 49}, "--min-frames"),
        ({"min_frames": 60, "frame_buckets": (9, 49)}, "--min-frames"),
        ({"windows": 0}, "--windows"),
        ({"resize": "pad"}, "crop' or 'stretch"),
        ({"vae_batch": 0}, "--vae-batch"),
        ({"dtype": "int8"}, "Unknown dtype"),
    ],
)
def test_config_errors_name_the_setting(values: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        PreprocessConfig(data=Path("x"), **values)


# --- inputs -----------------------------------------------------------------------------------


def test_metadata_files_csv_and_jsonl_with_paths_relative_to_the_file(tmp_path: Path):
    make_video(tmp_path / "data" / "clips" / "a.mp4")
    (tmp_path / "data" / "meta.csv").write_text('file_name,caption\nclips/a.mp4,"a ball, red"\n')
    (tmp_path / "data" / "meta.jsonl").write_text(json.dumps({"clip": "clips/a.mp4", "desc": "a ball"}) + "\n")
    (clip,) = discover(tmp_path / "data" / "meta.csv")
    assert clip.path == tmp_path / "data" / "clips" / "a.mp4" and clip.caption == "a ball, red"
    (clip,) = discover(tmp_path / "data" / "meta.jsonl", caption_column="desc", video_column="clip")
    assert clip.caption == "a ball" and clip.source == "clips/a.mp4"
    with pytest.raises(InputError, match=r"meta.jsonl has no column 'text'.*columns are: clip, desc"):
        discover(tmp_path / "data" / "meta.jsonl", caption_column="text", video_column="clip")
    with pytest.raises(InputError, match=r"no video column \(looked for video, file_name"):
        discover(tmp_path / "data" / "meta.jsonl")
    # A folder holding metadata.csv uses it.
    shutil.copy(tmp_path / "data" / "meta.csv", tmp_path / "data" / "metadata.csv")
    assert [c.caption for c in discover(tmp_path / "data")] == ["a ball, red"]


def test_seed_layout_and_its_errors(tmp_path: Path):
    clips = discover(SEED_LAYOUT)
    assert [c.source for c in clips][0] == "videos/red_disc_left.mp4"
    root = tmp_path / "seed"
    shutil.copytree(SEED_LAYOUT, root)
    (root / "captions.txt").write_text("one\ntwo\n")
    (root / "list.txt").write_text("videos/red_disc_left.mp4\n")
    with pytest.raises(InputError, match=r"captions.txt has 2 captions but .*list.txt has 1 videos"):
        discover(root, caption_column="captions.txt", video_column="list.txt")
    with pytest.raises(InputError, match="does not exist"):
        discover(tmp_path / "nowhere")
    with pytest.raises(InputError, match="no file nope.txt"):
        discover(CLIPS, video_column="nope.txt")


def test_id_token_is_prepended_with_a_space(tmp_path: Path):
    captioned_clip(tmp_path / "data", "a.mp4", caption="a red ball")
    run(tiny_config(tmp_path / "data", tmp_path / "out", id_token="TOK"))
    (sample,) = live_samples(tmp_path / "out")
    assert sample.meta["caption"] == "TOK a red ball"


def test_no_videos_is_a_clear_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="No videos found"):
        run(tiny_config(tmp_path / "empty", tmp_path / "out"))


# --- bad input --------------------------------------------------------------------------------


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """Every kind of bad input from the issue, beside a few good clips."""
    root = tmp_path / "messy"
    captioned_clip(root, "good.mp4", seed=1)
    captioned_clip(root, "nested/portrait.mp4", height=96, width=48, seed=2)
    captioned_clip(root, "vidéo d'été 1.mp4", caption="a ball, été", seed=3)
    captioned_clip(root, "long caption.mp4", caption=" ".join(["a red ball moves left"] * 60), seed=4)
    good = (root / "good.mp4").read_bytes()
    corrupt = bytearray(good)
    for i in range(len(good) // 3, len(good) // 3 + 400):
        corrupt[i] ^= 0x5A
    for name, data in [("corrupt.mp4", bytes(corrupt)), ("truncated.mp4", good[: len(good) // 2]), ("zero.mp4", b""),
                       ("text.mp4", b"this is not a video\n" * 20)]:  # fmt: skip
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text("a ball")
    captioned_clip(root, "single frame.mp4", frames=1)
    captioned_clip(root, "tiny8.mp4", height=8, width=8)
    captioned_clip(root, "no caption.mp4", caption=None, seed=5)
    captioned_clip(root, "empty caption.mp4", caption="  \n", seed=6)
    return root


EXPECTED_SKIPS = {
    # Where the flipped bytes land decides whether opening or decoding fails; a skip either way.
    "corrupt.mp4": {"unreadable video", "decoding failed"},
    "truncated.mp4": {"unreadable video"},
    "zero.mp4": {"unreadable video"},
    "text.mp4": {"unreadable video"},
    "single frame.mp4": {"too short"},
    "tiny8.mp4": {"too small"},
    "no caption.mp4": {"missing caption"},
    "empty caption.mp4": {"empty caption"},
}


def test_bad_inputs_are_skipped_listed_and_counted(messy: Path, tmp_path: Path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cogvx.preprocess"):
        result = run(tiny_config(messy, out, workers=1))
    skipped = {row["source"]: row for row in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert set(skipped) == set(EXPECTED_SKIPS)
    assert all(skipped[source]["reason"] in reasons for source, reasons in EXPECTED_SKIPS.items())
    assert all(row["detail"] for row in skipped.values())
    assert sum(result.skipped.values()) == len(EXPECTED_SKIPS)
    assert result.skipped["too short"] == result.skipped["too small"] == result.skipped["missing caption"] == 1
    samples = {s.meta["source"]: s for s in live_samples(out)}
    assert set(samples) == {"good.mp4", "nested/portrait.mp4", "vidéo d'été 1.mp4", "long caption.mp4"}
    assert result.encoded == 4
    assert samples["nested/portrait.mp4"].meta["source_size"] == [96, 48]
    assert samples["nested/portrait.mp4"].tensors["moments"].shape[-2:] == (8, 12)  # centre-cropped to 64x96
    assert samples["long caption.mp4"].meta["caption_truncated"] is True
    assert result.truncated_captions == 1 and "long caption.mp4" in caplog.text and "226 tokens" in caplog.text
    assert samples["vidéo d'été 1.mp4"].meta["caption"] == "a ball, été"
    assert verify(out, Manifest.load(out).shards) == []


def test_the_timeline_says_where_the_time_went(tmp_path: Path):
    result = run(tiny_config(CLIPS, tmp_path / "out", workers=1))
    line = dict(result.timeline)
    # seconds since this process started, on the kernel's clock of process starts
    assert abs(result.started - (time.time() - clock.process_seconds())) < 0.1
    # the start's steps in the order one run makes them; the first clip decodes while the encoders load
    assert 0 < line["imports"] <= line["clips_found"] <= line["configs"]
    assert line["configs"] <= line["loader"] <= line["vae"] <= line["t5"] <= line["encoders"]
    assert line["loader"] <= line["first_decoded"] <= line["first_prompt"]
    assert line["encoders"] <= line["first_prompt"] <= line["first_latent"] <= line["first_written"] <= line["encoded"]
    assert line["encoded"] - line["imports"] <= result.seconds
    other = dataclasses.replace(result.share(), timeline={"encoders": 1e6, "first_written": 0.0, "encoded": 2e6})
    result.add(other)  # a slower rank sets the merged timeline; a faster one does not
    assert result.timeline["encoders"] == 1e6 and result.timeline["encoded"] == 2e6
    assert result.timeline["first_written"] == line["first_written"]


def test_cli_exit_code_is_nonzero_only_when_nothing_usable(messy: Path, tmp_path: Path):
    runner = CliRunner(env={"COLUMNS": "200"})
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("zero.mp4", "text.mp4", "single frame.mp4"):
        shutil.copy(messy / name, bad / name)
        (bad / name).with_suffix(".txt").write_text("a ball")
    out = runner.invoke(app, ["preprocess", "--data", str(bad), "--model", "tiny", "--output", str(tmp_path / "o1"),
                              "--workers", "0", "--frame-bucket", "9"])  # fmt: skip
    assert out.exit_code == 1
    assert "Nothing usable" in out.output and "skipped.jsonl" in out.output
    assert len((tmp_path / "o1" / "skipped.jsonl").read_text().splitlines()) == 3
    shutil.copy(messy / "good.mp4", bad / "good.mp4")
    (bad / "good.txt").write_text("a ball")
    out = runner.invoke(app, ["preprocess", "--data", str(bad), "--model", "tiny", "--output", str(tmp_path / "o2"),
                              "--workers", "0", "--frame-bucket", "9"])  # fmt: skip
    assert out.exit_code == 0, out.output
    # 24 frames at 24 fps are 8 frames at 8 fps: shorter than the 9-frame bucket, so its 5-frame prefix.
    assert "unreadable video" in out.output and "bucket 5x64x96" in out.output


# --- buckets, windows, strips -----------------------------------------------------------------------


def test_buckets_windows_and_strips_in_the_cache(tmp_path: Path):
    data = tmp_path / "data"
    captioned_clip(data, "wide.mp4", frames=60, seed=1)  # 20 frames at 8 fps: two 9-frame windows
    captioned_clip(data, "tall.mp4", frames=30, height=96, width=64, seed=2)  # 10 frames: one window
    out = tmp_path / "out"
    cfg = tiny_config(data, out, resolutions=("64x96", "96x64"), frame_buckets=(9, 17), windows=2)
    result = run(cfg)
    assert result.encoded == 2 and result.samples == 2
    samples = live_samples(out)
    by_bucket = {(s.meta["source"], s.meta["window"]): s.meta["bucket"] for s in samples}
    assert by_bucket == {("wide.mp4", 0): "17x64x96", ("tall.mp4", 0): "9x96x64"}  # 17 fits once only
    assert Manifest.load(out).bucket_counts() == {"17x64x96": 1, "9x96x64": 1}
    latent_frames = {s.meta["source"]: s.tensors["moments"].shape[1] for s in samples}
    assert latent_frames == {"wide.mp4": 5, "tall.mp4": 3}  # (frames - 1) / 4 + 1

    out2 = tmp_path / "out2"
    run(tiny_config(data, out2, resolutions=("64x96", "96x64"), frame_buckets=(9,), windows=2))
    wide = sorted((s for s in live_samples(out2) if s.meta["source"] == "wide.mp4"), key=lambda s: s.meta["window"])
    assert [s.meta["window"] for s in wide] == [0, 1]
    assert wide[0].meta["frame_indices"] == list(range(0, 27, 3)) and wide[1].meta["frame_indices"][-1] == 57
    assert len({s.key for s in wide}) == 2
    from PIL import Image

    strip = Image.open(__import__("io").BytesIO(wide[0].extras["jpg"]))
    assert strip.format == "JPEG" and strip.height == 64 and strip.width == 8 * 96


# --- incremental ------------------------------------------------------------------------------


def test_incremental_runs_encode_only_new_and_changed_clips(tmp_path: Path):
    data, out = tmp_path / "data", tmp_path / "out"
    for i in range(3):
        captioned_clip(data, f"first/{i}.mp4", frames=15, seed=i)
    assert run(tiny_config(data, out)).encoded == 3
    first = Manifest.load(out).shards
    first_bytes = {r.name: (out / r.name).read_bytes() for r in first}

    again = run(tiny_config(data, out))
    assert (again.encoded, again.already_cached) == (0, 3)

    for i in range(10):
        captioned_clip(data, f"new/{i}.mp4", frames=15, seed=100 + i)
    added = run(tiny_config(data, out))
    assert (added.encoded, added.already_cached) == (10, 3)

    # A changed video and a changed caption are encoded again; their old samples stop being served.
    make_video(data / "first" / "0.mp4", frames=15, seed=999)
    (data / "first" / "1.txt").write_text("a blue ball")
    os.utime(data / "first" / "2.mp4")  # touched, same content: not re-encoded
    changed = run(tiny_config(data, out))
    assert (changed.encoded, changed.already_cached) == (2, 11)
    manifest = Manifest.load(out)
    assert manifest.sample_count == 13 and manifest.excluded_count == 2
    assert {r.name: (out / r.name).read_bytes() for r in first} == first_bytes, "earlier shards untouched"
    assert len(manifest.shards[0].excluded) == 2
    served = live_samples(out)
    assert sorted(s.meta["source"] for s in served) == sorted({s.meta["source"] for s in served})
    assert next(s for s in served if s.meta["source"] == "first/1.mp4").meta["caption"] == "a blue ball"
    all_old = list(read_shard(out, manifest.shards[0], include_excluded=True))
    assert len(all_old) == 3 and len(list(read_shard(out, manifest.shards[0]))) == 1
    assert verify(out, manifest.shards) == []
    assert run(tiny_config(data, out)).encoded == 0


def test_other_parameters_or_model_into_an_existing_cache_are_refused(tmp_path: Path):
    from diffusers import AutoencoderKLCogVideoX

    from cogvx.pipeline import models

    data, out = tmp_path / "data", tmp_path / "out"
    captioned_clip(data, "a.mp4", frames=15)
    run(tiny_config(data, out))
    with pytest.raises(CacheError, match=r"fps differ.*new --output folder"):
        run(tiny_config(data, out, fps=12))
    other = tmp_path / "other"
    shutil.copytree(models.resolve_model("tiny"), other)
    config = json.loads((other / "vae" / "config.json").read_text())
    config["latent_channels"] = 8
    AutoencoderKLCogVideoX.from_config(config).save_pretrained(other / "vae")
    with pytest.raises(CacheError, match="model encoders"):
        run(tiny_config(data, out, model=str(other)))
    # tiny-2b shares tiny's VAE and text encoder, like the real 2b and 5b: the cache accepts it.
    assert run(tiny_config(data, out, model="tiny-2b")).already_cached == 1


@pytest.mark.parametrize(
    "variant, wanted",
    [
        (None, {"vae/diffusion_pytorch_model.safetensors", "text_encoder/model-00001-of-00002.safetensors",
                "text_encoder/model-00002-of-00002.safetensors"}),
        ("fp16", {"vae/diffusion_pytorch_model.fp16.safetensors",
                  "text_encoder/model.fp16-00001-of-00001.safetensors"}),
    ],
)  # fmt: skip
def test_the_weights_read_ahead_are_the_encoders_of_the_variant_loaded(variant, wanted, tmp_path: Path):
    from cogvx.pipeline import models
    from cogvx.preprocess.loop import weights_files

    folder = tmp_path / "model"
    shutil.copytree(models.resolve_model("tiny"), folder)
    for name in {*wanted, "vae/diffusion_pytorch_model.fp16.safetensors", "transformer/x.safetensors"}:
        (folder / name).touch()
    for old in (folder / "text_encoder").glob("model.safetensors"):
        old.unlink()
    info = models.ModelInfo.read(str(folder), variant=variant)
    assert {str(path.relative_to(folder)) for path in weights_files(info)} == wanted
    assert weights_files(dataclasses.replace(info, source="THUDM/CogVideoX-2b")) == []
