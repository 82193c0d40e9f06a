"""Reading clips with decord: which frames to take (by time, not by index), which bucket, at what size.

Everything here runs in DataLoader worker processes. A clip that cannot be used raises ``SkipClip``
with a short reason (counted in the summary) and a detail (written to ``skipped.jsonl``).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np


class SkipClip(Exception):
    """This clip cannot be used; the run records why and goes on."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass(frozen=True)
class FrameSpec:
    """How frames are chosen and sized; every field is part of a cache's identity."""

    resolutions: tuple[tuple[int, int], ...] = ((480, 720),)  # (height, width) pixel buckets
    frame_buckets: tuple[int, ...] = (49,)  # frame counts, each 4k+1
    min_frames: int = 5
    fps: float = 8.0
    skip_frames_start: int = 0
    skip_frames_end: int = 0
    resize: str = "crop"  # "crop": cover then centre-crop; "stretch": scale each axis independently
    windows: int = 1  # at most this many non-overlapping windows per clip, evenly spread over it
    max_upscale: float = 4.0  # skip clips that would have to be enlarged more than this


@dataclass(frozen=True)
class Plan:
    """What to take from one clip: its bucket and the source frame indices of each window."""

    bucket: Bucket
    windows: list[list[int]]
    available: int  # frames the clip offers at the sampling rate, after the skips


def largest_4k1(n: int) -> int:
    """Largest frame count of the form 4k+1 not above n (the VAE compresses time 4:1 after frame one)."""
    return 0 if n < 1 else (n - 1) // 4 * 4 + 1


def sampling_stride(source_fps: float, fps: float) -> float:
    """Source frames per sampled frame: ``source_fps / fps``, never below 1 (no frame is used twice)."""
    return max(source_fps / fps, 1.0) if source_fps > 0 else 1.0


def plan_frames(total: int, source_fps: float, spec: FrameSpec) -> tuple[int, list[list[int]], int]:
    """Frame count, source indices of each window, and frames available; raises SkipClip.

    The clip is resampled to ``spec.fps`` from its real rate, between ``skip_frames_start`` and
    ``total - skip_frames_end``. Long enough for a frame bucket: the largest bucket that fits, in up to
    ``spec.windows`` non-overlapping windows spread evenly from the start to the end (the first window
    always starts at the first frame). Shorter than every bucket: its longest 4k+1 prefix, if that is at
    least ``min_frames``.
    """
    start, end = spec.skip_frames_start, total - spec.skip_frames_end
    if end <= start:
        raise SkipClip("no frames left", f"{total} frames, skipping {spec.skip_frames_start} + {spec.skip_frames_end}")
    stride = sampling_stride(source_fps, spec.fps)
    available = math.floor((end - start - 1) / stride) + 1
    fitting = [f for f in spec.frame_buckets if f <= available]
    count = max(fitting) if fitting else largest_4k1(available)
    if count < spec.min_frames:
        raise SkipClip(
            "too short", f"{available} frames at {spec.fps:g} fps, need at least {spec.min_frames} (--min-frames)"
        )
    n = max(1, min(spec.windows, available // count))
    firsts = [round(i * (available - count) / (n - 1)) for i in range(n)] if n > 1 else [0]
    windows = [[start + int((first + k) * stride + 0.5) for k in range(count)] for first in firsts]
    return count, windows, available


def closest_resolution(height: int, width: int, resolutions: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The resolution whose aspect ratio is closest to the clip's (on a log scale; first listed wins ties)."""
    aspect = math.log(width / height)
    return min(resolutions, key=lambda r: abs(math.log(r[1] / r[0]) - aspect))


def plan_clip(total: int, source_fps: float, height: int, width: int, spec: FrameSpec) -> Plan:
    frames, windows, available = plan_frames(total, source_fps, spec)
    target_h, target_w = closest_resolution(height, width, spec.resolutions)
    scale = max(target_h / height, target_w / width)
    if scale > spec.max_upscale:
        raise SkipClip(
            "too small",
            f"{height}x{width} would need {scale:.1f}x enlarging to {target_h}x{target_w} (--max-upscale "
            f"{spec.max_upscale:g})",
        )
    return Plan(Bucket(frames, target_h, target_w), windows, available)


def decode_size(height: int, width: int, target: tuple[int, int], resize: str) -> tuple[int, int]:
    """Size to let decord scale to: the target itself (stretch) or the smallest cover of it (crop)."""
    if resize == "stretch":
        return target
    scale = max(target[0] / height, target[1] / width)
    return max(target[0], round(height * scale)), max(target[1], round(width * scale))


def _unreadable(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200] if str(err).strip() else ''}"


def read_clip(path: str, spec: FrameSpec) -> tuple[np.ndarray, Plan, dict]:
    """uint8 frames ``[windows, F, H, W, 3]`` at the bucket's size, the plan, and what was sampled."""
    import decord

    try:
        probe = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        total, source_fps = len(probe), float(probe.get_avg_fps())
        src_h, src_w = probe[0].shape[:2] if total else (0, 0)
        del probe
    except Exception as err:
        raise SkipClip("unreadable video", _unreadable(err)) from err
    if total < 1 or src_h < 1 or src_w < 1:
        raise SkipClip("unreadable video", "no decodable frames")
    plan = plan_clip(total, source_fps, src_h, src_w, spec)
    target = (plan.bucket.height, plan.bucket.width)
    dec_h, dec_w = decode_size(src_h, src_w, target, spec.resize)
    wanted = sorted({i for window in plan.windows for i in window})
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), width=dec_w, height=dec_h, num_threads=1)
        try:
            decoded = reader.get_batch(wanted).asnumpy()
        except decord.DECORDError:
            # decord's batch copy fails for some frame widths (e.g. 48 or 72 px) that single frames decode
            # fine; frame by frame is slower but only ever needed for such small sizes.
            decoded = np.stack([reader[i].asnumpy() for i in wanted])
    except Exception as err:
        raise SkipClip("decoding failed", _unreadable(err)) from err
    if decoded.shape[1:3] != (dec_h, dec_w):
        raise SkipClip("decoding failed", f"decoded {decoded.shape[1:3]} instead of {(dec_h, dec_w)}")
    top, left = (dec_h - target[0]) // 2, (dec_w - target[1]) // 2
    decoded = decoded[:, top : top + target[0], left : left + target[1]]
    position = {index: row for row, index in enumerate(wanted)}
    frames = np.ascontiguousarray(np.stack([decoded[[position[i] for i in window]] for window in plan.windows]))
    stride = sampling_stride(source_fps, spec.fps)
    info = {
        "fps": round(source_fps / stride if source_fps > 0 else spec.fps, 4),
        "source_fps": round(source_fps, 4),
        "source_frames": total,
        "source_size": [int(src_h), int(src_w)],
        "size": list(target),
    }
    return frames, plan, info


def jpeg_strip(frames: np.ndarray, count: int = 8, height: int = 64, quality: int = 85) -> bytes:
    """A small JPEG of up to ``count`` evenly spaced frames side by side, to see what was encoded."""
    from PIL import Image

    picks = np.unique(np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int))
    width = max(1, round(frames.shape[2] * height / frames.shape[1]))
    strip = np.concatenate(
        [np.asarray(Image.fromarray(frames[i]).resize((width, height), Image.BILINEAR)) for i in picks], axis=1
    )
    out = io.BytesIO()
    Image.fromarray(strip).save(out, format="JPEG", quality=quality)
    return out.getvalue()
