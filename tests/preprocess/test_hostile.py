"""Preprocessing against careless users and hostile inputs: nothing already encoded is lost.

A cache can outlive its videos, so a shard is never deleted by a run that did not write it; damaged
shards are set aside and their samples encoded again; inputs that are not clips are listed with a
reason; a full or read-only disk ends the run with one line and leaves a valid cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cogvx.cli import app
from cogvx.errors import CacheError, InputError
from cogvx.preprocess.cachedir import cache_header
from cogvx.preprocess.run import run
from cogvx.preprocess.sources import MAX_CAPTION_CHARS, discover, find_sources, read_caption
from cogvx.shards import Manifest, read_shard, verify
from cogvx.shards.rebuild import read_indexed_shard
from tests.helpers.preprocessing import captioned_clip, make_video, tiny_config

CLI = CliRunner(env={"COLUMNS": "300"})


def _preprocess_cli(data: Path, out: Path, *extra: str):
    args = ["preprocess", "--data", str(data), "--output", str(out), "--model", "tiny", "--dtype", "fp32",
            "--workers", "0", "--frame-bucket", "9", *extra]  # fmt: skip
    return CLI.invoke(app, args)


def _error_line(output: str) -> str:
    """The one error message (the console wraps long lines to its width: joined again here)."""
    assert output.count("error:") == 1 and "Traceback" not in output, output
    return " ".join(output[output.index("error:") :].split())


def _samples(out: Path) -> dict[str, object]:
    """Live samples by source."""
    manifest = Manifest.load(out)
    return {s.meta["source"]: s for record in manifest.shards for s in read_shard(out, record)}


def _skipped(out: Path) -> dict[str, dict]:
    return {row["source"]: row for row in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}


@pytest.fixture
def five(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for i in range(5):
        captioned_clip(data, f"c{i}.mp4", frames=15, seed=i)
    return data


# --- the manifest is gone; shards nobody lists --------------------------------------------------------


def test_shards_without_a_manifest_are_refused_and_kept(five: Path, tmp_path: Path):
    out = tmp_path / "out"
    run(tiny_config(five, out, shard_max_samples=2))
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    (out / "manifest.json").unlink()
    done = _preprocess_cli(five, out)
    assert done.exit_code == 1
    line = _error_line(done.output)
    assert "no manifest.json" in line and f"cogvx shards rebuild-manifest {out}" in line and "--output" in line
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before, "every shard is still there, unchanged"
    assert len(before) == 3
    # The way out the message names: the rebuilt manifest makes the folder a cache this run adds to.
    assert CLI.invoke(app, ["shards", "rebuild-manifest", str(out)]).exit_code == 0
    again = run(tiny_config(five, out, shard_max_samples=2))
    assert (again.encoded, again.already_cached) == (0, 5)


def test_a_complete_shard_no_manifest_lists_is_adopted_and_an_unreadable_one_set_aside(five: Path, tmp_path: Path):
    out = tmp_path / "out"
    run(tiny_config(five, out, shard_max_samples=2))
    manifest = Manifest.load(out)
    orphan = manifest.shards.pop()  # renamed into place just before a kill: the manifest never listed it
    manifest.save(out)
    orphan_bytes = (out / orphan.name).read_bytes()
    (out / "shard-r00-000042.tar").write_bytes(b"renamed into place, never listed, and not a tar")
    result = run(tiny_config(five, out, shard_max_samples=2))
    assert (result.encoded, result.already_cached) == (0, 5), "the orphan's clips are not encoded again"
    assert (out / orphan.name).read_bytes() == orphan_bytes
    assert orphan.name in {r.name for r in Manifest.load(out).shards}
    assert (out / "shard-r00-000042.tar.damaged").read_bytes() == b"renamed into place, never listed, and not a tar"
    assert sorted(_samples(out)) == [f"c{i}.mp4" for i in range(5)]

    # A complete shard made with other settings is not adopted, and not touched either.
    other = tmp_path / "other"
    run(tiny_config(five, other, fps=12, shard_max_samples=5))
    foreign = (other / "shard-r00-000000.tar").read_bytes()
    (out / "shard-r00-000077.tar").write_bytes(foreign)
    assert run(tiny_config(five, out, shard_max_samples=2)).already_cached == 5
    assert (out / "shard-r00-000077.tar").read_bytes() == foreign
    assert "shard-r00-000077.tar" not in {r.name for r in Manifest.load(out).shards}


def test_the_data_path_is_recorded_outside_the_parameters(five: Path, tmp_path: Path):
    out = tmp_path / "out"
    run(tiny_config(five, out))
    manifest = Manifest.load(out)
    assert manifest.producer["data"] == str(five.resolve())
    assert "data" not in manifest.params
    (sample,) = [s for s in _samples(out).values() if s.meta["source"] == "c0.mp4"]
    entry = next(e for e in manifest.live_entries() if e.source == "c0.mp4")
    stat = os.stat(five / "c0.mp4")
    line = sample.meta["index"]  # the sample's manifest index line, so a manifest can be rebuilt from shards
    assert (line["size"], line["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
    assert line == {k: v for k, v in entry.to_dict().items() if k != "key"}
    header = read_indexed_shard(out, manifest.shards[0].name).header
    assert header == cache_header(manifest) and "data" not in header["producer"]
    assert header["params"] == manifest.params


# --- repair: missing, truncated and flipped shards ---------------------------------------------------


def test_damaged_shards_are_set_aside_and_exactly_their_samples_encoded_again(five: Path, tmp_path: Path):
    from cogvx.train.config import TrainConfig
    from cogvx.train.loop import run as train

    out = tmp_path / "out"
    run(tiny_config(five, out, shard_max_samples=1))
    records = {r.samples[0].source: r for r in Manifest.load(out).shards}
    keys = {source: r.samples[0].key for source, r in records.items()}
    files = {r.name: (out / r.name).read_bytes() for r in records.values()}
    deleted, truncated, flipped, lost = (records[f"c{i}.mp4"].name for i in range(4))
    (out / deleted).unlink()
    (out / truncated).write_bytes(files[truncated][:-512])
    flip = bytearray(files[flipped])
    flip[len(flip) // 2] ^= 0xFF
    (out / flipped).write_bytes(bytes(flip))
    (out / lost).unlink()
    (five / "c3.mp4").unlink()  # its samples cannot be made again

    first = run(tiny_config(five, out, shard_max_samples=1))
    assert (first.encoded, first.already_cached) == (2, 2), "the missing and the truncated shard's clips"
    assert sorted(first.dropped_shards) == sorted([deleted, truncated, lost])
    assert first.lost_sources == ["c3.mp4"]
    assert (out / f"{truncated}.damaged").read_bytes() == files[truncated][:-512], "set aside, not deleted"
    assert not (out / truncated).exists()

    second = run(tiny_config(five, out, shard_max_samples=1, repair=True))  # only hashing finds the flipped byte
    assert (second.encoded, second.already_cached) == (1, 3)
    assert second.dropped_shards == [flipped] and second.lost_sources == []
    assert (out / f"{flipped}.damaged").read_bytes() == bytes(flip)

    samples = _samples(out)
    assert sorted(samples) == ["c0.mp4", "c1.mp4", "c2.mp4", "c4.mp4"]
    assert {source: s.key for source, s in samples.items()} == {k: v for k, v in keys.items() if k != "c3.mp4"}
    untouched = records["c4.mp4"].name
    assert (out / untouched).read_bytes() == files[untouched], "a good shard is never rewritten"
    assert untouched in {r.name for r in Manifest.load(out).shards}
    assert verify(out, Manifest.load(out).shards) == []
    assert run(tiny_config(five, out, shard_max_samples=1, repair=True)).encoded == 0, "repaired: nothing left to do"

    cfg = TrainConfig(shards=out, output=tmp_path / "run", max_steps=2, rank=4, mixed_precision="no", workers=0,
                      checkpoint_every=0)  # fmt: skip
    train(cfg)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]


def test_repair_through_the_cli_reports_the_lost_sources(five: Path, tmp_path: Path, caplog):
    out = tmp_path / "out"
    run(tiny_config(five, out, shard_max_samples=1))
    record = next(r for r in Manifest.load(out).shards if r.samples[0].source == "c2.mp4")
    (out / record.name).unlink()
    (five / "c2.mp4").unlink()
    with caplog.at_level(logging.WARNING, logger="cogvx.preprocess"):
        done = _preprocess_cli(five, out, "--repair")
    assert done.exit_code == 0, done.output
    assert "sources lost (gone from the data)" in done.output and record.name in done.output
    assert "1 sample source(s)" in caplog.text and "c2.mp4" in caplog.text


# --- inputs: outside paths, duplicates, captions, odd files -------------------------------------------


def test_paths_leaving_the_data_folder_are_refused_unless_allowed(tmp_path: Path):
    make_video(tmp_path / "outside.mp4")
    data = tmp_path / "data"
    make_video(data / "inside.mp4", seed=1)
    (data / "link.mp4").symlink_to(tmp_path / "outside.mp4")
    cases = {
        "meta.csv": ("video,caption\ninside.mp4,a\n../outside.mp4,b\n", "row 2"),
        "abs.jsonl": (json.dumps({"video": str(tmp_path / "outside.mp4"), "caption": "b"}) + "\n", "row 1"),
        "viaLink.csv": ("video,caption\nlink.mp4,b\n", "row 1"),
    }
    for name, (text, where) in cases.items():
        (data / name).write_text(text)
        with pytest.raises(InputError, match=rf"{name}, {where}: .* outside the data folder .*--allow-outside-paths"):
            discover(data / name)
        assert any(
            c.path.name in ("outside.mp4", "link.mp4") for c in find_sources(data / name, allow_outside=True).clips
        )
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "videos.txt").write_text("../data/inside.mp4\n")
    (seed / "prompts.txt").write_text("a ball\n")
    with pytest.raises(InputError, match=r"videos.txt, line 1: the video path '../data/inside.mp4' leads outside"):
        discover(seed)
    (clip,) = find_sources(seed, allow_outside=True).clips
    assert clip.path.resolve() == (data / "inside.mp4").resolve()
    done = _preprocess_cli(data / "meta.csv", tmp_path / "out")
    assert done.exit_code == 1 and "row 2" in _error_line(done.output)


def test_layout_order_duplicates_rows_linked_folders_and_utf8_lists(tmp_path: Path):
    data = tmp_path / "data"
    make_video(data / "a.mp4")
    (data / "videos.txt").write_text("a.mp4\n")
    (data / "prompts.txt").write_text("from the seed layout\n")
    (data / "metadata.csv").write_text("video,caption\na.mp4,from metadata\n")
    assert [c.caption for c in discover(data)] == ["from the seed layout"], "videos.txt is tried before metadata.csv"
    (data / "videos.txt").unlink()
    (data / "metadata.csv").write_text("video,caption\na.mp4,one\n./a.mp4,two\n")
    found = find_sources(data)
    assert [c.caption for c in found.clips] == ["one"]
    assert found.skipped == [{"source": "./a.mp4", "reason": "duplicate", "detail": "same file as a.mp4"}]
    (data / "metadata.csv").write_bytes(b"video,caption\na.mp4,caf\xe9\n")
    with pytest.raises(InputError, match=r"metadata.csv, line 2 is not UTF-8 text; save the file as UTF-8"):
        discover(data)
    folder = tmp_path / "folder"
    make_video(tmp_path / "elsewhere" / "b.mp4")
    folder.mkdir()
    (folder / "linked").symlink_to(tmp_path / "elsewhere")
    assert [c.source for c in discover(folder)] == ["linked/b.mp4"], "a symlinked folder is searched"


def test_captions_are_utf8_with_replacement_and_bounded():
    assert read_caption("a ball été".encode()) == ("a ball été", ())
    assert read_caption(b"a \xff\xfe ball") == ("a \ufffd\ufffd ball", ("caption_invalid_utf8",))
    text, notes = read_caption(("x" * (MAX_CAPTION_CHARS + 10)).encode())
    assert len(text) == MAX_CAPTION_CHARS and notes == ("caption_clipped",)
    assert read_caption("a \ufffd ball".encode()) == ("a \ufffd ball", ()), "a real U+FFFD is not an invalid byte"


def test_hostile_folder_entries_are_listed_never_dropped_or_fatal(tmp_path: Path, caplog):
    data, out = tmp_path / "data", tmp_path / "out"
    captioned_clip(data, "a.mp4", frames=15, seed=1)
    os.link(data / "a.mp4", data / "b hardlink.mp4")
    (data / "b hardlink.txt").write_text("a ball")
    (data / "c symlink.mp4").symlink_to(data / "a.mp4")
    (data / "c symlink.txt").write_text("a ball")
    make_video(data / "latin1.mp4", frames=15, seed=2)
    (data / "latin1.txt").write_bytes("a ball in the café".encode("latin-1"))
    make_video(data / "huge caption.mp4", frames=15, seed=3)
    (data / "huge caption.txt").write_text("a red ball " * 1_000_000)  # 11 MB
    (data / "loop.mp4").symlink_to("loop.mp4")
    (data / "gone.mp4").symlink_to("nowhere.mp4")
    (data / "folder.mp4").mkdir()
    os.mkfifo(data / "pipe.mp4")
    (data / "sub").mkdir()
    (data / "sub" / "up").symlink_to("..")
    with caplog.at_level(logging.WARNING, logger="cogvx.preprocess"):
        result = run(tiny_config(data, out))
    skipped = _skipped(out)
    assert {source: row["reason"] for source, row in skipped.items()} == {
        "b hardlink.mp4": "duplicate",
        "c symlink.mp4": "duplicate",
        "loop.mp4": "symlink loop",
        "gone.mp4": "broken link",
        "folder.mp4": "not a file",
        "pipe.mp4": "not a file",
        "sub/up": "symlink loop",
    }
    assert skipped["b hardlink.mp4"]["detail"] == "same file as a.mp4"
    assert result.skipped["duplicate"] == 2 and sum(result.skipped.values()) == 7
    samples = _samples(out)
    assert sorted(samples) == ["a.mp4", "huge caption.mp4", "latin1.mp4"]
    latin = samples["latin1.mp4"].meta
    assert latin["caption"] == "a ball in the caf\ufffd" and latin["caption_invalid_utf8"] is True
    assert "latin1.mp4" in caplog.text and "not valid UTF-8" in caplog.text
    huge = samples["huge caption.mp4"].meta
    assert len(huge["caption"]) <= MAX_CAPTION_CHARS and huge["caption_clipped"] is True
    assert huge["caption_truncated"] is True and huge["caption_invalid_utf8"] is False
    assert samples["a.mp4"].meta["caption_clipped"] is False


# --- the promises of incremental runs -------------------------------------------------------------------


def test_an_unchanged_size_and_mtime_is_trusted_without_reading_the_file(tmp_path: Path):
    data, out = tmp_path / "data", tmp_path / "out"
    path = captioned_clip(data, "a.mp4", frames=15, seed=1)
    captioned_clip(data, "b.mp4", frames=15, seed=2)
    run(tiny_config(data, out))
    stat = os.stat(path)
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 64] = bytes(255 - b for b in content[middle : middle + 64])  # same size, other bytes
    path.write_bytes(bytes(content))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run(tiny_config(data, out)).already_cached == 2, "size and mtime equal: the file was not read"
    os.utime(path)  # now the mtime differs: the file is read, and the change found (it no longer decodes)
    changed = run(tiny_config(data, out))
    assert changed.already_cached == 1 and changed.encoded + sum(changed.skipped.values()) == 1


def test_a_vanished_source_keeps_its_samples(five: Path, tmp_path: Path):
    out = tmp_path / "out"
    run(tiny_config(five, out))
    before = _samples(out)["c1.mp4"]
    (five / "c1.mp4").unlink()
    result = run(tiny_config(five, out))
    assert (result.encoded, result.already_cached) == (0, 4)
    after = _samples(out)
    assert len(after) == 5 and after["c1.mp4"].key == before.key
    assert torch.equal(after["c1.mp4"].tensors["moments"], before.tensors["moments"])


def test_vae_batch_above_one_gives_the_moments_of_one(five: Path, tmp_path: Path):
    one = _samples_after(run(tiny_config(five, tmp_path / "one", vae_batch=1)), tmp_path / "one")
    three = _samples_after(run(tiny_config(five, tmp_path / "three", vae_batch=3)), tmp_path / "three")
    assert sorted(one) == sorted(three) == [f"c{i}.mp4" for i in range(5)]
    for source, sample in one.items():
        assert sample.key == three[source].key
        # Equal up to fp32 summation order (batched convolutions add in another order) ...
        assert (three[source].tensors["moments"] - sample.tensors["moments"]).abs().max() < 1e-3
    # ... which is far below what tells two clips apart.
    assert (one["c0.mp4"].tensors["moments"] - one["c1.mp4"].tensors["moments"]).abs().max() > 0.05


def _samples_after(result, out: Path) -> dict:
    assert result.encoded == 5
    return _samples(out)


def _in_thread(action) -> threading.Thread:
    """Run ``action`` on a thread; its exception, if any, is re-raised by ``join_raising``."""

    def target():
        try:
            action()
        except BaseException as err:  # handed to the test thread
            thread.error = err

    thread = threading.Thread(target=target, daemon=True)
    thread.error = None
    thread.start()
    return thread


def _join(thread: threading.Thread) -> None:
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run did not finish"
    if thread.error is not None:
        raise thread.error


def test_a_second_concurrent_run_is_refused_with_one_line(five: Path, tmp_path: Path):
    out = tmp_path / "out"
    first = _in_thread(lambda: run(tiny_config(five, out, shard_max_samples=1)))
    while not (out / "manifest.json").exists() and first.is_alive():
        time.sleep(0.001)  # the manifest is saved under the lock, before anything is encoded
    done = _preprocess_cli(five, out)
    still_running = first.is_alive()
    _join(first)
    assert still_running, "the first run finished before the second started: nothing was tested"
    assert done.exit_code == 1
    assert f"Another `cogvx preprocess` is writing to {out}" in _error_line(done.output)
    assert Manifest.load(out).sample_count == 5, "the first run went on undisturbed"


def test_a_reader_polling_the_manifest_never_sees_it_change_under_it(five: Path, tmp_path: Path):
    """The manifest is replaced, never rewritten: a reader's open file stays the complete version it opened."""
    out = tmp_path / "out"
    writer = _in_thread(lambda: run(tiny_config(five, out, shard_max_samples=1)))  # saved after each shard
    opened, versions = [], set()
    while writer.is_alive():
        try:
            handle = open(out / "manifest.json")
        except FileNotFoundError:
            continue
        text = handle.read()
        json.loads(text)  # never partial
        if text not in versions:
            versions.add(text)
            opened.append((handle, text))
        else:
            handle.close()
    _join(writer)
    assert len(versions) >= 3, "the reader saw several versions"
    for handle, text in opened:
        handle.seek(0)
        assert handle.read() == text, "a manifest a reader opened was changed in place"
        handle.close()


# --- full and read-only disks --------------------------------------------------------------------------


@pytest.fixture
def mount_tmpfs(tmp_path: Path):
    """Mount a small tmpfs (root only); skipped with the reason where mounting is not permitted."""
    mounted = []

    def mount(size: str, folder: Path | None = None) -> Path:
        folder = folder or tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("per_shard", [1, 1000], ids=["between shards", "inside a shard"])
def test_a_full_disk_ends_with_one_line_and_leaves_a_valid_cache(tmp_path: Path, mount_tmpfs, per_shard: int):
    data = tmp_path / "data"
    for i in range(12):
        captioned_clip(data, f"clip {i:02d}.mp4", frames=15, seed=i)
    disk = mount_tmpfs("1m")
    out = disk / "out"
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    ballast.write_bytes(b"\0" * (free - 160 * 1024))  # room for the manifest and a few 40 KB shards
    with pytest.raises(CacheError) as failed:
        run(tiny_config(data, out, shard_max_samples=per_shard))
    line = str(failed.value)
    assert "\n" not in line and "No space left on the device" in line and str(out) in line and "Free some" in line
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp")), "no temporary file is left"
    manifest = Manifest.load(out)  # still valid
    assert verify(out, manifest.shards) == []
    ballast.unlink()
    again = run(tiny_config(data, out))
    # A shard renamed into place when the manifest could no longer be saved is adopted, not encoded again.
    assert again.encoded + again.already_cached == 12 and again.already_cached >= manifest.sample_count
    assert len(_samples(out)) == 12


def test_a_read_only_cache_folder_ends_with_one_line(five: Path, tmp_path: Path, mount_tmpfs):
    disk = mount_tmpfs("4m")
    out = disk / "out"
    run(tiny_config(five, out))
    before = (out / "manifest.json").read_bytes()
    captioned_clip(five, "new.mp4", frames=15, seed=9)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    done = _preprocess_cli(five, out)
    assert done.exit_code == 1
    line = _error_line(done.output)
    assert "Read-only file system" in line and str(out) in line and "another --output" in line
    done = _preprocess_cli(five, disk / "fresh")
    assert done.exit_code == 1 and str(disk / "fresh") in _error_line(done.output)
    assert (out / "manifest.json").read_bytes() == before


def test_disk_errors_name_only_what_they_are_about():
    import errno

    from cogvx.preprocess.run import _write_problem

    out = Path("/cache/out")
    assert "No space left" in _write_problem(OSError(errno.ENOSPC, "No space left on device"), out)
    assert _write_problem(PermissionError(errno.EACCES, "Permission denied", "/cache/out/.lock"), out)
    assert _write_problem(PermissionError(errno.EACCES, "Permission denied", "/videos/a.txt"), out) is None
    assert _write_problem(OSError(errno.EIO, "Input/output error", "/cache/out/x"), out) is None
