"""One rank's writing end of preprocessing: samples into shards, finished shards into the cache's record.

A single process lists each finished shard in the manifest at once, so a kill keeps every finished
shard; a Ctrl-C also keeps the shard being written, finished early with fewer samples. Under torchrun
each rank lists them in its own part file instead, which rank 0 merges at the end (or the next run
merges at its start); the same holds for the inputs a rank had to skip.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cogvx.preprocess import cachedir
from cogvx.preprocess.encoding import Encoded, caption_hash, sample_key
from cogvx.preprocess.images import Refreshed
from cogvx.preprocess.sources import CLIPPED, INVALID_UTF8
from cogvx.preprocess.target import CacheTarget, LocalTarget
from cogvx.shards import Manifest, Sample, SampleEntry, ShardRecord, ShardWriter, paths
from cogvx.shards.codec import INDEX
from cogvx.shards.manifest import FIRST_FRAME, IMAGE_MOMENTS


@dataclass(frozen=True)
class CloseShard:
    """Queued behind the last sample: the writing thread finishes and commits the open shard.

    Shards are finished on that thread only, which a Ctrl-C (delivered to the main thread) never cuts
    short: a shard is closed, renamed and listed whole, or not at all.
    """

    ready: None = None  # what the sample sink waits on before writing: nothing


def with_image_latents(sample: Sample, entry: SampleEntry, image_moments, sigma: float, jpeg: bytes) -> None:
    """Add a sample's image latents (``--image-latents``): the tensor, its first frame and what the index says."""
    sample.tensors[IMAGE_MOMENTS] = image_moments
    sample.meta |= {"image_latents": True, "image_noise_sigma": sigma}
    sample.extras[FIRST_FRAME] = jpeg
    entry.carries = (*entry.carries, IMAGE_MOMENTS)


class RankWriter:
    """Writes one rank's encoded clips into its shards and commits each finished shard; logs its skips.

    ``target`` is the cache (a folder: written in place), ``target.folder`` where the shards are written;
    ``on_written`` is called after each clip's samples are written (the timeline's first write).
    """

    def __init__(
        self,
        target: CacheTarget | Path,
        rank: int,
        world: int,
        manifest: Manifest,
        max_bytes: int,
        max_samples: int,
        on_written: Callable[[], None],
    ):
        self.target = LocalTarget(target) if isinstance(target, (Path, str)) else target
        self.folder, self.rank, self.world, self.manifest = self.target.folder, rank, world, manifest
        self.on_written = on_written
        self.records: list[ShardRecord] = []  # this rank's finished shards, as its part file lists them
        self.shards = ShardWriter(
            self.folder,
            paths.shard_prefix(rank),
            self.commit,
            max_bytes=max_bytes,
            max_samples=max_samples,
            first_index=self.target.next_shard_index(rank),
            header=cachedir.cache_header(manifest),  # so a lost manifest can be rebuilt from the shards alone
        )
        self.skipped_log = open(paths.skipped_part(self.folder, rank), "a", encoding="utf-8")

    def commit(self, record: ShardRecord) -> None:
        """List a finished shard: in the manifest at once on one process, else in this rank's part file."""
        self.records.append(record)
        if self.world == 1:
            self.manifest.add_shard(record)
            self.manifest.save(self.folder)
        else:
            cachedir.save_shard_part(self.folder, self.rank, self.records)
        self.target.publish_shard(self.rank, self.records, self.folder / record.name)

    def write(self, item: Encoded | Refreshed | CloseShard) -> None:
        """The samples of one clip (one per window), or of one source written again, into one shard; or,
        given ``CloseShard``, finish and commit the open shard."""
        if isinstance(item, CloseShard):
            self.finish()
        elif isinstance(item, Refreshed):
            self._write_refreshed(item)
        else:
            self._write_encoded(item)

    def _write_refreshed(self, refreshed: Refreshed) -> None:
        """Cached samples again, under their keys, with image latents added and everything else as it was."""
        group = []
        size, mtime_ns = refreshed.stat
        first = refreshed.first
        for row, (old, entry) in enumerate(zip(refreshed.samples, refreshed.entries, strict=True)):
            meta = {name: value for name, value in old.meta.items() if name != INDEX}  # the writer adds it again
            entry = dataclasses.replace(entry, size=size, mtime_ns=mtime_ns)
            sample = Sample(old.key, dict(old.tensors), meta, dict(old.extras))
            with_image_latents(sample, entry, refreshed.image_moments[row], first.sigmas[row], first.jpegs[row])
            group.append((sample, entry))
        self.shards.write_group(group)
        self.on_written()

    def _write_encoded(self, encoded: Encoded) -> None:
        """The samples of one clip (one per window), into one shard."""
        read, prompt = encoded.read, encoded.prompt
        clip = read.clip
        group = []
        for row, ((window, mirrored), indices, moments, strip) in enumerate(
            zip(read.variants, read.windows, encoded.moments, read.strips, strict=True)
        ):
            original, key = sample_key(clip.source, read.content_hash, window, clip.caption), read.key(row)
            entry = SampleEntry(key, clip.source, read.content_hash, read.bucket, read.size, read.mtime_ns)
            entry.caption_hash = caption_hash(clip.caption)
            meta = {
                "source": clip.source,
                "content_hash": read.content_hash,
                "caption": clip.caption,
                "caption_truncated": prompt.truncated,
                INVALID_UTF8: INVALID_UTF8 in clip.caption_notes,
                CLIPPED: CLIPPED in clip.caption_notes,
                "window": window,
                "windows": len({window for window, _ in read.variants}),
                "frame_indices": indices,
                "frames": len(indices),
                "latent_shape": list(moments.shape),
                "bucket": read.bucket,
                **read.info,
            }
            if mirrored:  # the frames were mirrored left to right before encoding
                meta |= {"mirrored": True, "mirror_of": original}
            tensors = {"moments": moments, "prompt_embeds": prompt.embeds}
            sample = Sample(key, tensors, meta, {"jpg": strip})
            if encoded.image_moments is not None:
                first = read.first
                with_image_latents(sample, entry, encoded.image_moments[row], first.sigmas[row], first.jpegs[row])
            group.append((sample, entry))
        self.shards.write_group(group)
        self.on_written()

    def skip(self, source: str, reason: str, detail: str) -> None:
        """Record an input this rank could not use (merged into the cache's skipped list at the end)."""
        row = {"source": source, "reason": reason, "detail": detail}
        self.skipped_log.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.skipped_log.flush()

    def finish(self) -> None:
        """Finish and commit the open shard."""
        self.shards.flush()

    def abandon(self) -> None:
        """Drop the open shard after a failure; its half-written file goes even if the drop fails too."""
        try:
            self.shards.abandon()
        finally:  # a full disk can fail the abandon too
            cachedir.remove_temporary(self.folder, self.rank)

    def close(self) -> None:
        self.skipped_log.close()

    def __enter__(self) -> RankWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
