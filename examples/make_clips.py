"""Generate the tiny synthetic sample clips used by the quick start, so it needs nothing downloaded.

Draws six short clips with numpy -- a coloured disc or square moving over a two-colour gradient, each
one different in colour, motion and direction -- and writes them as H.264 mp4 (yuv420p, via imageio and
the ffmpeg binary bundled in the imageio-ffmpeg wheel), each with a same-name ``.txt`` caption:

* ``<out>/NAME.mp4`` + ``<out>/NAME.txt`` (default ``examples/clips``), the caption-per-clip layout;
* ``<seed-out>/prompts.txt``, ``videos.txt`` and ``videos/`` (default ``examples/seed-layout``), three
  of the same clips copied into the layout of the diffusers CogVideoX training script.

Sizes (96x64, 64x96, 80x80), frame rates (24 and 12 fps) and durations (2-3 s) vary on purpose, to
exercise resizing and frame sampling. There is no randomness: the decoded frames are identical on
every run.

    python examples/make_clips.py [--out examples/clips] [--seed-out examples/seed-layout]
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

HERE = Path(__file__).resolve().parent
SEED_LAYOUT_CLIPS = ("red_disc_left", "yellow_disc_down", "white_square_up")

RGB = tuple[int, int, int]
Motion = Callable[[float], tuple[float, float]]  # progress t in [0, 1] -> centre (x, y) as fractions


@dataclass(frozen=True)
class Clip:
    name: str
    caption: str
    width: int
    height: int
    fps: int
    num_frames: int
    shape: str  # "disc" or "square"
    colour: RGB
    background: tuple[RGB, RGB]  # gradient from the first colour to the second
    vertical_gradient: bool  # gradient runs top to bottom instead of left to right
    path: Motion


CLIPS: tuple[Clip, ...] = (
    Clip(
        "red_disc_left", "a red disc slides from right to left over a blue gradient",
        width=96, height=64, fps=24, num_frames=48, shape="disc", colour=(230, 40, 40),
        background=((20, 40, 120), (90, 160, 230)), vertical_gradient=False,
        path=lambda t: (0.85 - 0.7 * t, 0.5),
    ),
    Clip(
        "green_square_right", "a green square slides from left to right over a purple gradient",
        width=96, height=64, fps=24, num_frames=60, shape="square", colour=(40, 210, 70),
        background=((70, 20, 90), (200, 130, 220)), vertical_gradient=True,
        path=lambda t: (0.15 + 0.7 * t, 0.5),
    ),
    Clip(
        "yellow_disc_down", "a yellow disc falls from the top to the bottom over a dark teal gradient",
        width=64, height=96, fps=24, num_frames=48, shape="disc", colour=(245, 220, 40),
        background=((10, 70, 70), (60, 170, 160)), vertical_gradient=True,
        path=lambda t: (0.5, 0.15 + 0.7 * t),
    ),
    Clip(
        "white_square_up", "a white square rises slowly from the bottom to the top over an orange gradient",
        width=96, height=64, fps=12, num_frames=36, shape="square", colour=(245, 245, 245),
        background=((200, 80, 20), (250, 190, 90)), vertical_gradient=False,
        path=lambda t: (0.5, 0.8 - 0.6 * t),
    ),
    Clip(
        "blue_disc_diagonal",
        "a blue disc moves diagonally from the top left to the bottom right over a pale yellow gradient",
        width=80, height=80, fps=24, num_frames=60, shape="disc", colour=(30, 60, 220),
        background=((250, 240, 180), (200, 190, 110)), vertical_gradient=False,
        path=lambda t: (0.2 + 0.6 * t, 0.2 + 0.6 * t),
    ),
    Clip(
        "cyan_disc_circle", "a cyan disc circles clockwise around the centre over a dark grey gradient",
        width=96, height=64, fps=24, num_frames=72, shape="disc", colour=(40, 220, 230),
        background=((30, 30, 30), (110, 110, 110)), vertical_gradient=True,
        path=lambda t: (0.5 + 0.3 * math.cos(2 * math.pi * t), 0.5 + 0.3 * math.sin(2 * math.pi * t)),
    ),
)  # fmt: skip


def gradient(clip: Clip) -> np.ndarray:
    """The static background, float32 (H, W, 3) in [0, 255]."""
    n = clip.height if clip.vertical_gradient else clip.width
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    ramp = ramp[:, None, None] if clip.vertical_gradient else ramp[None, :, None]
    start, end = (np.asarray(c, dtype=np.float32) for c in clip.background)
    return np.broadcast_to(start + ramp * (end - start), (clip.height, clip.width, 3))


def render(clip: Clip) -> np.ndarray:
    """All frames of ``clip`` as uint8 (T, H, W, 3)."""
    background = gradient(clip)
    ys, xs = np.mgrid[0 : clip.height, 0 : clip.width].astype(np.float32) + 0.5
    radius = 0.18 * min(clip.width, clip.height)
    colour = np.asarray(clip.colour, dtype=np.float32)
    frames = np.empty((clip.num_frames, clip.height, clip.width, 3), dtype=np.uint8)
    for i in range(clip.num_frames):
        fx, fy = clip.path(i / (clip.num_frames - 1))
        dx, dy = xs - fx * clip.width, ys - fy * clip.height
        dist = np.hypot(dx, dy) if clip.shape == "disc" else np.maximum(np.abs(dx), np.abs(dy))
        alpha = np.clip(radius - dist + 0.5, 0.0, 1.0)[..., None]  # one-pixel anti-aliased edge
        frames[i] = np.rint(background + alpha * (colour - background)).astype(np.uint8)
    return frames


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode uint8 RGB frames as H.264/yuv420p mp4; bit-exact, so one ffmpeg build gives the same bytes."""
    params = ["-preset", "medium", "-crf", "23", "-threads", "1", "-bitexact", "-map_metadata", "-1"]
    with imageio.get_writer(
        path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
        quality=None, macro_block_size=2, ffmpeg_log_level="error", output_params=params,
    ) as writer:  # fmt: skip
        for frame in frames:
            writer.append_data(frame)


def make_clips(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for clip in CLIPS:
        write_mp4(out / f"{clip.name}.mp4", render(clip), clip.fps)
        (out / f"{clip.name}.txt").write_text(clip.caption + "\n", encoding="utf-8")


def make_seed_layout(clips_dir: Path, out: Path) -> None:
    """Copy a few clips into the diffusers layout: prompts.txt + videos.txt (paths relative to ``out``)."""
    (out / "videos").mkdir(parents=True, exist_ok=True)
    prompts, videos = [], []
    for name in SEED_LAYOUT_CLIPS:
        shutil.copyfile(clips_dir / f"{name}.mp4", out / "videos" / f"{name}.mp4")
        prompts.append((clips_dir / f"{name}.txt").read_text(encoding="utf-8").strip())
        videos.append(f"videos/{name}.mp4")
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    (out / "videos.txt").write_text("\n".join(videos) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic sample clips and captions.")
    parser.add_argument("--out", type=Path, default=HERE / "clips", help="caption-per-clip folder")
    parser.add_argument("--seed-out", type=Path, default=HERE / "seed-layout", help="prompts.txt/videos.txt folder")
    args = parser.parse_args()
    make_clips(args.out)
    make_seed_layout(args.out, args.seed_out)
    print(f"wrote {len(CLIPS)} clips to {args.out} and {len(SEED_LAYOUT_CLIPS)} to {args.seed_out}")


if __name__ == "__main__":
    main()
