"""``cogvx preprocess --output s3://bucket/prefix``: the local machinery in a staging folder, mirrored to a Store.

Preprocessing writes, checks and merges exactly as it does into a local ``--output`` folder, but into a
private staging folder per rank (``$COGVX_HOME/staging/<hash of the URL>/rNN``), which this module keeps
in step with the remote cache (docs/preprocess.md, "Writing the cache to object storage"):

- at the start, the remote ``manifest.json`` (and, on rank 0, the ``.parts/`` a killed run left) is
  downloaded into the cleared staging folder; shards are never downloaded: the remote ones are the cache;
- each finished shard is announced first in the rank's part record (``.parts/shards.rNN.json``, remote),
  then uploaded whole (one PUT: no reader ever sees a part of it), its size confirmed, and its local copy
  deleted, so staging holds at most the shard being written;
- the manifest is uploaded last, only after every shard it names was confirmed remote with its size;
  then the part records are deleted. A run killed anywhere leaves the old manifest (whole) and part
  records naming at most complete shards or shards that never arrived: the next run lists the first
  (their size matches) and forgets the second, so every sample is listed once.

One run writes a remote cache at a time: rank 0 holds a lock object (``.lock``) that it renews while it
runs; another run refuses while the lock is fresh and its owner alive (docs say what "alive" means).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from cogvx.errors import CacheError
from cogvx.files import sha256_of, write_bytes_atomic
from cogvx.pipeline.models import cache_home
from cogvx.preprocess import cachedir
from cogvx.preprocess.ranks import Ranks
from cogvx.shards import Manifest, ShardRecord, paths
from cogvx.shards.store import Store, display, join, open_store

if TYPE_CHECKING:
    from cogvx.preprocess.cachedir import EncodeText

log = logging.getLogger("cogvx.preprocess")

STAGING = "staging"  # under cogvx's cache home: one folder per remote cache, one per rank inside
LOCK_RENEW_SECONDS = 30.0  # rank 0 rewrites the remote lock this often
LOCK_STALE_SECONDS = 300.0  # a lock not renewed for this long belongs to a run that is gone
_PARALLEL = 16  # concurrent size queries (HEAD requests) when checking many shards


def staging_folder(location: str, rank: int) -> Path:
    """Where ``rank`` stages a remote cache on this machine: the same folder for every run to that URL."""
    digest = hashlib.sha256(display(location).rstrip("/").encode()).hexdigest()[:16]
    return cache_home() / STAGING / digest / f"r{rank:02d}"


class RemoteTarget:
    """The remote cache at ``location`` as one rank of a preprocess run writes it (``target.CacheTarget``).

    Entering locks this rank's staging folder (and on rank 0 the remote cache), clears it and downloads
    the remote manifest and, on rank 0, the remote part records into it.
    """

    def __init__(self, location: str, ranks: Ranks):
        self.location = display(location).rstrip("/")  # for messages: never holds credentials
        self.ranks = ranks
        self.store: Store = open_store(location)
        self.parts: Store = open_store(join(location, paths.PARTS))
        self.staging = staging_folder(location, ranks.rank)
        self.folder = self.staging  # the local machinery runs here
        self.shown: Path | str = self.location
        self.confirmed: set[str] = set()  # shards seen remote with their manifest size in this run
        self.names: list[str] = []  # the remote listing at the start
        self._stack = contextlib.ExitStack()
        self._lock: RemoteLock | None = None

    # -- start ---------------------------------------------------------------------------------------------

    def __enter__(self) -> RemoteTarget:
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
            self._stack.enter_context(cachedir.writer_lock(self.staging))
            if self.ranks.is_main:
                self._lock = self._stack.enter_context(RemoteLock(self.store, self.location))
            self._clear_staging()
            self.names = self.store.list()
            self.pull_manifest()
            if self.ranks.is_main:
                self._pull_parts()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def writing(self, ranks: Ranks) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the locks are held from ``__enter__`` on: staging exists already

    def load_manifest(self) -> Manifest:
        self.pull_manifest()
        return Manifest.load(self.staging)

    def skipped_listing(self) -> Path | str:
        return self.store.url(paths.SKIPPED)

    def _clear_staging(self) -> None:
        """Staging is scratch: what a killed run left here is redone (the remote cache is the record)."""
        for path in self.staging.iterdir():
            if path.name == paths.LOCK:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        paths.parts(self.staging).mkdir()

    def pull_manifest(self) -> None:
        """Put the remote manifest (checked) into staging, or none there if the remote cache has none."""
        local = paths.manifest(self.staging)
        if self.store.size(paths.MANIFEST) is None:
            local.unlink(missing_ok=True)
            shards = [name for name in self.names if paths.is_shard(name)]
            if shards:
                named = ", ".join(shards[:3]) + (" ..." if len(shards) > 3 else "")
                raise CacheError(
                    f"{self.location} holds {len(shards)} shard file(s) ({named}) but no {paths.MANIFEST}. Copy it "
                    f"to a folder and re-create the manifest with `cogvx shards rebuild-manifest DIR`, or write "
                    "to another --output (preprocess never deletes shards it did not write)."
                )
            return
        data = self.store.read_bytes(paths.MANIFEST)
        try:
            Manifest.from_dict(json.loads(data), self.store.url(paths.MANIFEST))
        except json.JSONDecodeError as err:
            raise CacheError(
                f"{self.store.url(paths.MANIFEST)} is not valid JSON ({err}); restore it, or write to another --output."
            ) from err
        write_bytes_atomic(local, data)

    def _pull_parts(self) -> None:
        """The part records a killed run left remote, into staging's ``.parts`` (rank 0, to recover)."""
        for name in self.parts.list():
            (paths.parts(self.staging) / name).write_bytes(self.parts.read_bytes(name))

    # -- recovery (rank 0, before any rank writes) -----------------------------------------------------------

    def recover(self, manifest: Manifest, check_hashes: bool) -> cachedir.Recovery:
        """``cachedir.recover`` for the remote cache: list the shards a killed run finished, drop damaged ones.

        Shards named in part records are listed if they are remote with their recorded size (a part record
        names a shard before it is uploaded, and an upload is whole or absent). Listed shards that are
        missing or of the wrong size (with ``check_hashes``, also the wrong sha256, read as a stream) leave
        the manifest and their samples are encoded again; a damaged object is renamed to ``NAME.damaged``.
        Unlisted shards of no part record are not this run's: left as they are, named in a warning.
        Then the manifest is uploaded and the part records deleted.
        """
        done = cachedir.Recovery()
        folder = self.staging
        before = {s.name for s in manifest.shards}
        self.merge_shard_parts(manifest)
        done.adopted += [s.name for s in manifest.shards if s.name not in before]
        sizes = self._sizes(s.name for s in manifest.shards if s.name not in self.confirmed)
        for record in list(manifest.shards):
            if record.name in self.confirmed:
                continue
            size = sizes.get(record.name)
            damaged = size != record.bytes or (check_hashes and self._sha256(record) != record.sha256)
            if not damaged:
                self.confirmed.add(record.name)
                continue
            manifest.shards.remove(record)
            done.dropped.append(record)
            if size is not None:
                done.set_aside.append(self._set_aside(record.name, folder))
        listed = {s.name for s in manifest.shards} | {r.name for r in done.dropped}
        foreign = [name for name in self.names if paths.is_shard(name) and name not in listed]
        for name in foreign:
            log.warning("%s is not listed in the manifest; left as it is", self.store.url(name))
        done.foreign = foreign
        cachedir.clear_parts(folder)
        manifest.save(folder)
        self._publish_manifest(folder)
        return done

    def _set_aside(self, name: str, folder: Path) -> str:
        """Rename a damaged remote shard to ``NAME.damaged`` (``.damaged.N`` if taken), as ``cachedir`` does
        locally: copied through staging (object stores rename by copying), never deleted before the copy is
        whole. Rare, so the copy's cost does not matter."""
        taken = set(self.names)
        target, n = paths.set_aside_name(Path(name)).name, 1
        while target in taken:
            target, n = paths.set_aside_name(Path(name), n).name, n + 1
        local = paths.temporary(Path(folder) / target)
        with self.store.open(name) as remote_file, open(local, "wb") as out:
            shutil.copyfileobj(remote_file, out, 8 << 20)
        self.store.put_file(local, target)
        local.unlink()
        self.store.delete(name)
        self.names.append(target)
        log.warning("%s does not match the manifest; renamed to %s", self.store.url(name), target)
        return target

    def merge_shard_parts(self, manifest: Manifest) -> int:
        """``cachedir.merge_shard_parts`` against the remote cache: a recorded shard is listed if it is remote
        with its recorded size."""
        records = [
            ShardRecord.from_dict(data, part)
            for part in paths.shard_parts(self.staging)
            for data in json.loads(part.read_text())
        ]
        known = {s.name for s in manifest.shards}
        new = [r for r in records if r.name not in known]
        sizes = self._sizes(r.name for r in new)
        added = 0
        for record in new:
            if sizes.get(record.name) == record.bytes and record.name not in known:
                manifest.add_shard(record)
                self.confirmed.add(record.name)
                known.add(record.name)
                added += 1
        return added

    def _sizes(self, names: Iterable[str]) -> dict[str, int | None]:
        names = list(dict.fromkeys(names))
        if len(names) <= 1:
            return {name: self.store.size(name) for name in names}
        with concurrent.futures.ThreadPoolExecutor(min(_PARALLEL, len(names))) as pool:
            return dict(zip(names, pool.map(self.store.size, names), strict=True))

    def _sha256(self, record: ShardRecord) -> str | None:
        try:
            with self.store.open(record.name) as f:
                return sha256_of(f, record.bytes + 1)
        except FileNotFoundError:
            return None

    def next_shard_index(self, rank: int) -> int:
        """The first shard number of ``rank`` that no remote object nor staged file uses (unlisted and damaged
        ones included)."""
        remote = max(paths.shard_numbers_in(self.names, rank), default=-1) + 1
        return max(cachedir.next_shard_index(self.staging, rank), remote)

    def save_validation_prompts(self, manifest: Manifest, prompts: list[str], encode: EncodeText) -> None:
        """Staged now, uploaded by ``publish`` in the same kill-safe order (``_publish_side_files``)."""
        cachedir.save_validation_prompts(self.staging, manifest, prompts, encode)

    # -- while encoding ----------------------------------------------------------------------------------------

    def publish_shard(self, rank: int, records: list[ShardRecord], path: Path) -> None:
        """Announce ``records`` (this rank's finished shards, ``path`` the last) remotely, then upload it.

        The part record goes first, so a kill between the two leaves a record of a shard that is not
        there (forgotten by the next run), never a shard that nothing names.
        """
        self.parts.put_bytes(paths.shard_part(self.staging, rank).name, _json([asdict(r) for r in records]))
        self.store.put_file(path, path.name)
        size = self._sizes([path.name])[path.name]
        if size != path.stat().st_size:
            raise CacheError(
                f"{self.store.url(path.name)} has {size} bytes after its upload, expected {path.stat().st_size}; "
                "run preprocess again (it uploads the shard again)."
            )
        self.confirmed.add(path.name)
        path.unlink()  # the remote copy is the cache: staging keeps only the shard being written

    # -- the end --------------------------------------------------------------------------------------------------

    def share_parts(self) -> None:
        """Upload this rank's skipped list and counts (a distributed run: rank 0 may be on another machine)."""
        if self.ranks.world == 1:
            return
        rank = self.ranks.rank
        for path in (paths.skipped_part(self.staging, rank), paths.result_part(self.staging, rank)):
            if path.is_file():
                self.parts.put_file(path, path.name)

    def gather_parts(self) -> None:
        """Every rank's part records, skipped lists and counts into staging (rank 0, after they pushed)."""
        if self.ranks.world > 1:
            self._pull_parts()

    def publish(self, manifest: Manifest) -> None:
        """Close the run in staging as a local one closes, then publish it (rank 0): side files, then the
        manifest, last, only after every shard it names was confirmed remote with its size."""
        folder = self.staging
        cachedir.close_run(folder, manifest)
        unconfirmed = [s.name for s in manifest.shards if s.name not in self.confirmed]
        sizes = self._sizes(unconfirmed)
        for record in manifest.shards:
            if record.name in unconfirmed and sizes.get(record.name) != record.bytes:
                raise CacheError(
                    f"{self.store.url(record.name)} is listed but not in the remote cache with its "
                    f"{record.bytes} bytes; the manifest was not uploaded. Run preprocess again."
                )
        self.confirmed.update(unconfirmed)
        if paths.skipped(folder).is_file():
            self.store.put_file(paths.skipped(folder), paths.SKIPPED)
        self._publish_side_files(folder, manifest)
        self._publish_manifest(folder)

    def _publish_side_files(self, folder: Path, manifest: Manifest) -> None:
        """Upload the side files this run wrote (the validation prompts) where the remote ones differ.

        The manifest names each with its sha256, and an object store replaces one object at a time: the
        manifest without their entries goes first, then the files, then (``publish``) the whole manifest. A run
        killed in between leaves a manifest whose every named file matches, at worst naming none of them.
        """
        changed: dict[str, Path] = {}
        for label, extra in manifest.extras.items():
            if not isinstance(extra, dict) or not extra.get("file") or not extra.get("sha256"):
                continue
            local = Path(folder) / extra["file"]
            if local.is_file() and self._remote_sha256(extra["file"]) != extra["sha256"]:
                changed[label] = local
        if not changed:
            return
        trimmed = manifest.to_dict()
        trimmed["extras"] = {label: extra for label, extra in trimmed["extras"].items() if label not in changed}
        self.store.put_bytes(paths.MANIFEST, _json(trimmed))
        for local in changed.values():
            self.store.put_file(local, local.name)

    def _remote_sha256(self, name: str) -> str | None:
        try:
            with self.store.open(name) as f:
                return sha256_of(f)
        except FileNotFoundError:
            return None

    def _publish_manifest(self, folder: Path) -> None:
        self.store.put_file(paths.manifest(folder), paths.MANIFEST)
        for name in self.parts.list():  # only once the manifest lists what they recorded
            self.parts.delete(name)


def _json(data) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode()


class RemoteLock:
    """``.lock`` in a remote cache: which run writes it (host, pid, token), renewed while it runs.

    Object stores offer no flock. A fresh lock of a live run refuses a second run. A lock is stale when it
    was not renewed for ``LOCK_STALE_SECONDS``, or when it names this host and a process that is gone
    (kill -9): a run that finds a stale lock takes it over. Two runs starting within the same second on
    two machines can both take a missing lock; each re-reads it after writing and the one whose token is
    not there stops, so at most one goes on (object stores show the last PUT).
    """

    def __init__(self, store: Store, location: str):
        self.store, self.location = store, location
        self.token = uuid.uuid4().hex
        self.url = store.url(paths.LOCK)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.time()

    def _content(self) -> bytes:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token}
        return _json({**owner, "started": self.started, "renewed": time.time()})

    def __enter__(self) -> RemoteLock:
        held = self._read()
        if held is not None and not _stale(held):
            raise CacheError(
                f"Another `cogvx preprocess` (host {held.get('host')}, pid {held.get('pid')}) is writing to "
                f"{self.location}: {self.url} was renewed {time.time() - float(held.get('renewed', 0)):.0f} s ago. "
                f"Wait for it to finish, or use another --output; if no run is writing there, delete {self.url}."
            )
        self.store.put_bytes(paths.LOCK, self._content())
        time.sleep(0.2)  # let a PUT of a run that started with this one land before looking
        mine = self._read()
        if mine is None or mine.get("token") != self.token:
            raise CacheError(
                f"Another `cogvx preprocess` took {self.url} at the same moment; it writes {self.location}. "
                "Wait for it to finish, or use another --output."
            )
        self._thread = threading.Thread(target=self._renew, name="cogvx-remote-lock", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> dict | None:
        try:
            held = json.loads(self.store.read_bytes(paths.LOCK))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # unreadable: stale unless renewed (it never is)
        return held if isinstance(held, dict) else {}

    def _renew(self) -> None:
        while not self._stop.wait(LOCK_RENEW_SECONDS):
            with contextlib.suppress(Exception):  # a missed renewal is retried; the run goes on
                self.store.put_bytes(paths.LOCK, self._content())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Exception):  # the lock goes stale by itself if this fails
            held = self._read()
            if held is not None and held.get("token") == self.token:
                self.store.delete(paths.LOCK)


def _stale(held: dict) -> bool:
    try:
        renewed = float(held.get("renewed", 0))
    except (TypeError, ValueError):
        return True
    if time.time() - renewed > LOCK_STALE_SECONDS:
        return True
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        return not _alive(held["pid"])
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
