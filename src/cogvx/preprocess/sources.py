"""Finding (video, caption) pairs in the dataset layouts users already have.

``--data`` is tried as, in this order:

1. a CSV or JSONL metadata file (``--data meta.csv``): one row per clip, video path relative to the file;
2. a folder holding the diffusers script's video-list file (``videos.txt``, renamed with
   ``--video-column``) and its caption file (``prompts.txt``, renamed with ``--caption-column``), one
   entry per line;
3. a folder holding ``metadata.csv`` or ``metadata.jsonl`` (as in 1);
4. a folder of videos, searched recursively (symlinked folders followed), each with a same-name
   ``.txt`` caption.

Whatever is found but cannot be a clip (a folder named like a video, a symlink loop, a broken link, the
same file under a second name) is returned as a skipped row, never dropped silently. Video paths named
by a metadata or video-list file must stay inside the data folder unless the user allows otherwise.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cogvx.errors import InputError

VIDEO_EXTENSIONS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
METADATA_EXTENSIONS = {".csv", ".jsonl"}
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
# Column names tried, in order, when a metadata file is used without --video-column/--caption-column.
VIDEO_COLUMNS = ("video", "file_name", "path", "video_path")
CAPTION_COLUMNS = ("caption", "text", "prompt")
SEED_CAPTIONS, SEED_VIDEOS = "prompts.txt", "videos.txt"
# T5 reads about 226 tokens; a caption beyond this many characters is cut (and marked), never stored whole.
MAX_CAPTION_CHARS = 65536
# Caption notes, as recorded in a sample's metadata.
INVALID_UTF8, CLIPPED = "caption_invalid_utf8", "caption_clipped"


@dataclass(frozen=True)
class Clip:
    path: Path
    caption: str | None  # None: no caption at all (missing .txt); "": an empty one
    source: str  # the path as recorded in the cache: relative to the data root where possible
    # What reading the caption changed: INVALID_UTF8 (undecodable bytes replaced by U+FFFD), CLIPPED.
    caption_notes: tuple[str, ...] = ()


@dataclass
class Sources:
    clips: list[Clip]
    skipped: list[dict] = field(default_factory=list)  # {"source", "reason", "detail"}, as in skipped.jsonl


def discover(root: Path, caption_column: str | None = None, video_column: str | None = None) -> list[Clip]:
    """All clips named by ``root`` in whichever layout it uses (see the module docstring)."""
    return find_sources(root, caption_column, video_column).clips


def find_sources(
    root: Path, caption_column: str | None = None, video_column: str | None = None, allow_outside: bool = False
) -> Sources:
    """The clips named by ``root``, and what was found but cannot be a clip (with its reason)."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"--data {root} does not exist. Point it at a folder of videos with .txt captions.")
    if root.is_file():
        if root.suffix.lower() not in METADATA_EXTENSIONS:
            raise InputError(
                f"--data {root} is a file; point it at the folder that holds the videos, or at a .csv/.jsonl "
                "metadata file with a video and a caption column."
            )
        return _unique(_from_metadata(root, caption_column, video_column, allow_outside))
    line_file = root / (video_column or SEED_VIDEOS)
    if line_file.is_file() and line_file.suffix.lower() not in METADATA_EXTENSIONS:
        return _unique(_from_line_files(root, root / (caption_column or SEED_CAPTIONS), line_file, allow_outside))
    for name in METADATA_NAMES:
        if (root / name).is_file():
            return _unique(_from_metadata(root / name, caption_column, video_column, allow_outside))
    if video_column or caption_column:
        raise InputError(
            f"--video-column/--caption-column were given, but {root} has no file {video_column or SEED_VIDEOS} "
            f"and no {' or '.join(METADATA_NAMES)}. Name an existing video-list file, or leave both options out "
            "for a folder of videos with .txt captions."
        )
    return _unique(_from_folder(root))


def read_caption(data: bytes, limit: int = MAX_CAPTION_CHARS) -> tuple[str, tuple[str, ...]]:
    """A caption from raw bytes: UTF-8, undecodable bytes replaced by U+FFFD, cut at ``limit`` characters.

    Returns the text and its notes (INVALID_UTF8, CLIPPED), so the sample records what was changed.
    """
    text = data.decode("utf-8", "surrogateescape").strip()
    notes = []
    if len(text) > limit:
        text, notes = text[:limit].rstrip(), [CLIPPED]
    if any("\udc80" <= ch <= "\udcff" for ch in text):  # surrogateescape marks the bytes that were not UTF-8
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        notes.insert(0, INVALID_UTF8)
    return text, tuple(notes)


def _read_caption_file(path: Path) -> tuple[str, tuple[str, ...]]:
    with open(path, "rb") as handle:
        data = handle.read(4 * MAX_CAPTION_CHARS + 4)  # enough for the limit in any UTF-8 text
    return read_caption(data)


def _read_utf8(path: Path) -> str:
    """A list or metadata file's text; its paths and columns must be UTF-8, so anything else is refused."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"{path}, line {line} is not UTF-8 text; save the file as UTF-8.") from err


def _check_inside(root: Path, name: str, where: str, allow_outside: bool) -> None:
    if allow_outside:
        return
    real_root = os.path.realpath(root)
    real = os.path.realpath(root / name)
    if os.path.commonpath([real_root, real]) != real_root:
        raise InputError(
            f"{where}: the video path {name!r} leads outside the data folder {root}. Move the video into the "
            "folder (or fix the path), or pass --allow-outside-paths if you trust this file."
        )


def _from_line_files(root: Path, prompts: Path, videos: Path, allow_outside: bool) -> Sources:
    if not prompts.is_file():
        raise InputError(
            f"{videos} lists the videos but the caption file {prompts} is missing (name it with --caption-column)."
        )
    raw = prompts.read_bytes().decode("utf-8", "surrogateescape")  # each caption is checked on its own
    captions = [line for line in (line.strip() for line in raw.splitlines()) if line]
    paths = [line.strip() for line in _read_utf8(videos).splitlines() if line.strip()]
    if len(captions) != len(paths):
        raise InputError(
            f"{prompts} has {len(captions)} captions but {videos} has {len(paths)} videos: "
            "they must pair up line by line."
        )
    for number, name in enumerate(paths, 1):
        _check_inside(root, name, f"{videos}, line {number}", allow_outside)
    clips = []
    for caption, name in zip(captions, paths, strict=True):
        text, notes = read_caption(caption.encode("utf-8", "surrogateescape"))
        clips.append(Clip(root / name, text, name, notes))
    return Sources(clips)


def _from_folder(root: Path) -> Sources:
    found = Sources([])
    for path, problem in _walk(root):
        source = path.relative_to(root).as_posix()
        if problem is not None:
            found.skipped.append({"source": source, "reason": problem[0], "detail": problem[1]})
            continue
        caption_file = path.with_suffix(".txt")
        caption, notes = _read_caption_file(caption_file) if caption_file.is_file() else (None, ())
        found.clips.append(Clip(path, caption, source, notes))
    return found


def _walk(root: Path):
    """(path, None) for every regular video file under ``root``, in path order, and (path, (reason, detail))
    for everything named like a video that is not one. Symlinked folders are followed, each folder once.
    """
    found: list[tuple[Path, tuple[str, str] | None]] = []
    visited: dict[tuple[int, int], Path] = {}

    def visit(folder: Path, ancestors: tuple[tuple[int, int], ...]) -> None:
        info = folder.stat()
        identity = (info.st_dev, info.st_ino)
        if identity in visited:
            first = visited[identity]
            reason = "symlink loop" if identity in ancestors else "duplicate"
            what = "leads back into" if identity in ancestors else "is the same folder as"
            found.append((folder, (reason, f"this folder {what} {first.relative_to(root).as_posix() or '.'}")))
            return
        visited[identity] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            found.append((folder, ("cannot read file", f"cannot list this folder: {err.strerror}")))
            return
        for entry in entries:
            path = Path(entry.path)
            is_video_name = path.suffix.lower() in VIDEO_EXTENSIONS
            try:
                mode = os.stat(path).st_mode
            except OSError as err:  # a dangling or looping symlink (or no permission): say so if it matters
                if is_video_name or entry.is_symlink():
                    found.append((path, _unreachable(path, err)))
                continue
            if stat.S_ISDIR(mode):
                if is_video_name:
                    found.append((path, ("not a file", "a folder named like a video (its contents are searched)")))
                visit(path, (*ancestors, identity))
            elif is_video_name:
                found.append((path, None if stat.S_ISREG(mode) else ("not a file", "not a regular file")))

    visit(root, ())
    found.sort(key=lambda item: item[0].relative_to(root).parts)
    return found


def _unreachable(path: Path, err: OSError) -> tuple[str, str]:
    if err.errno == errno.ELOOP:
        return "symlink loop", f"{path.name} -> {os.readlink(path)} never reaches a file"
    if err.errno == errno.ENOENT and path.is_symlink():
        return "broken link", f"{path.name} -> {os.readlink(path)} does not exist"
    return "cannot read file", err.strerror or str(err)


def _unique(found: Sources) -> Sources:
    """The same file under two names is encoded once: the first name keeps it, the others are skipped."""
    first: dict[tuple[int, int], str] = {}
    clips = []
    for clip in found.clips:
        try:
            info = os.stat(clip.path)
        except OSError:
            clips.append(clip)  # the reader reports why it cannot be read
            continue
        identity = (info.st_dev, info.st_ino)
        if identity in first:
            found.skipped.append(
                {"source": clip.source, "reason": "duplicate", "detail": f"same file as {first[identity]}"}
            )
            continue
        first[identity] = clip.source
        clips.append(clip)
    found.clips = clips
    return found


def _from_metadata(path: Path, caption_column: str | None, video_column: str | None, allow_outside: bool) -> Sources:
    rows = _read_rows(path)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    video = _pick_column(path, columns, video_column, VIDEO_COLUMNS, "video", "--video-column")
    caption = _pick_column(path, columns, caption_column, CAPTION_COLUMNS, "caption", "--caption-column")
    clips = []
    for number, row in enumerate(rows, 1):
        name = row.get(video)
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{path}, row {number}: the {video!r} column is empty; every row must name a video.")
        name = name.strip()
        # Paths are relative to the metadata file, so the folder can be moved as a whole.
        _check_inside(path.parent, name, f"{path}, row {number}", allow_outside)
        text, notes = row.get(caption), ()
        if text is not None:
            text, notes = read_caption(str(text).encode("utf-8", "surrogatepass"))
        clips.append(Clip(path.parent / name, text, name, notes))
    return Sources(clips)


def _read_rows(path: Path) -> list[dict]:
    text = _read_utf8(path)
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}, line {number} is not valid JSON ({err.msg}); fix or remove it.") from err
        if not isinstance(row, dict):
            raise InputError(f"{path}, line {number} is not a JSON object; each line must be one row.")
        rows.append(row)
    return rows


def _pick_column(
    path: Path, columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, flag: str
) -> str:
    if given is not None:
        if given not in columns:
            raise InputError(
                f"{path} has no column {given!r} ({flag}); its columns are: {', '.join(columns) or 'none'}."
            )
        return given
    for name in candidates:
        if name in columns:
            return name
    raise InputError(
        f"{path} has no {what} column (looked for {', '.join(candidates)}); its columns are: "
        f"{', '.join(columns) or 'none'}. Name it with {flag}."
    )
