"""The run's log: each step's record into metrics.jsonl (main process), the trackers, and the progress bar."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from cogvx import media, runs
from cogvx.progress import progress_bar
from cogvx.train import evaluation
from cogvx.train.config import TrainConfig

# The fields of a step's record that go to the trackers, under ``train/``.
TRACKED = ("loss", "lr", "grad_norm", "samples_per_s", "peak_memory_gb")


class Logbook:
    """Every process holds one and calls it alike; only the main process writes files and draws the bar."""

    def __init__(self, accelerator, cfg: TrainConfig):
        self.accelerator, self.cfg = accelerator, cfg
        self.main = accelerator.is_main_process
        self.tracking = cfg.report_to != "none"
        self._update = None

    def start(self, resolved: dict[str, Any], start_step: int) -> None:
        """Drop metrics past ``start_step`` (a resume rewrites them) and open the trackers with the settings."""
        if self.main:
            runs.keep_metrics_until(self.cfg.output, start_step)
        if self.tracking:
            self.accelerator.init_trackers("cogvx", config={k: str(v) for k, v in resolved.items()})

    def write_base(self, fields: dict[str, Any], start_step: int) -> None:
        """The base model's eval line: step 0 of every eval curve."""
        if self.main:
            runs.append_metrics(self.cfg.output, fields)
            if start_step:  # a resumed run scoring a new eval set: its line goes first, as the steps are in order
                runs.keep_metrics_until(self.cfg.output, start_step)
        if self.tracking:
            self.accelerator.log(evaluation.tracker_scalars(fields), step=0)

    @contextlib.contextmanager
    def progress(self, show: bool, start_step: int) -> Iterator[None]:
        """While training: the bar (``show`` on the main process), its loss smoothed as the card and report do."""
        bar = progress_bar(
            show and self.main,
            "train",
            self.cfg.max_steps,
            f"loss (EMA {media.EMA_WEIGHT:g}) {{task.fields[loss]:.4f}}  {{task.fields[rate]:.2f}} steps/s",
            loss=float("nan"),
            rate=0.0,
        )
        self.smoothed = media.Ema()
        for earlier in runs.read_metrics(self.cfg.output) if self.main else []:
            if math.isfinite(earlier.get("loss", math.nan)):
                self.smoothed.update(earlier["loss"])
        with bar as update:
            update(start_step)
            self._update = update
            try:
                yield
            finally:
                self._update = None

    def write(self, record: dict[str, Any], scored: dict[str, Any]) -> None:
        """One step's ``record``, with the eval fields ``scored`` (if any) also in it."""
        step, loss, seconds = record["step"], record["loss"], record["step_seconds"]
        if self.main:
            runs.append_metrics(self.cfg.output, record)
        if self.tracking:
            logged = {f"train/{k}": record[k] for k in TRACKED} | evaluation.tracker_scalars(scored)
            self.accelerator.log(logged, step=step)
        if self._update is not None:
            self._update(step, loss=self.smoothed.update(loss) if math.isfinite(loss) else loss, rate=1.0 / seconds)
