"""Locations (a cache, a run folder): telling a URL from a path, the form of one that may be shown, joining names.

``display`` is the one form of a location that may be printed or written (it drops ``user:password@`` and
any query string); ``join`` puts a file's name before the query string, which a web server reads with
every request. Where a client would read a query string or ``user:password@`` as part of a name
(``s3://``), ``refuse_misread_parts`` refuses the location rather than let a secret become a name.

Dependency-free (no torch), so the stage configs tell a URL from a path without loading the cache package;
``cogvx.shards.store`` re-exports these names.
"""

from __future__ import annotations

import re
from pathlib import Path

from cogvx.errors import ConfigError

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_QUERY_SCHEMES = ("http", "https")  # a query string is part of each request (a signed URL's token)
_USERINFO_SCHEMES = ("http", "https", "ftp", "sftp", "ssh", "smb")  # user:password@ is a login there


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


def join(location: str | Path, name: str) -> str:
    """The location of ``name`` inside ``location``: after its path, before its query string, which a web
    server reads with every request (``https://host/cache/?sig=x`` -> ``https://host/cache/manifest.json?sig=x``).

    A location's first ``?`` starts its query: a ``?`` in a path or a password is written ``%3F`` in a URL.
    """
    text = str(location)
    if not SCHEME.match(text):
        return str(Path(text) / name)
    base, mark, query = text.partition("?")
    return f"{base.rstrip('/')}/{name}{mark}{query}"


def refuse_misread_parts(location: str) -> None:
    """A query string or ``user:password@`` that the location's client would not read as such, but as part of
    a bucket's or an object's name (``s3://bucket/cache?token=x`` names objects ``cache?token=x/...``)."""
    scheme = SCHEME.match(location).group(1).lower()
    authority = location.partition("://")[2].partition("/")[0].partition("?")[0]
    misread = []
    if "?" in location and scheme not in _QUERY_SCHEMES:
        misread.append("no query string (?...)")
    if "@" in authority and scheme not in _USERINFO_SCHEMES:
        misread.append("no user:password@")
    if misread:
        raise ConfigError(
            f"{display(location)} cannot be used: {scheme}:// takes {' and '.join(misread)}, which its client would "
            "read as part of the bucket's or the objects' names. Drop it: credentials come from the standard places "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE for s3://, fsspec's configuration)."
        )


def parent_of(origin: str) -> str:
    """The location holding the file ``origin`` (a path or a URL), for messages."""
    if SCHEME.match(origin):
        return origin.rstrip("/").rpartition("/")[0]
    return str(Path(origin).parent)


def as_location(value: str | Path) -> str | Path:
    """A URL stays text, anything else becomes a ``Path`` (a Path would fold ``s3://`` into ``s3:/``)."""
    return value if is_remote(value) else Path(value)
