"""Clip geometry, searched with hypothesis: every clip either decodes to the frames it shows, or is skipped.

Sizes 2..1920 (odd, prime, portrait, landscape), display rotations (MP4, MOV, MKV), frame rates
1..120 and variable ones, 4:2:0 / 4:4:4 / 10-bit, 1..300 frames. For each generated clip, the
ClipReader item (what preprocess runs: ``read_clip``, then the JPEG strips) never raises, and either
holds the frames an independent decoder (PyAV) gives, resized as docs/preprocess.md says, at the
times the sampling rule picks, or is a skip for a reason the clip really has.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, reject, settings
from hypothesis import strategies as st
from PIL import Image

from cogvx.preprocess.encoding import ClipReader, Job, Skipped
from cogvx.preprocess.sources import Clip
from cogvx.preprocess.video import FrameSpec, SkipClip, closest_resolution, plan_frames
from tests.conftest import property_examples
from tests.helpers.clipgen import PIXEL_FORMATS, CannotStore, frame_spec, make_clip, pyav_frames, read_in_a_child, sized

# Mean absolute difference, in levels of 255, allowed between our frames and PyAV's resized with PIL:
# both decode the same bitstream, so what differs is the scaler (decord's swscale in YUV vs PIL in RGB),
# most where a few pixels are enlarged 4x.
TOLERANCE = 6.0
SOURCE_REASONS = {"too short", "too small", "too large"}  # what a well-formed clip may be skipped for


@dataclass(frozen=True)
class Case:
    height: int  # as displayed
    width: int
    frames: int = 10
    fps: float = 24.0
    gaps: tuple[float, ...] | None = None  # variable frame rate: each frame's duration in 1/fps units
    rotation: int = 0
    pix_fmt: str = "yuv420p"
    codec: str | None = None
    container: str = ".mp4"  # odd 4:2:0 sizes go to .mov (FFV1)
    resolutions: tuple[tuple[int, int], ...] = ((32, 48), (48, 32), (32, 32))
    frame_buckets: tuple[int, ...] = (5, 9)
    sample_fps: float = 8.0
    resize: str = "crop"
    windows: int = 1

    def spec(self) -> FrameSpec:
        return frame_spec(resolutions=self.resolutions, frame_buckets=self.frame_buckets, min_frames=5,
                         fps=self.sample_fps, resize=self.resize, windows=self.windows)  # fmt: skip

    def times(self) -> list[float] | None:
        if self.gaps is None:
            return None
        return [float(t) for t in np.concatenate([[0.0], np.cumsum(self.gaps[: self.frames - 1])]) / self.fps]


PRIMES = [2, 3, 5, 7, 11, 13, 17, 31, 37, 61, 97, 127, 251, 479, 719, 1021, 1277, 1901]
small_side = st.one_of(st.integers(2, 96), st.sampled_from(PRIMES[:11]))
large_side = st.one_of(st.integers(97, 1920), st.sampled_from([480, 720, 1080, 1280, 1920, *PRIMES[11:]]))


@st.composite
def cases(draw) -> Case:
    sides = st.one_of(small_side, small_side, small_side, large_side)  # mostly small, so encodes are quick
    height, width = draw(sides), draw(sides)
    fps = draw(st.one_of(st.integers(1, 120).map(float), st.sampled_from([23.976, 29.97, 59.94])))
    sample_fps = draw(st.sampled_from([8.0, 24.0, 4.0]))
    # Mostly long enough for 5 frames at sample_fps (else the clip is only "too short"), at most 300,
    # and few frames where they are large.
    enough = min(4 * math.ceil(max(fps / sample_fps, 1)) + 1, 300)
    most = 300 if height * width <= 20_000 else 12
    frames = min(draw(st.one_of(st.integers(enough, enough + 40), st.integers(1, 300))), max(most, 5))
    gaps = None
    if draw(st.integers(0, 3)) == 0:  # a quarter of the clips have a variable frame rate
        gaps = tuple(draw(st.lists(st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0]), min_size=299, max_size=299)))
    return Case(
        height=height,
        width=width,
        frames=frames,
        fps=fps,
        gaps=gaps,
        rotation=draw(st.sampled_from([0, 0, 90, 180, 270])),
        container=draw(st.sampled_from([".mp4", ".mp4", ".mov", ".mkv"])),
        pix_fmt=draw(st.sampled_from(PIXEL_FORMATS)),
        sample_fps=sample_fps,
        resize=draw(st.sampled_from(["crop", "crop", "stretch"])),
        windows=draw(st.integers(1, 3)),
    )


def expected_sampling(case: Case, times: list[float]) -> tuple[float, list[list[list[int]]]]:
    """The clip's rate and the frames docs/preprocess.md says are taken, from its real timestamps
    (no answer: the clip is too short).

    Several answers where the rule meets a tie (a step of exactly x.5 frames, a grid time halfway
    between two frames): decord's timestamps are float32, so either side of a tie is right.
    """
    total, stamps = len(times), np.asarray(times)
    step = (stamps[-1] - stamps[0]) / (total - 1) if total > 1 else 1 / case.fps
    grid = stamps[0] + step * np.arange(total)
    variable = total >= 3 and np.abs(stamps - grid).max() > step / 2
    rate = case.fps if case.gaps is None else 1 / step
    answers = []
    for nudge in (1 - 1e-6, 1.0, 1 + 1e-6):
        try:
            _, windows, _ = plan_frames(total, rate * nudge, case.spec())
        except SkipClip:
            continue  # a nudge can cross the 4k+1 boundary of a clip that is just long enough
        if not variable:
            answers.append(windows)
            continue
        for side in ("left", "right"):  # the nearest frame to each grid time, ties to the earlier or later
            distance = np.abs(stamps[None, :] - grid[:, None])
            nearest = distance.argmin(1) if side == "left" else total - 1 - distance[:, ::-1].argmin(1)
            answers.append([[int(nearest[v]) for v in window] for window in windows])
    return rate, answers


def check_clip(case: Case, folder: Path) -> None:
    try:
        path = make_clip((folder / "clip").with_suffix(case.container), case.frames, case.height, case.width,
                         case.fps, case.pix_fmt, case.rotation, case.times(), case.codec)  # fmt: skip
    except CannotStore:
        reject()  # no encoder here makes this clip (odd 4:2:0 a few pixels thin): nothing to read
    spec = case.spec()
    shown, times = pyav_frames(path)
    assert shown.shape[1:3] == (case.height, case.width)  # the generator makes what it is asked for

    # ClipReader is what preprocess runs: read_clip, then the JPEG strips. It never raises.
    item = ClipReader([Job(Clip(path=path, caption="a clip", source=path.name))], spec)[0]
    if isinstance(item, Skipped):
        # decord cannot open a one-frame MKV ("Failed to measure duration/frame-count"); too short anyway.
        decord_limit = item.reason == "unreadable video" and case.frames == 1 and path.suffix == ".mkv"
        assert (item.reason in SOURCE_REASONS or decord_limit) and item.detail, item
        if item.reason == "too short":
            assert expected_sampling(case, times)[1] == [], item
        if item.reason == "too small":
            target = closest_resolution(case.height, case.width, spec.resolutions)
            assert max(target[0] / case.height, target[1] / case.width) > spec.max_upscale, item
        return
    if case.height * case.width >= 1_000_000:
        # A handful of frames at the source's size, never the whole cover (120x32768 -> a 480x131072 cover).
        assert read_in_a_child(path, spec)["peak_mb"] < 300 + 24 * case.height * case.width / 2**20
    rate, answers = expected_sampling(case, times)
    assert item.windows in answers
    frames, info, windows = item.frames.numpy(), item.info, item.windows
    target = tuple(info["size"])
    assert item.bucket == f"{len(windows[0])}x{target[0]}x{target[1]}"
    assert target == closest_resolution(case.height, case.width, spec.resolutions)
    assert info["source_size"] == [case.height, case.width]
    assert info["source_frames"] == len(times) == case.frames
    assert math.isclose(info["source_fps"], rate, rel_tol=1e-3)
    assert math.isclose(info["fps"], min(rate, spec.fps), rel_tol=1e-3)
    assert frames.shape == (len(windows), len(windows[0]), *target, 3) and frames.dtype == np.uint8
    for got, window in zip(frames, windows, strict=True):
        diff = np.abs(got.astype(np.float64) - sized(shown[window], *target, spec.resize)).mean()
        assert diff < TOLERANCE, f"frames differ from PyAV's by {diff:.2f} levels on average"
    for strip in item.strips:
        assert Image.open(io.BytesIO(strip)).mode == "RGB"


@pytest.mark.slow
@settings(max_examples=property_examples(10))
@given(case=cases())
# Issue 9.1: decord pads the rows of a 64x48 clip decoded to 48x36 (shape (36, 48, 4)).
@example(case=Case(height=48, width=64, resolutions=((36, 48),), frame_buckets=(5,), sample_fps=24.0))
# Issue 10.7: 120x32768 into 480x720 (4x enlarging): a 480x131072 cover took 6.1 GB.
@example(case=Case(height=120, width=32768, frames=5, codec="mjpeg", resolutions=((480, 720),), frame_buckets=(5,),
                   sample_fps=24.0))  # fmt: skip
# 16:9 into a square bucket: the centre crop drops 12 of the cover's 57 columns on each side.
@example(case=Case(height=90, width=160, frames=12, resolutions=((32, 32),), frame_buckets=(5,), sample_fps=24.0))
# One frame in an MKV: decord cannot open it; a skip with its reason, never an exception.
@example(case=Case(height=48, width=64, frames=1, container=".mkv"))
# A phone's portrait clip, 10-bit, odd sizes, and a variable frame rate.
@example(case=Case(height=97, width=61, frames=40, rotation=90, pix_fmt="yuv420p10le", gaps=(1.0, 3.0) * 150))
def test_every_clip_decodes_to_what_it_shows_or_is_skipped(case: Case, tmp_path_factory):
    check_clip(case, tmp_path_factory.mktemp("clip"))
