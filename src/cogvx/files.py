"""Files the way users expect on shared storage: written atomically with the user's umask, hashed in bounded reads.

Some writers make private files: ``safetensors.torch.save_file`` creates 0600 files and
``tempfile.mkdtemp``/``mkstemp`` 0700/0600 ones. Runs, caches and the built-in models live on shared
filesystems (multi-node training, a lab's cache), so everything cogvx writes follows the umask, as
``open()`` and ``mkdir()`` do: 0644 files and 0755 folders under the usual 022.

Every file cogvx replaces is written by ``atomic_file`` (or renamed into place by ``publish``): readers see
the old file or the whole new one, never a part, even after a crash. Every sha256 of a file or stream is
taken by ``HashingReader``, which never reads more than it is told to.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

TEMPORARY_SUFFIX = ".tmp"  # a file being written beside its final name, renamed into place when complete
HASH_CHUNK = 8 << 20  # bytes per read while hashing: memory stays bounded whatever the file's size


def umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)  # no /proc (macOS): set and restore at once
    os.umask(current)
    return current


def follow_umask(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes ``open``/``mkdir`` would have."""
    mask = umask()
    path = Path(path)
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for target in targets:
        if target.is_symlink():
            continue
        os.chmod(target, (0o777 if target.is_dir() else 0o666) & ~mask)


def publish(written: Path, path: Path) -> Path:
    """Rename the complete file ``written`` to ``path``: flushed to disk first, with the umask's mode."""
    with open(written, "rb+") as f:
        os.fsync(f.fileno())
    return _rename(Path(written), Path(path))


def _rename(written: Path, path: Path) -> Path:
    follow_umask(written)  # mkstemp makes it private; what cogvx writes is shared like the files beside it
    os.replace(written, path)
    return path


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO]:
    """A hidden temporary beside ``path`` to write; flushed to disk and renamed into place once the block ends.

    Its name is unique (``.NAME.XXXX.tmp``), so concurrent writers never share one; on any failure it is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _rename(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to a hidden sibling, flush it to disk, and rename it into place."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as indented, key-sorted JSON, written atomically; missing folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def save_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """``safetensors`` file written atomically, with the umask's mode (``save_file`` would make it 0600)."""
    from safetensors.torch import save

    return write_bytes_atomic(path, save(tensors, metadata=metadata))


class HashingReader(io.RawIOBase):
    """Reads ``f`` through a sha256, never past ``limit`` bytes (None: to its end)."""

    def __init__(self, f: BinaryIO, limit: int | None = None):
        self.f, self.left, self.digest = f, limit, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left is not None:
            n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        if self.left is not None:
            self.left -= len(data)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        """Hash what is left (up to the limit), in bounded reads; the hex sha256 of everything read."""
        while self.left != 0 and self.read(HASH_CHUNK if self.left is None else min(HASH_CHUNK, self.left)):
            pass
        return self.digest.hexdigest()


def sha256_of(f: BinaryIO, limit: int | None = None) -> str:
    """sha256 of what ``f`` holds from its position on (at most ``limit`` bytes)."""
    return HashingReader(f, limit).finish()


def fsync_folder(path: Path) -> None:
    """Flush a folder's entries to disk: a file renamed into it, or a folder renamed into place, survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
