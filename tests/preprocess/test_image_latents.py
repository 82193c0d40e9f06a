"""Image latents for image-to-video: ``cogvx preprocess --image-latents`` stores each sample's first frame,
noised as diffusers' I2V script does and encoded alone (``image_moments``), and ``K.first.jpg``; on a cache
made without them it adds them later without encoding any video again. Also CogVideoX 1.5's native size
and frame counts as preprocessing's defaults.

The stored latents are checked against an independent computation: PyAV decodes the clip, PIL resizes
it as docs/preprocess.md says, the noise is drawn as docs/cache-format.md spells it out, and diffusers'
VAE encodes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image

from cogvx.errors import CacheError, ConfigError
from cogvx.pipeline import models
from cogvx.preprocess.run import PreprocessConfig
from cogvx.preprocess.run import run as preprocess
from cogvx.preprocess.video import plan_frames, read_clip, read_first_frames
from cogvx.shards import Manifest, read_shard, rebuild_manifest, verify
from tests.conftest import ROOT, property_examples
from tests.helpers.clipgen import frame_spec, make_clip, pyav_frames, sized
from tests.helpers.commands import cli
from tests.helpers.processes import listed_shards, wait_for

SETTINGS = dict(
    model="tiny", dtype="fp32", workers=0, frame_buckets=(5,), windows=2, resolutions=("32x48", "48x32"), flip=True
)
# frames, height, width: wide and tall at their bucket's size (decoders then agree exactly), short scaled
CLIPS = {"wide.mp4": (36, 32, 48), "tall.mp4": (36, 48, 32), "short.mp4": (20, 48, 64)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("i2v-data")
    for name, (frames, height, width) in CLIPS.items():
        make_clip(folder / name, frames, height, width)
        (folder / name).with_suffix(".txt").write_text(f"a gradient {name[:-4]}")
    return folder


@pytest.fixture(scope="module")
def made_with(data: Path, tmp_path_factory) -> Path:
    """Made with --image-latents from the start."""
    out = tmp_path_factory.mktemp("i2v") / "cache"
    preprocess(PreprocessConfig(data=data, output=out, image_latents=True, **SETTINGS))
    return out


@pytest.fixture(scope="module")
def plain(data: Path, tmp_path_factory) -> Path:
    """Made without image latents (text-to-video only)."""
    out = tmp_path_factory.mktemp("t2v") / "cache"
    preprocess(PreprocessConfig(data=data, output=out, **SETTINGS))
    return out


@pytest.fixture(scope="module")
def added(plain: Path, data: Path, tmp_path_factory):
    """``plain`` copied, then --image-latents run on it; records the depth of every video the VAE encoded."""
    from diffusers import AutoencoderKLCogVideoX

    out = tmp_path_factory.mktemp("added") / "cache"
    shutil.copytree(plain, out)
    seen: list[tuple[int, ...]] = []
    encode = AutoencoderKLCogVideoX.encode

    def watched(self, x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return encode(self, x, *args, **kwargs)

    AutoencoderKLCogVideoX.encode = watched
    try:
        result = preprocess(PreprocessConfig(data=data, output=out, image_latents=True, **SETTINGS))
    finally:
        AutoencoderKLCogVideoX.encode = encode
    return out, result, seen


def samples(cache: Path) -> dict:
    manifest = Manifest.load(cache)
    return {s.key: s for record in manifest.shards for s in read_shard(cache, record)}


# --- the independent computation -----------------------------------------------------------------


def reference_first_frame(data: Path, meta: dict) -> np.ndarray:
    """The sample's first frame: PyAV's decoding, PIL's cover-and-crop, mirrored for a mirrored sample."""
    frames, _ = pyav_frames(data / meta["source"])
    frame = sized(frames[meta["frame_indices"][0] : meta["frame_indices"][0] + 1], *meta["size"])[0]
    return frame[:, ::-1] if meta.get("mirrored") else frame


def reference_image_moments(vae, frame: np.ndarray, key: str) -> tuple[torch.Tensor, float]:
    """docs/cache-format.md's recipe: a generator seeded by sha256(key), log-sigma then noise, one frame."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)
    generator = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.normal(-3.0, 0.5, (1,), generator=generator))
    pixels = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float() / 127.5 - 1
    pixels = pixels + sigma * torch.randn(pixels.shape, generator=generator)
    with torch.no_grad():
        return vae.encode(pixels[None, :, None]).latent_dist.parameters[0], float(sigma)


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX.from_pretrained(models.resolve_model("tiny"), subfolder="vae").eval()


def test_image_latents_equal_an_independent_computation(made_with: Path, data: Path, vae):
    held = samples(made_with)
    assert len(held) == 2 * (2 + 2 + 1)  # wide and tall give two windows, short one; each mirrored
    for key, sample in held.items():
        frame = reference_first_frame(data, sample.meta)
        expected, sigma = reference_image_moments(vae, frame, key)
        stored = sample.tensors["image_moments"]
        assert stored.shape == expected.shape == (2 * 4, 1, *(n // 8 for n in sample.meta["size"]))
        assert stored.dtype == sample.tensors["moments"].dtype
        assert sample.meta["image_latents"] is True and sample.meta["image_noise_sigma"] == sigma
        following = dict(sample.meta, frame_indices=[sample.meta["frame_indices"][1]])
        wrong, _ = reference_image_moments(vae, reference_first_frame(data, following), key)
        if sample.meta["source_size"] == sample.meta["size"]:  # no scaling: the same pixels, the same latents
            assert torch.allclose(stored, expected, atol=1e-4) and not torch.allclose(stored, wrong, atol=0.05)
        else:  # scalers agree within a few levels: close, and far closer than the next sampled frame
            error, off = ((stored - expected).abs().mean().item(), (stored - wrong).abs().mean().item())
            assert error < 0.04 and 4 * error < off, (key, error, off)
        jpeg = Image.open(io.BytesIO(sample.extras["first.jpg"]))
        assert (jpeg.height, jpeg.width) == tuple(sample.meta["size"]) and jpeg.format == "JPEG"
        assert np.abs(np.asarray(jpeg.convert("RGB")).astype(int) - frame).mean() < 3  # before the noise


def test_the_manifest_says_what_each_sample_carries(made_with: Path):
    manifest = Manifest.load(made_with)
    assert manifest.image_latent_count == manifest.sample_count == 10
    assert all(entry.carries == ("image_moments",) for entry in manifest.live_entries())
    for layout in manifest.layouts().values():
        assert layout["image_moments"]["shape"][1] == 1 and layout["image_moments"]["dtype"] == "float32"
    lines = [s for shard in json.loads((made_with / "manifest.json").read_text())["shards"] for s in shard["samples"]]
    assert all(line["carries"] == ["image_moments"] for line in lines)
    assert verify(made_with, manifest.shards) == []


def test_a_cache_without_them_reads_as_before(plain: Path):
    manifest = Manifest.load(plain)
    assert manifest.image_latent_count == 0 and manifest.sample_count == 10
    text = (plain / "manifest.json").read_text()
    assert "carries" not in text  # old caches and new plain ones have the same manifest lines
    assert all("image_moments" not in s.tensors and "first.jpg" not in s.extras for s in samples(plain).values())


def test_adding_them_later_encodes_first_frames_only_and_copies_the_rest(added, plain: Path, made_with: Path):
    out, result, seen = added
    assert seen and all(shape[2] == 1 for shape in seen), f"the VAE encoded more than first frames: {seen}"
    assert result.encoded == 0 and result.images_added == 10 and result.images_missing == 0
    before, after, fresh = samples(plain), samples(out), samples(made_with)
    assert before.keys() == after.keys() == fresh.keys()
    for key, old in before.items():
        new = after[key]
        for name in ("moments", "prompt_embeds"):
            assert new.tensors[name].numpy().tobytes() == old.tensors[name].numpy().tobytes()
        assert new.extras["jpg"] == old.extras["jpg"]
        assert {k: v for k, v in new.meta.items() if not k.startswith(("image_", "index"))} == {
            k: v for k, v in old.meta.items() if k != "index"
        }
        # The same first frame, noise and VAE as a cache made with them (first frames batched differently).
        assert torch.allclose(new.tensors["image_moments"], fresh[key].tensors["image_moments"], atol=1e-4)
        assert new.extras["first.jpg"] == fresh[key].extras["first.jpg"]
    manifest = Manifest.load(out)
    assert manifest.image_latent_count == manifest.sample_count == manifest.excluded_count == 10
    assert verify(out, manifest.shards) == []


def test_a_lost_manifest_is_rebuilt_with_what_each_sample_carries(added, tmp_path: Path):
    out = tmp_path / "cache"
    shutil.copytree(added[0], out)
    original = Manifest.load(out)
    (out / "manifest.json").unlink()
    rebuild_manifest(out)
    again = Manifest.load(out)
    assert {r.name: r for r in again.shards} == {r.name: r for r in original.shards}  # carries, excluded, layouts
    assert again.image_latent_count == 10


def test_a_second_run_adds_nothing(added, data: Path):
    out = added[0]
    shards = sorted(p.name for p in out.glob("*.tar"))
    again = preprocess(PreprocessConfig(data=data, output=out, **SETTINGS))  # a cache with them keeps them
    assert (again.encoded, again.images_added, again.images_missing) == (0, 0, 0)
    assert sorted(p.name for p in out.glob("*.tar")) == shards


KILLED_RUN = """
import sys, time
from cogvx.preprocess import writer
from cogvx.preprocess.run import PreprocessConfig, run

commit = writer.RankWriter.commit

def slowly(self, record):  # widens the moment the test kills at: right after an added shard is listed
    commit(self, record)
    time.sleep(60)

writer.RankWriter.commit = slowly
run(PreprocessConfig(data=sys.argv[1], output=sys.argv[2], image_latents=True, shard_max_samples=1, **SETTINGS))
"""


def test_killed_while_adding_then_run_again(plain: Path, data: Path, made_with: Path, tmp_path: Path):
    out = tmp_path / "cache"
    shutil.copytree(plain, out)
    listed = listed_shards(out)
    code = f"SETTINGS = {SETTINGS!r}\n{KILLED_RUN}"
    proc = subprocess.Popen([sys.executable, "-c", code, str(data), str(out)], stderr=subprocess.DEVNULL)
    wait_for(lambda: listed_shards(out) > listed, proc, timeout=120)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    half = Manifest.load(out)
    assert 0 < half.image_latent_count < half.sample_count == 10, "the kill did not land mid-way"
    assert verify(out, half.shards) == []  # a bucket holds samples with and without them meanwhile

    result = preprocess(PreprocessConfig(data=data, output=out, **SETTINGS))  # it holds some: it gets the rest
    assert result.images_added == 10 - half.image_latent_count
    after, fresh = samples(out), samples(made_with)
    assert after.keys() == fresh.keys()
    assert all(torch.allclose(after[k].tensors["image_moments"], fresh[k].tensors["image_moments"], atol=1e-4)
               for k in fresh)  # fmt: skip
    manifest = Manifest.load(out)
    assert manifest.image_latent_count == manifest.sample_count == 10 and verify(out, manifest.shards) == []


def test_a_clip_whose_first_frame_cannot_be_read_is_skipped(plain: Path, data: Path, tmp_path: Path):
    """Also: a touched but unchanged clip gets them (hashed), a clip gone from the data keeps serving without."""
    out, copy = tmp_path / "cache", tmp_path / "data"
    shutil.copytree(plain, out)
    shutil.copytree(data, copy)
    broken = copy / "tall.mp4"
    stat = broken.stat()
    with open(broken, "r+b") as f:  # bit rot: same size and mtime, so the cache trusts the file unchanged
        f.write(bytes(4096))
    os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.utime(copy / "wide.mp4", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    (copy / "short.mp4").unlink()
    result = preprocess(PreprocessConfig(data=copy, output=out, image_latents=True, **SETTINGS))
    rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [row["source"] for row in rows] == ["tall.mp4"] and sum(result.skipped.values()) == 1
    assert rows[0]["reason"] in ("unreadable video", "decoding failed") and rows[0]["detail"]
    manifest = Manifest.load(out)
    assert (result.already_cached, result.images_added, result.images_missing) == (2, 4, 6)
    assert manifest.image_latent_count == 4 and manifest.sample_count == 10
    carried = {e.source for e in manifest.live_entries() if e.carries}
    assert carried == {"wide.mp4"} and verify(out, manifest.shards) == []  # the others serve without


@pytest.mark.parametrize(
    "carries", ["image_moments", [1], ["image_latents"], ["image_moments", "image_moments"], {"a": 1}, None]
)
def test_a_mistyped_carries_is_one_line_naming_the_manifest(made_with: Path, tmp_path: Path, carries):
    out = tmp_path / "cache"
    shutil.copytree(made_with, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["samples"][0]["carries"] = carries
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="carries") as caught:
        Manifest.load(out)
    assert str(out / "manifest.json") in str(caught.value) and "\n" not in str(caught.value)
    assert str(out / "manifest.json") in cli("shards", "verify", str(out)).error_line()


def test_a_sample_whose_tensors_disagree_with_what_it_carries_is_refused(made_with: Path, tmp_path: Path):
    out = tmp_path / "cache"
    shutil.copytree(made_with, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["shards"][0]["samples"][0]["carries"]  # the shard's sample still holds image_moments
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(out, Manifest.load(out).shards)
    assert len(problems) == 1 and "the manifest's index says" in problems[0], problems


# --- the same frame, read alone -------------------------------------------------------------------


@hsettings(max_examples=property_examples(8))
@given(
    height=st.integers(24, 96),
    width=st.integers(24, 96),
    frames=st.integers(9, 40),
    fps=st.sampled_from([8.0, 12.0, 24.0, 30.0]),
    rotation=st.sampled_from([0, 0, 90]),
    resize=st.sampled_from(["crop", "stretch"]),
    windows=st.integers(1, 3),
)
def test_a_first_frame_read_alone_is_the_one_read_with_its_window(
    tmp_path_factory, height, width, frames, fps, rotation, resize, windows
):
    """Image latents added later decode one frame per window: it must be exactly the frame the whole clip gave."""
    path = make_clip(tmp_path_factory.mktemp("clip") / "c.mp4", frames, height, width, fps, rotation=rotation)
    spec = frame_spec(resolutions=((32, 48), (48, 32)), frame_buckets=(5,), resize=resize, windows=windows)
    clip, plan, info = read_clip(str(path), spec)
    for row, window in enumerate(plan.windows):
        alone = read_first_frames(str(path), [window[0]], info["source_size"], info["size"], resize)
        assert np.array_equal(alone[0], clip[row, 0])


# --- CogVideoX 1.5 at its native size ----------------------------------------------------------------


def model_folder(name: str, tmp_path: Path) -> str:
    """A model folder holding only the published configs of ``name`` (bench/model-configs)."""
    configs = json.loads((ROOT / "bench" / "model-configs" / f"{name}.json").read_text())
    folder = tmp_path / name
    for part in ("vae", "transformer", "text_encoder"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(configs[part]))
    (folder / "model_index.json").write_text("{}")
    return str(folder)


TODAY = {  # what caches made with the defaults record, before and after 1.5's defaults came from its config
    "resolutions": [[480, 720]], "frame_buckets": [49], "min_frames": 5, "fps": 8.0, "skip_frames_start": 0,
    "skip_frames_end": 0, "resize": "crop", "windows": 1, "max_upscale": 4.0, "id_token": None, "dtype": "bf16",
}  # fmt: skip


@pytest.mark.parametrize(
    "name, native", [("CogVideoX-2b", (49, 480, 720, 4)), ("CogVideoX-5b", (49, 480, 720, 4)),
                     ("CogVideoX1.5-5B", (81, 768, 1360, 8))],
)  # fmt: skip
def test_buckets_default_to_the_models_native_shape(name: str, native, tmp_path: Path):
    info = models.ModelInfo.read(model_folder(name, tmp_path))
    assert (info.native_frames, *info.native_size, info.frame_step) == native
    cfg = PreprocessConfig(data="clips")
    spec = cfg.frame_spec(info.native_size, info.native_frames, info.frame_step)
    assert spec.frame_buckets == (native[0],) and spec.resolutions == (native[1:3],)
    if native[3] == 4:
        assert cfg.cache_params(spec) == TODAY  # 2b/5b caches keep their parameters
    else:
        assert cfg.cache_params(spec)["frame_step"] == 8


def test_a_frame_bucket_15_cannot_use_is_one_line_naming_the_fix(tmp_path: Path):
    info = models.ModelInfo.read(model_folder("CogVideoX1.5-5B", tmp_path))
    cfg = PreprocessConfig(data="clips", frame_buckets=(17, 13), model="THUDM/CogVideoX1.5-5B")
    with pytest.raises(ConfigError, match=r"--frame-bucket 13: .* 8k\+1 .* use --frame-bucket 9 or 17") as caught:
        cfg.frame_spec(info.native_size, info.native_frames, info.frame_step)
    assert "\n" not in str(caught.value)
    assert PreprocessConfig(data="clips", frame_buckets=(9, 17, 49, 81)).frame_spec((768, 1360), 81, 8)
    with pytest.raises(ConfigError, match="--min-frames must be between 1 and the largest frame count 81"):
        PreprocessConfig(data="clips", min_frames=85).frame_spec((768, 1360), 81, 8)  # the model's count, once known


@given(
    total=st.integers(1, 400),
    source_fps=st.sampled_from([8.0, 12.0, 24.0, 30.0, 60.0]),
    buckets=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    min_frames=st.integers(1, 9),
)
def test_every_frame_count_planned_for_15_packs(total, source_fps, buckets, min_frames):
    spec = frame_spec(frame_buckets=tuple(sorted({8 * k + 1 for k in buckets})), min_frames=min_frames, frame_step=8)
    try:
        count, windows, _ = plan_frames(total, source_fps, spec)
    except Exception as err:  # too short: a SkipClip, never a count 1.5 cannot pack
        assert type(err).__name__ == "SkipClip"
        return
    assert (count - 1) % 8 == 0 and all(len(window) == count for window in windows)


KILLED_IN_MANIFEST_WRITE = """
import os, signal, sys
from cogvx.preprocess import writer
from cogvx.preprocess.run import PreprocessConfig, run

commit, replace = writer.RankWriter.commit, os.replace

def killed_before_the_rename(src, dst, *args, **kwargs):  # the new manifest is written, not yet in place
    if os.path.basename(dst) == "manifest.json":
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *args, **kwargs)

def commit_then_die(self, record):  # the first shard of added image latents is listed: kill -9 mid-save
    os.replace = killed_before_the_rename
    commit(self, record)

writer.RankWriter.commit = commit_then_die
run(PreprocessConfig(data=sys.argv[1], output=sys.argv[2], image_latents=True, shard_max_samples=1, **SETTINGS))
"""


def test_a_manifest_copy_a_killed_run_left_is_removed_by_the_next_run_never_while_one_runs(
    plain: Path, data: Path, tmp_path: Path
):
    from cogvx.preprocess import cachedir

    out = tmp_path / "cache"
    shutil.copytree(plain, out)
    code = f"SETTINGS = {SETTINGS!r}\n{KILLED_IN_MANIFEST_WRITE}"
    done = subprocess.run([sys.executable, "-c", code, str(data), str(out)], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    [left] = out.glob(".manifest.json.*")  # the kill -9 landed between writing the copy and renaming it
    assert Manifest.load(out).image_latent_count == 0  # the manifest in place is the whole old one

    with cachedir.writer_lock(out):  # a live run holds the folder: the next one refuses and touches nothing
        live = out / ".manifest.json.live"
        live.write_text("{}")
        with pytest.raises(CacheError, match="Another `cogvx preprocess` is writing"):
            preprocess(PreprocessConfig(data=data, output=out, image_latents=True, **SETTINGS))
        assert left.exists() and live.exists()
        live.unlink()

    result = preprocess(PreprocessConfig(data=data, output=out, image_latents=True, **SETTINGS))
    assert not list(out.glob(".manifest.json.*"))
    manifest = Manifest.load(out)  # the shard renamed into place before the kill was adopted, not redone
    assert 0 < result.images_added < manifest.image_latent_count == manifest.sample_count == 10
