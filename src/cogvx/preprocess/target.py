"""Where a preprocess run writes its cache: one protocol, a local folder or an object store behind it.

``open_target`` chooses once, from ``--output``: a path gives a ``LocalTarget`` (the folder is the cache),
a URL a ``remote.RemoteTarget`` (a private staging folder per rank, mirrored to the store). Both run the
same local machinery in ``target.folder`` (shards written as ``.tar.tmp`` and renamed, part records,
merging); the target adds what differs: locks, recovery, publishing. The stages call the protocol and
never ask which target they hold (``tests/cli/test_structure.py`` checks it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cogvx.preprocess import cachedir
from cogvx.preprocess.ranks import Ranks
from cogvx.preprocess.remote import RemoteTarget
from cogvx.shards import Manifest, ShardRecord, paths, store

if TYPE_CHECKING:
    from cogvx.preprocess.cachedir import EncodeText


class CacheTarget(Protocol):
    """The cache one rank of a preprocess run writes, as the stages see it (a context manager: entering
    takes the locks held for the whole run)."""

    folder: Path  # where this rank writes shards, part records and the manifest it saves
    shown: Path | str  # the cache as messages name it (a URL never holds credentials)

    def __enter__(self) -> CacheTarget: ...

    def __exit__(self, *exc: object) -> None: ...

    def writing(self, ranks: Ranks) -> AbstractContextManager[None]:
        """Held while ranks write: ``folder`` exists and no second run writes the cache."""
        ...

    def recover(self, manifest: Manifest, check_hashes: bool) -> cachedir.Recovery:
        """List what a killed run finished, drop damaged shards, publish the manifest (rank 0, first)."""
        ...

    def load_manifest(self) -> Manifest:
        """The manifest rank 0 left after ``recover`` (the other ranks, after the barrier)."""
        ...

    def next_shard_index(self, rank: int) -> int:
        """The first shard number of ``rank`` that no shard of the cache (damaged ones included) uses."""
        ...

    def publish_shard(self, rank: int, records: list[ShardRecord], path: Path) -> None:
        """Make the finished shard at ``path`` part of the cache (``records``: this rank's, ``path`` the last)."""
        ...

    def save_validation_prompts(self, manifest: Manifest, prompts: list[str], encode: EncodeText) -> None:
        """Store the validation prompts' embeddings; the manifest never names a file of other bytes."""
        ...

    def share_parts(self) -> None:
        """Put this rank's skipped list and counts where rank 0 reads them (each rank, at the end)."""
        ...

    def gather_parts(self) -> None:
        """Every rank's part records, skipped lists and counts into ``folder`` (rank 0, at the end)."""
        ...

    def merge_shard_parts(self, manifest: Manifest) -> int:
        """List the shards the ranks finished (rank 0, at the end); returns how many were new."""
        ...

    def publish(self, manifest: Manifest) -> None:
        """Close the run (rank 0): ``skipped.jsonl``, the side files, then the manifest, last."""
        ...

    def skipped_listing(self) -> Path | str:
        """Where the cache lists the inputs that were skipped, as messages name it."""
        ...


class LocalTarget:
    """A cache folder on this machine: it is written in place, and each step is its own publication."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.shown: Path | str = self.folder

    def __enter__(self) -> LocalTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @contextlib.contextmanager
    def writing(self, ranks: Ranks) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with cachedir.writer_lock(self.folder) if ranks.is_main else contextlib.nullcontext():
            yield

    def recover(self, manifest: Manifest, check_hashes: bool) -> cachedir.Recovery:
        return cachedir.recover(self.folder, manifest, check_hashes)

    def load_manifest(self) -> Manifest:
        return Manifest.load(self.folder)

    def next_shard_index(self, rank: int) -> int:
        return cachedir.next_shard_index(self.folder, rank)

    def publish_shard(self, rank: int, records: list[ShardRecord], path: Path) -> None:
        pass  # renamed into place and listed by the writer: the folder is the cache

    def save_validation_prompts(self, manifest: Manifest, prompts: list[str], encode: EncodeText) -> None:
        cachedir.save_validation_prompts(self.folder, manifest, prompts, encode)

    def share_parts(self) -> None:
        pass  # every rank writes its part files into the cache folder itself

    def gather_parts(self) -> None:
        pass

    def merge_shard_parts(self, manifest: Manifest) -> int:
        return cachedir.merge_shard_parts(self.folder, manifest)

    def publish(self, manifest: Manifest) -> None:
        cachedir.close_run(self.folder, manifest)

    def skipped_listing(self) -> Path | str:
        return paths.skipped(self.folder)


def open_target(output: Path | str, ranks: Ranks) -> CacheTarget:
    """The target ``--output`` names, for this rank: the one place that tells a URL from a folder."""
    if store.is_remote(output):
        return RemoteTarget(str(output), ranks)
    return LocalTarget(output)
