"""The cache folder as preprocessing sees it: who may write, what a killed run left, and merging ranks.

Readers trust only ``manifest.json``. A single process lists each finished shard in it right away.
Under torchrun each rank lists its finished shards in its own part file (``.parts/shards.rNN.json``)
and rank 0 merges the parts into the manifest at the end -- or, after a kill, at the start of the next
run. Either way a shard is listed only after it is complete and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from cogvx.shards import MANIFEST_NAME, CacheError, Manifest, ShardRecord, write_json_atomic
from cogvx.shards.manifest import SKIPPED_NAME

PARTS_DIR = ".parts"
LOCK_NAME = ".lock"
SHARD_NAME = re.compile(r"^shard-r\d+-\d+\.tar$")


def check_existing(folder: Path, producer: dict, params: dict) -> Manifest | None:
    """The cache already in ``folder`` if it was made the same way, None if there is none; else refuse."""
    try:
        manifest = Manifest.load(folder)
    except CacheError:
        if (Path(folder) / MANIFEST_NAME).exists():
            raise
        return None
    stored_encoders = manifest.producer.get("encoders")
    if manifest.params != params or stored_encoders != producer["encoders"]:
        changed = sorted(k for k in {*manifest.params, *params} if manifest.params.get(k) != params.get(k))
        if stored_encoders != producer["encoders"]:
            changed.append("model encoders (VAE / text encoder)")
        raise ValueError(
            f"{folder} already holds a cache made with other settings: {', '.join(changed)} differ "
            f"(stored: model {manifest.producer.get('model')}, {manifest.params}; now: model {producer['model']}, "
            f"{params}). Write to a new --output folder, or re-run with the stored settings to add to it."
        )
    return manifest


@contextlib.contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Refuse a second preprocessing run into the same folder while one is running.

    An flock is released by the kernel when its process dies, even by kill -9, so it never goes stale.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: go on without the guard
        yield
        return
    with open(Path(folder) / LOCK_NAME, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise ValueError(
                f"Another `cogvx preprocess` is writing to {folder}. Wait for it to finish, or use another --output."
            ) from err
        yield


def parts_dir(folder: Path) -> Path:
    return Path(folder) / PARTS_DIR


def shard_part(folder: Path, rank: int) -> Path:
    return parts_dir(folder) / f"shards.r{rank:02d}.json"


def skipped_part(folder: Path, rank: int) -> Path:
    return parts_dir(folder) / f"skipped.r{rank:02d}.jsonl"


def result_part(folder: Path, rank: int) -> Path:
    return parts_dir(folder) / f"result.r{rank:02d}.json"


def save_shard_part(folder: Path, rank: int, records: list[ShardRecord]) -> None:
    write_json_atomic(shard_part(folder, rank), [asdict(r) for r in records])


def merge_shard_parts(folder: Path, manifest: Manifest) -> int:
    """List the shards that ranks finished (in rank order) in the manifest; returns how many were new."""
    added = 0
    for part in sorted(parts_dir(folder).glob("shards.r*.json")):
        for data in json.loads(part.read_text()):
            record = ShardRecord.from_dict(data)
            path = Path(folder) / record.name
            known = any(s.name == record.name for s in manifest.shards)
            if not known and path.is_file() and path.stat().st_size == record.bytes:
                manifest.add_shard(record)
                added += 1
    return added


def recover(folder: Path, manifest: Manifest) -> int:
    """Tidy what an interrupted run left (rank 0, before any rank writes); returns shards adopted.

    Finished shards of a killed distributed run are merged from their part files. Then half-written
    ``.tar.tmp`` files, and shard files that no manifest or part lists (renamed into place just before a
    kill), are deleted: readers never saw them, and their clips are encoded again.
    """
    adopted = merge_shard_parts(folder, manifest)
    listed = {s.name for s in manifest.shards}
    for path in Path(folder).iterdir():
        if path.name.endswith(".tar.tmp") or (SHARD_NAME.match(path.name) and path.name not in listed):
            path.unlink()
    clear_parts(folder)
    manifest.save(folder)
    return adopted


def clear_parts(folder: Path, keep_folder: bool = True) -> None:
    parts = parts_dir(folder)
    if parts.is_dir():
        for path in parts.iterdir():
            path.unlink()
        if not keep_folder:
            parts.rmdir()
    if keep_folder:
        parts.mkdir(exist_ok=True)


def merge_skipped(folder: Path) -> list[dict]:
    """All ranks' skipped inputs of this run, in source order, as ``skipped.jsonl`` (replaced atomically)."""
    rows = []
    for part in sorted(parts_dir(folder).glob("skipped.r*.jsonl")):
        rows += [json.loads(line) for line in part.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda row: row["source"])
    path = Path(folder) / SKIPPED_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)
    return rows
