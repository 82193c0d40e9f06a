"""Writing files the way users expect on shared storage: atomically, and with the user's umask.

Some writers make private files: ``safetensors.torch.save_file`` creates 0600 files and
``tempfile.mkdtemp``/``mkstemp`` 0700/0600 ones. Runs, caches and the built-in models live on shared
filesystems (multi-node training, a lab's cache), so everything cogvx writes follows the umask, as
``open()`` and ``mkdir()`` do: 0644 files and 0755 folders under the usual 022.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


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


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to a hidden sibling, flush it to disk, and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """``safetensors`` file written atomically, with the umask's mode (``save_file`` would make it 0600)."""
    from safetensors.torch import save

    return write_bytes_atomic(path, save(tensors, metadata=metadata))
