"""What people look at: H.264 mp4 files, PNG contact sheets, and the smoothing of training curves.

Ground floor: knows frames and images, nothing of CogVideoX, runs or caches. ``sample`` and ``render``
write their videos and sheets here, ``cogvx shards inspect`` draws its frame strips with the same
drawer, and the loss curves of ``loss.png`` and the HTML report share one smoother.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cogvx import files
from cogvx.errors import CogvxError, ConfigError
from cogvx.names import SHEET_COLUMNS  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from PIL import Image


class VideoWriteError(CogvxError):
    """Generation finished but an mp4 could not be written; the frames were saved another way."""


def check_video_settings(fps: int, sheet_columns: int) -> None:
    """The frame rate of the mp4 files and the frames per row of a contact sheet, as sample and render take them."""
    if fps < 1:
        raise ConfigError(f"--fps must be at least 1 (got {fps})")
    if sheet_columns < 1:
        raise ConfigError(f"sheet_columns must be at least 1 (got {sheet_columns}); set it in the --config file.")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (the pipeline's ``np`` output) to uint8, rounded."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> Path:
    """uint8 frames ``[F, H, W, 3]`` to an H.264 mp4 (yuv420p, plays in browsers); atomic rename at the end."""
    import imageio.v2 as imageio

    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 wants uint8 frames [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 needs an even frame size; {path} would be {frames.shape[2]}x{frames.shape[1]}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(path)
    writer = imageio.get_writer(
        partial,
        format="FFMPEG",
        fps=fps,
        codec="libx264",
        quality=8,
        pixelformat="yuv420p",
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    try:
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # no half-written file left beside the outputs
        raise
    return path


def check_mp4_writer() -> str:
    """The ffmpeg that ``write_mp4`` will use, checked to list the H.264 encoder; a clear error otherwise."""
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg
    except ImportError as err:
        raise CogvxError(
            f"Writing mp4 needs imageio and imageio-ffmpeg ({err}): pip install imageio imageio-ffmpeg"
        ) from err
    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
        listed = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=60)
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        raise CogvxError(
            f"No usable ffmpeg to write mp4 ({err}): pip install imageio-ffmpeg, or point IMAGEIO_FFMPEG_EXE at an "
            "ffmpeg with libx264. Nothing was generated."
        ) from err
    if listed.returncode != 0 or "libx264" not in listed.stdout:
        raise CogvxError(
            f"{exe} cannot encode H.264 (libx264 is not among its encoders): pip install imageio-ffmpeg, or point "
            "IMAGEIO_FFMPEG_EXE at an ffmpeg with libx264. Nothing was generated."
        )
    return exe


EMA_WEIGHT = 0.9  # how every loss cogvx shows is smoothed: curves, the report, the card, the progress bar


class Ema:
    """Exponential moving average with bias correction (as TensorBoard smooths), one value at a time."""

    def __init__(self, weight: float = EMA_WEIGHT):
        self.weight, self._acc, self._norm = weight, 0.0, 0.0

    def update(self, value: float) -> float:
        self._acc = self.weight * self._acc + (1 - self.weight) * value
        self._norm = self.weight * self._norm + (1 - self.weight)
        return self._acc / self._norm


def ema(values: list[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Every step of ``Ema`` over ``values``."""
    smoother = Ema(weight)
    return [smoother.update(v) for v in values]


# --- contact sheets ---


def contact_sheet(
    rows: list[tuple[str, list[Image.Image]]],
    *,
    pad: int,
    label_width: int = 0,
    label_height: int = 14,
    label_chars: int | None = None,
) -> Image.Image:
    """One row per item: its label, then its tiles side by side.

    The label sits in a ``label_height`` band above the tiles, or, with ``label_width``, in a column of that
    width at their left (it may then span several lines). Labels longer than ``label_chars`` characters
    per line (default: what fits the sheet's width) end in "...".
    """
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise ValueError("contact_sheet needs at least one row")
    above = 0 if label_width else label_height
    tile_height = max(tile.height for _, tiles in rows for tile in tiles)
    row_height = above + tile_height
    left = label_width or pad
    width = left + max(sum(tile.width + pad for tile in tiles) for _, tiles in rows)
    sheet = Image.new("RGB", (width, len(rows) * (row_height + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    chars = label_chars or max(8, sheet.width // 6)
    for r, (label, tiles) in enumerate(rows):
        top = pad + r * (row_height + pad)
        # The bitmap fallback font only knows latin-1.
        text = _fit(label, chars).encode("latin-1", "replace").decode("latin-1")
        draw.multiline_text((pad, top + (0 if above else 4)), text, fill="black", font=font)
        x = left
        for tile in tiles:
            sheet.paste(tile, (x, top + above))
            x += tile.width + pad
    return sheet


def frame_tiles(frames: np.ndarray, columns: int) -> list[Image.Image]:
    """``columns`` evenly spaced frames of a uint8 video ``[F, H, W, 3]`` (all of them when it has fewer)."""
    from PIL import Image

    picked = np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)
    return [Image.fromarray(frames[index]) for index in picked]


def video_sheet(videos: list[tuple[str, np.ndarray]], columns: int) -> Image.Image:
    """One row per video: its label above ``columns`` evenly spaced frames."""
    return contact_sheet([(label, frame_tiles(frames, columns)) for label, frames in videos], pad=2)


def write_sheet(path: Path, videos: list[tuple[str, np.ndarray]], columns: int) -> Path:
    """:func:`video_sheet` as a PNG, renamed into place when complete."""
    return write_png(path, video_sheet(videos, columns))


def write_png(path: Path, image: Image.Image) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    return files.write_bytes_atomic(path, encoded.getvalue())


def _fit(text: str, chars: int) -> str:
    return "\n".join(line if len(line) <= chars else line[: chars - 3] + "..." for line in text.splitlines())


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial{path.suffix}")
