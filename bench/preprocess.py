"""Preprocess and cache-reuse benchmarks, on one GPU.

    python bench/preprocess.py make-clips bench-clips --count 8        # on a machine with imageio-ffmpeg
    python bench/preprocess.py run bench-clips --model 2b --out results.json

``run`` builds a real-size CogVideoX folder with random weights (VAE, T5-XXL, transformer) from
bench/model-configs, then measures on the same card:

1. pure encode: VAE + T5 encode time of the clips' frames, decoded beforehand (the floor);
2. ``cogvx preprocess`` wall time on the same clips (decoding in workers, overlapped);
3. cache reuse: ``cogvx train`` from start to its first optimizer step on a 100-sample cache, vs a
   seed-style start that decodes and VAE-encodes every one of 100 clips before step one;
4. launch cost (``--parts launch``): fresh processes, each timed from just before it starts: preprocess to
   its first written sample and to its end (VAE plain, compiled with an empty compile cache, compiled again
   with that cache warm), then train to its first optimizer step on that cache (compiled cold, warm, plain).

Clips are 720x480, 30 fps, 4 s; they are sampled at 12.5 fps so each gives 49 frames (49x480x720).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cogvx.pipeline import models, tiny  # noqa: E402
from cogvx.pipeline.encode import encode_prompts, encode_video_moments  # noqa: E402
from cogvx.preprocess.run import PreprocessConfig  # noqa: E402
from cogvx.preprocess.run import run as preprocess  # noqa: E402
from cogvx.preprocess.sources import discover  # noqa: E402
from cogvx.preprocess.video import FrameSpec, read_clip  # noqa: E402
from cogvx.shards import Manifest, Sample, SampleEntry, ShardWriter  # noqa: E402

CONFIGS = Path(__file__).parent / "model-configs"
FPS = 12.5


def make_clips(folder: Path, count: int, seconds: float = 4.0, fps: int = 30) -> None:
    """Moving discs over a panning noise texture: enough detail that decoding is real work."""
    import imageio.v2 as imageio

    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    rng = np.random.default_rng(0)
    coarse = Image.fromarray((rng.random((60, 100, 3)) * 255).astype(np.uint8))
    texture = np.asarray(coarse.resize((1000, 600), Image.BICUBIC)).copy()
    texture[::2] = (texture[::2] * 0.9).astype(np.uint8)  # fine stripes: some high-frequency detail
    yy, xx = np.mgrid[0:480, 0:720]
    for i in range(count):
        writer = imageio.get_writer(
            folder / f"clip_{i:03d}.mp4",
            fps=fps,
            codec="libx264",
            quality=7,
            pixelformat="yuv420p",
            macro_block_size=16,
        )
        for f in range(int(seconds * fps)):
            x0, y0 = (3 * f + 37 * i) % 280, (2 * f + 11 * i) % 120
            frame = texture[y0 : y0 + 480, x0 : x0 + 720].copy()
            cx, cy = 360 + 200 * np.sin(f / 15 + i), 240 + 120 * np.cos(f / 20 + i)
            frame[(xx - cx) ** 2 + (yy - cy) ** 2 < 60**2] = (40 * i % 255, 200, 90)
            writer.append_data(frame)
        writer.close()
        (folder / f"clip_{i:03d}.txt").write_text(f"a green disc circles over a moving texture, take {i}\n")


def build_model_folder(model: str, folder: Path, device: torch.device, encoders: bool = True) -> None:
    """A diffusers-format CogVideoX folder with random weights, in bf16, from the published configs.

    With ``encoders=False`` the VAE and T5 get their configs only (all that training reads).
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    cfg = json.loads((CONFIGS / {"2b": "CogVideoX-2b.json", "5b": "CogVideoX-5b.json"}[model]).read_text())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            if encoders:
                AutoencoderKLCogVideoX(**cfg["vae"]).save_pretrained(folder / "vae")
                T5EncoderModel(T5Config(**cfg["text_encoder"])).save_pretrained(folder / "text_encoder")
            else:
                AutoencoderKLCogVideoX.from_config(cfg["vae"]).save_config(folder / "vae")
                T5Config(**cfg["text_encoder"]).save_pretrained(folder / "text_encoder")
            CogVideoXTransformer3DModel(**cfg["transformer"]).save_pretrained(folder / "transformer")
    finally:
        torch.set_default_dtype(previous)
    CogVideoXDPMScheduler(**cfg["scheduler"]).save_pretrained(folder / "scheduler")
    # A small tokenizer is enough: ids only index the random embedding table.
    shutil.copytree(tiny.materialise("tiny", models.cache_home()) / "tokenizer", folder / "tokenizer")
    shutil.copy(tiny.materialise("tiny", models.cache_home()) / "model_index.json", folder / "model_index.json")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pure_encode(source: str, clips, spec: FrameSpec, device: torch.device) -> dict:
    """VAE + T5 time of frames already in memory, clip by clip: the floor for preprocessing."""
    decode_times, frames = [], []
    for clip in clips:
        began = time.perf_counter()
        frames.append(torch.from_numpy(read_clip(str(clip.path), spec)[0][0]))
        decode_times.append(time.perf_counter() - began)
    vae = models.load_vae(source, torch.bfloat16, device).eval()
    tokenizer, text_encoder = models.load_text_encoder(source, torch.bfloat16, device)
    encode_video_moments(vae, frames[0][None].pin_memory() if device.type == "cuda" else frames[0][None])  # warm-up
    synchronize(device)
    vae_times = []
    for clip_frames in frames:
        began = time.perf_counter()
        encode_video_moments(vae, clip_frames[None])
        synchronize(device)
        vae_times.append(time.perf_counter() - began)
    captions = [c.caption for c in clips]
    began = time.perf_counter()
    for i in range(0, len(captions), 16):
        encode_prompts(tokenizer, text_encoder, captions[i : i + 16])
    synchronize(device)
    t5_total = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0
    del vae, text_encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "frames": int(frames[0].shape[0]),
        "decode_s_per_clip_one_core": statistics.median(decode_times),
        "vae_s_per_clip": statistics.median(vae_times),
        "t5_s_per_clip": t5_total / len(clips),
        "pure_s_per_clip": statistics.median(vae_times) + t5_total / len(clips),
        "vae_peak_gb": peak,
    }


def cogvx_preprocess(source: str, data: Path, out: Path, workers: int, vae_batch: int) -> dict:
    """One in-process run; per clip counts from the encoders on the GPU to the last sample written."""
    cfg = PreprocessConfig(data=data, output=out, model=source, fps=FPS, workers=workers, vae_batch=vae_batch)
    began = time.perf_counter()
    result = preprocess(cfg)
    total = time.perf_counter() - began
    return {
        "clips": result.encoded,
        "workers": workers,
        "vae_batch": vae_batch,
        "wall_s": total,
        "timeline": result.timeline,
        "wall_s_per_clip": _encoding_seconds(result.timeline) / max(result.encoded, 1),
    }


def _encoding_seconds(timeline: dict[str, float]) -> float:
    """From the encoders on the device to the last sample written (the slowest rank's)."""
    return timeline["encoded"] - timeline["encoders"]


def multi_gpu(source: str, data: Path, work: Path, gpus: int, workers: int) -> dict:
    """`torchrun ... preprocess` on 1 and on ``gpus`` GPUs over the same clips, after a warm-up launch.

    Two rates: whole launches (interpreter start to exit), and the encoding phase of the run's own
    timeline, which leaves out what every launch pays once whatever its GPU count (imports, loading
    the encoders); the difference between the two is that fixed cost, reported per launch.
    """
    import subprocess

    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                      os.environ.get("PYTHONPATH", "")])}  # fmt: skip

    def launch(n: int, clips: Path, name: str) -> float:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   __file__, "rank", str(clips), str(work / f"cache-{name}"), source, str(workers),
                   str(work / f"counts-{name}.json")]  # fmt: skip
        began = time.perf_counter()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        return time.perf_counter() - began

    # The compiled VAE's kernels are kept between launches (~/.cache/cogvx/torch-compile); one untimed launch
    # on a few clips fills that cache first, so neither timed launch pays the first compile. It runs on every
    # GPU: the cache keeps a graph per device index (measured: warmed on GPU 0 only, ranks 1-3 compiled again).
    warm_up = launch(gpus, data / "copy0", "warm-up")
    runs = {}
    for n in (1, gpus):
        wall = launch(n, data, f"{n}gpu")
        counts = json.loads((work / f"counts-{n}gpu.json").read_text())
        clips, encoding = counts["encoded"], _encoding_seconds(counts["timeline"])
        runs[n] = {
            "wall_s": wall,
            "run_seconds": counts["seconds"],
            "timeline": counts["timeline"],
            "clips_per_min": 60 * clips / wall,
            "clips_per_min_encoding": 60 * clips / encoding,
            "fixed_s": wall - encoding,
        }
    return {
        "clips": counts["encoded"],
        "warm_up_s": warm_up,
        "runs": runs,
        "scaling": runs[gpus]["clips_per_min"] / runs[1]["clips_per_min"],
        "scaling_encoding": runs[gpus]["clips_per_min_encoding"] / runs[1]["clips_per_min_encoding"],
    }


def rank_run(data: Path, out: Path, source: str, workers: int, counts_file: Path) -> None:
    """One process of a torchrun launch; rank 0 writes the merged counts and timeline."""
    result = preprocess(PreprocessConfig(data=data, output=out, model=source, fps=FPS, workers=workers))
    if int(os.environ.get("RANK", "0")) == 0:
        counts_file.write_text(json.dumps(result.counts()))


def cache_reuse(source: str, clips, spec: FrameSpec, device: torch.device, count: int, workdir: Path) -> dict:
    """Seconds from start to the first optimizer step: cogvx on a cache vs the seed's encode-everything start."""
    from cogvx.train.config import TrainConfig
    from cogvx.train.loop import run as train

    info = models.ModelInfo.read(source)
    cache = workdir / "reuse-cache"
    records = []
    writer = ShardWriter(cache, "shard-r00", records.append)
    g = torch.Generator().manual_seed(0)
    (height, width), frames = spec.resolutions[0], spec.frame_buckets[0]
    bucket = f"{frames}x{height}x{width}"
    shape = (info.latent_channels * 2, (frames - 1) // 4 + 1, height // 8, width // 8)
    for i in range(count):
        tensors = {
            "moments": torch.randn(*shape, generator=g).to(torch.bfloat16),
            "prompt_embeds": torch.randn(226, info.text_embed_dim, generator=g).to(torch.bfloat16),
        }
        writer.write(Sample(f"s{i}", tensors, {"bucket": bucket}), SampleEntry(f"s{i}", f"c{i}", "h", bucket))
    writer.flush()
    producer = {"tool": "cogvx", "model": source, "encoders": info.encoder_identity()}
    Manifest(producer=producer, params={}, schema={}, shards=records).save(cache)

    first_step = {}
    began = time.perf_counter()
    train(
        TrainConfig(shards=cache, output=workdir / "reuse-run", model=source, max_steps=1, checkpoint_every=0),
        on_step=lambda record: first_step.setdefault("t", time.perf_counter() - began),
    )
    cogvx_s = first_step["t"]
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # The seed's start: every clip decoded (one process) and VAE-encoded, prompts through T5, then step one.
    began = time.perf_counter()
    vae = models.load_vae(source, torch.bfloat16, device).eval()
    tokenizer, text_encoder = models.load_text_encoder(source, torch.bfloat16, device)
    for i in range(count):
        frames = torch.from_numpy(read_clip(str(clips[i % len(clips)].path), spec)[0][0])
        encode_video_moments(vae, frames[None])
    for i in range(0, count, 16):
        encode_prompts(tokenizer, text_encoder, [clips[j % len(clips)].caption for j in range(i, min(i + 16, count))])
    synchronize(device)
    encode_all_s = time.perf_counter() - began
    del vae, text_encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # ... then the same model load and first step cogvx does; that part is timed inside cogvx_s already.
    return {"cache_samples": count, "cogvx_start_to_first_step_s": cogvx_s, "seed_encode_everything_s": encode_all_s,
            "seed_start_to_first_step_s": encode_all_s + cogvx_s}  # fmt: skip


# What a launch runs, less the command-line parsing: the same imports as ``cogvx preprocess`` / ``cogvx train``.
_PREPROCESS_LAUNCH = """
import json, sys, time
from pathlib import Path
from cogvx.preprocess.run import PreprocessConfig, run
imported = time.time()
began, data, out, source, compiled, fps = float(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:]
result = run(PreprocessConfig(data=data, output=out, model=source, fps=float(fps), compile_vae=compiled == "1"))
done = time.time()
marks = {name: result.started + seconds - began for name, seconds in result.timeline.items()}
print(json.dumps({"imported_s": imported - began, **{f"{k}_s": v for k, v in marks.items()}, "end_s": done - began}))
"""
_TRAIN_LAUNCH = """
import json, sys, time
from pathlib import Path
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run
imported = time.time()
began, shards, out, compiled = float(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
first = {}
cfg = TrainConfig(shards=shards, output=out, max_steps=1, checkpoint_every=0, compile=compiled == "1")
run(cfg, on_step=lambda record: first.setdefault("first_step_s", time.time() - began))
print(json.dumps({"imported_s": imported - began, **first, "end_s": time.time() - began}))
"""


def launch_cost(source: str, data: Path, work: Path) -> dict:
    """Fresh processes, timed from just before each starts (interpreter start and imports included)."""
    import subprocess

    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                      os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env["XDG_CACHE_HOME"] = str(work / "xdg")  # cogvx keeps compiled kernels under it: starts empty
    env["TRITON_CACHE_DIR"] = str(work / "triton")  # and Triton its own (~/.triton by default)

    def launch(script: str, *args: str) -> dict:
        began = time.time()
        out = subprocess.run([sys.executable, "-c", script, str(began), *args], env=env, check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        return json.loads(out.strip().splitlines()[-1])

    report = {"clips": len(discover(data))}
    preprocess_runs = (("preprocess_plain", "0"), ("preprocess_compiled_cold", "1"), ("preprocess_compiled_warm", "1"))
    for name, compiled in preprocess_runs:
        report[name] = launch(_PREPROCESS_LAUNCH, str(data), str(work / f"cache-{name}"), source, compiled, str(FPS))
        print(name, json.dumps(report[name]), flush=True)
    cache = str(work / "cache-preprocess_plain")
    for name, compiled in (("train_compiled_cold", "1"), ("train_compiled_warm", "1"), ("train_plain", "0")):
        report[name] = launch(_TRAIN_LAUNCH, cache, str(work / f"run-{name}"), compiled)
        print(name, json.dumps(report[name]), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-clips")
    make.add_argument("folder", type=Path)
    make.add_argument("--count", type=int, default=8)
    bench = sub.add_parser("run")
    bench.add_argument("clips", type=Path)
    bench.add_argument("--model", default="2b", help="2b, 5b, or tiny (CPU smoke run)")
    bench.add_argument("--copies", type=int, default=3, help="each clip is preprocessed this many times")
    bench.add_argument("--workers", type=int, default=8)
    bench.add_argument("--vae-batch", type=int, default=1)
    bench.add_argument("--reuse-count", type=int, default=100)
    bench.add_argument("--model-dir", type=Path, help="keep the built model here and reuse it on the next run")
    bench.add_argument("--parts", default="pure,cogvx,reuse", help="which measurements to run (also: multi, launch)")
    bench.add_argument("--gpus", type=int, default=2, help="for the multi part")
    bench.add_argument("--out", type=Path, required=True)
    rank = sub.add_parser("rank", help="internal: one process of the multi part's torchrun launch")
    for name in ("data", "out", "source", "workers", "counts_file"):
        rank.add_argument(name)
    args = parser.parse_args()
    if args.command == "make-clips":
        make_clips(args.folder, args.count)
        return
    if args.command == "rank":
        rank_run(Path(args.data), Path(args.out), args.source, int(args.workers), Path(args.counts_file))
        return

    import diffusers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp())
    data = work / "clips"
    for copy in range(args.copies):  # distinct paths, so each copy is a clip of its own
        shutil.copytree(args.clips, data / f"copy{copy}")
    report = {
        "environment": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"),
        },
        "command": " ".join(sys.argv),
    }
    # cogvx preprocess's own frame settings, at the benchmark's rate and size
    if args.model == "tiny":
        source, spec = models.resolve_model("tiny"), PreprocessConfig(data=data, fps=FPS).frame_spec((64, 96), 49, 4)
    else:
        folder = args.model_dir or work / "model"
        source, spec = str(folder), PreprocessConfig(data=data, fps=FPS).frame_spec((480, 720), 49, 4)
        if not (folder / "model_index.json").is_file():
            began = time.perf_counter()
            build_model_folder(args.model, folder, device)
            report["build_model_s"] = time.perf_counter() - began
    clips = discover(data)
    parts = args.parts.split(",")
    print(f"\n{report['environment']}")
    if "pure" in parts:
        pure = report["pure"] = pure_encode(source, clips, spec, device)
        print(json.dumps(pure), flush=True)
        print(
            f"pure VAE+T5 encode  {pure['pure_s_per_clip']:.3f} s/clip ({60 / pure['pure_s_per_clip']:.1f} clips/min)"
        )
    if "cogvx" in parts:
        ours = report["cogvx"] = cogvx_preprocess(source, data, work / "cache", args.workers, args.vae_batch)
        print(json.dumps(ours), flush=True)
        print(
            f"cogvx preprocess    {ours['wall_s_per_clip']:.3f} s/clip ({60 / ours['wall_s_per_clip']:.1f} clips/min)"
        )
        if "pure" in report:
            report["ratio_wall_to_pure"] = ours["wall_s_per_clip"] / report["pure"]["pure_s_per_clip"]
            print(f"ratio wall / pure   {report['ratio_wall_to_pure']:.2f}")
    args.out.write_text(json.dumps(report, indent=1))
    if "launch" in parts:
        report["launch"] = launch_cost(source, data, work)
        args.out.write_text(json.dumps(report, indent=1))
    if "multi" in parts:
        multi = report["multi"] = multi_gpu(source, data, work, args.gpus, args.workers)
        print(json.dumps(multi), flush=True)
        print(f"preprocess on {args.gpus} GPUs: {multi['scaling']:.2f}x the clips/min of one (whole launches), "
              f"{multi['scaling_encoding']:.2f}x (encoding phase)")  # fmt: skip
    if "reuse" in parts:
        reuse = report["reuse"] = cache_reuse(source, clips, spec, device, args.reuse_count, work)
        print(json.dumps(reuse), flush=True)
        print(f"start->first step, {reuse['cache_samples']} clips: cogvx {reuse['cogvx_start_to_first_step_s']:.1f} s, "
              f"seed-style {reuse['seed_start_to_first_step_s']:.1f} s")  # fmt: skip
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
