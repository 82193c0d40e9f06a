"""The cache folder as preprocessing sees it: who may write, what a killed run left, and merging ranks.

Readers trust only ``manifest.json``. A single process lists each finished shard in it right away.
Under torchrun each rank lists its finished shards in its own part file (``.parts/shards.rNN.json``)
and rank 0 merges the parts into the manifest at the end -- or, after a kill, at the start of the next
run. Either way a shard is listed only after it is complete and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cogvx import files
from cogvx.errors import CacheError
from cogvx.pipeline import compat, models
from cogvx.shards import Manifest, ShardRecord, paths, write_json_atomic
from cogvx.shards.rebuild import read_indexed_shard
from cogvx.shards.shardfile import check_shard, file_sha256

if TYPE_CHECKING:
    import torch

    # texts -> (their T5 embeddings, which were cut to fit)
    EncodeText = Callable[[list[str]], tuple[torch.Tensor, list[bool]]]

log = logging.getLogger("cogvx.preprocess")


def check_existing(
    folder: Path, producer: dict, params: dict, info: models.ModelInfo, shown: Path | str | None = None
) -> Manifest | None:
    """The cache already in ``folder`` if it was made the same way, None if there is none; else refuse.

    ``shown`` names the cache in messages (a remote cache staged in ``folder``: its URL).

    The manifest is read once: ranks that start together see either no manifest or a whole one (it is
    replaced atomically), never "none" at one look and "there" at the next. A folder that holds shards
    but no manifest is refused: its shards may be all that is left of their videos.
    """
    manifest = _read_manifest(Path(folder))
    if manifest is None:
        shards = sorted(p.name for p in Path(folder).glob("*.tar")) if Path(folder).is_dir() else []
        if shards:
            named = ", ".join(shards[:3]) + (" ..." if len(shards) > 3 else "")
            raise CacheError(
                f"{folder} holds {len(shards)} shard file(s) ({named}) but no {paths.MANIFEST}. Re-create it from "
                f"the shards with `cogvx shards rebuild-manifest {folder}`, or write to another --output folder "
                "(preprocess never deletes shards it did not write)."
            )
        return None
    encoders_differ = bool(compat.encoder_differences(manifest, info))
    if manifest.params != params or encoders_differ:
        changed = sorted(k for k in {*manifest.params, *params} if manifest.params.get(k) != params.get(k))
        if encoders_differ:
            changed.append("model encoders (VAE / text encoder)")
        raise CacheError(
            f"{shown or folder} already holds a cache made with other settings: {', '.join(changed)} differ "
            f"(stored: model {manifest.producer.get('model')}, {manifest.params}; now: model {producer['model']}, "
            f"{params}). Write to a new --output folder, or re-run with the stored settings to add to it."
        )
    return manifest


def _read_manifest(folder: Path) -> Manifest | None:
    path = paths.manifest(folder)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CacheError(f"{path} is not valid JSON ({err}); restore it, or write to another --output.") from err
    return Manifest.from_dict(data, path)


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
    with open(paths.lock(folder), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise CacheError(
                f"Another `cogvx preprocess` is writing to {folder}. Wait for it to finish, or use another --output."
            ) from err
        yield


def save_shard_part(folder: Path, rank: int, records: list[ShardRecord]) -> None:
    write_json_atomic(paths.shard_part(folder, rank), [r.to_dict() for r in records])


def merge_shard_parts(folder: Path, manifest: Manifest) -> int:
    """List the shards that ranks finished (in rank order) in the manifest; returns how many were new."""
    added = 0
    for part in paths.shard_parts(folder):
        for data in json.loads(part.read_text()):
            record = ShardRecord.from_dict(data)
            path = Path(folder) / record.name
            known = any(s.name == record.name for s in manifest.shards)
            if not known and path.is_file() and path.stat().st_size == record.bytes:
                manifest.add_shard(record)
                added += 1
    return added


@dataclass
class Recovery:
    """What preprocessing found in the folder before encoding, and did about it."""

    adopted: list[str] = field(default_factory=list)  # finished shards listed now (parts, or indexed orphans)
    set_aside: list[str] = field(default_factory=list)  # files renamed to NAME.damaged, never deleted
    foreign: list[str] = field(default_factory=list)  # unlisted shards made with other settings: left alone
    dropped: list[ShardRecord] = field(default_factory=list)  # listed shards that were missing or damaged


def cache_header(manifest: Manifest) -> dict:
    """What every shard of this cache records about how it was made (``ShardWriter(header=...)``): the
    manifest's producer (less the data path, which may change between runs), params and schema."""
    producer = {key: value for key, value in manifest.producer.items() if key != "data"}
    header = {"producer": producer, "params": manifest.params, "schema": manifest.schema}
    return json.loads(json.dumps(header, sort_keys=True))  # as a shard stores and returns it


def recover(folder: Path, manifest: Manifest, check_hashes: bool) -> Recovery:
    """Tidy what an interrupted run left, and drop damaged shards (rank 0, before any rank writes).

    Finished shards of a killed distributed run are merged from their part files. A complete shard that
    nothing lists (renamed into place just before a kill) is adopted from its own contents if it was made
    with this cache's header; one that cannot be read is renamed to ``NAME.damaged``; one made with other
    settings is left as it is. Half-written ``.tar.tmp`` files of our writers are deleted:
    they are never complete; so are copies of the manifest or side files a killed run was writing (this
    runs under the folder's lock, so no live writer's file is touched). Listed shards that are missing or
    have the wrong size (with ``check_hashes``, also the wrong sha256) leave the manifest, so their samples
    are encoded again; a damaged file is renamed to ``NAME.damaged``. Nothing else is ever deleted.
    """
    done = Recovery()
    folder = Path(folder)
    header = cache_header(manifest)
    before = {s.name for s in manifest.shards}
    merge_shard_parts(folder, manifest)
    done.adopted += [s.name for s in manifest.shards if s.name not in before]
    for path in sorted(folder.iterdir()):
        if paths.is_temporary_shard(path.name):
            path.unlink()
    for path in paths.stale_temporaries(folder):
        path.unlink(missing_ok=True)
    done.dropped = _drop_damaged(folder, manifest, check_hashes, done)
    listed = {s.name for s in manifest.shards}
    for path in sorted(folder.glob("*.tar")):
        if path.name in listed or not paths.is_shard(path.name):
            continue  # a .tar of someone else's is left alone
        try:
            indexed = read_indexed_shard(folder, path.name)
        except CacheError as err:
            log.warning("%s is not listed and cannot be read (%s); renamed to %s", path, err, paths.DAMAGED_SUFFIX)
            done.set_aside.append(_set_aside(path))
            continue
        if indexed.header != header:
            log.warning("%s is not listed and was made with other settings than this cache; left as it is", path)
            done.foreign.append(path.name)
            continue
        manifest.add_shard(indexed.record)
        done.adopted.append(path.name)
    clear_parts(folder)
    manifest.save(folder)
    return done


def _drop_damaged(folder: Path, manifest: Manifest, check_hashes: bool, done: Recovery) -> list[ShardRecord]:
    dropped = []
    for record in list(manifest.shards):
        path = folder / record.name
        try:
            check_shard(folder, record, full=check_hashes)
            continue
        except CacheError:
            pass  # missing, or not what the manifest says: drop it below
        if path.exists():
            done.set_aside.append(_set_aside(path))
        manifest.shards.remove(record)
        dropped.append(record)
    return dropped


def _set_aside(path: Path) -> str:
    """Rename a shard that cannot be used to ``NAME.damaged`` (``NAME.damaged.N`` if taken); never delete it."""
    target, n = paths.set_aside_name(path), 1
    while target.exists():
        target, n = paths.set_aside_name(path, n), n + 1
    path.rename(target)
    return target.name


def next_shard_index(folder: Path, rank: int) -> int:
    """The first shard number of ``rank`` that no file in the folder uses, set-aside ones included, so a
    new shard never takes the name of one that was damaged."""
    return max(paths.shard_numbers(folder, rank), default=-1) + 1


def remove_temporary(folder: Path, rank: int) -> None:
    """Delete the half-written shards of this rank (after a failure; they are never complete)."""
    for path in paths.temporary_shards(folder, rank):
        path.unlink(missing_ok=True)


def clear_parts(folder: Path, keep_folder: bool = True) -> None:
    parts = paths.parts(folder)
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
    for part in paths.skipped_parts(folder):
        rows += [json.loads(line) for line in part.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda row: row["source"])
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    files.write_bytes_atomic(paths.skipped(folder), text.encode("utf-8"))
    return rows


def close_run(folder: Path, manifest: Manifest) -> None:
    """The end of a run in the folder (rank 0, every rank's parts there): ``skipped.jsonl`` from the ranks'
    lists, the part files gone, the manifest saved."""
    merge_skipped(folder)
    clear_parts(folder, keep_folder=False)
    manifest.save(folder)


def save_validation_prompts(folder: Path, manifest: Manifest, prompts: list[str], encode: EncodeText) -> None:
    """Store the embeddings of validation prompts, and of the empty prompt (for guidance), in the cache.

    Training samples validation latents from these without loading T5. The manifest stops naming the old
    file before it is replaced and names the new one after: a kill in between leaves a cache without
    validation prompts (which training says in one line), never a manifest naming other bytes.
    """
    embeds, _ = encode([*prompts, ""])
    path = paths.validation_prompts(folder)
    tensors = {
        "prompt_embeds": embeds[:-1].contiguous().cpu(),
        "negative_prompt_embeds": embeds[-1:].contiguous().cpu(),
    }
    if manifest.extras.pop(paths.VALIDATION_ENTRY, None) is not None:
        manifest.save(folder)
    files.save_safetensors(path, tensors, metadata={"prompts": json.dumps(prompts)})
    manifest.extras[paths.VALIDATION_ENTRY] = {
        "file": paths.VALIDATION_PROMPTS,
        "prompts": prompts,
        "sha256": file_sha256(path),
    }
    manifest.save(folder)
