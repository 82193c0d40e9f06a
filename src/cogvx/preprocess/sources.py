"""Finding (video, caption) pairs in the dataset layouts users already have."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}


@dataclass(frozen=True)
class Clip:
    path: Path
    caption: str
    source: str  # the path as recorded in the cache: relative to the data root where possible


def discover(root: Path, caption_column: str = "prompts.txt", video_column: str = "videos.txt") -> list[Clip]:
    """All clips under ``root``: the seed's prompts/videos files if present, else videos with .txt captions."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"--data {root} does not exist. Point it at a folder of videos with .txt captions.")
    if root.is_dir() and (root / video_column).is_file():
        return _from_line_files(root, root / caption_column, root / video_column)
    if not root.is_dir():
        raise ValueError(f"--data {root} is a file; point it at the folder that holds the videos.")
    return _from_folder(root)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _from_line_files(root: Path, prompts: Path, videos: Path) -> list[Clip]:
    if not prompts.is_file():
        raise ValueError(f"{videos} lists the videos but the caption file {prompts} is missing.")
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
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            clips.append(Clip(path, caption, path.relative_to(root).as_posix()))
    return clips
