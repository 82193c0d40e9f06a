"""Reading clips: pixels, frames and metadata as the clip is, for sizes, rates and rotations users have.

Clips are generated with ffmpeg (tests/helpers/clipgen.py); expected pixels come from what the clip was made
to show, or from PyAV, a decoder independent of decord.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogvx.preprocess.encoding import ClipItem, ClipReader, Job, ReadClip, Skipped
from cogvx.preprocess.run import PreprocessConfig, run
from cogvx.preprocess.sources import Clip
from cogvx.preprocess.video import FrameSpec, SkipClip, read_clip
from cogvx.shards import Manifest, read_shard
from tests.helpers.clipgen import (
    content,
    ffmpeg,
    ffmpeg_frames,
    frame_spec,
    make_clip,
    pyav_frames,
    regions,
    sized,
    write_clip,
    zero_frame_rate,
)

RED, GREEN, BLUE = (220, 30, 30), (30, 220, 30), (30, 30, 220)


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b).mean())


def reader_item(path: Path, spec: FrameSpec) -> ClipItem:
    return ClipReader([Job(Clip(path=path, source=path.name, caption="a clip"))], spec)[0]


# --- issue 9.1: decord pads the rows of some output widths ------------------------------------------


@pytest.mark.parametrize("height, width, tolerance", [(36, 48, 3), (18, 24, 3), (54, 72, 3), (2, 2, 6)])
def test_padded_widths_decode_right(tmp_path: Path, height: int, width: int, tolerance: float):
    # decord returns (36, 48, 4) for a 64x48 clip decoded to 48x36: 144 RGB bytes and 48 zero bytes a row.
    # Before the fix these frames went on to jpeg_strip, which raised "cannot write mode RGBA as JPEG".
    path = make_clip(tmp_path / "clip.mp4", frames=10, height=48, width=64)
    spec = frame_spec(resolutions=((height, width),), frame_buckets=(5,), fps=24, max_upscale=100)
    frames, plan, _ = read_clip(str(path), spec)
    assert frames.shape == (1, 5, height, width, 3) and frames.dtype == np.uint8
    expected = sized(pyav_frames(path)[0][plan.windows[0]], height, width)
    assert mean_diff(frames[0], expected) < tolerance  # decord's and PIL's kernels differ most at 2x2
    item = reader_item(path, spec)
    assert isinstance(item, ReadClip), item
    assert Image.open(io.BytesIO(item.strips[0])).mode == "RGB"


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv"])  # decord turns MP4/MOV itself, not Matroska
def test_rotated_clips_come_out_upright(tmp_path: Path, suffix: str):
    # A phone stores portrait video as landscape frames plus a display rotation; players turn it upright.
    shown = content(10, 96, 64)  # portrait, as it should appear
    spec = frame_spec(resolutions=((48, 32), (32, 48)), frame_buckets=(5,), fps=24)
    for rotation in (90, 180, 270):
        path = write_clip((tmp_path / f"r{rotation}").with_suffix(suffix), shown, rotation=rotation)
        assert mean_diff(ffmpeg_frames(path, 96, 64), shown) < 3  # the ffmpeg player shows it upright
        frames, plan, info = read_clip(str(path), spec)
        assert info["source_size"] == [96, 64] and info["size"] == [48, 32], rotation
        assert mean_diff(frames[0], sized(shown[plan.windows[0]], 48, 32)) < 3, rotation


def test_any_exception_while_reading_a_clip_is_a_skip_record(tmp_path: Path):
    path = make_clip(tmp_path / "clip.mp4", frames=40)
    broken = frame_spec(resolutions=((0, 0),))  # never passes PreprocessConfig; here it makes reading fail
    item = reader_item(path, broken)
    assert isinstance(item, Skipped) and item.reason == "reading failed"
    assert item.detail.startswith("ZeroDivisionError: ") and "video.py:" in item.detail


# --- issue 10.7: decode memory per clip (120x32768: an @example in test_clip_geometry.py) -------------


def test_decoding_in_several_calls_gives_the_same_frames(tmp_path: Path, monkeypatch):
    from cogvx.preprocess import video

    path = make_clip(tmp_path / "clip.mp4", frames=60, height=48, width=64)
    spec = frame_spec(resolutions=((32, 32),), frame_buckets=(9,), fps=24, windows=3)
    whole, plan, _ = read_clip(str(path), spec)
    calls = record_batches(monkeypatch)
    monkeypatch.setattr(video, "DECODE_CHUNK_BYTES", 5 * 32 * 43 * 3 + 10)  # 5 frames of the 32x43 cover a call
    chunked, _, _ = read_clip(str(path), spec)
    assert len(plan.windows) == 3 and np.array_equal(whole, chunked)
    assert mean_diff(chunked, np.stack([sized(content(60, 48, 64)[w], 32, 32) for w in plan.windows])) < 3
    wanted = sorted({i for w in plan.windows for i in w})
    assert len(wanted) == 27 and calls == [wanted[i : i + 5] for i in range(0, 27, 5)]  # 5, 5, 5, 5, 5, 2
    calls.clear()
    monkeypatch.setattr(video, "DECODE_CHUNK_BYTES", 1)  # less than a frame: one frame a call, never none
    assert np.array_equal(read_clip(str(path), spec)[0], whole) and calls == [[i] for i in wanted]


def record_batches(monkeypatch) -> list[list[int]]:
    """The frame indices of each ``get_batch`` call decord gets from here on."""
    import decord

    calls, get_batch = [], decord.VideoReader.get_batch

    def recording(reader, indices):
        calls.append(list(indices))
        return get_batch(reader, indices)

    monkeypatch.setattr(decord.VideoReader, "get_batch", recording)
    return calls


def test_frames_above_the_pixel_limit_are_refused(tmp_path: Path, monkeypatch):
    from cogvx.preprocess import video

    path = make_clip(tmp_path / "big.mp4", frames=2, height=64, width=64)
    monkeypatch.setattr(video, "MAX_SOURCE_PIXELS", 64 * 64 - 1)  # the real 40 M would need a 40 MB test clip
    with pytest.raises(SkipClip, match="64x64 frames are above the 0.004095-megapixel limit") as err:
        read_clip(str(path), frame_spec(resolutions=((64, 64),), frame_buckets=(1,), min_frames=1))
    assert err.value.reason == "too large"


# --- issue 10.9: frame rates -----------------------------------------------------------------------


def test_zero_frame_rate_is_skipped_with_a_reason(tmp_path: Path):
    path = zero_frame_rate(make_clip(tmp_path / "clip.mp4", frames=10), tmp_path / "zero.mp4")
    spec = frame_spec(resolutions=((48, 64),), frame_buckets=(5,))
    with pytest.raises(SkipClip, match="gives nan frames per second") as err:
        read_clip(str(path), spec)
    assert err.value.reason == "no frame rate"
    item = reader_item(path, spec)
    assert isinstance(item, Skipped) and item.reason == "no frame rate" and "ffmpeg" in item.detail


def test_variable_frame_rate_is_sampled_by_time(tmp_path: Path):
    # 10 frames 0.1 s apart, then 20 frames 0.025 s apart: 1.475 s. Sampling by index at the average
    # rate (20 fps) would take frames 0.5 s apart in the first second and 0.125 s apart after it.
    times = [0.1 * i for i in range(10)] + [1.0 + 0.025 * i for i in range(20)]
    path = make_clip(tmp_path / "vfr.mp4", frames=30, times=times)
    spec = frame_spec(resolutions=((48, 64),), frame_buckets=(5,), fps=4)
    frames, plan, info = read_clip(str(path), spec)
    (window,) = plan.windows
    taken = [times[i] for i in window]
    assert all(0.15 < b - a < 0.35 for a, b in zip(taken[:-1], taken[1:], strict=False)), taken
    assert info["source_fps"] == round(29 / 1.475, 4) and info["fps"] == 4.0
    # The pixels are those frames (the blue level names the frame).
    assert mean_diff(frames[0], content(30, 48, 64)[window]) < 3


def test_constant_frame_rates_keep_index_sampling(tmp_path: Path):
    path = make_clip(tmp_path / "clip.mp4", frames=40, fps=12)
    frames, plan, info = read_clip(str(path), frame_spec(resolutions=((48, 64),), frame_buckets=(9,)))
    assert plan.windows == [[0, 2, 3, 5, 6, 8, 9, 11, 12]]  # every 1.5 source frames, rounded
    assert info == {"fps": 8.0, "source_fps": 12.0, "source_frames": 40, "source_size": [48, 64], "size": [48, 64]}
    assert mean_diff(frames[0], content(40, 48, 64)[plan.windows[0]]) < 3


# --- issue 16: crop, stretch and the sample's metadata, by value -------------------------------------


def test_crop_takes_the_centre(tmp_path: Path):
    # Red | green | blue bands; the bucket is square, so crop keeps exactly the green band.
    clip = write_clip(tmp_path / "bands.mp4", regions(5, 64, 192, [0, 64, 128, 192], [RED, GREEN, BLUE]))
    spec = frame_spec(resolutions=((64, 64),), frame_buckets=(5,), fps=24)
    frames, _, _ = read_clip(str(clip), spec)
    assert np.abs(frames[0, :, :, 2:-2].astype(int) - GREEN).max() <= 12
    # A cover over 4x the bucket is cropped in the source first (another code path), to the same result.
    wide = write_clip(tmp_path / "wide.mp4", regions(5, 32, 320, [0, 144, 176, 320], [RED, GREEN, BLUE]))
    frames, _, _ = read_clip(str(wide), frame_spec(resolutions=((32, 32),), frame_buckets=(5,), fps=24))
    assert np.abs(frames[0, :, :, 2:-2].astype(int) - GREEN).max() <= 12


def test_stretch_scales_each_axis(tmp_path: Path):
    clip = write_clip(tmp_path / "bands.mp4", regions(5, 64, 192, [0, 64, 128, 192], [RED, GREEN, BLUE]))
    spec = frame_spec(resolutions=((32, 48),), frame_buckets=(5,), fps=24, resize="stretch")
    frames, _, info = read_clip(str(clip), spec)
    assert frames.shape == (1, 5, 32, 48, 3) and info["size"] == [32, 48]
    thirds = frames[0].astype(int)
    for columns, colour in ((slice(0, 12), RED), (slice(19, 29), GREEN), (slice(36, 48), BLUE)):  # bands' edges blend
        assert np.abs(thirds[:, :, columns] - colour).max() <= 12, colour


def test_sample_metadata_says_what_the_clip_is(tmp_path: Path):
    # 32x48 is also a width decord pads (issue 9.1): before the fix the JPEG strip failed in the DataLoader
    # worker and ended the run.
    data = tmp_path / "data"
    make_clip(data / "a.mp4", frames=40, height=64, width=96, fps=12)
    (data / "a.txt").write_text("a ramp")
    write_clip(data / "bands.mp4", regions(9, 64, 192, [0, 48, 144, 192], [RED, GREEN, BLUE]), fps=8)
    (data / "bands.txt").write_text("bands")
    out = tmp_path / "out"
    cfg = PreprocessConfig(data=data, output=out, model="tiny", dtype="fp32", workers=1, frame_buckets=(9,),
                           resolutions=("32x48",))  # fmt: skip
    result = run(cfg)
    assert result.encoded == 2 and sum(result.skipped.values()) == 0
    samples = {s.meta["source"]: s for record in Manifest.load(out).shards for s in read_shard(out, record)}
    meta = samples["a.mp4"].meta
    assert meta["frame_indices"] == [0, 2, 3, 5, 6, 8, 9, 11, 12] and meta["frames"] == 9
    assert meta["fps"] == 8.0 and meta["source_fps"] == 12.0 and meta["source_frames"] == 40
    assert meta["size"] == [32, 48] and meta["source_size"] == [64, 96] and meta["bucket"] == "9x32x48"
    assert meta["content_hash"] == hashlib.sha256((data / "a.mp4").read_bytes()).hexdigest()
    assert meta["caption"] == "a ramp" and (meta["window"], meta["windows"]) == (0, 1)
    # The 32x96 cover of 64x192 keeps its columns 24..72, the source's 48..144: the green band, as the
    # JPEG strip shows.
    bands = samples["bands.mp4"].meta
    assert bands["frame_indices"] == list(range(9)) and bands["fps"] == 8.0 and bands["size"] == [32, 48]
    strip = np.asarray(Image.open(io.BytesIO(samples["bands.mp4"].extras["jpg"])).convert("RGB")).astype(int)
    assert np.abs(strip[4:-4, 4:-4].mean(axis=(0, 1)) - GREEN).max() <= 12


def test_crop_takes_the_centre_of_tall_clips_on_both_decoding_paths(tmp_path: Path):
    # Red / green / blue rows: a square bucket keeps the green band, whichever path decodes it.
    tall = regions(5, 64, 192, [0, 64, 128, 192], [RED, GREEN, BLUE]).transpose(0, 2, 1, 3)  # 192x64
    frames, _, _ = read_clip(
        str(write_clip(tmp_path / "tall.mp4", tall)), frame_spec(resolutions=((64, 64),), frame_buckets=(5,), fps=24)
    )
    assert np.abs(frames[0, :, 2:-2].astype(int) - GREEN).max() <= 12  # a 192x64 cover: decord scales
    taller = regions(5, 32, 320, [0, 144, 176, 320], [RED, GREEN, BLUE]).transpose(0, 2, 1, 3)  # 320x32
    frames, _, _ = read_clip(
        str(write_clip(tmp_path / "taller.mp4", taller)),
        frame_spec(resolutions=((32, 32),), frame_buckets=(5,), fps=24),
    )
    assert np.abs(frames[0, :, 2:-2].astype(int) - GREEN).max() <= 12  # a 320x32 cover: cropped first


def test_frames_at_the_pixel_limit_are_read(tmp_path: Path, monkeypatch):
    from cogvx.preprocess import video

    path = make_clip(tmp_path / "clip.mp4", frames=5, height=64, width=64)
    monkeypatch.setattr(video, "MAX_SOURCE_PIXELS", 64 * 64)
    frames, _, info = read_clip(str(path), frame_spec(resolutions=((64, 64),), frame_buckets=(5,), fps=24))
    assert frames.shape == (1, 5, 64, 64, 3) and info["source_size"] == [64, 64]


class StoredFrames:
    """decord's reader as _decode_cropping_first uses it: ``reader[i].asnumpy()`` is frame i as stored."""

    def __init__(self, frames: np.ndarray):
        self.frames = frames

    def __getitem__(self, index: int):
        frame = self.frames[index]
        return type("Frame", (), {"asnumpy": lambda _: frame})()


@pytest.mark.parametrize("source, target", [((45, 299), (20, 30)), ((299, 45), (30, 20))])  # odd margins
@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_cropping_first_gives_the_pixels_of_scaling_the_whole_frame(source, target, rotation: int):
    # The promise in _decode_cropping_first: the box of the source that becomes the crop, scaled on its
    # own, is the same pixels as scaling the whole upright frame to the cover (bilinear) and cropping its
    # centre, within a level of rounding. Noise makes any shift of the box or change of filter visible.
    from cogvx.preprocess import video

    upright = np.random.default_rng(rotation).integers(0, 256, (3, *source, 3), dtype=np.uint8)
    stored = np.rot90(upright, k=-rotation // 90, axes=(1, 2))
    cover = video.decode_size(*source, target, "crop")
    out = video._decode_cropping_first(StoredFrames(stored), [0, 2], source, cover, target, rotation)
    top, left = (cover[0] - target[0]) // 2, (cover[1] - target[1]) // 2
    assert (top, left) in ((0, 51), (51, 0))
    whole = [np.asarray(Image.fromarray(frame).resize(cover[::-1], Image.BILINEAR)) for frame in upright[[0, 2]]]
    assert out.dtype == np.uint8
    diff = np.abs(out.astype(int) - np.stack(whole)[:, top : top + target[0], left : left + target[1]])
    assert diff.max() <= 1, diff.max()  # rounding; shifting the box half a pixel differs by tens of levels


def test_matroska_rotation_reads_quarter_turns_only(tmp_path: Path):
    import subprocess

    from cogvx.preprocess.video import matroska_rotation

    plain = make_clip(tmp_path / "plain.mkv", frames=3)
    assert matroska_rotation(str(plain)) == 0  # no rotation tag at all
    for tagged, expected in ((90, 90), (-90, 270), (450, 90), (60, 0)):  # 60 degrees is no quarter turn: upright
        path = tmp_path / f"r{tagged}.mkv"
        subprocess.run([ffmpeg(), "-loglevel", "error", "-y", "-display_rotation", str(tagged), "-i", str(plain),
                        "-c", "copy", str(path)], check=True)  # fmt: skip
        assert matroska_rotation(str(path)) == expected, tagged


def test_rotated_webm_comes_out_upright(tmp_path: Path):
    # WebM is Matroska: decord does not apply its display rotation either (VP8, as browsers record it).
    import subprocess

    shown = content(10, 96, 64)
    stored = np.ascontiguousarray(np.rot90(shown, k=-1, axes=(1, 2)))  # 64x96, shown turned 90 degrees
    plain, path = tmp_path / "plain.webm", tmp_path / "rotated.webm"
    subprocess.run([ffmpeg(), "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "96x64",
                    "-r", "24", "-i", "-", "-c:v", "libvpx", "-crf", "4", "-b:v", "20M", str(plain)],
                   input=stored.tobytes(), check=True)  # fmt: skip
    subprocess.run([ffmpeg(), "-loglevel", "error", "-y", "-display_rotation", "90", "-i", str(plain), "-c", "copy",
                    str(path)], check=True)  # fmt: skip
    frames, plan, info = read_clip(str(path), frame_spec(resolutions=((48, 32), (32, 48)), frame_buckets=(5,), fps=24))
    assert info["source_size"] == [96, 64] and info["size"] == [48, 32]
    assert mean_diff(frames[0], sized(shown[plan.windows[0]], 48, 32)) < 4


def test_a_frame_taken_twice_is_decoded_once_and_placed_twice(tmp_path: Path):
    # 0.4 s of frames, a 0.8 s gap, 0.4 s of frames: on the even 5.625 fps grid over 1.6 s the frames
    # nearest in time are 0, 2, 4, 4, 4, 5, 5, 5, 7 (in the gap the last frame before it is shown on).
    times = [0.0, 0.1, 0.2, 0.3, 0.4, 1.2, 1.3, 1.4, 1.5, 1.6]
    path = make_clip(tmp_path / "gap.mp4", frames=10, times=times)
    frames, plan, info = read_clip(str(path), frame_spec(resolutions=((48, 64),), frame_buckets=(9,), fps=24))
    assert plan.windows == [[0, 2, 4, 4, 4, 5, 5, 5, 7]] and info["source_fps"] == info["fps"] == 5.625
    assert plan.available == 10 and plan.bucket.name == "9x48x64"
    assert mean_diff(frames[0], content(10, 48, 64)[plan.windows[0]]) < 3


def test_a_one_frame_clip_is_one_frame(tmp_path: Path):
    path = make_clip(tmp_path / "one.mp4", frames=1)
    frames, plan, info = read_clip(str(path), frame_spec(resolutions=((48, 64),), frame_buckets=(1,), min_frames=1))
    assert plan.windows == [[0]] and info["source_frames"] == 1 and info["source_fps"] == 24.0
    assert mean_diff(frames[0], content(1, 48, 64)) < 3


def test_a_file_that_is_no_video_is_skipped_as_unreadable(tmp_path: Path):
    path = tmp_path / "junk.mp4"
    path.write_bytes(b"not a video" * 100)
    with pytest.raises(SkipClip) as err:
        read_clip(str(path), frame_spec())
    assert err.value.reason == "unreadable video" and err.value.detail.startswith("RuntimeError: Error reading ")


@pytest.mark.parametrize("width, scaled_by_decord", [(128, True), (160, False)])
def test_covers_above_crop_first_times_the_bucket_are_cropped_before_scaling(
    tmp_path: Path, monkeypatch, width, scaled_by_decord
):
    # A 32x128 clip into 32x32 needs a cover of exactly CROP_FIRST (4) times the bucket: decord scales it
    # (get_batch). 32x160 needs 5 times: each frame is cropped from the source first (reader[i], no batch).
    calls = record_batches(monkeypatch)
    path = write_clip(tmp_path / "wide.mp4", content(5, 32, width))
    frames, _, _ = read_clip(str(path), frame_spec(resolutions=((32, 32),), frame_buckets=(5,), fps=24))
    assert bool(calls) == scaled_by_decord
    centre = (width - 32) // 2
    assert mean_diff(frames[0], content(5, 32, width)[:, :, centre : centre + 32]) < 3


@pytest.mark.parametrize("height, width", [(1, 64), (64, 1)])
def test_one_pixel_thin_clips_are_read(tmp_path: Path, height: int, width: int):
    shown = content(5, height, width)
    path = write_clip(tmp_path / "thin.mp4", shown)  # FFV1 in a .mov: 4:2:0 H.264 has no odd sizes
    frames, _, info = read_clip(str(path), frame_spec(resolutions=((height, width),), frame_buckets=(5,), fps=24))
    assert info["source_size"] == [height, width] and mean_diff(frames[0], shown) < 3


def test_sampled_rate_is_recorded_to_four_decimals(tmp_path: Path):
    # 30 frames over 1.475 s: 19.66101... fps, below the 24 asked for, so every frame is taken.
    times = [0.1 * i for i in range(10)] + [1.0 + 0.025 * i for i in range(20)]
    path = make_clip(tmp_path / "vfr.mp4", frames=30, times=times)
    _, _, info = read_clip(str(path), frame_spec(resolutions=((48, 64),), frame_buckets=(9,), fps=24))
    assert info["fps"] == info["source_fps"] == 19.661


# --- issue 16: the skips that turn decord's failures into records --------------------------------------


def test_a_clip_whose_last_packets_are_corrupt_is_skipped_as_decoding_failed(tmp_path: Path):
    # A real file: the index (moov moved to the front) and most frames are sound, every 7th byte of the
    # last tenth is flipped. decord opens it and reads frame 0 and the timestamps, then fails decoding the
    # last frames (get_batch and the frame-by-frame retry both raise DECORDError): the wrapper records why.
    # With 60 frames and the second half flipped, decord's read-ahead met the damage while reading frame 0
    # in 1 run of 4 ("unreadable video"); 300 frames, 1/10 flipped, gave "decoding failed" 120 times of 120.
    import subprocess

    import decord

    plain, front = make_clip(tmp_path / "plain.mp4", frames=300), tmp_path / "front.mp4"
    subprocess.run([ffmpeg(), "-loglevel", "error", "-y", "-i", str(plain), "-c", "copy", "-movflags", "faststart",
                    str(front)], check=True)  # fmt: skip
    data = bytearray(front.read_bytes())
    for i in range(len(data) * 9 // 10, len(data), 7):
        data[i] ^= 0xFF
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(bytes(data))
    with pytest.raises(SkipClip) as err:  # 49 frames 6 apart (24 to 4 fps): 0, 6, ..., 288
        read_clip(str(path), frame_spec(resolutions=((48, 64),), frame_buckets=(49,), fps=4))
    assert err.value.reason == "decoding failed"
    assert isinstance(err.value.__cause__, decord.DECORDError)
    assert err.value.detail.startswith("DECORDError: [") and "threaded_decoder.cc" in err.value.detail


def test_a_failure_reading_the_timestamps_is_skipped_as_unreadable(tmp_path: Path, monkeypatch):
    # No real clip found makes decord fail there (the timestamps come from the index read at opening), so
    # the failure is injected at decord's boundary: get_frame_timestamp raises as decord raises.
    import decord

    def broken(reader, indices):
        raise decord.DECORDError("[12:00:00] video_reader.cc:9: Error: no timestamps\n")

    monkeypatch.setattr(decord.VideoReader, "get_frame_timestamp", broken)
    with pytest.raises(SkipClip) as err:
        read_clip(str(make_clip(tmp_path / "clip.mp4", frames=10)), frame_spec(resolutions=((48, 64),)))
    assert err.value.reason == "unreadable video"
    assert err.value.detail == "DECORDError: [12:00:00] video_reader.cc:9: Error: no timestamps"
    assert isinstance(err.value.__cause__, decord.DECORDError)


def test_a_video_that_opens_with_no_frames_is_skipped_as_unreadable(tmp_path: Path, monkeypatch):
    # decord 0.6 refuses a zero-frame file when opening it ("unreadable video" with its error); a reader that
    # opens and reports no frames (injected: len() is 0) is skipped with the same reason, before any decoding.
    import decord

    monkeypatch.setattr(decord.VideoReader, "__len__", lambda reader: 0)
    with pytest.raises(SkipClip) as err:
        read_clip(str(make_clip(tmp_path / "clip.mp4", frames=10)), frame_spec(resolutions=((48, 64),)))
    assert (err.value.reason, err.value.detail) == ("unreadable video", "no decodable frames")


@pytest.mark.parametrize(
    "height, width, bucket, scaled_by_decord",
    [(32, 320, (32, 64), False), (192, 32, (64, 32), True)],
)
def test_the_decoding_path_compares_the_cover_with_the_bucket_area(
    tmp_path: Path, monkeypatch, height, width, bucket, scaled_by_decord
):
    # Non-square buckets: 32x320 into 32x64 has a 32x320 cover, 5 times the bucket's 2048 pixels (cropped
    # first, no get_batch); 192x32 into 64x32 has a 192x32 cover, 3 times (decord scales). Comparing with
    # width * width instead would pick the other path for both.
    calls = record_batches(monkeypatch)
    shown = content(5, height, width)
    path = write_clip(tmp_path / "clip.mp4", shown)
    frames, plan, _ = read_clip(str(path), frame_spec(resolutions=(bucket,), frame_buckets=(5,), fps=24))
    assert bool(calls) == scaled_by_decord and plan.bucket.name == f"5x{bucket[0]}x{bucket[1]}"
    top, left = (height - bucket[0]) // 2, (width - bucket[1]) // 2
    assert mean_diff(frames[0], shown[:, top : top + bucket[0], left : left + bucket[1]]) < 3


def test_the_dataloaders_pinning_thread_pins_a_read_clips_frames():
    # Frames leave the workers pinned, for a non-blocking copy to the GPU; a dataclass is pinned only
    # through its own pin_memory(), which torch's pinning thread calls.
    from torch.utils.data._utils.pin_memory import pin_memory

    class Frames:
        def pin_memory(self):
            return "pinned"

    clip = Clip(Path("a.mp4"), "a", "a.mp4")
    read = ReadClip(0, clip, "h", 1, 2, Frames(), "1x16x16", [[0]], {}, [b""], [(0, False)])
    pinned = pin_memory(read)
    assert isinstance(pinned, ReadClip) and pinned.frames == "pinned" and pinned.windows == [[0]]
    assert pin_memory(Skipped(0, "too short", "x")) == Skipped(0, "too short", "x")
