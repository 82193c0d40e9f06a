"""Mirrored variants: ``cogvx preprocess --flip`` encodes them beside each sample (also later, into an existing
cache), and ``cogvx train --random-flip P`` draws them with probability P, reproducibly under exact resume."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogvx.errors import CacheError
from cogvx.preprocess.run import PreprocessConfig
from cogvx.preprocess.run import run as preprocess
from cogvx.shards import Manifest
from cogvx.shards.manifest import MIRROR_SUFFIX
from cogvx.train.config import TrainConfig
from cogvx.train.data import ShardStream
from cogvx.train.loop import run as train
from tests.conftest import CLIPS


@pytest.fixture(scope="module")
def flipped_cache(tmp_path_factory) -> Path:
    """The bundled clips preprocessed without mirrors, then again with --flip: the mirrors are added."""
    out = tmp_path_factory.mktemp("flip") / "cache"
    preprocess(PreprocessConfig(data=CLIPS, output=out, model="tiny", dtype="fp32", workers=0))
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    result = preprocess(PreprocessConfig(data=CLIPS, output=out, model="tiny", dtype="fp32", workers=0, flip=True))
    clips = len(list(CLIPS.glob("*.mp4")))
    assert (result.encoded, result.samples) == (clips, clips)  # one mirror per clip, nothing else
    after = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert all(after[name] == data for name, data in before.items())  # the first shards are untouched
    return out


def _members(cache: Path, suffix: str) -> dict[str, bytes]:
    found = {}
    for shard in sorted(cache.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if ext == suffix:
                    found[key] = tar.extractfile(member).read()
    return found


def test_every_sample_gets_a_mirror_and_the_originals_stay_served(flipped_cache):
    manifest = Manifest.load(flipped_cache)
    clips = len(list(CLIPS.glob("*.mp4")))
    assert (manifest.sample_count, manifest.original_count) == (2 * clips, clips)
    assert manifest.missing_mirrors() == [] and manifest.excluded_count == 0
    live = {e.key for e in manifest.live_entries()}
    originals = {k for k in live if not k.endswith(MIRROR_SUFFIX)}
    assert live == originals | {k + MIRROR_SUFFIX for k in originals}
    # Running --flip again finds nothing to do.
    again = preprocess(
        PreprocessConfig(data=CLIPS, output=flipped_cache, model="tiny", dtype="fp32", workers=0, flip=True)
    )
    assert again.encoded == 0


def test_a_mirrored_samples_strip_is_the_mirror_of_the_originals(flipped_cache):
    strips = _members(flipped_cache, "jpg")
    originals = [k for k in strips if not k.endswith(MIRROR_SUFFIX)]
    assert originals
    asymmetric = 0
    for key in originals:
        original = np.asarray(Image.open(io.BytesIO(strips[key])).convert("RGB")).astype(int)
        mirror = np.asarray(Image.open(io.BytesIO(strips[key + MIRROR_SUFFIX])).convert("RGB")).astype(int)
        assert mirror.shape == original.shape
        tile = original.shape[0] * 96 // 64  # tiny's frames are 64x96: strip tiles are 64 px high, 96 wide
        expected = np.concatenate(
            [original[:, start : start + tile][:, ::-1] for start in range(0, original.shape[1], tile)], axis=1
        )
        assert np.abs(mirror - expected).mean() < 2, f"{key}: the strip is not the original's, mirrored"
        asymmetric += np.abs(mirror - original).max() > 60  # a clip whose mirror image shows
    assert asymmetric >= len(originals) // 2  # so the check above could tell a mirror from a copy


def _keys(cache: Path, p: float, skip: int = 0, count: int = 40) -> list[str]:
    manifest = Manifest.load(cache)
    stream = ShardStream(
        cache, manifest.shards, batch_size=1, seed=3, random_flip=p, shuffle_buffer=4, skip_batches=skip
    )
    batches = iter(stream)
    return [next(batches)["keys"][0] for _ in range(count)]


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_p_zero_and_one_draw_only_originals_or_only_mirrors(flipped_cache, p):
    keys = _keys(flipped_cache, p)
    assert all(k.endswith(MIRROR_SUFFIX) == (p == 1.0) for k in keys)


def test_a_probability_between_draws_both_and_resumes_exactly(flipped_cache):
    keys = _keys(flipped_cache, 0.5, count=60)
    mirrored = sum(k.endswith(MIRROR_SUFFIX) for k in keys)
    assert 10 < mirrored < 50  # both variants, about half each
    for skip in (1, 7, 23):
        assert _keys(flipped_cache, 0.5, skip=skip, count=20) == keys[skip : skip + 20]


def test_training_with_random_flip_on_a_cache_without_mirrors_is_refused_with_the_command(tiny_cache, tmp_path):
    cfg = TrainConfig(shards=tiny_cache, output=tmp_path / "run", max_steps=1, rank=4, workers=0, random_flip=0.5)
    with pytest.raises(CacheError) as err:
        train(cfg)
    message = str(err.value)
    assert "--random-flip 0.5 needs the mirrored variant of every sample" in message
    assert f"cogvx preprocess --data {CLIPS.resolve()} --output {tiny_cache} --model tiny --flip" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_training_draws_mirrors_and_an_epoch_counts_samples_not_variants(flipped_cache, tmp_path):
    cfg = TrainConfig(shards=flipped_cache, output=tmp_path / "run", epochs=1, rank=4, workers=0, random_flip=1.0,
                      checkpoint_every=0, mixed_precision="fp32")  # fmt: skip
    result = train(cfg)
    assert result.steps == Manifest.load(flipped_cache).original_count
    with pytest.raises(Exception, match="--random-flip must be a probability"):
        TrainConfig(shards=flipped_cache, random_flip=1.5)


def test_the_choice_is_the_same_after_resume_with_data_workers(flipped_cache):
    from cogvx.train.data import make_loader

    def keys(skip: int, count: int) -> list[str]:
        manifest = Manifest.load(flipped_cache)
        stream = ShardStream(flipped_cache, manifest.shards, batch_size=1, seed=5, random_flip=0.3,
                             shuffle_buffer=4, skip_batches=skip)  # fmt: skip
        batches = iter(make_loader(stream, workers=2, pin_memory=False))
        return [next(batches)["keys"][0] for _ in range(count)]

    whole = keys(0, 30)
    assert any(k.endswith(MIRROR_SUFFIX) for k in whole) and not all(k.endswith(MIRROR_SUFFIX) for k in whole)
    for skip in (3, 11):
        assert keys(skip, 12) == whole[skip : skip + 12]
