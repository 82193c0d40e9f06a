"""The job plan of a preprocess run: which clips there are, which the cache holds, and which to encode.

Every rank computes the same plan from the same inputs, then takes its share (``jobs[rank::world]``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cogvx.errors import InputError
from cogvx.preprocess.encoding import Job, caption_hash
from cogvx.preprocess.sources import VIDEO_EXTENSIONS, Clip, Sources, find_sources
from cogvx.shards import Manifest, SampleEntry

if TYPE_CHECKING:
    from cogvx.preprocess.run import PreprocessConfig


def find_clips(cfg: PreprocessConfig, data: Path) -> tuple[Sources, list[Clip]]:
    """The videos in ``data`` (``cfg.data``, downloaded if on the hub) and their captions, with ``--id-token``
    in front; refuses when there is none."""
    sources = find_sources(data, cfg.caption_column, cfg.video_column, cfg.allow_outside_paths)
    clips = sources.clips
    if not clips:
        unusable = f"; {len(sources.skipped)} entries named like videos are not usable files" if sources.skipped else ""
        raise InputError(
            f"No videos found under {cfg.data} (looked for {', '.join(sorted(VIDEO_EXTENSIONS))}, "
            f"recursively{unusable})."
        )
    if cfg.id_token:
        clips = [dataclasses.replace(c, caption=f"{cfg.id_token} {c.caption}") if c.caption else c for c in clips]
    return sources, clips


def todo(clips: list[Clip], manifest: Manifest, flip: bool, image_latents: bool) -> tuple[list[Job], list[str]]:
    """Clips the cache does not hold yet, and the sources of those it does. Same answer on every rank.

    A clip whose size, mtime and caption match its cached samples is done without reading it; any other
    clip with cached samples is hashed in a worker and skipped there if its content did not change. With
    ``flip``, a clip the cache holds without mirrored variants is read again for them alone. (Cached
    samples without image latents get them after the clips are encoded: ``add_image_latents``.)
    """
    known: dict[str, SampleEntry] = {}
    mirrored: set[str] = set()
    for entry in manifest.live_entries():
        if entry.mirrored:
            mirrored.add(entry.source)
        else:
            known.setdefault(entry.source, entry)
    jobs, cached = [], []
    for clip in clips:
        entry = known.get(clip.source)
        if entry is None:
            jobs.append(Job(clip, mirrors=flip, image_latents=image_latents))
            continue
        caption = caption_hash(clip.caption) if clip.caption else None
        try:
            stat = os.stat(clip.path)
            unchanged = (stat.st_size, stat.st_mtime_ns) == (entry.size, entry.mtime_ns)
        except OSError:
            unchanged = False
        has_mirrors = clip.source in mirrored
        if unchanged and caption is not None and caption == entry.caption_hash and (has_mirrors or not flip):
            cached.append(clip.source)
        else:  # hashed in a worker: unchanged content needs only what is missing (its mirrors, with flip)
            jobs.append(
                Job(clip, entry.content_hash, entry.caption_hash, flip, has_mirrors, image_latents=image_latents)
            )
    return jobs, cached
