"""Where a cache lives: a local folder or any fsspec URL (``s3://``, ``https://``, ``gs://``, ``memory://``).

Readers and writers of a cache go through one ``Store`` per location, so a folder and a bucket behave
the same: named files directly inside it, opened for streaming, listed, and replaced whole.

Credentials never travel in cogvx's own files: they come from the standard places (``AWS_*``
environment variables, ``~/.aws`` profiles, fsspec's configuration), an S3-compatible endpoint from
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``. A Store keeps the given form of its location privately,
for access only, and shows ``display``'s form (``urls.py`` handles the forms of a location; its names are
imported from here too).

A remote file is never trusted as it streams: ``Store.fetch`` copies one file through a sha256 into a
local temporary file (or the read-through cache of ``cache_dir``, keyed by that sha256) and hands it
out only when its size and hash match what the caller expects.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from cogvx import files
from cogvx.errors import CacheError, CogvxError, ConfigError
from cogvx.locations import (  # noqa: F401 -- their home is cogvx/locations.py; imported from here too
    SCHEME,
    display,
    is_remote,
    join,
    parent_of,
    refuse_misread_parts,
)

CHUNK = 8 << 20  # bytes per read of a file being streamed (one ranged GET on object stores)
FETCH_CHUNK = 32 << 20  # bytes per ranged GET when a whole file is copied: fewer, larger requests
_CLIENT_SETTINGS = ("AWS_", "FSSPEC_")  # environment variables that configure the clients of remote stores
PARTIAL_SUFFIX = ".part"  # a download into the read-through cache, renamed once its sha256 matched


class StoreError(CacheError):
    """A store that cannot be reached, or refuses access: nothing is known about the file asked for."""


class LocalCopyError(StoreError):
    """The local disk that takes a downloaded copy (``cache_dir``, or the temporary folder) cannot be written:
    nothing is known about the file asked for."""


class Mismatch(Exception):
    """``Store.fetch`` found a file whose size or sha256 differs from the expected (``size``: what it found)."""

    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


class Store:
    """One cache location; local folders and fsspec URLs behave the same."""

    location: str  # display form (never holds credentials)
    remote: bool = False

    def url(self, name: str) -> str:
        """Display URL or path of one file in the store, for messages."""
        raise NotImplementedError

    def open(self, name: str, what: str = "File") -> BinaryIO:
        """A streaming read of ``name`` (FileNotFoundError when missing). ``what`` names it in errors."""
        raise NotImplementedError

    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        """The bytes of ``name``; with ``limit``, at most ``limit + 1`` of them (so a caller can tell "too long")."""
        with self.open(name) as f:
            return f.read() if limit is None else f.read(limit + 1)

    def size(self, name: str) -> int | None:
        """Bytes of ``name``, None when missing."""
        raise NotImplementedError

    def list(self) -> list[str]:
        """Names directly inside the store (no recursion), sorted; empty when it does not exist."""
        raise NotImplementedError

    def put_file(self, local: Path, name: str) -> None:
        """Store the file ``local`` as ``name``: readers see the old file or the whole new one, never a part."""
        raise NotImplementedError

    def put_bytes(self, name: str, data: bytes) -> None:
        """Store ``data`` as ``name``, with the same atomicity as ``put_file``."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove ``name``; a missing file is fine."""
        raise NotImplementedError

    def fetch(self, name: str, size: int, sha256: str, *, full: bool = True) -> BinaryIO:
        """``name`` as a local, seekable file at its start, whose size (and, with ``full``, sha256) match.

        FileNotFoundError when missing; ``Mismatch`` when it differs. A remote file is always hashed (it is
        copied through the hash), whatever ``full`` says; ``full=False`` lets a local file pass on its size.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


class LocalStore(Store):
    """A folder on a local (or shared) filesystem. Opens regular files only, without ever blocking."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.location = str(self.folder)

    def path(self, name: str) -> Path:
        return self.folder / name

    def url(self, name: str) -> str:
        return str(self.folder / name)

    def open(self, name: str, what: str = "File") -> BinaryIO:
        return open_regular(self.folder / name, what=what)

    def size(self, name: str) -> int | None:
        try:
            return (self.folder / name).stat().st_size
        except FileNotFoundError:
            return None

    def list(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else []

    def put_file(self, local: Path, name: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with files.atomic_file(self.folder / name) as out, open(local, "rb") as f:
            shutil.copyfileobj(f, out, CHUNK)

    def put_bytes(self, name: str, data: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        files.write_bytes_atomic(self.folder / name, data)

    def delete(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def fetch(self, name: str, size: int, sha256: str, *, full: bool = True) -> BinaryIO:
        return _open_checked(self.folder / name, size, sha256 if full else None, what="Shard")


class FsspecStore(Store):
    """A location any fsspec filesystem reads: ``s3://bucket/prefix``, ``https://host/path/``, ``gs://`` ...

    The filesystem is made on first use in each process (and made again after a fork: an s3fs client and
    its event loop do not survive one), and never taken from fsspec's instance cache, so a change of
    endpoint or credentials between stores is seen. Pickling keeps only the location and ``cache_dir``,
    so DataLoader workers started by fork, forkserver or spawn each build their own.
    """

    remote = True

    def __init__(self, location: str, cache_dir: Path | None = None):
        self._given = str(location)  # may hold credentials: used for access only, never shown
        self.location = display(location).rstrip("/")
        refuse_misread_parts(self._given)
        # The query goes after each file's path (``join``), never into the filesystem's root.
        self._base, mark, query = self._given.partition("?")
        self._query = mark + query
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._fs = None
        self._root = ""
        self._pid = -1

    def __getstate__(self) -> dict:
        # A forkserver's workers inherit the environment of the forkserver, not of the run: the client
        # settings (AWS_*, FSSPEC_*) travel with the store, in memory, to the worker that unpickles it.
        settings = {k: v for k, v in os.environ.items() if k.startswith(_CLIENT_SETTINGS)}
        return {"location": self._given, "cache_dir": self.cache_dir, "settings": settings}

    def __setstate__(self, state: dict) -> None:
        os.environ.update(state.get("settings", {}))
        self.__init__(state["location"], state["cache_dir"])

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._root = _filesystem(self._base, self.location)
            self._pid = os.getpid()
        return self._fs

    def _path(self, name: str) -> str:
        self.fs  # noqa: B018 -- sets self._root
        # The root is the filesystem's own form of the location (``bucket/prefix`` for s3fs): joined as ``join`` does.
        return f"{self._root.rstrip('/')}/{name}{self._query}" if name else f"{self._root}{self._query}"

    def url(self, name: str) -> str:
        return join(self.location, name)

    def open(self, name: str, what: str = "File") -> BinaryIO:
        with self._errors(name):
            self._forget(name)
            # Buffered as a local file is: fsspec's files lack parts of io's API (readline's size limit).
            return io.BufferedReader(self._stream(self._path(name)), CHUNK)

    def _forget(self, name: str) -> None:
        """fsspec answers sizes (and opens files) from listings it cached, which do not show what other
        processes or machines wrote since: the next question about ``name`` goes to the store."""
        self.fs.invalidate_cache(self._path(name))

    def _stream(self, path: str, whole: bool = False) -> BinaryIO:
        """A sequential read of ``path``; ``whole``: it is read to its end in FETCH_CHUNK pieces."""
        if "http" in _protocols(self.fs):  # a plain web server need not answer ranged requests: one GET
            return self.fs.open(path, "rb", block_size=0)
        if whole:  # each read is one ranged GET of its size, with nothing kept around
            return self.fs.open(path, "rb", block_size=FETCH_CHUNK, cache_type="none")
        return self.fs.open(path, "rb", block_size=CHUNK, cache_type="readahead")

    def size(self, name: str) -> int | None:
        with self._errors(name):
            self._forget(name)
            try:
                info = self.fs.info(self._path(name))
            except FileNotFoundError:
                return None
        found = info.get("size")
        return int(found) if found is not None and info.get("type", "file") == "file" else None

    def list(self) -> list[str]:
        with self._errors(""):
            self.fs.invalidate_cache()  # another process may have written since this one last looked
            try:
                entries = self.fs.ls(self._path(""), detail=False)
            except FileNotFoundError:
                return []
        names = {str(entry).rstrip("/").rpartition("/")[2] for entry in entries}
        return sorted(name for name in names if name)

    def put_file(self, local: Path, name: str) -> None:
        # One object PUT: object stores show the old object or the whole new one, never a part.
        with self._errors(name, writing=True):
            self.fs.put_file(str(local), self._path(name))

    def put_bytes(self, name: str, data: bytes) -> None:
        with self._errors(name, writing=True):
            self.fs.pipe_file(self._path(name), data)

    def delete(self, name: str) -> None:
        with self._errors(name, writing=True), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(name))

    def fetch(self, name: str, size: int, sha256: str, *, full: bool = True) -> BinaryIO:
        cached = self._cached(name, sha256)
        if cached is not None:
            try:
                return _open_checked(cached, size, sha256 if full else None, what="Cached copy")
            except (FileNotFoundError, Mismatch):  # gone or damaged since: fetch it again
                with self._keeping():
                    cached.unlink(missing_ok=True)
        with self._errors(name):
            return self._download(name, size, sha256, cached)

    def _cached(self, name: str, sha256: str) -> Path | None:
        if self.cache_dir is None or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            return None
        with self._keeping():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        return self.cache_dir / (sha256 + "".join(Path(name).suffixes))

    def _download(self, name: str, size: int, sha256: str, cached: Path | None) -> BinaryIO:
        """Copy ``name`` through a sha256 into a temporary file; keep it in the cache only once it matched."""
        with self._keeping():
            if cached is not None:
                fd, tmp = tempfile.mkstemp(prefix=f".{cached.name}.", suffix=PARTIAL_SUFFIX, dir=cached.parent)
                out = os.fdopen(fd, "w+b")
            else:
                tmp, out = None, tempfile.TemporaryFile()  # gone when closed, or when this process ends
        try:
            copied = 0
            with self._stream(self._path(name), whole=True) as remote:
                hashed = files.HashingReader(remote, size + 1)  # one byte past the size tells a longer file
                while block := hashed.read(FETCH_CHUNK):
                    with self._keeping():
                        out.write(block)
                    copied += len(block)
                found = hashed.finish()  # read to the end (or the limit) already: nothing more is read
            if copied != size or found != sha256:
                raise Mismatch(copied)
            with self._keeping():
                out.flush()
                if tmp is not None:
                    files.publish(Path(tmp), cached)  # atomic: a reader (another run, a killed one) never sees a part
                    tmp = None
            out.seek(0)
            return out
        except BaseException:
            # Closing flushes what is buffered: on a full disk that fails again, after the error being raised.
            with contextlib.suppress(OSError):
                out.close()
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _keeping(self) -> Iterator[None]:
        """A failure of the local disk that takes a downloaded copy, as one line naming that disk: not the store's."""
        try:
            yield
        except OSError as err:
            if self.cache_dir is None:
                raise LocalCopyError(
                    f"Cannot copy a file of {self.location} into a temporary file in {tempfile.gettempdir()} "
                    f"({err.strerror or err}): free space there, or set TMPDIR to a folder with room."
                ) from err
            folder = self.cache_dir
            why = "it is a file, not a folder" if folder.exists() and not folder.is_dir() else err.strerror or err
            raise LocalCopyError(
                f"Cannot keep verified copies in --cache-dir {folder} ({why}): free space there or make it writable, "
                "give another --cache-dir, or leave --cache-dir out to stream the shards without keeping copies."
            ) from err

    @contextlib.contextmanager
    def _errors(self, name: str, writing: bool = False) -> Iterator[None]:
        """Failures to reach the store as one line naming it and what to check; a missing file stays itself."""
        where = self.url(name) if name else self.location
        doing = "write" if writing else "read"
        try:
            yield
        except FileNotFoundError as err:
            if not _unreachable(err.__cause__):
                raise
            raise StoreError(  # fsspec's http says "not found" for a server it could not reach at all
                f"Cannot {doing} {where}: {self._scrub(_one_line(err.__cause__))}. Check the URL and the network."
            ) from err
        except (Mismatch, CogvxError):
            raise
        except NotImplementedError as err:
            raise CacheError(f"{self.location} cannot be written (its filesystem is read-only for cogvx).") from err
        except _remote_errors() as err:
            raise StoreError(
                f"Cannot {doing} {where}: {self._scrub(_one_line(err))}. Check the URL, the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and, for an S3-compatible store, "
                "AWS_ENDPOINT_URL."
            ) from err

    def _scrub(self, text: str) -> str:
        """``text`` without the secret parts of the given location (a client may quote its URL)."""
        parts = urlsplit(self._given)
        for secret in (parts.password, parts.query, parts.username):
            if secret:
                text = text.replace(secret, "***")
        return text


def open_store(location: str | Path | Store, *, cache_dir: Path | None = None) -> Store:
    """The store of ``location``: a ``LocalStore`` for a path or ``file://`` URL, else an ``FsspecStore``.

    ``cache_dir`` (remote stores only): a local folder where verified files are kept, named by their
    sha256, so a later read of the same file does not download it again.
    """
    if isinstance(location, Store):
        return location
    if is_remote(location):
        return FsspecStore(str(location), cache_dir)
    text = str(location)
    if SCHEME.match(text):  # file://
        text = urlsplit(text).path
    return LocalStore(Path(text))


def open_regular(path: Path, what: str = "File") -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (or a link to one), without ever blocking.

    O_NONBLOCK makes opening a FIFO return at once; fstat on the opened file then refuses FIFOs, devices
    (``/dev/zero``) and folders, so nothing here can hang or read forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise  # the caller says what a missing file means
    except OSError as err:
        raise CacheError(f"{what} {path} cannot be opened ({err.strerror}).") from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CacheError(f"{what} {path} is not a regular file (a device, FIFO or folder); cogvx reads only files.")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _open_checked(path: Path, size: int, sha256: str | None, what: str) -> BinaryIO:
    """``path`` opened as a regular file of ``size`` bytes (and ``sha256``, hashing at most ``size`` bytes)."""
    f = open_regular(path, what=what)
    try:
        found = os.fstat(f.fileno()).st_size
        if found != size or (sha256 is not None and files.sha256_of(f, size) != sha256):
            raise Mismatch(found)
        f.seek(0)
        return f
    except BaseException:
        f.close()
        raise


def _filesystem(given: str, shown: str):
    """The fsspec filesystem and root path of ``given`` (a fresh instance: see ``FsspecStore``)."""
    import fsspec

    scheme = SCHEME.match(given).group(1).lower()
    options: dict = {"skip_instance_cache": True}
    if scheme in ("s3", "s3a"):
        # botocore reads AWS_ENDPOINT_URL(_S3) itself in recent versions; saying it here covers older ones.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    try:
        fs, root = fsspec.core.url_to_fs(given, **options)
    except ImportError as err:
        extra = ' (pip install "cogvx[s3]")' if scheme in ("s3", "s3a") else ""
        raise ConfigError(f"Reading {shown} needs a package that is not installed{extra}: {_one_line(err)}") from err
    except ValueError as err:  # an unknown protocol
        raise ConfigError(f"{shown} is not a location cogvx can read ({_one_line(err)}).") from err
    return fs, root


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _remote_errors() -> tuple[type[BaseException], ...]:
    """What a client raises when a store cannot be reached or refuses access (the ones installed)."""
    kinds: list[type[BaseException]] = [OSError, TimeoutError]
    with contextlib.suppress(ImportError):
        import aiohttp

        kinds.append(aiohttp.ClientError)
    with contextlib.suppress(ImportError):
        import botocore.exceptions

        kinds += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    return tuple(kinds)


def _unreachable(cause: BaseException | None) -> bool:
    """Whether a client's error means "no answer from the server" (not "no such file")."""
    if isinstance(cause, TimeoutError):
        return True
    try:
        import aiohttp
    except ImportError:
        return False
    return isinstance(cause, aiohttp.ClientConnectionError | aiohttp.ServerTimeoutError)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."
