"""`cogvx shards inspect` and `cogvx shards verify` on a real (tiny) cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from cogvx.cli import app
from cogvx.shards import Manifest

RUNNER = CliRunner(env={"COLUMNS": "200"})


def _copy(cache: Path, tmp_path: Path) -> Path:
    target = tmp_path / "cache"
    shutil.copytree(cache, target)
    return target


def test_inspect_summarises_and_draws_a_contact_sheet(tiny_cache: Path, tmp_path: Path):
    sheet = tmp_path / "sheet.png"
    out = RUNNER.invoke(app, ["shards", "inspect", str(tiny_cache), "--contact-sheet", str(sheet)])
    assert out.exit_code == 0, out.output
    for expected in ("model", "tiny", "samples", "bucket 13x64x96", "size on disk", "param fps", "6 strips"):
        assert expected in out.output
    image = Image.open(sheet)
    assert image.format == "PNG" and image.height == 6 * (64 + 4) + 4
    # The strip pixels are there: the right part of the sheet is not blank.
    assert image.crop((320, 4, image.width, 68)).getextrema() != ((255, 255),) * 3


def test_inspect_without_a_cache_or_strips_is_a_clear_error(tmp_path: Path):
    out = RUNNER.invoke(app, ["shards", "inspect", str(tmp_path)])
    assert out.exit_code == 1 and "No manifest.json" in out.output
    out = RUNNER.invoke(app, ["shards", "inspect", str(tmp_path), "--contact-sheet", str(tmp_path / "x.jpg")])
    assert out.exit_code == 1 and "must end in .png" in out.output


def test_verify_passes_then_names_a_damaged_shard(tiny_cache: Path, tmp_path: Path):
    cache = _copy(tiny_cache, tmp_path)
    out = RUNNER.invoke(app, ["shards", "verify", str(cache)])
    assert out.exit_code == 0 and "6 samples verified" in out.output
    shard = cache / Manifest.load(cache).shards[0].name
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = RUNNER.invoke(app, ["shards", "verify", str(cache)])
    assert out.exit_code == 1 and shard.name in out.output and "does not match the manifest" in out.output


def test_verify_checks_keys_against_the_index(tiny_cache: Path, tmp_path: Path):
    cache = _copy(tiny_cache, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0]["samples"][0]["key"] = "not-in-the-shard"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    (cache / "shard-r00-000777.tar").write_bytes(b"stray")
    out = RUNNER.invoke(app, ["shards", "verify", str(cache), "--quick"])
    assert out.exit_code == 1 and "sample keys differ" in out.output
    assert "unlisted" in out.output and "shard-r00-000777.tar" in out.output


def test_verify_names_the_command_that_repairs_a_missing_shard(tiny_cache: Path, tmp_path: Path):
    cache = _copy(tiny_cache, tmp_path)
    raw = json.loads((cache / "manifest.json").read_text())
    raw["producer"]["data"] = data = "/videos/my clips"  # as preprocess records it: the command is complete
    (cache / "manifest.json").write_text(json.dumps(raw))
    manifest = Manifest.load(cache)
    (cache / manifest.shards[0].name).unlink()
    out = RUNNER.invoke(app, ["shards", "verify", str(cache), "--quick"])
    assert out.exit_code == 1 and "listed in the manifest but missing" in out.output
    said = " ".join(out.output.split())  # the console wraps at 200 columns
    assert said.endswith(
        f"error: 1 problem(s) in {cache}. Run `cogvx preprocess --data '{data}' --output {cache} --repair` to "
        f"re-encode the samples of the missing or changed {manifest.shards[0].name}."
    )
    # Without the data folder recorded, the command says what to fill in.
    raw = json.loads((cache / "manifest.json").read_text())
    del raw["producer"]["data"]
    (cache / "manifest.json").write_text(json.dumps(raw))
    out = RUNNER.invoke(app, ["shards", "verify", str(cache), "--quick"])
    said = " ".join(out.output.split())
    assert f"`cogvx preprocess --data VIDEOS --output {cache} --repair` (VIDEOS: the folder" in said


def test_inspect_refuses_a_fifo_for_skipped_jsonl_without_blocking(tiny_cache: Path, tmp_path: Path):
    cache = _copy(tiny_cache, tmp_path)
    (cache / "skipped.jsonl").unlink(missing_ok=True)
    os.mkfifo(cache / "skipped.jsonl")
    out = RUNNER.invoke(app, ["shards", "inspect", str(cache)])
    assert out.exit_code == 1 and "skipped.jsonl is not a regular file" in out.output
