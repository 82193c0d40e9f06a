"""Finding (video, caption) pairs in the dataset layouts users already have.

Three layouts, tried in this order for ``--data``:

1. a CSV or JSONL metadata file (``--data meta.csv``), or a folder holding ``metadata.csv`` /
   ``metadata.jsonl``: one row per clip, video path relative to the file;
2. the diffusers script's layout: a folder with a caption file and a video-list file, one entry per
   line (``prompts.txt`` / ``videos.txt``, renamed with ``--caption-column`` / ``--video-column``);
3. a folder of videos, searched recursively, each with a same-name ``.txt`` caption.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
METADATA_EXTENSIONS = {".csv", ".jsonl"}
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
# Column names tried, in order, when a metadata file is used without --video-column/--caption-column.
VIDEO_COLUMNS = ("video", "file_name", "path", "video_path")
CAPTION_COLUMNS = ("caption", "text", "prompt")
SEED_CAPTIONS, SEED_VIDEOS = "prompts.txt", "videos.txt"


@dataclass(frozen=True)
class Clip:
    path: Path
    caption: str | None  # None: no caption at all (missing .txt); "": an empty one
    source: str  # the path as recorded in the cache: relative to the data root where possible


def discover(root: Path, caption_column: str | None = None, video_column: str | None = None) -> list[Clip]:
    """All clips named by ``root`` in whichever layout it uses (see the module docstring)."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"--data {root} does not exist. Point it at a folder of videos with .txt captions.")
    if root.is_file():
        if root.suffix.lower() not in METADATA_EXTENSIONS:
            raise ValueError(
                f"--data {root} is a file; point it at the folder that holds the videos, or at a .csv/.jsonl "
                "metadata file with a video and a caption column."
            )
        return _from_metadata(root, caption_column, video_column)
    line_file = root / (video_column or SEED_VIDEOS)
    if line_file.is_file() and line_file.suffix.lower() not in METADATA_EXTENSIONS:
        return _from_line_files(root, root / (caption_column or SEED_CAPTIONS), line_file)
    for name in METADATA_NAMES:
        if (root / name).is_file():
            return _from_metadata(root / name, caption_column, video_column)
    if video_column or caption_column:
        raise ValueError(
            f"--video-column/--caption-column were given, but {root} has no file {video_column or SEED_VIDEOS} "
            f"and no {' or '.join(METADATA_NAMES)}. Name an existing video-list file, or leave both options out "
            "for a folder of videos with .txt captions."
        )
    return _from_folder(root)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _from_line_files(root: Path, prompts: Path, videos: Path) -> list[Clip]:
    if not prompts.is_file():
        raise ValueError(
            f"{videos} lists the videos but the caption file {prompts} is missing (name it with --caption-column)."
        )
    captions, paths = _read_lines(prompts), _read_lines(videos)
    if len(captions) != len(paths):
        raise ValueError(
            f"{prompts} has {len(captions)} captions but {videos} has {len(paths)} videos: "
            "they must pair up line by line."
        )
    return [Clip(root / p, c, p) for c, p in zip(captions, paths, strict=True)]


def _from_folder(root: Path) -> list[Clip]:
    clips = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file():
            caption_file = path.with_suffix(".txt")
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None
            clips.append(Clip(path, caption, path.relative_to(root).as_posix()))
    return clips


def _from_metadata(path: Path, caption_column: str | None, video_column: str | None) -> list[Clip]:
    rows = _read_rows(path)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    video = _pick_column(path, columns, video_column, VIDEO_COLUMNS, "video", "--video-column")
    caption = _pick_column(path, columns, caption_column, CAPTION_COLUMNS, "caption", "--caption-column")
    clips = []
    for number, row in enumerate(rows, 1):
        name = row.get(video)
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{path}, row {number}: the {video!r} column is empty; every row must name a video.")
        text = row.get(caption)
        text = None if text is None else str(text).strip()
        # Paths are relative to the metadata file, so the folder can be moved as a whole.
        clips.append(Clip(path.parent / name.strip(), text, name.strip()))
    return clips


def _read_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number} is not valid JSON ({err.msg}); fix or remove it.") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number} is not a JSON object; each line must be one row.")
        rows.append(row)
    return rows


def _pick_column(
    path: Path, columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, flag: str
) -> str:
    if given is not None:
        if given not in columns:
            raise ValueError(
                f"{path} has no column {given!r} ({flag}); its columns are: {', '.join(columns) or 'none'}."
            )
        return given
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(
        f"{path} has no {what} column (looked for {', '.join(candidates)}); its columns are: "
        f"{', '.join(columns) or 'none'}. Name it with {flag}."
    )
