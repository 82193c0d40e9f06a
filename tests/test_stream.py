"""The training stream serves every live sample of a cache and never a stale one."""

from __future__ import annotations

import shutil
from pathlib import Path

from cogvx.preprocess.run import PreprocessConfig
from cogvx.preprocess.run import run as preprocess
from cogvx.shards import Manifest
from cogvx.train.data import ShardStream


def _keys_seen(cache: Path, batches: int) -> set[str]:
    manifest = Manifest.load(cache)
    stream = iter(ShardStream(cache, manifest.shards, batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=4))
    return {key for _ in range(batches) for key in next(stream)["keys"]}


def test_a_re_encoded_clip_replaces_its_stale_sample_in_the_stream(clips_copy: Path, tmp_path: Path):
    cache = tmp_path / "shards"
    config = PreprocessConfig(data=clips_copy, output=cache, model="tiny", dtype="fp32", workers=0)
    preprocess(config)
    before = {s.source: s.key for shard in Manifest.load(cache).shards for s in shard.samples}

    # The clip changes on disk: the next run re-encodes it and excludes the old sample.
    shutil.copy(clips_copy / "green_square_right.mp4", clips_copy / "red_disc_left.mp4")
    assert preprocess(config).encoded == 1
    manifest = Manifest.load(cache)
    stale = before["red_disc_left.mp4"]
    assert any(stale in shard.excluded for shard in manifest.shards)
    live = {s.key for shard in manifest.shards for s in shard.samples if s.key not in shard.excluded}
    assert stale not in live and len(live) == 6

    seen = _keys_seen(cache, 80)
    assert stale not in seen
    assert seen == live  # every live sample is drawn, including the re-encoded one
