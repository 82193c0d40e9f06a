"""The held-out set is the cache's, not the run's: the same clips for any shard order, whole clips (windows,
mirrors and copies together), never streamed to training, and one-line errors for requests that cannot be met."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cogvx.errors import CacheError, CogvxError, ConfigError
from cogvx.shards import Manifest, SampleEntry, ShardRecord
from cogvx.shards.manifest import MIRROR_SUFFIX
from cogvx.train import heldout
from cogvx.train.data import ShardStream
from tests.conftest import CLIPS, property_examples


def _manifest(clips: list[tuple[int, int, bool, int]], shard_size: int, order: random.Random | None) -> Manifest:
    """A manifest of clips (content id, windows, mirrored, copies under other names), cut into shards."""
    entries = []
    for content, windows, mirrored, copies in clips:
        for copy in range(copies):
            for window in range(windows):
                key = f"c{content}-n{copy}-w{window}"
                source = f"video{content}-{copy}.mp4"
                entries.append(SampleEntry(key, source, f"{content:064x}", "9x32x32"))
                if mirrored:
                    entries.append(SampleEntry(key + MIRROR_SUFFIX, source, f"{content:064x}", "9x32x32"))
    if order is not None:
        order.shuffle(entries)
    cut = [entries[i : i + shard_size] for i in range(0, len(entries), shard_size)]
    shards = [ShardRecord(f"s{i}.tar", len(s), 1, "0" * 64, list(s)) for i, s in enumerate(cut)]
    if order is not None:
        order.shuffle(shards)
    return Manifest(producer={}, params={}, schema={}, shards=shards)


clip_lists = st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(1, 3), st.booleans(), st.integers(1, 2)),
    min_size=2,
    max_size=30,
    unique_by=lambda clip: clip[0],
)


@settings(max_examples=property_examples(15))
@given(clips=clip_lists, shard_size=st.integers(1, 7), seed=st.integers(0, 2**32), data=st.data())
def test_the_held_out_clips_are_the_same_for_any_shard_order_and_whole(clips, shard_size, seed, data):
    count = data.draw(st.integers(1, len(clips) - 1))
    reference = heldout.held_out(_manifest(clips, 5, None), count, "cache")
    shuffled = heldout.held_out(_manifest(clips, shard_size, random.Random(seed)), count, "cache")
    assert shuffled.keys == reference.keys and shuffled.keys_hash == reference.keys_hash
    assert reference.clips == count
    # Whole clips: every window, mirror and copy of a held-out content, and nothing of the others.
    contents = {int(key[1:].split("-")[0]) for key in reference.keys}
    assert len(contents) == count
    for content, windows, mirrored, copies in clips:
        held = {k for k in reference.keys if k.startswith(f"c{content}-")}
        assert len(held) in (0, windows * copies * (2 if mirrored else 1))
    # Each original scored once; its mirror only held out (the same clip seen in a mirror).
    assert set(reference.scored) == {k for k in reference.keys if not k.endswith(MIRROR_SUFFIX)}
    # A cache that gains clips keeps all but at most one held-out clip per new clip.
    grown = heldout.held_out(_manifest([*clips, (10**6 + 1, 1, False, 1)], 5, None), count, "cache")
    assert len({k.split("-")[0] for k in reference.keys - grown.keys}) <= 1


def test_the_default_rule_and_its_line():
    assert heldout.holdout_count(None, 19, "CACHE")[0] == 0
    assert "fewer than the 20" in heldout.holdout_count(None, 19, "CACHE")[1]
    assert heldout.holdout_count(None, 20, "CACHE")[0] == 2
    assert heldout.holdout_count(None, 45, "CACHE")[0] == 4
    assert heldout.holdout_count(None, 500, "CACHE")[0] == 6  # a tenth, at most six
    assert heldout.holdout_count(0, 500, "CACHE") == (0, "No eval score (--eval-holdout 0).")
    assert heldout.holdout_count(3, 5, "CACHE")[0] == 3
    assert heldout.holdout_count(0.25, 10, "CACHE")[0] == 2
    assert heldout.holdout_count(0.01, 10, "CACHE")[0] == 1  # a fraction asks for some
    count, line = heldout.holdout_count(3, 5, "CACHE")
    assert line.startswith("Eval score on 3 of 5 clips of CACHE") and "\n" not in line


@pytest.mark.parametrize(
    ("request_", "total", "kind", "words"),
    [
        (
            5,
            5,
            ConfigError,
            "holds out 5 clips, but CACHE holds 5, leaving none to train on. Hold out fewer (at most 4)",
        ),
        (9, 5, ConfigError, "--eval-shards DIR"),
        (0.99, 5, ConfigError, "leaving none to train on"),
        (2.5, 5, ConfigError, "neither a number of clips"),
        (-1, 5, ConfigError, "neither a number of clips"),
        (float("nan"), 5, ConfigError, "neither a number of clips"),
        (2, 0, CacheError, "cogvx shards rebuild-manifest"),
    ],
)
def test_a_request_that_cannot_be_met_is_one_line_naming_the_fix(request_, total, kind, words):
    with pytest.raises(kind) as caught:
        heldout.holdout_count(request_, total, "CACHE")
    assert words in str(caught.value) and "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def flipped_shards(tmp_path_factory) -> Path:
    """The bundled clips with mirrors, a few samples per shard, so a clip and its mirror may sit in two shards."""
    from cogvx.preprocess.run import PreprocessConfig, run

    out = tmp_path_factory.mktemp("heldout") / "cache"
    run(PreprocessConfig(CLIPS, out, model="tiny", dtype="fp32", workers=0, flip=True, shard_max_samples=5))
    return out


def _stream_keys(cache: Path, shards, rank: int, world: int, batch: int, flip: float, batches: int) -> set[str]:
    stream = ShardStream(
        cache, shards, batch, seed=rank, rank=rank, world_size=world, shuffle_buffer=2, random_flip=flip
    )
    keys, it = set(), iter(stream)
    for _ in range(batches):
        keys.update(next(it)["keys"])
    return keys


@settings(max_examples=property_examples(4))
@given(world=st.integers(1, 2), batch=st.integers(1, 2), flip=st.sampled_from([0.0, 0.5, 1.0]), count=st.integers(1, 3))
def test_training_never_streams_a_held_out_sample(flipped_shards, world, batch, flip, count):
    manifest = Manifest.load(flipped_shards)
    assert len(manifest.shards) > 1 and manifest.missing_mirrors() == []
    eval_set, line = heldout.choose(manifest, count, "cache")
    assert eval_set.clips == count and len(eval_set.keys) == 2 * count  # each original with its mirror
    assert eval_set.keys_hash == heldout.choose(Manifest.load(flipped_shards), count, "cache")[0].keys_hash
    training = heldout.training_shards(manifest.shards, eval_set)
    assert heldout.training_originals(manifest, eval_set) == manifest.original_count - count
    for rank in range(world):
        # The predicate on what the whole cache's stream yields, and the stream over the training shards.
        everything = _stream_keys(flipped_shards, manifest.shards, rank, world, batch, flip, 40)
        trained = _stream_keys(flipped_shards, training, rank, world, batch, flip, 40)
        assert not any(eval_set.excludes(k) for k in trained)
        kept = {k for k in everything if not eval_set.excludes(k)}
        assert kept and trained <= {e.key for e in manifest.live_entries()} - eval_set.keys
        if world == 1 and flip == 0.5:  # 40 draws see every one of the few samples left
            assert trained == {e.key for e in manifest.live_entries()} - eval_set.keys
    assert Manifest.load(flipped_shards).to_dict() == manifest.to_dict()  # the manifest itself is untouched


def test_another_cache_as_the_eval_set_takes_all_of_it_and_nothing_from_training(tiny_cache: Path):
    store, manifest, eval_set = heldout.separate_set(tiny_cache)
    assert eval_set.separate and eval_set.keys == {e.key for e in manifest.live_entries()}
    assert eval_set.clips == len(heldout.clips(manifest)) and not any(eval_set.excludes(k) for k in eval_set.keys)
    assert heldout.training_shards(manifest.shards, eval_set) == manifest.shards
    assert eval_set.location == store.location


def test_another_cache_that_is_empty_or_missing_is_one_line(tmp_path: Path):
    with pytest.raises(CogvxError) as caught:
        heldout.separate_set(tmp_path / "nowhere")
    assert "\n" not in str(caught.value)
