"""The training stream serves every live sample of a cache and never a stale one, and each global rank
(process, on any node) a share of its own: disjoint, together the whole cache, balanced."""

from __future__ import annotations

import shutil
from itertools import islice
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cogvx.errors import CacheError
from cogvx.preprocess.run import PreprocessConfig
from cogvx.preprocess.run import run as preprocess
from cogvx.shards import Manifest, ShardRecord
from cogvx.shards.manifest import MIRROR_SUFFIX, SampleEntry
from cogvx.train.data import Piece, ShardStream, rank_share, unit_count
from tests.conftest import property_examples


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


# --- every global rank streams a disjoint share of the cache ---


@st.composite
def _caches(draw) -> list[ShardRecord]:
    """Shards as manifests list them: originals, mirrors (in their shard or a later one), replaced
    samples, empty and fully replaced shards, and shards whose entry indexes no samples."""
    records, originals, mirrored = [], [], set()
    for number in range(draw(st.integers(1, 10))):
        name = f"shard-{number:03d}.tar"
        count = draw(st.integers(0, 8))
        if count and draw(st.integers(0, 3)) == 0:  # an entry without an index: samples by place
            records.append(ShardRecord(name, count, 1, "0" * 64))
            continue
        keys = []
        for _ in range(count):
            free = [k for k in originals if k not in mirrored]
            if free and draw(st.booleans()):
                original = draw(st.sampled_from(free))
                mirrored.add(original)
                keys.append(original + MIRROR_SUFFIX)
            else:
                originals.append(f"clip{len(originals)}")
                keys.append(originals[-1])
        excluded = draw(st.lists(st.sampled_from(keys), unique=True)) if keys else []
        samples = [SampleEntry(k, f"{k}.mp4", "0" * 64, "13x60x90") for k in keys]
        records.append(ShardRecord(name, count, 1, "0" * 64, samples, excluded))
    return records


def _live(record: ShardRecord) -> set[tuple[str, object]]:
    """The live samples of a shard as (shard, key), or (shard, place) where the manifest has no index."""
    if len(record.live_samples()) == record.live_count:
        return {(record.name, s.key) for s in record.live_samples()}
    return {(record.name, place) for place in range(record.live_count)}


def _served(piece: Piece) -> set[tuple[str, object]]:
    if piece.whole:
        return _live(piece.record)
    names = piece.keys if piece.keys is not None else piece.positions
    assert len(names) == piece.count
    return {(piece.record.name, name) for name in names}


@settings(max_examples=property_examples(60))
@given(shards=_caches(), world=st.integers(1, 8))
def test_ranks_share_the_cache_disjointly_and_completely(shards, world):
    shares = [[x for piece in rank_share(shards, rank, world) for x in _served(piece)] for rank in range(world)]
    served = [set(share) for share in shares]
    assert all(len(share) == len(set(share)) for share in shares)  # no sample twice in one share
    assert sum(map(len, served)) == len(set().union(*served))  # pairwise disjoint
    assert set().union(*served) == set().union(*map(_live, shards))  # every live sample, nothing else

    # Balanced in units (a sample and its mirror count once), none empty when there are enough, and a
    # mirror goes where its original goes.
    def unit(sample):
        return sample[1].removesuffix(MIRROR_SUFFIX) if isinstance(sample[1], str) else sample

    units = [{unit(s) for s in share} for share in served]
    assert max(map(len, units)) - min(map(len, units)) <= 1
    if unit_count(shards) >= world:
        assert all(units)
    assert sum(map(len, units)) == unit_count(shards)  # no unit on two ranks


@settings(max_examples=property_examples(20))
@given(per_shard=st.integers(1, 5), shards_per_rank=st.integers(1, 3), world=st.integers(1, 8))
def test_equal_shards_go_whole_to_the_ranks(per_shard, shards_per_rank, world):
    def record(number):
        keys = [f"s{number}k{i}" for i in range(per_shard)]
        samples = [SampleEntry(k, f"{k}.mp4", "0" * 64, "13x60x90") for k in keys]
        return ShardRecord(f"shard-{number:03d}.tar", per_shard, 1, "0" * 64, samples)

    shards = [record(n) for n in range(world * shards_per_rank)]
    for rank in range(world):
        pieces = rank_share(shards, rank, world)
        assert [p.record.name for p in pieces] == [s.name for s in shards[rank * shards_per_rank :][:shards_per_rank]]
        assert all(p.whole for p in pieces)


def test_four_processes_split_a_one_shard_cache_and_each_streams_only_its_share(tiny_cache: Path):
    manifest = Manifest.load(tiny_cache)
    assert len(manifest.shards) == 1  # fewer shards than processes: split inside the shard
    live = {s.key for s in manifest.live_entries()}
    seen = []
    for rank in range(4):
        share = {key for piece in rank_share(manifest.shards, rank, 4) for key in (piece.keys or live)}
        stream = ShardStream(
            tiny_cache, manifest.shards, 1, seed=3, rank=rank, world_size=4, random_flip=0.0, shuffle_buffer=4
        )
        keys = {key for batch in islice(stream, 12) for key in batch["keys"]}
        assert keys == share  # only its own samples, and all of them
        seen.append(keys)
    assert sorted(len(keys) for keys in seen) == [1, 1, 2, 2]
    assert set().union(*seen) == live and sum(map(len, seen)) == len(live)


def test_more_processes_than_samples_is_refused_on_every_rank(tiny_cache: Path):
    manifest = Manifest.load(tiny_cache)
    for rank in (0, 6):
        with pytest.raises(CacheError, match="holds 6 samples .* fewer than the 7 processes"):
            ShardStream(tiny_cache, manifest.shards, 1, 0, rank, 7, random_flip=0.0, shuffle_buffer=4)
