"""Reading clips with decord: which frames to take (by time, not by index), which bucket, at what size.

Everything here runs in DataLoader worker processes. A clip that cannot be used raises ``SkipClip``
with a short reason (counted in the summary) and a detail (written to ``skipped.jsonl``).
"""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
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
    """How frames are chosen and sized; every field is part of a cache's identity.

    No defaults: ``PreprocessConfig.frame_spec`` builds it from the stage's settings, where they live.
    """

    resolutions: tuple[tuple[int, int], ...]  # (height, width) pixel buckets
    frame_buckets: tuple[int, ...]  # frame counts, each 1 + k * frame_step
    min_frames: int
    fps: float
    skip_frames_start: int
    skip_frames_end: int
    resize: str  # "crop": cover then centre-crop; "stretch": scale each axis independently
    windows: int  # at most this many non-overlapping windows per clip, evenly spread over it
    max_upscale: float  # skip clips that would have to be enlarged more than this
    frame_step: int  # usable frame counts are 1 + k * frame_step (4; 8 for CogVideoX 1.5: ModelInfo.frame_step)

    @property
    def largest_window(self) -> tuple[int, int, int]:
        """(frames, height, width) of the largest window a clip can give: the most frames, the most pixels."""
        return (max(self.frame_buckets), *max(self.resolutions, key=lambda size: size[0] * size[1]))


@dataclass(frozen=True)
class Plan:
    """What to take from one clip: its bucket and the source frame indices of each window."""

    bucket: Bucket
    windows: list[list[int]]
    available: int  # frames the clip offers at the sampling rate, after the skips


def largest_4k1(n: int, step: int = 4) -> int:
    """Largest frame count of the form ``step``k+1 not above n (the VAE compresses time 4:1 after frame one;
    CogVideoX 1.5 packs two latent frames per token, so its counts are 8k+1)."""
    return 0 if n < 1 else (n - 1) // step * step + 1


def sampling_stride(source_fps: float, fps: float) -> float:
    """Source frames per sampled frame: ``source_fps / fps``, never below 1 (no frame is used twice)."""
    return max(source_fps / fps, 1.0) if source_fps > 0 else 1.0


def plan_frames(total: int, source_fps: float, spec: FrameSpec) -> tuple[int, list[list[int]], int]:
    """Frame count, source indices of each window, and frames available; raises SkipClip.

    The clip is resampled to ``spec.fps`` from its real rate, between ``skip_frames_start`` and
    ``total - skip_frames_end``. Long enough for a frame bucket: the largest bucket that fits, in up to
    ``spec.windows`` non-overlapping windows spread evenly from the start to the end (the first window
    always starts at the first frame). Shorter than every bucket: its longest prefix of a usable length
    (``1 + k * frame_step``), if that is at least ``min_frames``.
    """
    start, end = spec.skip_frames_start, total - spec.skip_frames_end
    if end <= start:
        raise SkipClip("no frames left", f"{total} frames, skipping {spec.skip_frames_start} + {spec.skip_frames_end}")
    stride = sampling_stride(source_fps, spec.fps)
    available = math.floor((end - start - 1) / stride) + 1
    fitting = [f for f in spec.frame_buckets if f <= available]
    count = max(fitting) if fitting else largest_4k1(available, spec.frame_step)
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


# Decode memory per clip: a source frame above MAX_SOURCE_PIXELS (8K is 33.2 M) is refused after the first
# frame; at most DECODE_CHUNK_BYTES of frames are held at decode size (one decord call each: a call starts
# with a seek, so fewer is faster), and a cover larger than CROP_FIRST times the bucket (extreme aspect
# ratios: 120x32768 into 480x720 needs a 480x131072 cover) is cropped in the source frame before
# scaling, one frame at a time.
MAX_SOURCE_PIXELS = 40_000_000
DECODE_CHUNK_BYTES = 256 * 2**20
CROP_FIRST = 4


def _unreadable(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200] if str(err).strip() else ''}"


def _rgb(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """decord's frames as ``[..., height, width, 3]``.

    For some output widths (seen: 2-24, 48 and 72 px, scaled or after a display rotation) decord hands
    back each row padded to its line size and calls the padding extra channels: ``(36, 48, 4)`` is 36
    rows of 144 RGB bytes plus 48 zero bytes. The RGB bytes are the first ``3 * width`` of a row.
    """
    if frames.shape[-3:] == (height, width, 3):
        return frames
    if frames.shape[-3:-1] != (height, width) or frames.shape[-1] < 3:
        raise SkipClip("decoding failed", f"decoded frames of shape {frames.shape[-3:]}, not {(height, width, 3)}")
    rows = frames.reshape(*frames.shape[:-2], -1)
    return rows[..., : 3 * width].reshape(*frames.shape[:-1], 3)


def _frame_times(reader, total: int, container_fps: float) -> tuple[float, np.ndarray | None]:
    """The clip's frame rate, and for a variable frame rate clip the real frame nearest each step of it.

    The rate comes from the frames' timestamps: the container's own figure where its grid ends within
    half a frame of the last timestamp (timestamps in ms are not exact), else the timestamps' average
    (some muxers count the last frame's duration oddly). A clip is variable-rate when a frame's
    timestamp is more than half a frame away from the even grid between its first and last
    timestamps; it is then sampled on that grid (its average rate), each step taking the frame nearest
    in time. Without usable timestamps the container's rate is used, and a clip with neither is skipped.
    """
    stamps = reader.get_frame_timestamp(range(total))[:, 0].astype(np.float64) if total >= 2 else np.zeros(0)
    if len(stamps) < 2 or not np.isfinite(stamps).all() or (np.diff(stamps) <= 0).any():
        if not math.isfinite(container_fps) or container_fps <= 0:
            raise SkipClip(
                "no frame rate",
                f"the container gives {container_fps:g} frames per second and no usable timestamps; re-encode it "
                "with a frame rate (ffmpeg -i IN -r 24 OUT)",
            )
        return container_fps, None
    step = (stamps[-1] - stamps[0]) / (total - 1)
    grid = stamps[0] + step * np.arange(total)
    if np.abs(stamps - grid).max() <= step / 2:
        span = (total - 1) / container_fps if math.isfinite(container_fps) and container_fps > 0 else math.inf
        return (container_fps if abs(span - (stamps[-1] - stamps[0])) <= step / 2 else float(1.0 / step)), None
    after = np.clip(np.searchsorted(stamps, grid), 1, total - 1)
    nearest = np.where(grid - stamps[after - 1] <= stamps[after] - grid, after - 1, after)
    return float(1.0 / step), nearest


def matroska_rotation(path: str) -> int:
    """The display rotation of a Matroska/WebM clip, 0/90/180/270 degrees counter-clockwise (0: none).

    decord applies the rotation of MP4/MOV clips itself but not this one; the ffmpeg binary that
    imageio-ffmpeg ships reads it (``ffmpeg -i`` prints "rotation of -90.00 degrees"). Other angles: 0.
    """
    import imageio_ffmpeg

    done = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, text=True, timeout=60
    )  # exits 1 ("At least one output file must be specified") after describing the file
    found = re.search(r"rotation of (-?[0-9.]+) degrees", done.stderr)
    quarter = float(found.group(1)) / 90 if found else 0.0
    return round(quarter) % 4 * 90 if abs(quarter - round(quarter)) < 1e-3 else 0


class OpenClip:
    """A clip opened for decoding: its frame count, rates, upright size and display rotation."""

    def __init__(self, path: str):
        import decord

        self.path = path
        try:
            self.reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
            self.total, self.container_fps = len(self.reader), float(self.reader.get_avg_fps())
            height, width = self.reader[0].shape[:2] if self.total else (0, 0)
            self.rotation = matroska_rotation(path) if os.path.splitext(path)[1].lower() in (".mkv", ".webm") else 0
        except Exception as err:
            raise SkipClip("unreadable video", _unreadable(err)) from err
        self.size = (width, height) if self.rotation in (90, 270) else (height, width)  # upright
        if self.total < 1 or min(self.size) < 1:
            raise SkipClip("unreadable video", "no decodable frames")
        if self.size[0] * self.size[1] > MAX_SOURCE_PIXELS:
            raise SkipClip(
                "too large",
                f"{self.size[0]}x{self.size[1]} frames are above the {MAX_SOURCE_PIXELS / 1e6:g}-megapixel limit; "
                "scale the clip down",
            )

    def frames(self, wanted: list[int], target: tuple[int, int], resize: str) -> np.ndarray:
        """Source frames ``wanted`` (sorted, distinct) at ``target`` size, ``[len(wanted), H, W, 3]`` uint8.

        The one decoding path of preprocessing: the same frame comes out the same whether it is read with
        its whole window or alone (image latents added to a cache later rely on that).
        """
        cover = decode_size(*self.size, target, resize)
        try:
            if self.rotation or cover[0] * cover[1] > CROP_FIRST * target[0] * target[1]:
                return _decode_cropping_first(self.reader, wanted, self.size, cover, target, self.rotation)
            self.reader = None  # a second live reader would halve decoding speed
            return _decode_scaled(self.path, wanted, cover, target)
        except SkipClip:
            raise
        except Exception as err:
            raise SkipClip("decoding failed", _unreadable(err)) from err


def read_clip(path: str, spec: FrameSpec) -> tuple[np.ndarray, Plan, dict]:
    """uint8 frames ``[windows, F, H, W, 3]`` at the bucket's size, the plan, and what was sampled.

    Frames are upright as a player shows them: a 90/180/270 degree display rotation is applied (by
    decord for MP4/MOV, here for Matroska/WebM), and sizes here are display sizes.
    """
    clip = OpenClip(path)
    src_h, src_w = clip.size
    try:
        source_fps, nearest = _frame_times(clip.reader, clip.total, clip.container_fps)
    except SkipClip:
        raise
    except Exception as err:
        raise SkipClip("unreadable video", _unreadable(err)) from err
    plan = plan_clip(clip.total, source_fps, src_h, src_w, spec)
    if nearest is not None:
        plan = Plan(plan.bucket, [[int(nearest[i]) for i in window] for window in plan.windows], plan.available)
    target = (plan.bucket.height, plan.bucket.width)
    wanted = sorted({i for window in plan.windows for i in window})
    decoded = clip.frames(wanted, target, spec.resize)
    if wanted == [i for window in plan.windows for i in window]:  # windows in order, no frame twice: no copy
        frames = decoded.reshape(len(plan.windows), plan.bucket.frames, *decoded.shape[1:])
    else:
        position = {index: row for row, index in enumerate(wanted)}
        frames = np.stack([decoded[[position[i] for i in window]] for window in plan.windows])
    stride = sampling_stride(source_fps, spec.fps)
    info = {
        "fps": round(source_fps / stride, 4),
        "source_fps": round(source_fps, 4),
        "source_frames": clip.total,
        "source_size": [int(src_h), int(src_w)],
        "size": list(target),
    }
    return frames, plan, info


def read_first_frames(path: str, indices: list[int], source_size: list[int], target: list[int], resize: str):
    """Source frames ``indices`` exactly as ``read_clip`` read them for a sample of ``target`` size.

    ``source_size`` is what the sample recorded: a clip that decodes to another size now is refused.
    """
    clip = OpenClip(path)
    if list(clip.size) != list(source_size):
        raise SkipClip("source changed", f"frames are {clip.size[0]}x{clip.size[1]} now, {source_size} when encoded")
    if max(indices) >= clip.total:
        raise SkipClip("decoding failed", f"frame {max(indices)} is past the clip's {clip.total} frames")
    wanted = sorted(set(indices))
    decoded = clip.frames(wanted, (int(target[0]), int(target[1])), resize)
    return decoded[[wanted.index(i) for i in indices]]


def _decode_cropping_first(reader, wanted: list[int], source, cover, target, rotation: int) -> np.ndarray:
    """Frames ``wanted`` scaled to ``cover`` and centre-cropped to ``target``, without ever holding a cover.

    The box of the source that becomes the crop is scaled on its own: the same pixels as scaling the
    whole frame and cropping (PIL weighs the same source pixels). ``reader`` decodes at full size, as
    stored: ``rotation`` (degrees counter-clockwise) turns each frame upright first, ``source`` is the
    upright size.
    """
    from PIL import Image

    stored = source[::-1] if rotation in (90, 270) else source
    top, left = (cover[0] - target[0]) // 2, (cover[1] - target[1]) // 2
    sy, sx = cover[0] / source[0], cover[1] / source[1]
    box = (left / sx, top / sy, (left + target[1]) / sx, (top + target[0]) / sy)
    out = np.empty((len(wanted), *target, 3), np.uint8)
    for row, index in enumerate(wanted):
        upright = np.rot90(_rgb(reader[index].asnumpy(), *stored), k=rotation // 90)
        frame = Image.fromarray(np.ascontiguousarray(upright))
        out[row] = np.asarray(frame.resize((target[1], target[0]), Image.BILINEAR, box=box))
    return out


def _decode_scaled(path: str, wanted: list[int], cover: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """Frames ``wanted`` scaled to ``cover`` by decord and centre-cropped to ``target``.

    decord's scaler (in the decoder's colour space) is what makes decoding fast: 0.10 s instead of
    0.31 s for 49 frames of 720x480.
    """
    import decord

    top, left = (cover[0] - target[0]) // 2, (cover[1] - target[1]) // 2
    reader = decord.VideoReader(path, ctx=decord.cpu(0), width=cover[1], height=cover[0], num_threads=1)
    out = np.empty((len(wanted), *target, 3), np.uint8)
    per_call = max(1, DECODE_CHUNK_BYTES // (cover[0] * cover[1] * 3))
    for start in range(0, len(wanted), per_call):
        chunk = wanted[start : start + per_call]
        try:
            batch = reader.get_batch(chunk).asnumpy()
        except decord.DECORDError:
            # The batch copy fails where frames come back padded (see _rgb); single frames do not.
            batch = np.stack([reader[i].asnumpy() for i in chunk])
        out[start : start + len(chunk)] = _rgb(batch, *cover)[:, top : top + target[0], left : left + target[1]]
    return out


def jpeg_frame(frame: np.ndarray, quality: int = 95) -> bytes:
    """One frame ``[H, W, 3]`` uint8 as a JPEG at its own size."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


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
