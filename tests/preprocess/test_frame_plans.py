"""The pure parts of reading a clip, by value: frame plans, buckets, decode sizes, frame rates, row padding.

These run in milliseconds and need no model folder, so mutation testing (docs/testing.md) runs them for
every mutant of ``cogvx/preprocess/video.py``. Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from cogvx.preprocess import video
from cogvx.preprocess.video import (
    Bucket,
    SkipClip,
    closest_resolution,
    decode_size,
    jpeg_strip,
    largest_4k1,
    plan_clip,
    plan_frames,
    sampling_stride,
)
from tests.helpers.clipgen import frame_spec


def test_the_spelled_out_settings_are_preprocess_defaults():
    from cogvx.preprocess.run import PreprocessConfig

    assert PreprocessConfig(data="clips").frame_spec((480, 720), 49, 4) == frame_spec()


def test_skip_clip_carries_its_reason_and_detail():
    err = SkipClip("too short", "4 frames")
    assert (str(err), err.reason, err.detail) == ("too short: 4 frames", "too short", "4 frames")
    bare = SkipClip("no frames")
    assert (str(bare), bare.reason, bare.detail) == ("no frames", "no frames", "")


def test_bucket_name_is_frames_height_width():
    assert Bucket(49, 480, 720).name == "49x480x720"


def test_frame_spec_defaults_are_the_documented_ones():
    spec = frame_spec()
    assert spec.resolutions == ((480, 720),) and spec.frame_buckets == (49,) and spec.min_frames == 5
    assert spec.fps == 8.0 and (spec.skip_frames_start, spec.skip_frames_end) == (0, 0)
    assert spec.resize == "crop" and spec.windows == 1 and spec.max_upscale == 4.0


@pytest.mark.parametrize("n, expected", [(-3, 0), (0, 0), (1, 1), (4, 1), (5, 5), (8, 5), (9, 9), (52, 49), (53, 53)])
def test_largest_4k1(n: int, expected: int):
    assert largest_4k1(n) == expected


@pytest.mark.parametrize(
    "source_fps, fps, expected",
    [(24.0, 8.0, 3.0), (12.0, 8.0, 1.5), (8.0, 8.0, 1.0), (4.0, 8.0, 1.0), (1.0, 0.5, 2.0), (0.0, 8.0, 1.0)]
    + [(-5.0, 8.0, 1.0), (math.nan, 8.0, 1.0)],
)
def test_sampling_stride_is_source_frames_per_sample_never_below_one(source_fps: float, fps: float, expected: float):
    assert sampling_stride(source_fps, fps) == expected


def test_plan_frames_takes_the_largest_fitting_bucket_sampled_by_time():
    # 97 frames at 24 fps -> every 3rd: 33 available; 33 fits exactly, 29 is smaller, 37 is too long.
    count, windows, available = plan_frames(97, 24.0, frame_spec(frame_buckets=(29, 33, 37)))
    assert (count, available) == (33, 33) and windows == [list(range(0, 97, 3))]
    # 30 fps to 12: stride 2.5, indices int(k * 2.5 + 0.5): 0, 3, 5, 8, ...
    count, windows, available = plan_frames(23, 30.0, frame_spec(frame_buckets=(9,), fps=12))
    assert (count, available) == (9, 9) and windows == [[0, 3, 5, 8, 10, 13, 15, 18, 20]]


def test_plan_frames_spreads_windows_evenly_from_first_to_last_frame():
    # 100 frames at 30 fps to 12: stride 2.5, 40 available, 4 windows of 9 (40 // 9 = 4). Their first
    # samples are round(i * 31 / 3) = 0, 10, 21, 31; sample s is source frame int(s * 2.5 + 0.5).
    count, windows, available = plan_frames(100, 30.0, frame_spec(frame_buckets=(9,), fps=12, windows=4))
    assert (count, available) == (9, 40)
    assert windows == [[int((first + k) * 2.5 + 0.5) for k in range(9)] for first in (0, 10, 21, 31)]
    assert windows[0][0] == 0 and windows[-1][-1] == 98  # the last window ends at the last sample (39)
    # 240 frames at 24 fps: 80 samples, 3 windows of 17: firsts 0, round(31.5) = 32, 63.
    _, windows, available = plan_frames(240, 24.0, frame_spec(frame_buckets=(9, 17), windows=3))
    assert available == 80 and [w[0] for w in windows] == [0, 96, 189] and windows[-1][-1] == 237
    # Two windows asked, room for one (17 // 9 = 1): one window at the start.
    _, windows, available = plan_frames(51, 24.0, frame_spec(frame_buckets=(9,), windows=2))
    assert available == 17 and windows == [list(range(0, 27, 3))]


def test_plan_frames_respects_the_skips():
    # Frames 2..6 remain of 10 (skip 2 at the start, 3 at the end); 4 fps source to 8 fps: stride 1.
    count, windows, available = plan_frames(
        10, 4.0, frame_spec(frame_buckets=(5,), skip_frames_start=2, skip_frames_end=3)
    )
    assert (count, available) == (5, 5) and windows == [[2, 3, 4, 5, 6]]
    with pytest.raises(SkipClip) as err:
        plan_frames(20, 24.0, frame_spec(skip_frames_start=15, skip_frames_end=5))
    assert (err.value.reason, err.value.detail) == ("no frames left", "20 frames, skipping 15 + 5")
    with pytest.raises(SkipClip, match="no frames left"):
        plan_frames(20, 24.0, frame_spec(skip_frames_start=16, skip_frames_end=5))
    # One frame left is one sample: enough for a one-frame bucket.
    assert plan_frames(
        21, 24.0, frame_spec(frame_buckets=(1,), min_frames=1, skip_frames_start=15, skip_frames_end=5)
    ) == (
        1,
        [[15]],
        1,
    )


def test_short_clips_take_their_longest_4k1_prefix_down_to_min_frames():
    # 13 frames at 24 fps -> 5 samples: below the 49 bucket, 5 is 4k+1 and == min_frames.
    assert plan_frames(13, 24.0, frame_spec()) == (5, [[0, 3, 6, 9, 12]], 5)
    # 36 frames -> 12 samples -> 9.
    assert plan_frames(36, 24.0, frame_spec()) == (9, [list(range(0, 27, 3))], 12)
    with pytest.raises(SkipClip) as err:
        plan_frames(10, 24.0, frame_spec())  # 4 samples -> 1 frame
    assert err.value.reason == "too short"
    assert err.value.detail == "4 frames at 8 fps, need at least 5 (--min-frames)"
    with pytest.raises(SkipClip) as err:
        plan_frames(13, 24.0, frame_spec(min_frames=6, fps=7.5))
    assert err.value.detail == "4 frames at 7.5 fps, need at least 6 (--min-frames)"


def test_closest_resolution_compares_aspect_ratios_on_a_log_scale():
    # A square clip is as far from 2:1 as from 1:2 on a log scale (linear: 1 vs 0.5); the first wins.
    assert closest_resolution(100, 100, ((32, 64), (64, 32))) == (32, 64)
    assert closest_resolution(100, 100, ((64, 32), (32, 64))) == (64, 32)
    # 16:9 landscape, portrait and square clips against three buckets.
    resolutions = ((480, 720), (720, 480), (512, 512))
    assert closest_resolution(720, 1280, resolutions) == (480, 720)
    assert closest_resolution(1280, 720, resolutions) == (720, 480)
    assert closest_resolution(500, 520, resolutions) == (512, 512)
    # On a log scale 3:1 is nearer 4:1 (0.29) than 2:1 (0.41), and 2.5:1 nearer 2:1 (0.22) than 4:1 (0.47).
    assert closest_resolution(10, 30, ((10, 10), (10, 20), (10, 40))) == (10, 40)
    assert closest_resolution(10, 25, ((10, 10), (10, 20), (10, 40))) == (10, 20)


def test_plan_clip_picks_bucket_and_refuses_too_much_enlarging():
    spec = frame_spec(resolutions=((64, 96), (96, 64), (80, 80)), frame_buckets=(9, 17, 25))
    plan = plan_clip(60, 24.0, 720, 1280, spec)  # 20 samples -> 17
    assert plan.bucket == Bucket(17, 64, 96) and plan.available == 20 and plan.windows == [list(range(0, 49, 3))]
    assert plan_clip(200, 24.0, 1280, 720, spec).bucket == Bucket(25, 96, 64)
    # Enlarging exactly max_upscale is allowed: 8x8 -> 32x32 is 4x.
    square = frame_spec(resolutions=((32, 32),), frame_buckets=(5,))
    assert plan_clip(13, 24.0, 8, 8, square).bucket == Bucket(5, 32, 32)
    with pytest.raises(SkipClip) as err:
        plan_clip(13, 24.0, 7, 7, square)
    assert err.value.reason == "too small"
    assert err.value.detail == "7x7 would need 4.6x enlarging to 32x32 (--max-upscale 4)"
    # The cover needs the larger of the two scales: 16x64 into 32x32 is 2x (height), not 0.5x.
    with pytest.raises(SkipClip, match=r"16x64 would need 2.0x enlarging to 32x32 \(--max-upscale 1.5\)"):
        plan_clip(13, 24.0, 16, 64, frame_spec(resolutions=((32, 32),), frame_buckets=(5,), max_upscale=1.5))
    assert plan_clip(
        13, 24.0, 64, 16, frame_spec(resolutions=((32, 32),), frame_buckets=(5,), max_upscale=2)
    ).bucket == (Bucket(5, 32, 32))


@pytest.mark.parametrize(
    "height, width, target, resize, expected",
    [
        (64, 192, (32, 48), "crop", (32, 96)),  # scale 0.5 by height covers the width
        (192, 64, (48, 32), "crop", (96, 32)),  # and the other way round
        (97, 61, (32, 48), "crop", (76, 48)),  # width decides: 61 -> 48, 97 * 48 / 61 = 76.3
        (8, 8, (32, 32), "crop", (32, 32)),  # enlarging
        (64, 192, (32, 48), "stretch", (32, 48)),
        (97, 61, (32, 48), "stretch", (32, 48)),
    ],
)
def test_decode_size_is_the_smallest_cover_or_the_target(height, width, target, resize, expected):
    assert decode_size(height, width, target, resize) == expected


def test_unreadable_keeps_the_type_and_last_line():
    assert video._unreadable(ValueError("first line\nlast line \n")) == "ValueError: last line"
    assert video._unreadable(OSError("")) == "OSError: "
    assert video._unreadable(RuntimeError("x" * 300)) == "RuntimeError: " + "x" * 200


def test_rgb_passes_whole_frames_and_strips_row_padding():
    rgb = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
    assert video._rgb(rgb, 3, 5) is rgb
    # decord's padded layout: each row is 5 * 3 RGB bytes then 5 zero bytes, reported as (3, 5, 4).
    padded = np.concatenate([rgb.reshape(2, 3, 15), np.zeros((2, 3, 5), np.uint8)], axis=-1).reshape(2, 3, 5, 4)
    assert np.array_equal(video._rgb(padded, 3, 5), rgb)
    assert np.array_equal(video._rgb(padded[0], 3, 5), rgb[0])  # one frame as well as a batch
    with pytest.raises(SkipClip) as err:
        video._rgb(rgb, 3, 4)
    assert err.value.reason == "decoding failed"
    assert err.value.detail == "decoded frames of shape (3, 5, 3), not (3, 4, 3)"
    with pytest.raises(SkipClip, match=r"shape \(3, 5, 2\), not \(3, 5, 3\)"):
        video._rgb(rgb[..., :2], 3, 5)


class Stamps:
    """A reader that only knows its frames' timestamps (decord's ``get_frame_timestamp``: start, end)."""

    def __init__(self, stamps: list[float]):
        self.stamps = np.array(stamps, np.float64)

    def get_frame_timestamp(self, indices) -> np.ndarray:
        picked = self.stamps[list(indices)]
        return np.stack([picked, picked + 0.001], axis=1)


def frame_times(stamps: list[float], container_fps: float):
    return video._frame_times(Stamps(stamps), len(stamps), container_fps)


def test_frame_rate_from_timestamps_or_the_container():
    eighths = [i * 0.125 for i in range(9)]  # 8 fps, exact in binary
    assert frame_times(eighths, 8.0) == (8.0, None)
    # The container's figure where its grid ends within half a frame (0.0625 s) of the last stamp:
    # 8 frames at 8.4 fps span 0.952 s, 0.048 from 1.0.
    assert frame_times(eighths, 8.4) == (8.4, None)
    # Else the stamps' own rate: 8 frames at 9 fps span 0.889 s, 0.111 from 1.0.
    assert frame_times(eighths, 9.0) == (8.0, None)
    # Exactly half a frame off is still the container's: [0, 1] at 2 fps spans 0.5, half of the 1 s step.
    assert frame_times([0.0, 1.0], 2.0) == (2.0, None)
    assert frame_times([0.0, 0.05], 10.0) == (20.0, None)  # two frames are enough to measure
    # No usable container rate: the stamps decide.
    assert frame_times(eighths, math.nan) == (8.0, None)
    assert frame_times(eighths, 0.0) == (8.0, None)
    assert frame_times(eighths, -8.0) == (8.0, None)


def test_without_usable_timestamps_the_container_rate_is_used_or_the_clip_skipped():
    assert video._frame_times(Stamps([0.0]), 1, 24.0) == (24.0, None)  # one frame: no stamps to compare
    assert frame_times([0.0, 0.1, 0.1, 0.2], 10.0) == (10.0, None)  # a repeated stamp
    assert frame_times([0.0, 0.2, 0.1, 0.3], 10.0) == (10.0, None)  # a stamp going back
    assert frame_times([0.0, math.nan, 0.2], 10.0) == (10.0, None)
    assert frame_times([0.0, math.inf, 0.2], 10.0) == (10.0, None)
    for container in (math.nan, math.inf, 0.0, -1.0):
        with pytest.raises(SkipClip) as err:
            frame_times([0.0, 0.0], container)
        assert err.value.reason == "no frame rate"
        assert err.value.detail == (
            f"the container gives {container:g} frames per second and no usable timestamps; re-encode it with a "
            "frame rate (ffmpeg -i IN -r 24 OUT)"
        )


def test_variable_frame_rate_takes_the_frame_nearest_each_step():
    # Stamps 0, 0.125, 0.25, 0.75, 1.0: the even grid is 0, 0.25, 0.5, 0.75, 1.0 (4 fps), and the third
    # frame is 0.25 from its grid point, more than half the 0.25 step: variable. Nearest frames: 0;
    # 0.25 -> frame 2; 0.5 is equally far from 0.25 and 0.75 -> the earlier, frame 2; 0.75 -> 3; 1.0 -> 4.
    fps, nearest = frame_times([0.0, 0.125, 0.25, 0.75, 1.0], 99.0)
    assert fps == 4.0 and nearest.tolist() == [0, 2, 2, 3, 4]
    # Exactly half a step off the grid is still constant.
    assert frame_times([0.0, 0.375, 0.5, 0.75, 1.0], 4.0) == (4.0, None)
    # A gap at each end, 2 s over 8 steps (4 fps): 0.25 is as near 0.0 as 0.5 (-> 0), 1.5 nearer 1.25
    # than 2.0 (-> 7), the frames between are each taken once or skipped.
    fps, nearest = frame_times([0.0, 0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 2.0], 10.0)
    assert fps == 4.0 and nearest.tolist() == [0, 0, 1, 3, 5, 7, 7, 8, 8]


def test_jpeg_strip_shows_evenly_spaced_frames_side_by_side():
    levels = np.arange(10, dtype=np.uint8) * 25
    frames = np.broadcast_to(levels[:, None, None, None], (10, 32, 48, 3)).copy()
    strip = np.asarray(Image.open(io.BytesIO(jpeg_strip(frames))).convert("RGB")).astype(int)
    # 8 of 10 frames: linspace(0, 9, 8) rounded = 0, 1, 3, 4, 5, 6, 8, 9; each 64 high and 96 wide.
    assert strip.shape == (64, 8 * 96, 3)
    shown = [round(strip[:, 96 * i + 8 : 96 * i + 88].mean()) for i in range(8)]
    assert [abs(s - 25 * f) <= 2 for s, f in zip(shown, [0, 1, 3, 4, 5, 6, 8, 9], strict=True)] == [True] * 8
    # Fewer frames than asked: each once. Other sizes: as asked.
    few = Image.open(io.BytesIO(jpeg_strip(frames[:3], count=8, height=16)))
    assert few.size == (3 * 24, 16) and few.mode == "RGB"
    assert jpeg_strip(frames) == jpeg_strip(frames, count=8, height=64, quality=85)
    assert len(jpeg_strip(frames, quality=95)) > len(jpeg_strip(frames, quality=20))


def test_jpeg_strip_scales_each_frame_bilinearly():
    # Grey noise (no colour for JPEG's chroma subsampling to lose) at quality 100: the strip is PIL's
    # bilinear resize of each frame within 1 level here (2 allowed for other libjpeg builds); PIL's
    # default filter (bicubic) differs by up to 31 levels, 7.5 on average.
    grey = np.random.default_rng(0).integers(0, 256, (3, 48, 72, 1), dtype=np.uint8)
    frames = np.repeat(grey, 3, axis=3)
    strip = np.asarray(Image.open(io.BytesIO(jpeg_strip(frames, count=3, height=32, quality=100))).convert("RGB"))
    expected = np.concatenate([np.asarray(Image.fromarray(f).resize((48, 32), Image.BILINEAR)) for f in frames], axis=1)
    diff = np.abs(strip.astype(int) - expected)
    assert strip.shape == (32, 3 * 48, 3) and diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_jpeg_strip_of_very_tall_frames_is_one_pixel_wide_a_frame():
    tall = np.full((3, 128, 2, 3), 200, np.uint8)  # 2 * 64 / 128 = 1 pixel wide at 64 high
    assert Image.open(io.BytesIO(jpeg_strip(tall))).size == (3, 64)
    thread = np.full((2, 200, 1, 3), 200, np.uint8)  # 0.32 rounds to 0: still 1 pixel
    assert Image.open(io.BytesIO(jpeg_strip(thread))).size == (2, 64)


def test_frame_rates_of_clips_that_start_late_or_run_below_one_fps():
    # Timestamps need not start at 0; rates below 1 fps (time-lapse) are rates like any other.
    assert frame_times([1.0 + i * 0.125 for i in range(9)], 30.0) == (8.0, None)
    assert frame_times([2.0 + i * 0.125 for i in range(9)], 8.4) == (8.4, None)
    fps, nearest = frame_times([2.0, 2.125, 2.25, 2.75, 3.0], 99.0)
    assert fps == 4.0 and nearest.tolist() == [0, 2, 2, 3, 4]
    assert frame_times([0.0, 0.0], 0.5) == (0.5, None)  # no usable stamps, a 0.5 fps container
    # 4 steps of 2 s: 0.55 fps ends its grid at 7.27 s, within a frame's half (1 s) of the last stamp (8 s).
    assert frame_times([0.0, 2.0, 4.0, 6.0, 8.0], 0.55) == (0.55, None)


def test_the_last_grid_point_may_fall_just_after_the_last_frame():
    # In floating point 0.1 + 7 * (0.9 / 7) is a little above 1.0: the grid's end still takes the last frame.
    stamps = [0.1, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 1.0]
    fps, nearest = frame_times(stamps, 99.0)
    assert fps == pytest.approx(7 / 0.9) and nearest.tolist() == [0, 6, 6, 6, 7, 7, 7, 7]
