"""Launch cost: fresh processes of what `cogvx train` and `cogvx preprocess` run, timed from just before each starts.

    python bench/launch.py --models 2b 5b --out launch.json
    python bench/launch.py --models tiny --device cpu --out launch.json       # CPU smoke run

Per model: preprocess to its first written sample, then train (on that cache) to its first optimizer step,
first with the compile cache cold (empty XDG_CACHE_HOME and TRITON_CACHE_DIR in the work folder, where cogvx
and Triton keep compiled kernels), then warm (the same folders, now filled), and one plain train run (no
compile). Compiling follows cogvx's own default: on with a GPU, off on a CPU (``--compile`` forces it).
2b and 5b are random-weight folders built from bench/model-configs (kept in ``--model-dir`` if given);
the clips are bench/preprocess.py's. Each row keeps the run's own timeline: train's ``launch`` field of its
first metrics row (seconds from its process's start to each phase), preprocess's report timeline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from preprocess import FPS, build_model_folder, make_clips  # noqa: E402
from train_step import environment  # noqa: E402

from cogvx import clock, runs  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"

# What `cogvx preprocess` runs (the CLI builds this config and calls run); prints its timeline from ``began``.
_PREPROCESS = """
import json, sys
from pathlib import Path
from cogvx.preprocess.run import PreprocessConfig, run
began, data, out = float(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
source, device, compiled, fps = sys.argv[4:]
cfg = PreprocessConfig(data=data, output=out, model=source, fps=float(fps), device=device, compile_vae=compiled == "1")
result = run(cfg)
print(json.dumps({name: result.started + seconds - began for name, seconds in result.timeline.items()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["2b", "5b"], help="2b, 5b, or tiny (CPU smoke run)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: on with a GPU")
    parser.add_argument("--clips", type=int, default=2, help="clips preprocessed (the cache trained on)")
    parser.add_argument("--model-dir", type=Path, help="keep the built model folders here and reuse them")
    parser.add_argument("--clips-from", type=Path, help="clips made beforehand (make_clips needs imageio-ffmpeg)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    compiled = args.compile if args.compile is not None else device.type == "cuda"
    report = {"environment": environment(device), "command": " ".join(sys.argv), "compile": compiled, "rows": []}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if args.clips_from is not None:
            shutil.copytree(args.clips_from, work / "clips")
        else:
            make_clips(work / "clips", args.clips)
        for model in args.models:
            source = _model_folder(model, args.model_dir or work / "models", device)
            for row in measure(model, source, work / model, work / "clips", device, compiled):
                report["rows"].append(row)
                args.out.write_text(json.dumps(report, indent=1))  # row by row: a run cut short keeps what it measured
    print(table(report["rows"]))


def _model_folder(model: str, models_dir: Path, device: torch.device) -> str:
    if model == "tiny":
        return model
    folder = models_dir / model
    if not (folder / "model_index.json").is_file():
        build_model_folder(model, folder, device)
    return str(folder)


def measure(model: str, source: str, work: Path, clips: Path, device: torch.device, compiled: bool) -> Iterator[dict]:
    """Preprocess and train, cold then warm, then plain train: one row each, in that order, as each ends."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env["XDG_CACHE_HOME"] = str(work / "xdg")  # cogvx keeps compiled kernels under it: starts empty
    env["TRITON_CACHE_DIR"] = str(work / "triton")  # and Triton its own (~/.triton by default)
    env["COGVX_HOME"] = os.environ.get("COGVX_HOME", str(work / "cogvx-home"))  # the tiny models, not compiled code
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # `cogvx train` trains on the GPU whenever it sees one
    count, cache = 0, work / "cache-cold"
    for temperature in ("cold", "warm"):
        out = work / f"cache-{temperature}"
        command = [
            "-c",
            _PREPROCESS,
            "{began}",
            str(clips),
            str(out),
            source,
            device.type,
            str(int(compiled)),
            str(FPS),
        ]
        launched = _launch(command, env)
        timeline = json.loads(launched.stdout.strip().splitlines()[-1])
        row = _row(model, "preprocess", temperature, compiled, launched, timeline)
        count += 1
        yield row | {"first_sample_s": timeline["first_written"]}
    for temperature, compile_blocks in (("cold", compiled), ("warm", compiled), ("warm", False)):
        run = work / f"run-{count}"
        command = ["-m", "cogvx", "train", "--shards", str(cache), "--output", str(run), "--max-steps", "1"]
        command += ["--checkpoint-every", "0", "--compile" if compile_blocks else "--no-compile"]
        launched = _launch(command, env)
        launch = runs.read_metrics(run)[0][runs.LAUNCH]  # seconds from the process's start
        row = _row(model, "train", temperature, compile_blocks, launched, launch)
        count += 1
        yield row | {"first_step_s": launched.start_s + launch[runs.LAUNCH_FIRST_STEP]}


def _row(model: str, command: str, temperature: str, compiled: bool, launched: Launched, timeline: dict) -> dict:
    return {
        "model": model,
        "command": command,
        "compile": compiled,
        "compile_cache": temperature,
        "start_s": launched.start_s,
        "end_s": launched.end_s,
        "timeline": timeline,
    }


@dataclass
class Launched:
    stdout: str
    start_s: float  # from just before the process was started to its start (its own timeline's zero)
    end_s: float  # from just before it was started to its exit


def _launch(command: list[str], env: dict[str, str]) -> Launched:
    """Run ``python COMMAND``, ``{began}`` in it replaced by the time just before the process starts."""
    boot_began, began = clock.boot_seconds(), time.time()
    argv = [sys.executable, *(arg.replace("{began}", repr(began)) for arg in command)]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = clock.started_after_boot(process.pid)
    stdout, stderr = process.communicate()
    end_s = time.time() - began
    if process.returncode:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({process.returncode}):\n{stderr[-3000:]}")
    # Both from the clock the kernel counts a process's start on (to 10 ms); 0 where it cannot be read.
    start_s = max(0.0, started - boot_began) if started is not None and boot_began is not None else 0.0
    return Launched(stdout, start_s, end_s)


def table(rows: list[dict]) -> str:
    lines = ["model  command     compile  cache  first s  end s", "-" * 48]
    for row in rows:
        first = row.get("first_step_s", row.get("first_sample_s"))
        compiled = "yes" if row["compile"] else "no"
        cache = row["compile_cache"]
        lines.append(f"{row['model']:6} {row['command']:11} {compiled:8} {cache:6} {first:7.1f}  {row['end_s']:5.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
