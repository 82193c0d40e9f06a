"""One LoRA experiment, from the command to the LoRA on disk: cogvx against the seed script, same run, same card.

    python bench/experiment.py --seed-script PATH/train_cogvideox_lora.py --out experiment.json   # on a GPU
    python bench/experiment.py --model tiny --device cpu --clips 2 --steps 2 --validate-at 2 \\
        --sampling-steps 2 --skip-seed --out smoke.json                                       # CPU smoke run

Both sides train the same random-weight model folder (bench/preprocess.py's ``build_model_folder``, from
bench/model-configs; ``--model tiny`` is cogvx's tiny model) on the same clips (``make_clips``: 720x480,
30 fps, 4 s), each as fresh processes through its own command line, the model's files dropped from the page cache before
each side starts (both read their weights from the disk, as on a fresh machine):

- cogvx: ``python -m cogvx preprocess`` then ``python -m cogvx train``; ``cogvx_wall_s`` runs from just
  before preprocess starts to the end of the train process (which writes the LoRA, then its model card
  and loss curve).
- seed: diffusers' ``train_cogvideox_lora.py`` (``--seed-script``; not part of this repository), on a
  dataset folder in its layout (``prompts.txt``, ``videos.txt``); it decodes and VAE-encodes every clip
  at launch. ``seed_wall_s`` runs from just before it starts to the modification time of its LoRA file.
  After the LoRA the script loads the pipeline again and samples the prompt once more (a third
  validation cogvx does not do); it is stopped once its LoRA is complete, unless ``--seed-final-inference``.

Settings chosen so both sides do the same work:

- Frames: 49 at the model's size (480x720; 64x96 for tiny) from each 120-frame clip. cogvx samples at
  12.5 fps (``--fps 12.5``); the seed takes every second frame (its stride is 120 // 49) and keeps the
  first 49. Same frame count and size, slightly different spans of the clip.
- Training set: all clips on both sides: cogvx's eval score is off (``--eval-every 0 --eval-holdout 0``;
  by default it holds out a tenth of a cache of 20 clips or more).
- LoRA rank 128, alpha 128, default targets (to_q, to_k, to_v, to_out.0) on both; AdamW, lr 1e-4,
  constant schedule without warm-up, gradient clipping at 1, bf16, seed 0, batch 1 (both sides' Adam
  defaults agree: betas 0.9/0.95, weight decay 1e-4, eps 1e-8).
- Checkpoints: none before the end (cogvx ``--checkpoint-every 0``; seed ``--checkpointing_steps`` past
  the last step).
- Memory: the seed with ``--gradient_checkpointing`` (full recompute, as its seed-style step in
  bench/train_step.py); cogvx with its defaults (``--checkpointing auto``, compile on a GPU), as users run it.
  cogvx's compile cache starts empty (``XDG_CACHE_HOME`` and ``TRITON_CACHE_DIR`` in the work folder): a
  first experiment's cost.
- Validation: one prompt, guidance 6, at the model's size and 49 frames. cogvx validates every
  ``--validate-at[0]`` steps (the list must be its multiples). The seed validates at the end of every
  ``--validation_epochs`` epochs (an epoch is ceil(clips / batch) steps); the benchmark picks the epoch
  count whose validation steps come closest to ``--validate-at`` (200 steps, 32 clips: every 3 epochs,
  steps 96 and 192) and records the steps the seed actually reached when each validation began. The
  seed's sampler runs the pipeline's default 50 steps (it has no flag); ``--sampling-steps`` sets cogvx's.
  cogvx's validation writes the sampled latents (``cogvx render`` decodes them later); the seed's decodes
  them with the VAE and, with no tracker, discards the video. That decode is in the seed's time.
- The seed is started with ``python`` (one process, as ``accelerate launch`` with one GPU runs it), the
  model folder is named ``CogVideoX-2b``/``CogVideoX-5b`` because the seed loads the transformer in bf16
  only when the path says ``5b``. Both sides see the same environment otherwise.

The defaults (5b, 200 steps) need about half an hour of one H100 (an estimate from bench/results: steps of
2.4 s for cogvx and 3.9 s seed-style in train_step_5b_h100.json, validations of 77 s and 99 s in
validation_5b_h100.json). Where a command may run only minutes, run the sides apart on one ``--work`` folder
(the model and the clips are reused when there) with ``--skip-seed`` and ``--skip-cogvx``, and fewer steps;
``--merge SEED.json COGVX.json`` joins the two results. ``--project-steps N`` adds each side's wall at N steps:
the measured wall plus the steps not run at that side's own measured rate (cogvx: its median step; the seed:
its steps before the first validation over their time), the validations and everything else as measured.

Phases: cogvx's preprocess and train walls (with preprocess's own encoder-loading time from its summary,
and train's step and validation seconds from the run's metrics); the seed's, from the times its log lines
(tqdm bars included) arrived: clips decoded, clips encoded, training started, each validation started.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from preprocess import FPS, build_model_folder, make_clips  # noqa: E402
from train_step import environment  # noqa: E402

from cogvx import runs  # noqa: E402
from cogvx.pipeline import models  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
SIZES = {"2b": (480, 720), "5b": (480, 720), "tiny": (64, 96)}
FRAMES = 49
GUIDANCE = 6.0
SEED_SAMPLING_STEPS = 50  # CogVideoXPipeline's default; the seed passes none
PROMPT = "a green disc circles over a moving texture"


@dataclass
class Launch:
    """One subprocess: when it started and ended (time.time()), its exit code and its timed output lines."""

    began: float
    ended: float = 0.0
    returncode: int | None = None
    stopped: bool = False  # ended by this benchmark once its LoRA was on disk
    lines: list[tuple[float, str]] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return self.ended - self.began

    def first(self, pattern: str) -> float | None:
        """Seconds from the start to the first output line matching ``pattern``."""
        regex = re.compile(pattern)
        return next((t - self.began for t, line in self.lines if regex.search(line)), None)

    def tail(self, count: int = 30) -> str:
        return "\n".join(line for _, line in self.lines[-count:])


def launch(command: list[str], env: dict, log: Path, lora: Path | None = None) -> Launch:
    """Run ``command``, stamping each output line (tqdm's carriage-return updates too) with its arrival.

    With ``lora``, the process is ended once that file is complete (its size steady and readable)."""
    run = Launch(began=time.time())
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )

    def read() -> None:
        pending = b""
        with log.open("wb") as sink:
            while chunk := process.stdout.read1(65536):
                sink.write(chunk)
                now = time.time()
                *complete, pending = re.split(rb"[\r\n]", pending + chunk)
                run.lines += [(now, part.decode(errors="replace")) for part in complete if part.strip()]
        if pending.strip():
            run.lines.append((time.time(), pending.decode(errors="replace")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    size = -1
    while process.poll() is None:
        time.sleep(0.5)
        if lora is None or not lora.is_file():
            continue
        if lora.stat().st_size == size and lora_tensors(lora):
            run.stopped = True
            os.killpg(process.pid, signal.SIGTERM)
            break
        size = lora.stat().st_size
    process.wait()
    run.ended = time.time()
    reader.join()
    run.returncode = process.returncode
    return run


def lora_tensors(path: Path) -> int:
    """How many tensors the safetensors file holds; 0 while it is still being written."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return len(list(f.keys()))
    except Exception:  # a half-written file does not parse yet; the caller polls again
        return 0


def seed_validation_epochs(targets: list[int], steps: int, steps_per_epoch: int) -> tuple[int, list[int]]:
    """The ``--validation_epochs`` whose validation steps come closest to ``targets``, and those steps.

    The seed validates after each epoch ``e`` with ``e % validation_epochs == 0``, at step
    ``min(e * steps_per_epoch, steps)``; the last epoch ends early at ``steps``."""
    epochs = math.ceil(steps / steps_per_epoch)

    def steps_for(every: int) -> list[int]:
        return [min(e * steps_per_epoch, steps) for e in range(every, epochs + 1, every)]

    def distance(every: int) -> tuple[int, int]:
        got = steps_for(every)
        return abs(len(got) - len(targets)), sum(abs(a - b) for a, b in zip(got, targets, strict=False))

    every = min(range(1, epochs + 1), key=distance)
    return every, steps_for(every)


def cogvx_validation_every(targets: list[int], steps: int) -> int:
    every = targets[0]
    if every <= 0 or targets != list(range(every, steps + 1, every)):
        raise SystemExit(f"--validate-at {targets}: cogvx validates every N steps; give N, 2N, ... up to --steps")
    return every


def base_env(work: Path, device: str) -> dict:
    env = os.environ | {"COLUMNS": "200", "XDG_CACHE_HOME": str(work / "xdg"), "TRITON_CACHE_DIR": str(work / "triton")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # cogvx train and the seed take the GPU whenever they see one
    return env


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache (written back first), so each side reads its weights from the
    disk as on a fresh machine, not from the memory the building (or the other side) left them in."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in (p for p in folder.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fresh(*folders: Path) -> None:
    """Each side starts from nothing but the model and the clips (a kept --work folder holds the last runs)."""
    for folder in folders:
        if folder.exists():
            shutil.rmtree(folder)


def run_cogvx(args, model: str, clips: Path, work: Path, env: dict) -> dict:
    cache, run_folder = work / "cogvx-cache", work / "cogvx-run"
    fresh(cache, run_folder)
    preprocess = [sys.executable, "-m", "cogvx", "preprocess", "--data", str(clips), "--output", str(cache),
                  "--model", model, "--fps", str(FPS), "--max-frames", str(FRAMES), "--validation-prompt", PROMPT,
                  "--device", args.device]  # fmt: skip
    train = [sys.executable, "-m", "cogvx", "train", "--shards", str(cache), "--output", str(run_folder),
             "--max-steps", str(args.steps), "--batch-size", "1", "--optimizer", "adamw", "--rank", "128",
             "--alpha", "128", "--learning-rate", "1e-4", "--lr-scheduler", "constant", "--max-grad-norm", "1",
             "--seed", "0", "--mixed-precision", "bf16", "--checkpoint-every", "0",
             "--eval-every", "0", "--eval-holdout", "0",
             "--validation-every", str(cogvx_validation_every(args.validate_at, args.steps)),
             "--validation-steps", str(args.sampling_steps), "--validation-guidance", str(GUIDANCE)]  # fmt: skip
    first = launch(preprocess, env, work / "cogvx-preprocess.log")
    if first.returncode != 0:
        return {"error": f"cogvx preprocess exited {first.returncode}", "log_tail": first.tail()}
    second = launch(train, env, work / "cogvx-train.log")
    if second.returncode != 0:
        return {"error": f"cogvx train exited {second.returncode}", "log_tail": second.tail()}
    lora = runs.lora_weights(run_folder)
    metrics = [json.loads(line) for line in runs.metrics(run_folder).read_text().splitlines() if line.strip()]
    validations = [m for m in metrics if runs.VALIDATION_SECONDS in m]
    steps_s = sum(m["step_seconds"] for m in metrics)
    validation_s = sum(m[runs.VALIDATION_SECONDS] for m in validations)
    summary = next((line for _, line in first.lines if "loading the encoders" in line), "")
    loaded = re.search(r"([\d.]+) s loading the encoders", summary)
    return {
        "commands": [shlex.join(preprocess), shlex.join(train)],
        "wall_s": second.ended - first.began,
        "lora_written_s": lora.stat().st_mtime - first.began,
        "lora_tensors": lora_tensors(lora),
        "phases": {
            "preprocess_wall_s": first.wall_s,
            "preprocess_loading_encoders_s": float(loaded.group(1)) if loaded else None,
            "train_wall_s": second.wall_s,
            "train_steps_s": steps_s,
            "train_validation_s": validation_s,
            "train_rest_s": second.wall_s - steps_s - validation_s,  # start-up, model load, compile, exports
            # From the train process's start (its own launch timeline), compile cache cold: a fresh machine's.
            "train_first_step_s": metrics[0][runs.LAUNCH][runs.LAUNCH_FIRST_STEP],
        },
        "steps_done": len(metrics),
        "validated_at": [m["step"] for m in validations],
        "step_s_median": sorted(m["step_seconds"] for m in metrics)[len(metrics) // 2],
    }


def copy_clips(source: Path, clips: Path, count: int) -> None:
    """The first ``count`` clips of ``source`` (each .mp4 with its .txt caption), refused if it has fewer."""
    videos = sorted(source.glob("*.mp4"))[:count]
    if len(videos) < count:
        raise SystemExit(f"--clips-from {source}: {len(videos)} clips, --clips asks for {count}")
    clips.mkdir(parents=True)
    for video in videos:
        for path in (video, video.with_suffix(".txt")):
            shutil.copy2(path, clips / path.name)


def seed_dataset(clips: Path, folder: Path) -> None:
    """The seed's layout for the same clips: one caption per line in prompts.txt, one path in videos.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    videos = sorted(clips.glob("*.mp4"))
    (folder / "prompts.txt").write_text("".join(v.with_suffix(".txt").read_text().strip() + "\n" for v in videos))
    (folder / "videos.txt").write_text("".join(f"{v.resolve()}\n" for v in videos))


def run_seed(args, model: str, clips: Path, work: Path, env: dict) -> dict:
    data, out = work / "seed-data", work / "seed-run"
    fresh(data, out)
    seed_dataset(clips, data)
    steps_per_epoch = math.ceil(args.clips / 1)
    every, planned = seed_validation_epochs(args.validate_at, args.steps, steps_per_epoch)
    height, width = SIZES[args.model]
    command = [sys.executable, str(args.seed_script), "--pretrained_model_name_or_path", model,
               "--instance_data_root", str(data), "--caption_column", "prompts.txt", "--video_column", "videos.txt",
               "--height", str(height), "--width", str(width), "--max_num_frames", str(FRAMES),
               "--validation_prompt", PROMPT, "--validation_epochs", str(every), "--num_validation_videos", "1",
               "--guidance_scale", str(GUIDANCE), "--seed", "0", "--rank", "128", "--lora_alpha", "128",
               "--mixed_precision", "bf16", "--output_dir", str(out), "--train_batch_size", "1",
               "--max_train_steps", str(args.steps), "--checkpointing_steps", str(args.steps + 1),
               "--gradient_checkpointing", "--learning_rate", "1e-4", "--lr_scheduler", "constant",
               "--lr_warmup_steps", "0", "--optimizer", "adamw", "--max_grad_norm", "1.0",
               "--allow_tf32"]  # fmt: skip
    lora = out / runs.LORA_WEIGHTS  # the name diffusers' save_lora_weights writes too
    done = launch(command, env, work / "seed.log", None if args.seed_final_inference else lora)
    if not lora.is_file() or (done.returncode != 0 and not done.stopped):
        return {"error": f"the seed exited {done.returncode} without its LoRA", "log_tail": done.tail()}
    written = lora.stat().st_mtime - done.began
    # The step each validation began at: the last progress count ("Steps: ... 96/200") before it.
    validated_at, step = [], 0
    for t, line in done.lines:
        if found := re.search(r"Steps:.*?\|\s*(\d+)/\d+", line):
            step = int(found.group(1))
        if "Running validation" in line:
            validated_at.append({"step": step, "began_s": t - done.began, "after_lora": t - done.began > written})
    return {
        "command": shlex.join(command),
        "validation_epochs": every,
        "steps_per_epoch": steps_per_epoch,
        "planned_validation_steps": planned,
        "sampling_steps": SEED_SAMPLING_STEPS,
        "wall_s": written,
        "process_s": done.wall_s,
        "stopped_after_lora": done.stopped,
        "lora_tensors": lora_tensors(lora),
        "phases": {
            "clips_decoded_s": done.first(rf"Loading progress.*\b{args.clips}/{args.clips}\b"),
            "clips_encoded_s": done.first(rf"Encoding videos.*\b{args.clips}/{args.clips}\b"),
            "training_started_s": done.first(r"\*\*\*\*\* Running training"),
            "lora_written_s": written,
        },
        "validated_at": validated_at,
    }


def table(report: dict) -> str:
    rows = [f"{'side':<6} {'wall s':>9}  phases"]
    for side in ("cogvx", "seed"):
        result = report.get(side)
        if not result:
            continue
        if "error" in result:
            rows.append(f"{side:<6} {'failed':>9}  {result['error']}")
            continue
        phases = ", ".join(
            f"{k.removesuffix('_s')} {v:.1f}" for k, v in result.get("phases", {}).items() if v is not None
        )
        rows.append(f"{side:<6} {result['wall_s']:>9.1f}  {phases}")
    if report.get("ratio_seed_to_cogvx"):
        rows.append(f"seed / cogvx: {report['ratio_seed_to_cogvx']:.2f}x")
    if (projection := report.get("projection")) and projection.get("ratio_seed_to_cogvx"):
        walls = f"cogvx {projection['cogvx_wall_s']:.1f} s, seed {projection['seed_wall_s']:.1f} s"
        rows.append(f"projected to {projection['steps']} steps: {walls}, {projection['ratio_seed_to_cogvx']:.2f}x")
    return "\n".join(rows)


def step_rates(report: dict) -> dict:
    """Each side's seconds per training step, as measured in its own run: cogvx's median step (metrics.jsonl),
    the seed's steps before its first validation over the time they took (from its progress lines)."""
    rates = {}
    if (cogvx := report.get("cogvx")) and "error" not in cogvx:
        rates["cogvx"] = cogvx["step_s_median"]
    if (seed := report.get("seed")) and "error" not in seed and seed["validated_at"]:
        first = seed["validated_at"][0]
        rates["seed"] = (first["began_s"] - seed["phases"]["training_started_s"]) / first["step"]
    return rates


def summarize(report: dict, project_steps: int | None) -> dict:
    """The walls and their ratio; with ``project_steps``, each side's wall with the steps it did not run (that
    many less ``steps``) added at its own measured rate: the same validations, more steps."""
    report["cogvx_wall_s"] = report["cogvx"].get("wall_s") if report.get("cogvx") else None
    report["seed_wall_s"] = report["seed"].get("wall_s") if report.get("seed") else None
    if report["cogvx_wall_s"] and report["seed_wall_s"]:
        report["ratio_seed_to_cogvx"] = report["seed_wall_s"] / report["cogvx_wall_s"]
    if project_steps is not None:
        more = project_steps - report["settings"]["steps"]
        if more < 0:
            raise SystemExit(f"--project-steps {project_steps}: fewer than the {report['settings']['steps']} run")
        rates = step_rates(report)
        report["projection"] = {"steps": project_steps, "s_per_step": rates} | {
            f"{side}_wall_s": report[f"{side}_wall_s"] + more * rate
            for side, rate in rates.items()
            if report[f"{side}_wall_s"]
        }
        if {"cogvx_wall_s", "seed_wall_s"} <= set(report["projection"]):
            projection = report["projection"]
            projection["ratio_seed_to_cogvx"] = projection["seed_wall_s"] / projection["cogvx_wall_s"]
    return report


def merge(paths: list[Path]) -> dict:
    """One report from the two sides run apart (``--skip-seed`` and ``--skip-cogvx``, same settings and card)."""
    parts = [json.loads(path.read_text()) for path in paths]
    for key in ("settings", "environment"):
        mine = [{k: v for k, v in part[key].items() if k != "date"} for part in parts]
        if mine[0] != mine[1]:
            raise SystemExit(f"--merge: {paths[0]} and {paths[1]} differ in {key}: {mine[0]} vs {mine[1]}")
    sides = {side: next((part[side] for part in parts if part.get(side)), None) for side in ("cogvx", "seed")}
    if None in sides.values():
        raise SystemExit(f"--merge: {paths[0]} and {paths[1]} must hold one side each (cogvx and seed)")
    return {
        "environment": parts[0]["environment"],
        "command": " ".join(sys.argv),
        "merged": [{"path": str(path), "command": part["command"]} for path, part in zip(paths, parts, strict=True)],
        "settings": parts[0]["settings"],
        **sides,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="5b", choices=sorted(SIZES), help="random-weight 2b/5b, or tiny (CPU)")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--validate-at", type=int, nargs="+", default=[100, 200], help="steps, e.g. 100 200")
    parser.add_argument("--sampling-steps", type=int, default=SEED_SAMPLING_STEPS, help="cogvx's validation sampler")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--seed-script", type=Path, help="diffusers' examples/cogvideo/train_cogvideox_lora.py")
    parser.add_argument("--skip-seed", action="store_true", help="time cogvx only")
    parser.add_argument("--skip-cogvx", action="store_true", help="time the seed only (the sides in two commands)")
    parser.add_argument("--seed-final-inference", action="store_true", help="let the seed sample after its LoRA")
    parser.add_argument("--clips-from", type=Path, help="clips made beforehand (make_clips needs imageio-ffmpeg)")
    parser.add_argument("--work", type=Path, help="work folder (model, clips, runs, logs); default: a temporary one")
    parser.add_argument("--project-steps", type=int, help="add each side's wall at that many steps (its own rate)")
    parser.add_argument("--merge", type=Path, nargs=2, help="join two results, one side each, into --out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.merge:
        report = summarize(merge(args.merge), args.project_steps)
        args.out.write_text(json.dumps(report, indent=1))
        print(table(report))
        return
    if not args.skip_seed and (args.seed_script is None or not args.seed_script.is_file()):
        parser.error("--seed-script must name diffusers' train_cogvideox_lora.py (or pass --skip-seed)")
    cogvx_validation_every(args.validate_at, args.steps)  # a cadence cogvx cannot follow fails before any work
    work = args.work or Path(tempfile.mkdtemp(prefix="cogvx-experiment-"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    height, width = SIZES[args.model]
    report = {
        "environment": environment(device),
        "command": " ".join(sys.argv),
        "settings": {
            "model": args.model,
            "clips": args.clips,
            "clip_frames": FRAMES,
            "height": height,
            "width": width,
            "steps": args.steps,
            "batch_size": 1,
            "rank": 128,
            "validate_at": args.validate_at,
            "validation_prompt": PROMPT,
            "guidance": GUIDANCE,
            "cogvx_sampling_steps": args.sampling_steps,
            "seed_sampling_steps": SEED_SAMPLING_STEPS,
            "work": str(work),
        },
    }

    began = time.perf_counter()
    if args.model == "tiny":
        model = models.resolve_model("tiny")
    else:
        model = str(work / f"CogVideoX-{args.model}")  # "5b" in the path: the seed loads the transformer in bf16
        if not (Path(model) / "model_index.json").is_file():
            build_model_folder(args.model, Path(model), device)
            torch.cuda.empty_cache()  # the building's cached blocks would be memory neither side can use
    clips = work / "clips"
    if len(list(clips.glob("*.mp4"))) != args.clips:
        fresh(clips)
        if args.clips_from is None:
            make_clips(clips, args.clips)
        else:
            copy_clips(args.clips_from, clips, args.clips)
    report["setup_s"] = time.perf_counter() - began
    fresh(work / "xdg", work / "triton")  # cogvx's compile cache starts empty: a first experiment's cost
    env = base_env(work, args.device)

    if args.model != "tiny":
        evict(Path(model))
    report["cogvx"] = None if args.skip_cogvx else run_cogvx(args, model, clips, work, env)
    args.out.write_text(json.dumps(summarize(report | {"seed": None}, args.project_steps), indent=1))
    if args.model != "tiny":
        evict(Path(model))
    report["seed"] = None if args.skip_seed else run_seed(args, model, clips, work, env)
    args.out.write_text(json.dumps(summarize(report, args.project_steps), indent=1))
    print(table(report))
    if any("error" in (report.get(side) or {}) for side in ("cogvx", "seed")):
        sys.exit(1)


if __name__ == "__main__":
    main()
