"""Data-parallel scaling: `cogvx train` samples/s on N GPUs of one host vs on one.

    python bench/ddp.py --gpus 2 --out results.json

Builds a real-size CogVideoX-2b transformer with random weights (the VAE and T5 need only their
configs: training never loads them), a cache of synthetic 49x480x720 samples, then runs
`torchrun --nproc_per_node {1, N} -m cogvx train` and reads samples/s from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from preprocess import build_model_folder  # noqa: E402

from cogvx.pipeline import models  # noqa: E402
from cogvx.shards import Manifest, Sample, SampleEntry, ShardWriter  # noqa: E402


def make_cache(folder: Path, source: str, count: int) -> None:
    info = models.ModelInfo.read(source)
    records = []
    writer = ShardWriter(folder, "shard-r00", records.append, max_samples=16)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        tensors = {
            "moments": torch.randn(info.latent_channels * 2, 13, 60, 90, generator=g).to(torch.bfloat16),
            "prompt_embeds": torch.randn(226, info.text_embed_dim, generator=g).to(torch.bfloat16),
        }
        writer.write(Sample(f"s{i}", tensors, {"bucket": "49x480x720"}), SampleEntry(f"s{i}", "b", "h", "49x480x720"))
    writer.flush()
    producer = {"tool": "cogvx", "model": source, "encoders": info.encoder_identity()}
    Manifest(producer=producer, params={}, schema={}, shards=records).save(folder)


def train(gpus: int, source: str, cache: Path, out: Path, steps: int, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "cogvx", "train", "--shards", str(cache), "--model", source, "--output", str(out),
               "--max-steps", str(steps), "--checkpoint-every", "0", "--workers", "2", *extra]  # fmt: skip
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                      os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    began = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [m["samples_per_s"] for m in lines[3:]]
    return {"gpus": gpus, "wall_s": time.perf_counter() - began, "samples_per_s": statistics.median(steady),
            "step_s": statistics.median(m["step_seconds"] for m in lines[3:]),
            "peak_memory_gb": max(m["peak_memory_gb"] for m in lines)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--extra", default="", help="more `cogvx train` flags, quoted")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    source = work / "model"
    build_model_folder("2b", source, torch.device("cuda"), encoders=False)
    torch.cuda.empty_cache()
    make_cache(work / "cache", str(source), 32)
    import diffusers

    environment = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    report = {"environment": environment, "command": " ".join(sys.argv), "runs": []}
    for gpus in (1, args.gpus):
        report["runs"].append(
            train(gpus, str(source), work / "cache", work / f"run-{gpus}", args.steps, args.extra.split())
        )
        print(json.dumps(report["runs"][-1]), flush=True)
    one, many = report["runs"]
    report["scaling"] = many["samples_per_s"] / one["samples_per_s"]
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{report['environment']}\n1 GPU {one['samples_per_s']:.3f} samples/s, {args.gpus} GPUs "
          f"{many['samples_per_s']:.3f} samples/s: {report['scaling']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
