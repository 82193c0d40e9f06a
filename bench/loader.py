"""Loader benchmark (CPU only): samples/s of cogvx's training reader vs a bare webdataset read.

    python bench/loader.py --out results.json
    python bench/loader.py --remote --out bench/results/loader_s3_cpu.json   # from S3 vs from the disk

With ``--remote`` (needs the dev extra: moto, s3fs, boto3), the same shards are uploaded to an S3-compatible
server on localhost (moto's, started in a child process so it does not share this process's GIL) and
cogvx's reader is timed reading them from the folder, from ``s3://`` (each drawn shard copied through
its sha256, as `cogvx train --shards s3://...` does) and from ``s3://`` with a warm ``--cache-dir``.
``--url URL`` times the reader on an existing cache instead (a folder or any URL; its manifest lists the shards).

Both read the same shards of CogVideoX-5b-size samples (moments 32x13x60x90 bf16 and prompt
embeddings 226x4096 bf16, 6.3 MB a sample) with the same number of DataLoader workers. The bare
read is webdataset's own pipeline (resampled shards) plus safetensors parsing; cogvx's adds its
shard verification, shuffle buffer, bucket batching, collation and pinned memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
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


def cogvx_loader(folder, records, workers: int):
    """cogvx's training reader on ``folder``: a path, a URL or a Store (with its read-through cache)."""
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
    parser.add_argument("--remote", action="store_true", help="time the reader from a local S3 server vs the disk")
    parser.add_argument("--url", help="time the reader on this cache (a folder or a URL) and nothing else")
    args = parser.parse_args()
    if args.remote or args.url:
        return remote_main(args)
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server() -> tuple[subprocess.Popen, str]:
    """moto's S3-compatible server in a child process on a free localhost port; dummy credentials in the env."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            time.sleep(0.1)
    return server, endpoint


def remote_main(args) -> None:
    from cogvx.shards import Manifest
    from cogvx.shards.store import display, open_store

    report = {
        "environment": _environment(),
        "command": " ".join(sys.argv),
        "results": {},
    }

    def measure(name: str, location, records, workers: int) -> float:
        """One timed read, kept under ``name``; the median comes at the end."""
        sample_rate = rate(cogvx_loader(location, records, workers), args.read, warmup=24)
        report["results"].setdefault(name, {"runs": []})["runs"].append(sample_rate)
        print(name, round(sample_rate, 1), flush=True)
        return sample_rate

    if args.url:
        records = Manifest.load(args.url).shards
        report["location"] = display(args.url)
        for workers in (0, 2):
            for _ in range(args.repeats):
                measure(f"url-{workers}w", args.url, records, workers)
        _medians(report)
        args.out.write_text(json.dumps(report, indent=1))
        return
    import boto3

    server, endpoint = start_s3_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "cache"
            records = write_shards(folder, args.samples, per_shard=12)
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket="bench")
            for record in records:
                client.upload_file(str(folder / record.name), "bench", f"cache/{record.name}")
            url = "s3://bench/cache"
            kept = Path(tmp) / "kept"
            warm = open_store(url, cache_dir=kept)
            for record in records:  # fill the read-through cache once, as a first run would
                warm.fetch(record.name, record.bytes, record.sha256).close()
            # The machine is shared: each repeat times the three readers back to back (each first in turn), so
            # a busy minute weighs on all of them, and the ratios are the medians of the per-repeat ratios.
            for workers in (0, 2):
                readers = [("disk", folder), ("s3", url), ("s3-cache-dir", open_store(url, cache_dir=kept))]
                for repeat in range(args.repeats):
                    turn = readers[repeat % 3 :] + readers[: repeat % 3]  # each reader goes first in turn
                    got = {name: measure(f"{name}-{workers}w", where, records, workers) for name, where in turn}
                    disk, s3, cached = got["disk"], got["s3"], got["s3-cache-dir"]
                    for name, value in (
                        (f"ratio-s3-{workers}w", s3 / disk),
                        (f"ratio-s3-cache-dir-{workers}w", cached / disk),
                    ):
                        report["results"].setdefault(name, {"runs": []})["runs"].append(value)
    finally:
        server.terminate()
        server.wait()
    _medians(report)
    r = report["results"]
    for w in (0, 2):
        rates = [r[f"{name}-{w}w"]["samples_per_s"] for name in ("disk", "s3", "s3-cache-dir")]
        ratios = [r[f"ratio-{name}-{w}w"]["median"] for name in ("s3", "s3-cache-dir")]
        print(f"{w} workers: disk {rates[0]:.0f}, s3 {rates[1]:.0f} ({ratios[0]:.2f}x), "
              f"s3 + cache-dir {rates[2]:.0f} ({ratios[1]:.2f}x) samples/s")  # fmt: skip
    args.out.write_text(json.dumps(report, indent=1))


def _medians(report: dict) -> None:
    for name, entry in report["results"].items():
        key = "median" if name.startswith("ratio") else "samples_per_s"
        entry[key] = statistics.median(entry["runs"])


def _environment() -> dict:
    import fsspec

    env = {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "fsspec": fsspec.__version__,
    }
    for name in ("s3fs", "moto"):
        with contextlib.suppress(ImportError):
            env[name] = __import__(name).__version__
    return env


if __name__ == "__main__":
    main()
