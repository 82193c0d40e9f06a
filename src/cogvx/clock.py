"""When a process started, on the clock the kernel counts it by: the zero of every launch timeline.

On Linux a process's start is kept in clock ticks since boot (to 10 ms). psutil's ``create_time`` adds a boot
time rounded to whole seconds, up to a second wrong, which a launch of a few seconds cannot afford.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def boot_seconds() -> float | None:
    """Seconds since boot now (None where the clock does not exist: not Linux)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else None


def started_after_boot(pid: int | str = "self") -> float | None:
    """Seconds after boot at which process ``pid`` started (None where /proc cannot tell: not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime (the name before it may hold spaces)
    except (OSError, ValueError, IndexError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def process_seconds() -> float:
    """Seconds since this process started: the interpreter's start and every import count."""
    now, started = boot_seconds(), started_after_boot()
    if now is not None and started is not None:
        return now - started
    import psutil  # elsewhere: to the second

    return time.time() - psutil.Process().create_time()
