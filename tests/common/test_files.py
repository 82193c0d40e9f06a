"""Everything cogvx writes follows the user's umask, as ``open`` and ``mkdir`` do.

Caches, run folders and the built-in models live on shared storage (multi-node runs, a lab's cache):
a 0600 LoRA or a 0700 model folder breaks the other users and nodes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cogvx import files
from cogvx.files import write_json_atomic
from tests.conftest import CLIPS


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o002])  # group-writable: tells "follows the umask" from a fixed 0644
def test_every_file_of_a_whole_run_follows_the_umask(tmp_path: Path, umask: int):
    # One process does what a user does: build the tiny model, preprocess with validation prompts,
    # train with checkpoints and validation latents, render them, write the report, sample.
    home, cache, run, sample = tmp_path / "home", tmp_path / "cache", tmp_path / "run", tmp_path / "samples"
    script = textwrap.dedent(
        f"""
        import os
        os.umask({umask:#o})
        from cogvx.cli import app
        steps = [
            ["preprocess", "--data", {str(CLIPS)!r}, "--output", {str(cache)!r}, "--model", "tiny", "--workers", "0",
             "--dtype", "fp32", "--validation-prompt", "a red disc"],
            ["train", "--shards", {str(cache)!r}, "--output", {str(run)!r}, "--max-steps", "2", "--workers", "0",
             "--rank", "4", "--checkpoint-every", "1", "--validation-every", "2", "--validation-steps", "2"],
            ["render", {str(run)!r}],
            ["report", {str(run)!r}, "--no-render"],
            ["sample", "--lora", {str(run)!r}, "--prompt", "a red disc", "--steps", "2", "--frames", "5",
             "--output", {str(sample / "lora.mp4")!r}],
        ]
        for argv in steps:
            try:
                app(argv, standalone_mode=False)
            except SystemExit as exit:
                if exit.code:
                    raise
        """
    )
    env = {**os.environ, "COGVX_HOME": str(home), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    wrong = {}
    for root in (home, cache, run, sample):
        for name, mode in _modes(root).items():
            path = root / name
            if path.is_symlink():
                continue
            wanted = (0o777 if path.is_dir() else 0o666) & ~umask
            if mode != wanted:
                wanted_text = f"{wanted:o}"
                wrong[str(path)] = f"{mode:o} (wanted {wanted_text})"
    assert not wrong, wrong
    assert (run / "pytorch_lora_weights.safetensors").is_file()  # the run really wrote what is checked


def test_save_safetensors_is_atomic_and_leaves_nothing_behind_on_failure(tmp_path: Path):
    target = tmp_path / "weights.safetensors"
    files.save_safetensors(target, {"w": torch.ones(3)})
    before = target.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises for a non-tensor
        files.save_safetensors(target, {"w": "not a tensor"})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]


def test_umask_is_read_without_changing_it():
    previous = os.umask(0o027)
    try:
        assert files.umask() == 0o027
        assert files.umask() == 0o027
    finally:
        os.umask(previous)


def test_the_hashing_reader_never_reads_past_its_size():
    import hashlib
    import io

    from cogvx.files import HashingReader as _HashingReader

    reader = _HashingReader(io.BytesIO(b"0123456789"), 4)
    assert (reader.read(3), reader.read(3), reader.read(3)) == (b"012", b"3", b"")
    assert reader.finish() == hashlib.sha256(b"0123").hexdigest()
    whole = _HashingReader(io.BytesIO(b"0123456789"), 6)
    assert whole.read() == b"012345" and whole.finish() == hashlib.sha256(b"012345").hexdigest()
    rest = _HashingReader(io.BytesIO(b"0123456789"), 7)
    assert rest.read(2) == b"01" and rest.finish() == hashlib.sha256(b"0123456").hexdigest()


def test_the_manifest_is_written_to_a_hidden_temporary_beside_it_then_renamed(tmp_path: Path):
    seen: list[list[str]] = []

    class Watched(dict):
        def items(self):  # json.dump (indented) asks for the items while the temporary is open
            seen.append(sorted(os.listdir(tmp_path)))
            return super().items()

    (tmp_path / "manifest.json").write_text("old")
    write_json_atomic(tmp_path / "manifest.json", Watched(a=1))
    (during,) = seen
    assert len(during) == 2 and "manifest.json" in during
    temporary = next(name for name in during if name != "manifest.json")
    assert temporary.startswith(".manifest.json.")
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"] and json.loads(
        (tmp_path / "manifest.json").read_text()
    ) == {"a": 1}
