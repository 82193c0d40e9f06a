"""Small captioned H.264 clips made with imageio, and the tiny model's preprocess config for them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cogvx.preprocess.run import PreprocessConfig


def make_video(path: Path, frames: int = 24, height: int = 64, width: int = 96, fps: int = 24, seed: int = 0) -> Path:
    """A small H.264 clip whose content depends on ``seed`` (so two seeds give two different files)."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    writer = imageio.get_writer(
        str(path), format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1, ffmpeg_log_level="error",
        output_params=["-pix_fmt", "yuv420p"],
    )  # fmt: skip
    for i in range(frames):
        frame = np.empty((height, width, 3), np.uint8)
        frame[:] = (base + 7 * i) % 255
        frame[:, (3 * i) % width :, 1] = 200
        writer.append_data(frame)
    writer.close()
    return path


def captioned_clip(folder: Path, name: str, caption: str | None = "a red ball", **video) -> Path:
    """``folder/name`` made by ``make_video(**video)``, with ``caption`` beside it as a .txt file (none if None)."""
    path = make_video(folder / name, **video)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def tiny_config(data: Path, output: Path, **overrides) -> PreprocessConfig:
    """Preprocess ``data`` into ``output`` with the tiny model, fp32, no workers, one 9-frame bucket."""
    values = {"model": "tiny", "dtype": "fp32", "workers": 0, "frame_buckets": (9,)} | overrides
    return PreprocessConfig(data=data, output=output, **values)
