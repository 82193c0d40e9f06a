"""Ctrl-C that is never lost: a SIGINT raises KeyboardInterrupt as usual, and is remembered until delivered.

Python drops an exception raised inside a ``__del__`` (it prints "Exception ignored in ..." and goes on), so a
Ctrl-C that lands while a decoder frees its handle, say, would leave a long run going as if nothing happened.
``catching`` (around a command) remembers every SIGINT until a KeyboardInterrupt leaves the command;
``check``, called by the loops at each clip and step, raises it again when the first one was swallowed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_pending = False  # a SIGINT came and no KeyboardInterrupt has left the command since


def _on_sigint(signum, frame) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def catching() -> Iterator[None]:
    """Around a command, in the main thread: Ctrl-C raises KeyboardInterrupt and is remembered until one leaves."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending = False
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        _pending = False  # delivered (it is leaving now) or never pressed
        signal.signal(signal.SIGINT, previous)


def check() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that was swallowed (inside a ``__del__``) before it reached here."""
    if _pending:
        raise KeyboardInterrupt
