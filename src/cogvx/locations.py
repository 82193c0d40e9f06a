"""What a location string is: a URL (``s3://``, ``https://``, ...) or a local path; how it is shown.

Torch-free and dependency-free, so the stage configs can tell a URL from a path without loading the cache
package; ``cogvx.shards.store`` (which reads and writes locations) re-exports these.
"""

from __future__ import annotations

import re
from pathlib import Path

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_remote(location: str | Path) -> bool:
    """True for a URL with a scheme other than ``file://`` (``s3://``, ``https://``, ``gs://``, ``memory://`` ...)."""
    if isinstance(location, Path):
        return False
    match = SCHEME.match(str(location))
    return bool(match) and match.group(1).lower() != "file"


def display(location: str | Path) -> str:
    """``location`` without ``user:password@`` or a query string: the one form of a location that cogvx prints
    or writes (messages, tables, progress lines, config files, model cards, manifests)."""
    text = str(location)
    if not SCHEME.match(text):
        return text
    scheme, _, rest = text.partition("?")[0].partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def as_location(value: str | Path) -> str | Path:
    """A URL stays text, anything else becomes a ``Path`` (a Path would fold ``s3://`` into ``s3:/``)."""
    return value if is_remote(value) else Path(value)
