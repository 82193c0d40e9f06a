"""VAE encode benchmark: diffusers' plain ``vae.encode`` beside cogvx's compiled encoder, same clip, same card.

A real-size CogVideoX VAE is built from a published config (bench/model-configs) with random weights.
One process measures the plain encode (median of ``--repeats`` after one warm-up), then compiles the
encoder as preprocessing does (``compiling.compile_vae_encoder``, compile artifacts in ``--cache-dir``) and
times the first compiled encode (the compile, or the cache load) and the median after it, and the
largest difference between the two paths' moments. Run it twice with the same ``--cache-dir`` to see a
cold launch and a warm one:

    python bench/vae_encode.py --cache-dir /tmp/cc --out cold.json
    python bench/vae_encode.py --cache-dir /tmp/cc --out warm.json

``--plain-only --cudnn-benchmark on|off`` times the plain encode alone, its first call included, with
cuDNN's convolution autotuner on or off (what preprocessing's first clip pays). ``--device cuda:1`` after a
run on ``cuda:0`` with the same ``--cache-dir`` shows whether a warm cache serves another GPU index
(``CUDA_VISIBLE_DEVICES=1`` shows that GPU as ``cuda:0``, as ``torchrun --virtual-local-rank`` does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cogvx.pipeline.speed import compiling  # noqa: E402

CONFIGS = Path(__file__).parent / "model-configs"


def timed(fn, repeats: int) -> tuple[list[float], torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        began = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CogVideoX-2b.json")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--size", default="480x720")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plain-only", action="store_true", help="no compiled encoder")
    parser.add_argument("--cudnn-benchmark", choices=("on", "off"), default="off")
    parser.add_argument("--device", default="cuda", help="e.g. cuda:1: the compile cache keeps a graph per GPU index")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    began = time.perf_counter()
    compiling.use_persistent_compile_cache(args.cache_dir)
    from diffusers import AutoencoderKLCogVideoX

    device = torch.device(args.device)
    if device.index is not None:
        torch.cuda.set_device(device)  # synchronize() and the memory counters below mean this one
    cfg = json.loads((CONFIGS / args.model).read_text())["vae"]
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(**cfg).to(device, torch.bfloat16).eval()
    height, width = (int(n) for n in args.size.split("x"))
    g = torch.Generator(device).manual_seed(1)
    clip = torch.rand(1, 3, args.frames, height, width, generator=g, device=device).mul(2).sub(1).to(torch.bfloat16)

    with torch.no_grad():
        plain_first, plain = timed(lambda: vae.encode(clip).latent_dist.parameters, 1)
        plain_times, plain = timed(lambda: vae.encode(clip).latent_dist.parameters, args.repeats)
        result = {
            "model": args.model,
            "clip": f"{args.frames}x{height}x{width}",
            "cudnn_benchmark": args.cudnn_benchmark,
            "plain_first_s": plain_first[0],
            "plain_s": statistics.median(plain_times),
        }
        if not args.plain_only:
            compiling.compile_vae_encoder(vae)
            first, _ = timed(lambda: vae.encode(clip).latent_dist.parameters, 1)
            compiled_times, compiled = timed(lambda: vae.encode(clip).latent_dist.parameters, args.repeats)
            difference = (compiled.float() - plain.float()).abs()
            result |= {
                "compiled_first_s": first[0],
                "compiled_s": statistics.median(compiled_times),
                "speedup": statistics.median(plain_times) / statistics.median(compiled_times),
                "max_abs_difference": difference.max().item(),
                "mean_abs_difference": difference.mean().item(),
                "max_abs_value": plain.float().abs().max().item(),
            }
    result |= {
        "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
        "process_s": time.perf_counter() - began,
        "command": " ".join(sys.argv),
        "environment": {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device),
            "date": time.strftime("%Y-%m-%d"),
        },
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
