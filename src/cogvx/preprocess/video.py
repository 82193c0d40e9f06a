"""Reading clips with decord: which frames to take (by time, not by index) and at what size."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class SkipClip(Exception):
    """This clip cannot be used; the message says why. The run records it and goes on."""


@dataclass(frozen=True)
class FrameSpec:
    height: int = 480
    width: int = 720
    max_frames: int = 49
    min_frames: int = 5
    fps: float = 8.0
    skip_frames_start: int = 0
    skip_frames_end: int = 0
    resize: str = "crop"  # "crop": cover then centre-crop; "stretch": scale each axis independently


def largest_4k1(n: int) -> int:
    """Largest frame count of the form 4k+1 not above n (the VAE compresses time 4:1 after frame one)."""
    return 0 if n < 1 else (n - 1) // 4 * 4 + 1


def frame_indices(total: int, source_fps: float, spec: FrameSpec) -> list[int]:
    """Source frame indices for one window, sampled at ``spec.fps`` from the clip's real frame rate.

    Frames are taken every ``source_fps / fps`` source frames (never denser than the source) starting
    at ``skip_frames_start``; the window is the longest 4k+1 prefix up to ``max_frames``.
    """
    start, end = spec.skip_frames_start, total - spec.skip_frames_end
    if end <= start:
        raise SkipClip(f"no frames left: {total} frames, skipping {spec.skip_frames_start} + {spec.skip_frames_end}")
    stride = max(source_fps / spec.fps, 1.0) if source_fps > 0 else 1.0
    available = math.floor((end - start - 1) / stride) + 1
    count = largest_4k1(min(spec.max_frames, available))
    if count < spec.min_frames:
        raise SkipClip(
            f"too short: {available} frames at {spec.fps:g} fps, need at least {spec.min_frames} (--min-frames)"
        )
    return [start + int(k * stride + 0.5) for k in range(count)]


def decode_size(height: int, width: int, spec: FrameSpec) -> tuple[int, int]:
    """Size to let decord scale to: the target itself (stretch) or the smallest cover of it (crop)."""
    if spec.resize == "stretch":
        return spec.height, spec.width
    scale = max(spec.height / height, spec.width / width)
    return max(spec.height, round(height * scale)), max(spec.width, round(width * scale))


def read_clip(path: str, spec: FrameSpec) -> tuple[np.ndarray, dict]:
    """uint8 frames ``[F, H, W, 3]`` at the target size, and what was sampled; raises SkipClip."""
    import decord

    try:
        probe = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        total, source_fps = len(probe), float(probe.get_avg_fps())
        src_h, src_w = probe[0].shape[:2]
        del probe
    except SkipClip:
        raise
    except Exception as err:
        raise SkipClip(f"unreadable video ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    if total < 1 or src_h < 1 or src_w < 1:
        raise SkipClip("no decodable frames")
    indices = frame_indices(total, source_fps, spec)
    dec_h, dec_w = decode_size(src_h, src_w, spec)
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), width=dec_w, height=dec_h, num_threads=1)
        frames = reader.get_batch(indices).asnumpy()
    except Exception as err:
        raise SkipClip(f"decoding failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    top, left = (dec_h - spec.height) // 2, (dec_w - spec.width) // 2
    frames = np.ascontiguousarray(frames[:, top : top + spec.height, left : left + spec.width])
    effective_fps = source_fps / max(source_fps / spec.fps, 1.0) if source_fps > 0 else spec.fps
    info = {
        "frame_indices": indices,
        "fps": round(effective_fps, 4),
        "source_fps": round(source_fps, 4),
        "source_frames": total,
        "source_size": [int(src_h), int(src_w)],
        "size": [spec.height, spec.width],
    }
    return frames, info
