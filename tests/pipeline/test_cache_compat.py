"""Caches outlive the cogvx that wrote them: older fingerprints still fit, and a failed re-run keeps a cache usable."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from cogvx.errors import CacheError, ModelError
from cogvx.pipeline import models
from cogvx.pipeline.compat import check_cache_fits
from cogvx.preprocess.run import run
from cogvx.shards import Manifest
from tests.helpers.preprocessing import captioned_clip, tiny_config


def _rewrite_encoders(folder: Path, **fields) -> None:
    """Record ``fields`` as the cache's encoder identity, as an older cogvx would have written it."""
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    data["producer"]["encoders"].update(fields)
    path.write_text(json.dumps(data))


def _legacy(info: models.ModelInfo) -> dict[str, str]:
    vae = models.read_config(info.source, "vae")
    text = models.read_config(info.source, "text_encoder")
    # cogvx 0.1 hashed whole config files (minus these bookkeeping keys, and the VAE's scaling factor).
    volatile = ("_name_or_path", "_diffusers_version", "transformers_version", "_class_name", "_commit_hash")

    def digest(config: dict, ignore: tuple[str, ...] = ()) -> str:
        kept = {k: v for k, v in config.items() if k not in volatile and k not in ignore}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]

    return {
        "vae_fingerprint": digest(vae, ("scaling_factor",)),
        "text_encoder_fingerprint": digest(text),
    }


def test_a_cache_with_older_fingerprints_of_the_same_encoders_still_trains_and_grows(tmp_path: Path, tiny_cache: Path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    info = models.ModelInfo.read("tiny")
    legacy = _legacy(info)
    assert legacy["vae_fingerprint"] != info.vae_fingerprint  # the two forms really differ
    _rewrite_encoders(cache, **legacy)

    check_cache_fits(Manifest.load(cache), info, cache)  # no error: the same encoders
    before = Manifest.load(cache).sample_count
    data = tmp_path / "more"
    captioned_clip(data, "new.mp4", frames=48)
    result = run(tiny_config(data, cache, frame_buckets=()))  # the fixture's settings: defaults, fp32, tiny
    assert result.encoded == 1
    assert Manifest.load(cache).sample_count == before + 1


def test_an_older_fingerprint_of_another_encoder_is_still_refused(tmp_path: Path, tiny_cache: Path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    info = models.ModelInfo.read("tiny")
    text = models.read_config(info.source, "text_encoder") | {"num_layers": 7}
    other = models.legacy_fingerprint(text)
    _rewrite_encoders(cache, text_encoder_fingerprint=other)
    with pytest.raises(ModelError, match="text_encoder_fingerprint"):
        check_cache_fits(Manifest.load(cache), info, cache)
    data = tmp_path / "more"
    captioned_clip(data, "new.mp4", frames=48)
    with pytest.raises(CacheError, match="model encoders"):
        run(tiny_config(data, cache, frame_buckets=()))


def test_a_rerun_whose_only_changed_clip_no_longer_decodes_keeps_the_cache_and_exits_cleanly(tmp_path: Path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    captioned_clip(data, "a.mp4", frames=48, seed=1)
    captioned_clip(data, "b.mp4", frames=48, seed=2)
    run(tiny_config(data, cache))
    keys = sorted(e.key for e in Manifest.load(cache).live_entries())

    (data / "a.mp4").unlink()  # a vanished source keeps its samples
    (data / "b.mp4").write_bytes(b"not a video any more")
    result = run(tiny_config(data, cache))  # no "Nothing usable" error: the cache still serves both samples
    assert (result.encoded, result.already_cached, dict(result.skipped)) == (0, 0, {"unreadable video": 1})
    assert sorted(e.key for e in Manifest.load(cache).live_entries()) == keys  # b's earlier sample is kept
    rows = [json.loads(line) for line in (cache / "skipped.jsonl").read_text().splitlines()]
    assert [row["source"] for row in rows] == ["b.mp4"]
