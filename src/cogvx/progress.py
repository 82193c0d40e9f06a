"""A rich progress bar that does nothing when disabled (other ranks, library use, tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def progress_bar(
    enabled: bool, label: str, total: int, fields: str = "", **initial: float
) -> Iterator[Callable[..., None]]:
    """Yields ``update(completed, **values)``; ``fields`` formats the values, which start at ``initial``."""
    if not enabled:
        yield lambda completed, **values: None
        return
    columns = [
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(fields),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(label, total=total, **initial)
        yield lambda completed, **values: progress.update(task, completed=completed, **values)
