"""Loader benchmark (CPU only): samples/s of cogvx's training reader vs a bare webdataset read.

    python bench/loader.py --out results.json

Both read the same shards of CogVideoX-5b-size samples (moments 32x13x60x90 bf16 and prompt
embeddings 226x4096 bf16, 6.3 MB a sample) with the same number of DataLoader workers. The bare
read is webdataset's own pipeline (resampled shards) plus safetensors parsing; cogvx's adds its
shard verification, shuffle buffer, bucket batching, collation and pinned memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cogvx.shards import Sample, SampleEntry, ShardWriter  # noqa: E402
from cogvx.train.data import ShardStream, make_loader  # noqa: E402


def write_shards(folder: Path, samples: int, per_shard: int):
    records = []
    writer = ShardWriter(folder, "shard-r00", records.append, max_samples=per_shard)
    g = torch.Generator().manual_seed(0)
    for i in range(samples):
        tensors = {
            "moments": torch.randn(32, 13, 60, 90, generator=g).to(torch.bfloat16),
            "prompt_embeds": torch.randn(226, 4096, generator=g).to(torch.bfloat16),
        }
        key = f"s{i:05d}"  # the index line must name the sample's own key and bucket (the writer checks)
        writer.write(Sample(key, tensors, {"bucket": "49x480x720"}), SampleEntry(key, "b", "h", "49x480x720"))
    writer.flush()
    return records


def _bare_decode(sample: dict) -> dict:
    from safetensors.torch import load

    return load(sample["safetensors"])


def bare_loader(folder: Path, records, workers: int):
    import webdataset as wds

    urls = [str(folder / r.name) for r in records]
    dataset = wds.WebDataset(urls, resampled=True, shardshuffle=False, empty_check=False).map(_bare_decode)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)


def cogvx_loader(folder: Path, records, workers: int):
    stream = ShardStream(folder, records, batch_size=1, seed=0, random_flip=0.0, shuffle_buffer=16)
    return make_loader(stream, workers, pin_memory=torch.cuda.is_available())


def rate(loader, samples: int, warmup: int) -> float:
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    began = time.perf_counter()
    for _ in range(samples):
        next(iterator)
    return samples / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=48, help="samples in the cache")
    parser.add_argument("--read", type=int, default=300, help="samples timed per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = {
        "environment": {
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "command": " ".join(sys.argv),
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        records = write_shards(folder, args.samples, per_shard=12)
        for workers in (0, 2):
            for name, build in (("bare", bare_loader), ("cogvx", cogvx_loader)):
                rates = [rate(build(folder, records, workers), args.read, warmup=24) for _ in range(args.repeats)]
                report["results"][f"{name}-{workers}w"] = {"samples_per_s": statistics.median(rates), "runs": rates}
                print(name, workers, [round(r, 1) for r in rates], flush=True)
    for workers in (0, 2):
        bare = report["results"][f"bare-{workers}w"]["samples_per_s"]
        ours = report["results"][f"cogvx-{workers}w"]["samples_per_s"]
        report["results"][f"ratio-{workers}w"] = ours / bare
        print(f"{workers} workers: bare {bare:.0f} samples/s, cogvx {ours:.0f} samples/s, ratio {ours / bare:.2f}")
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
