"""``cogvx train --cache-dir``: the local folder that keeps verified copies of a remote cache's shards.

The cache is served by Python's http.server on localhost; the disk problems are real ones (a file where
the folder should be, a read-only and a full tmpfs mounted for the test), never patched-in errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cogvx.cli import app
from cogvx.shards import Manifest

TRAIN = dict(max_steps=1, rank=4, alpha=4, mixed_precision="fp32", checkpoint_every=0, seed=3, shuffle_buffer=2)


def _train_args(url: str, run: Path, kept: Path) -> list[str]:
    settings = run.parent / f"{run.name}.toml"
    settings.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in TRAIN.items()))
    return ["train", "--shards", url, "--output", str(run), "--cache-dir", str(kept), "--workers", "0",
            "--config", str(settings)]  # fmt: skip


@contextlib.contextmanager
def _tmpfs(folder: Path, options: str):
    """A tmpfs mounted at ``folder`` for the test (root only: the mount fails otherwise, and the test skips)."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a {options} tmpfs cannot be mounted here ({done.stderr.strip()}); it needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _fill(folder: Path) -> None:
    """Write until the filesystem is full: the next write of a copy fails with ENOSPC."""
    with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


@pytest.mark.parametrize("disk", ["a file", "read-only", "full"])
def test_a_cache_dir_that_cannot_be_written_is_one_line_naming_it_not_the_store(
    tiny_cache: Path, http_server, tmp_path: Path, disk: str
):
    url = http_server.serve(tiny_cache, "cache")
    kept = tmp_path / "kept"
    with contextlib.ExitStack() as stack:
        if disk == "a file":
            kept.write_text("not a folder")
        elif disk == "read-only":
            stack.enter_context(_tmpfs(kept, "ro,size=1m"))
        else:
            _fill(stack.enter_context(_tmpfs(kept, "size=64k")))
        out = CliRunner().invoke(app, _train_args(url, tmp_path / "run", kept))
    line = " ".join(out.output.split())
    assert out.exit_code == 1 and "Traceback" not in out.output, out.output
    said = line.partition("error: ")[2]  # after the progress bar's last state
    assert said.startswith(f"Cannot keep verified copies in --cache-dir {kept} ("), line
    assert "leave --cache-dir out" in said and "Check the URL" not in said and "--output" not in said, line
    assert line.count("error:") == 1


def test_verified_copies_follow_the_umask(tiny_cache: Path, http_server, tmp_path: Path):
    """The copies are made with mkstemp (0600); like everything cogvx writes, they end with the umask's modes."""
    url = http_server.serve(tiny_cache, "cache")
    kept = tmp_path / "kept" / "shards"  # both folders made by cogvx
    command = [sys.executable, "-m", "cogvx", *_train_args(url, tmp_path / "run", kept)]
    done = subprocess.run(
        command, capture_output=True, text=True, umask=0o027, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    copies = sorted(kept.iterdir())
    assert copies, "the run kept no copy"
    assert {p.name for p in copies} <= {f"{s.sha256}.tar" for s in Manifest.load(tiny_cache).shards}
    modes = {str(p): stat.S_IMODE(p.stat().st_mode) for p in [kept.parent, kept, *copies]}
    assert modes == {str(kept.parent): 0o750, str(kept): 0o750} | {str(p): 0o640 for p in copies}
