"""Generated test clips: any size, frame rate, pixel format, display rotation, or a variable frame rate.

Clips are written with the ffmpeg binary that imageio-ffmpeg ships (raw RGB frames piped in), so the
tests need no system ffmpeg. ``content(...)`` gives the frames a clip shows: smooth gradients (red
along x, green along y, at most 8 levels a pixel) so that scalers agree within a few levels, and a
blue level that changes by 53 per frame so that taking a neighbouring frame is a large error.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

# libx264 stores these; odd sizes in 4:2:0 go to FFV1 in a .mov (libx264 cannot store them).
PIXEL_FORMATS = ("yuv420p", "yuv444p", "yuv420p10le")


class CannotStore(ValueError):
    """No codec here stores this size in this pixel format (odd 4:2:0 frames a few pixels thin)."""


def ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def content(frames: int, height: int, width: int) -> np.ndarray:
    """What a clip shows, ``[frames, height, width, 3]`` uint8, in display orientation."""
    # At most 8 levels a pixel: decoders convert steeper 4:2:0 chroma differently (up to 9 levels apart
    # for 10-bit at 8 rows), which would hide what the comparison is for.
    x = 16 + np.arange(width) * min(219 / max(width - 1, 1), 8)
    y = 16 + np.arange(height) * min(219 / max(height - 1, 1), 8)
    out = np.empty((frames, height, width, 3), np.uint8)
    out[..., 0] = np.round(x)[None, None, :]
    out[..., 1] = np.round(y)[None, :, None]
    out[..., 2] = (40 + 53 * np.arange(frames) % 180)[:, None, None]
    return out


def write_clip(
    path: Path,
    frames: np.ndarray,
    fps: float = 24.0,
    pix_fmt: str = "yuv420p",
    rotation: int = 0,
    times: list[float] | None = None,
    codec: str | None = None,
) -> Path:
    """Encode ``frames`` (display orientation) so that a player shows exactly them.

    ``rotation`` (0, 90, 180, 270: degrees counter-clockwise, as ffmpeg's ``-display_rotation``)
    stores the frames turned the other way plus the display matrix that turns them back, as a phone
    does. ``times`` (seconds, increasing) makes a variable frame rate clip with those timestamps.
    ``codec`` "ffv1" (lossless, .mov) or "mjpeg" (.mkv) store sizes libx264 cannot (above 16384 px).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = np.ascontiguousarray(np.rot90(frames, k=-rotation // 90, axes=(1, 2)))
    count, height, width = stored.shape[:3]
    lossless = codec == "ffv1" or (codec is None and (height % 2 or width % 2) and pix_fmt != "yuv444p")
    encoder = ["-c:v", "ffv1"] if lossless else ["-c:v", "libx264", "-preset", "ultrafast", "-qp", "4"]
    container = path.with_suffix(".mov") if lossless else path
    if codec == "mjpeg":  # quick to write and to read at any size up to 65535 px
        encoder, pix_fmt = ["-c:v", "mjpeg", "-q:v", "2"], "yuvj420p" if pix_fmt == "yuv420p" else pix_fmt
        container = path.with_suffix(".mkv")
    timing = []
    if times is not None:
        # Frames come in at 1000 fps (timestamps in ms) and setpts moves each to its own time.
        if len(times) != count or any(b <= a for a, b in zip(times[:-1], times[1:], strict=False)):
            raise ValueError("times must give one increasing timestamp per frame")
        table = _balanced_sum([f"eq(N,{i})*{round(t * 1000)}" for i, t in enumerate(times)])
        timing = ["-vf", f"setpts='({table})/(1000*TB)'", "-fps_mode", "passthrough", "-video_track_timescale", "1000"]
    plain = container if rotation == 0 else container.with_name(f"unrotated-{container.name}")
    command = [ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{width}x{height}", "-r", "1000" if times is not None else f"{fps}", "-i", "-",
               *timing, *encoder, "-pix_fmt", pix_fmt, str(plain)]  # fmt: skip
    done = subprocess.run(command, input=stored.tobytes(), capture_output=True)
    # FFV1 finds no slice count of its own for some sizes; one of these fits each size it can store.
    for slices in ("1", "4", "6", "9", "12", "16", "24", "30") if lossless else ():
        if not done.returncode:
            break
        retry = [*command[: command.index("ffv1") + 1], "-slices", slices, *command[command.index("ffv1") + 1 :]]
        done = subprocess.run(retry, input=stored.tobytes(), capture_output=True)
    if done.returncode and lossless and b"slices" in done.stderr:
        raise CannotStore(f"FFV1 stores no {width}x{height} frames in {pix_fmt} (too thin for any slice count)")
    if done.returncode:
        raise RuntimeError(f"ffmpeg could not write {plain}: {done.stderr.decode(errors='replace')[-2000:]}")
    if rotation:
        # -display_rotation is an input option: it tags the stream, and a stream copy keeps the tag.
        subprocess.run(
            [ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-display_rotation", str(rotation),
             "-i", str(plain), "-c", "copy", str(container)],
            check=True, capture_output=True,
        )  # fmt: skip
        plain.unlink()
    return container


def _balanced_sum(terms: list[str]) -> str:
    """``a+b+c+...`` nested as a balanced tree: ffmpeg's expression parser fails on a flat chain of 300."""
    if len(terms) == 1:
        return terms[0]
    half = len(terms) // 2
    return f"({_balanced_sum(terms[:half])}+{_balanced_sum(terms[half:])})"


def make_clip(
    path: Path,
    frames: int = 10,
    height: int = 48,
    width: int = 64,
    fps: float = 24.0,
    pix_fmt: str = "yuv420p",
    rotation: int = 0,
    times: list[float] | None = None,
    codec: str | None = None,
) -> Path:
    """A clip of ``content(frames, height, width)``; the path becomes .mov where FFV1 stores it."""
    return write_clip(path, content(frames, height, width), fps, pix_fmt, rotation, times, codec)


def regions(frames: int, height: int, width: int, edges: list[int], colours: list[tuple[int, int, int]]) -> np.ndarray:
    """Vertical bands: columns ``edges[i] .. edges[i+1]`` in ``colours[i]`` (edges start at 0, end at width)."""
    out = np.empty((frames, height, width, 3), np.uint8)
    for start, end, colour in zip(edges[:-1], edges[1:], colours, strict=True):
        out[:, :, start:end] = colour
    return out


def pyav_frames(path: Path) -> tuple[np.ndarray, list[float]]:
    """Every frame decoded by PyAV (independent of decord), upright, and its time in seconds."""
    import av

    frames, times = [], []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            # PyAV reports the display rotation (degrees counter-clockwise) but does not apply it.
            frames.append(np.rot90(frame.to_ndarray(format="rgb24"), k=round(frame.rotation / 90) % 4))
            times.append(float(frame.time))
    return np.stack(frames), times


def sized(frames: np.ndarray, height: int, width: int, resize: str = "crop") -> np.ndarray:
    """``frames`` at a bucket's size as docs/preprocess.md says: cover and centre-crop, or stretch."""
    from PIL import Image

    src_h, src_w = frames.shape[1:3]
    if resize == "stretch":
        cover = (height, width)
    else:
        scale = max(height / src_h, width / src_w)
        cover = (max(height, round(src_h * scale)), max(width, round(src_w * scale)))
    top, left = (cover[0] - height) // 2, (cover[1] - width) // 2
    # Resizing the box of the source that becomes the crop gives the same pixels as resizing the whole
    # frame to the cover and cropping it (PIL weighs the same source pixels), without a 480x131072 cover.
    sy, sx = cover[0] / src_h, cover[1] / src_w
    box = (left / sx, top / sy, (left + width) / sx, (top + height) / sy)
    return np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize((width, height), Image.BILINEAR, box=box))
        for f in frames
    ])  # fmt: skip


def ffmpeg_frames(path: Path, height: int, width: int) -> np.ndarray:
    """Every frame as the ffmpeg command line shows it (display rotation applied), ``[N, H, W, 3]``."""
    raw = subprocess.run(
        [ffmpeg(), "-loglevel", "error", "-i", str(path), "-fps_mode", "passthrough", "-f", "rawvideo",
         "-pix_fmt", "rgb24", "-"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


# PreprocessConfig's frame settings, spelled out for tests (FrameSpec has no defaults of its own;
# tests/preprocess/test_frame_plans.py checks that these are PreprocessConfig's).
SPEC_DEFAULTS = dict(
    resolutions=((480, 720),), frame_buckets=(49,), min_frames=5, fps=8.0, skip_frames_start=0, skip_frames_end=0,
    resize="crop", windows=1, max_upscale=4.0, frame_step=4,
)  # fmt: skip


def frame_spec(**changes):
    """A FrameSpec with preprocessing's default settings, except ``changes``."""
    from cogvx.preprocess.video import FrameSpec

    return FrameSpec(**(SPEC_DEFAULTS | changes))


READ_IN_A_CHILD = """
import json, sys
from cogvx.preprocess.video import FrameSpec, SkipClip, read_clip
fields = json.loads(sys.argv[2])
fields["resolutions"] = tuple(map(tuple, fields["resolutions"]))
fields["frame_buckets"] = tuple(fields["frame_buckets"])
try:
    frames, _, _ = read_clip(sys.argv[1], FrameSpec(**fields))
    result = {"shape": list(frames.shape), "centre": frames[0, 0, frames.shape[2] // 2, frames.shape[3] // 2].tolist()}
except SkipClip as err:
    result = {"skip": err.reason}
# VmHWM: this process's own high-water mark (ru_maxrss would include a large parent's, passed on by fork).
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({**result, "peak_mb": int(status["VmHWM"].split()[0]) / 1024}))
"""


def read_in_a_child(path: Path, spec) -> dict:
    """``read_clip`` in a fresh process: the frames' shape and centre pixel (or the skip reason), and
    the process's peak resident memory in MB."""
    fields = json.dumps(dataclasses.asdict(spec))
    done = subprocess.run([sys.executable, "-c", READ_IN_A_CHILD, str(path), fields], capture_output=True, text=True)
    if done.returncode:
        raise AssertionError(f"reading {path} in a child process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def zero_frame_rate(source: Path, target: Path) -> Path:
    """A copy of an MP4 whose samples and track last no time: the container gives no frame rate."""
    data = bytearray(source.read_bytes())

    def walk(start: int, end: int):
        while start + 8 <= end:
            size, kind = struct.unpack(">I4s", data[start : start + 8])
            if size < 8:
                return
            yield start, size, kind
            if kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl"):
                yield from walk(start + 8, start + size)
            start += size

    found = False
    for start, _size, kind in walk(0, len(data)):
        if kind == b"stts":  # (count, delta) pairs: every delta becomes 0
            (entries,) = struct.unpack(">I", data[start + 12 : start + 16])
            for k in range(entries):
                offset = start + 16 + 8 * k + 4
                data[offset : offset + 4] = bytes(4)
            found = True
        if kind == b"mdhd":  # and the track lasts no time: version 0 keeps the duration at 24, version 1 at 32
            offset, width = (start + 24, 4) if data[start + 8] == 0 else (start + 32, 8)
            data[offset : offset + width] = bytes(width)
    if not found:
        raise ValueError(f"{source} has no stts box (not an MP4?)")
    target.write_bytes(bytes(data))
    return target
