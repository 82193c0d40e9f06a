"""Kernel timings behind the train step: what attention and the block's matrix products cost, and what the
levers not taken would give (issue 15). One GPU, bf16, the 49x480x720 sequence (17,550 video + 226 text tokens).

    python bench/kernels.py --out bench/results/kernels_h100.json

1. attention, forward and forward+backward, for each SDPA backend PyTorch offers (2b: 30 heads, 5b: 48; head
   size 64), and which one it picks by default (read from the kernel names of one profiled call);
2. each block linear shape: bf16 product, float8 product (``torch._scaled_mm``, row-wise scales) and the
   row-wise quantisation of its input, compiled on its own (in the step it fuses into the op before it);
3. fused QKV: one bf16 product with the three projections' weights side by side vs three products.

Timing: median of 7 calls after one warm-up, CUDA events.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import environment  # noqa: E402

from cogvx.pipeline.speed.float8 import quantise_rows  # noqa: E402  (train_step put src/ on the path)

TOKENS = 17550 + 226
MODELS = {"2b": {"heads": 30, "width": 1920}, "5b": {"heads": 48, "width": 3072}}
BACKENDS = ("default", "CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")


def milliseconds(fn, calls: int = 7) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[calls // 2]


def attention(heads: int) -> dict:
    q, k, v = (
        torch.randn(1, heads, TOKENS, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    grad = torch.randn_like(q)

    def call(backend: str):
        if backend == "default":
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(q, k, v)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call("default").backward(grad)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    picked = [
        b for b, key in (("CUDNN_ATTENTION", "cudnn"), ("FLASH_ATTENTION", "flash")) if any(key in n for n in names)
    ]
    flop = 4 * TOKENS * TOKENS * 64 * heads  # QK^T and PV; the backward does 2.5 times that
    rows = {"default_backend": picked[0] if picked else "other"}
    for backend in BACKENDS:

        def forward(backend=backend):
            with torch.no_grad():
                call(backend)

        try:
            fwd = milliseconds(forward)
            both = milliseconds(lambda backend=backend: call(backend).backward(grad))
        except RuntimeError as err:  # a backend that does not take these inputs on this card
            rows[backend] = {"error": str(err)[:200]}
            continue
        rows[backend] = {"forward_ms": fwd, "forward_backward_ms": both}
        rows[backend] |= {"forward_tflops": flop / fwd / 1e9, "forward_backward_tflops": 3.5 * flop / both / 1e9}
    return rows


def linears(width: int) -> list[dict]:
    quantise = torch.compile(quantise_rows)
    rows = []
    for name, inner, outer in (("q/k/v/out", width, width), ("ff in", width, 4 * width), ("ff out", 4 * width, width)):
        x = torch.randn(TOKENS, inner, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(outer, inner, device="cuda", dtype=torch.bfloat16)
        w8, w_scale = quantise_rows(w)
        x8, x_scale = quantise(x)
        bf16 = milliseconds(lambda x=x, w=w: x @ w.t())
        fp8 = milliseconds(
            lambda x8=x8, w8=w8, xs=x_scale, ws=w_scale: torch._scaled_mm(
                x8, w8.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16
            )
        )
        quant = milliseconds(lambda x=x: quantise(x))
        rows.append({"linear": name, "in": inner, "out": outer, "bf16_ms": bf16, "fp8_ms": fp8, "quantise_ms": quant})
    x = torch.randn(TOKENS, width, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3 * width, width, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.contiguous() for t in w.chunk(3))
    three = milliseconds(lambda: (x @ q.t(), x @ k.t(), x @ v.t()))
    fused = milliseconds(lambda: x @ w.t())
    rows.append({"linear": "qkv: three vs fused", "in": width, "out": 3 * width, "three_ms": three, "fused_ms": fused})
    return rows


def measure_models(doc: str, measure, **environment_extra) -> dict:
    """``--out`` from the command line, then ``measure(sizes)`` for each of MODELS, the report written after each."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = {"environment": environment(torch.device("cuda")), "command": " ".join(sys.argv), "models": {}}
    report["environment"] |= environment_extra
    for model, sizes in MODELS.items():
        report["models"][model] = measure(sizes)
        args.out.write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    report = measure_models(
        __doc__, lambda sizes: {"attention": attention(sizes["heads"]), "linears": linears(sizes["width"])}
    )
    for model, parts in report["models"].items():
        print(f"{model}: default attention backend {parts['attention']['default_backend']}")
        for backend in BACKENDS:
            row = parts["attention"][backend]
            if "error" not in row:
                print(f"  {backend:20s} fwd {row['forward_ms']:6.2f} ms  fwd+bwd {row['forward_backward_ms']:6.2f} ms")
        for row in parts["linears"]:
            print(f"  {row['linear']:20s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ms")))


if __name__ == "__main__":
    main()
