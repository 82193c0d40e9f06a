"""The runs ``cogvx compare`` sets side by side, read from their folders (local or any fsspec URL).

Each run's settings, metrics, held-out scores per held-out set and validation videos, and the check
that the runs trained on one cache.
"""

from __future__ import annotations

import base64
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cogvx import runs
from cogvx.errors import RunError
from cogvx.report import find_cache
from cogvx.shards.store import LocalStore, display, is_remote, open_store


@dataclass
class HeldOut:
    """One run's held-out scores on one held-out set."""

    eval_set: str
    rows: dict[int, dict[str, Any]]  # step -> its eval row (the last one written for that step)
    base: float | None  # the base model's score (LoRA off) on this set

    def best(self) -> tuple[int, dict[str, Any]]:
        """The step with the lowest held-out loss (the earliest on a tie) and its row."""
        return min(self.rows.items(), key=lambda item: (item[1]["eval_loss"], item[0]))


@dataclass
class Video:
    """One validation sample of a run: its prompt, and where the browser finds its video (None: latents only)."""

    step: int
    index: int
    prompt: str
    src: str | None


@dataclass
class Run:
    """What the page shows of one run folder."""

    label: str
    location: str  # as shown (a URL without credentials)
    local: Path | None  # the folder, for a local run
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    bad_lines: int
    videos: list[Video]

    @property
    def name(self) -> str:
        if self.local is not None:
            return self.local.resolve().name
        return self.location.rstrip("/").rpartition("/")[2] or self.location

    @property
    def title(self) -> str:
        return f"{self.label} {self.name}"

    def held_out(self) -> list[HeldOut]:
        """Scores per held-out set, in the order the sets first appear in its metrics."""
        sets: dict[str, HeldOut] = {}
        for row in self.metrics:
            if finite_number(row.get("eval_loss")) or finite_number(row.get("eval_base_loss")):
                name = str(row.get("eval_set") or f"unnamed ({self.label})")  # no name: comparable with nothing
                sets.setdefault(name, HeldOut(name, {}, None))
                if finite_number(row.get("eval_loss")):
                    sets[name].rows[int(row["step"])] = row
                if finite_number(row.get("eval_base_loss")):
                    sets[name].base = float(row["eval_base_loss"])
        return [s for s in sets.values() if s.rows or s.base is not None]

    def losses(self) -> dict[int, float]:
        """The training loss of each step (the last line written for it)."""
        return {int(r["step"]): float(r["loss"]) for r in self.metrics if finite_number(r.get("loss"))}


def finite_number(value: Any) -> bool:
    """A metric value a plot can draw: a finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- reading runs anywhere


def _join(location: Path | str, relative: Path | str) -> Path | str:
    if isinstance(location, Path):
        return location / relative
    return f"{location.rstrip('/')}/{PurePosixPath(relative).as_posix()}"


def read_run(location: Path | str, label: str, page_dir: Path) -> Run:
    """A run folder, local or remote: its settings, metrics and validation samples."""
    shown = display(location) if isinstance(location, str) else str(location)
    if isinstance(location, Path):
        if not location.is_dir():
            raise RunError(f"Run folder {location} does not exist.")
        config = runs.read_config(location)
        metrics, bad = runs.read_metrics_counted(location)
    else:
        config, metrics, bad = _read_remote(location)
    if not config and not metrics:
        raise RunError(
            f"{shown} holds neither {runs.CONFIG_JSON} nor {runs.METRICS}: it is not a `cogvx train` run folder."
        )
    videos = _read_videos(location, page_dir)
    return Run(label, shown, location if isinstance(location, Path) else None, config, metrics, bad, videos)


def _read_remote(location: str) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """A remote run's settings and metrics, read by the run folder's own readers from a local copy."""
    store = open_store(location)
    listed = set(store.list())
    with tempfile.TemporaryDirectory(prefix="cogvx-compare-") as tmp:
        copy = Path(tmp)
        for path in (runs.config_json(copy), runs.metrics(copy)):
            if path.name in listed:
                path.write_bytes(store.read_bytes(path.name))
        try:
            config = runs.read_config(copy)
        except RunError as err:  # name the file where it is, not the copy
            raise RunError(str(err).replace(str(runs.config_json(copy)), store.url(runs.CONFIG_JSON))) from err
        metrics, bad = runs.read_metrics_counted(copy)
    return config, metrics, bad


def _read_videos(location: Path | str, page_dir: Path) -> list[Video]:
    """Every validation sample of a run, with its prompt and its video (None when only latents exist)."""
    root = _join(location, runs.validation(Path()))
    found = []
    for name in open_store(root).list():
        step = runs.validation_step_of(name)
        if step is None:
            continue
        folder = open_store(_join(root, name))
        listed = folder.list()
        for sample in listed:
            index = runs.validation_sample_of(sample)
            if index is None:
                continue
            with folder.open(sample, what="Validation sample") as f:
                prompt = runs.read_validation_metadata(f, folder.url(sample)).get("prompt", Path(sample).stem)
            video = runs.validation_video(Path(sample)).name
            src = None
            if video in listed:
                if isinstance(folder, LocalStore):
                    src = Path(os.path.relpath(folder.path(video), page_dir)).as_posix()
                else:
                    src = "data:video/mp4;base64," + base64.b64encode(folder.read_bytes(video)).decode()
            found.append(Video(step, index, prompt, src))
    return sorted(found, key=lambda v: (v.step, v.index))


# --------------------------------------------------------------------------- one cache


def _cache_of(run: Run) -> tuple[str, str | None]:
    """Where a run's cache was (resolved as ``cogvx report`` finds it) and its identity, when recorded."""
    recorded = run.config.get("shards")
    if not recorded:
        raise RunError(
            f"{run.location}: its {runs.CONFIG_JSON} records no cache (shards), so compare cannot tell that the runs "
            "share one; compare runs written by `cogvx train`."
        )
    recorded = str(recorded)
    if is_remote(recorded):
        where = display(recorded).rstrip("/")
    else:
        found = find_cache(run.local, recorded) if run.local is not None else None
        where = str(found.resolve()) if isinstance(found, Path) else os.path.normpath(recorded)
    cache_id = run.config.get(runs.CACHE_ID)
    return where, str(cache_id) if cache_id else None


def check_one_cache(compared: list[Run]) -> None:
    """Refuse runs of different caches: by identity where both record it, else by the recorded location."""
    caches = [_cache_of(run) for run in compared]
    for i, (a, (where_a, id_a)) in enumerate(zip(compared, caches, strict=True)):
        for b, (where_b, id_b) in zip(compared[i + 1 :], caches[i + 1 :], strict=True):
            if id_a and id_b:
                differ, what = id_a != id_b, f"cache_id {id_a[:12]} vs {id_b[:12]}"
            else:
                differ, what = where_a != where_b, f"{where_a} vs {where_b}"
            if differ:
                raise RunError(
                    f"Runs {a.location} and {b.location} trained on different caches ({what}); compare runs of one "
                    "cache (`cogvx report RUN` shows any run alone)."
                )
