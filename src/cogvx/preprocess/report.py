"""What a preprocess run did, counted, said along the way and summed up at the end (one rank's and all ranks').

Rank 0 adds the other ranks' counts (``RankCounts``, a JSON part file each) into the run's
``PreprocessResult``, warns about what was found or cut, and prints the summary table.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cogvx import clock
from cogvx.preprocess.cachedir import Recovery
from cogvx.preprocess.sources import INVALID_UTF8, Sources
from cogvx.shards import Manifest, paths, store, write_json_atomic

log = logging.getLogger("cogvx.preprocess")


@dataclass
class PreprocessResult:
    """What this rank did; on rank 0 at the end, what the whole run did (``add``)."""

    encoded: int = 0  # clips encoded by this run
    samples: int = 0  # samples written by this run (one per window)
    already_cached: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated_captions: int = 0
    truncated_sources: list[str] = field(default_factory=list)
    images_added: int = 0  # cached samples written again with image latents added (--image-latents)
    images_missing: int = 0  # with image latents: samples in the cache still without them at the end
    # Listed shards found missing or damaged at the start (dropped from the manifest, their samples
    # encoded again), and the sources of their samples that no longer exist in the data: lost.
    dropped_shards: list[str] = field(default_factory=list)
    lost_sources: list[str] = field(default_factory=list)
    seconds: float = 0.0  # from the run's start ("imports") to its end
    # The VAE's encoder compiled (``--compile``; by default when it pays for this rank's clips), and why.
    vae_compiled: bool = False
    vae_compile_why: str = ""
    # Seconds from the process's start (``started``) to each step of the run's start, in the order they
    # usually come: the run begins, its imports done ("imports"); the clips found, their captions read
    # ("clips_found"); the model's configs read ("configs"); the
    # decoding workers started ("loader"); the first clip decoded, by a worker meanwhile ("first_decoded");
    # the VAE on the device ("vae"); T5 too ("t5", "encoders"); the first prompt embedded ("first_prompt");
    # the first VAE call made, its kernels queued ("first_latent"); the first clip's samples written
    # ("first_written"); every sample written ("encoded"). Across ranks: the slowest.
    timeline: dict[str, float] = field(default_factory=dict)
    ranks: int = 1
    manifest: Manifest | None = None
    started: float = field(default_factory=lambda: time.time() - clock.process_seconds())  # the process's start

    def mark(self, name: str) -> None:
        """Put ``name`` on the timeline at now, unless it is there already."""
        self.timeline.setdefault(name, time.time() - self.started)

    def counts(self) -> dict:
        """Everything but the manifest, as JSON values."""
        data = {k: v for k, v in asdict(self).items() if k not in ("manifest", "started")}
        data["skipped"] = dict(self.skipped)
        return data

    def share(self) -> RankCounts:
        """What this rank did, for rank 0 to add up."""
        return RankCounts(
            encoded=self.encoded,
            samples=self.samples,
            already_cached=self.already_cached,
            skipped=dict(self.skipped),
            truncated_captions=self.truncated_captions,
            truncated_sources=list(self.truncated_sources),
            timeline=dict(self.timeline),
            images_added=self.images_added,
        )

    def add(self, other: RankCounts) -> None:
        self.encoded += other.encoded
        self.samples += other.samples
        self.already_cached += other.already_cached
        self.skipped.update(other.skipped)
        self.truncated_captions += other.truncated_captions
        self.truncated_sources += other.truncated_sources
        self.images_added += other.images_added
        for name, seconds in other.timeline.items():
            self.timeline[name] = max(seconds, self.timeline.get(name, 0.0))


@dataclass
class RankCounts:
    """One rank's share of a distributed run, as its result part file holds it (JSON)."""

    encoded: int
    samples: int
    already_cached: int
    skipped: dict[str, int]
    truncated_captions: int
    truncated_sources: list[str]
    timeline: dict[str, float]
    images_added: int = 0

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> RankCounts:
        return cls(**json.loads(Path(path).read_text()))


def report_found(
    folder: Path, data: Path | str, sources: Sources, recovery: Recovery, result: PreprocessResult
) -> None:
    """Say what was found before encoding (rank 0): unusable entries, odd captions, and shards that were
    repaired; the unusable entries go to rank 0's skipped list in ``folder``."""
    with open(paths.skipped_part(folder, 0), "a", encoding="utf-8") as skipped_log:
        for row in sources.skipped:
            skipped_log.write(json.dumps(row, ensure_ascii=False) + "\n")
            result.skipped[row["reason"]] += 1
    invalid = [clip.source for clip in sources.clips if INVALID_UTF8 in clip.caption_notes]
    if invalid:
        log.warning(
            "%d caption(s) are not valid UTF-8; their undecodable bytes were replaced by U+FFFD "
            "(marked caption_invalid_utf8 in the samples): %s",
            len(invalid),
            ", ".join(invalid[:5]) + (" ..." if len(invalid) > 5 else ""),
        )
    if recovery.adopted:
        log.warning(
            "Listed %d finished shard(s) an interrupted run left: %s",
            len(recovery.adopted),
            ", ".join(recovery.adopted),
        )
    if recovery.dropped:
        result.dropped_shards = [record.name for record in recovery.dropped]
        held = {entry.source for record in recovery.dropped for entry in record.live_samples()}
        result.lost_sources = sorted(held - {clip.source for clip in sources.clips})
        log.warning(
            "%d listed shard(s) were missing or damaged and left the manifest: %s; their %d source(s) are "
            "encoded again where they still exist.",
            len(recovery.dropped),
            ", ".join(result.dropped_shards),
            len(held),
        )
    if result.lost_sources:
        log.warning(
            "%d sample source(s) of those shards are no longer in %s, so their samples are lost: %s",
            len(result.lost_sources),
            data,
            ", ".join(result.lost_sources[:20]) + (" ..." if len(result.lost_sources) > 20 else ""),
        )


def report_end(
    result: PreprocessResult,
    max_text_tokens: int,
    image_latents: bool,
    data: Path | str,
    shown: Path | str,
    skipped: Path | str,
) -> None:
    """Warn about what the run leaves short (rank 0): captions cut to fit, samples still without image latents.

    ``shown`` and ``skipped`` name the cache and its list of skipped inputs as messages name them.
    """
    manifest = result.manifest
    if result.truncated_captions:
        log.warning(
            "%d caption(s) were longer than %d tokens and were cut to fit: %s",
            result.truncated_captions,
            max_text_tokens,
            ", ".join(result.truncated_sources[:5]) + (" ..." if result.truncated_captions > 5 else ""),
        )
    if image_latents:
        result.images_missing = manifest.sample_count - manifest.image_latent_count
        if result.images_missing:
            log.warning(
                "%d sample(s) in %s still have no image latents: their videos are not in %s, or their first "
                "frames could not be read (reasons in %s).",
                result.images_missing,
                shown,
                data,
                skipped,
            )


def print_summary(result: PreprocessResult, output: Path | str) -> None:
    """The summary table of a run, on stderr; ``output``: the cache as messages name it."""
    from rich.console import Console
    from rich.table import Table

    manifest = result.manifest
    table = Table(title="preprocess summary", show_header=False)
    table.add_row("encoded now", f"{result.encoded} clips, {result.samples} samples")
    table.add_row("already in cache", str(result.already_cached))
    if result.images_added:
        table.add_row("image latents added", f"{result.images_added} cached samples (no video encoded again)")
    if manifest.image_latent_count:
        missing = f", {result.images_missing} without" if result.images_missing else ""
        table.add_row("samples with image latents", f"{manifest.image_latent_count}{missing}")
    skipped = sum(result.skipped.values())
    listed = store.join(output, paths.SKIPPED)
    table.add_row("skipped", f"{skipped} (listed in {listed})" if skipped else "0")
    for reason, count in result.skipped.most_common():
        table.add_row(f"  {reason}", str(count))
    if result.truncated_captions:
        length = manifest.producer["encoders"]["max_text_tokens"]
        table.add_row(f"captions cut at {length} tokens", str(result.truncated_captions))
    if result.dropped_shards:
        table.add_row("damaged shards dropped", f"{len(result.dropped_shards)}: {', '.join(result.dropped_shards)}")
    if result.lost_sources:
        table.add_row("sources lost (gone from the data)", str(len(result.lost_sources)))
    table.add_row("samples in cache", str(manifest.sample_count))
    for bucket, count in manifest.bucket_counts().items():
        table.add_row(f"  bucket {bucket}", str(count))
    table.add_row("size on disk", f"{manifest.total_bytes / 2**20:.1f} MiB in {len(manifest.shards)} shards")
    table.add_row("time", _timing(result))
    table.add_row("VAE encoder", f"{'compiled' if result.vae_compiled else 'not compiled'} ({result.vae_compile_why})")
    table.add_row("cache", store.display(output))
    Console(stderr=True).print(table)


def _timing(result: PreprocessResult) -> str:
    """E.g. "95.2 s on 2 ranks: 21.0 s loading the encoders, then 70.1 clips/min"."""
    text = f"{result.seconds:.1f} s" + (f" on {result.ranks} ranks" if result.ranks > 1 else "")
    began, loaded, encoded = (result.timeline.get(name) for name in ("imports", "encoders", "encoded"))
    if began is None or loaded is None or encoded is None:
        return text
    text += f": {loaded - began:.1f} s loading the encoders"
    if result.encoded and encoded > loaded:
        text += f", then {60 * result.encoded / (encoded - loaded):.1f} clips/min"
    return text
