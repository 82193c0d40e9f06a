"""Attention kernels at CogVideoX's shapes: PyTorch's SDPA against FlashAttention-3 (bf16, and a float8 forward).

One GPU, batch 1, head size 64, the 49x480x720 sequence (17,550 video + 226 text tokens); 2b has 30 heads, 5b
48. FlashAttention-3 is the build of ``bench/fa3_build.sh`` (unpack its ``flash_attn_3.tar.gz`` into a folder on
PYTHONPATH); without it only SDPA's rows are written.

    python bench/attention.py --out bench/results/attention_h100.json

Rows per model: ``sdpa`` (PyTorch's default pick, cuDNN on Hopper), ``fa3`` (bf16 forward and backward) and
``fa3_fp8_forward`` (q, k, v quantised to e4m3 with one scale per head, bf16 out; forward only, as validation
and the selective mode's single attention forward would run it). Each has forward and forward+backward
milliseconds (median of 7 after a warm-up, CUDA events), TFLOP/s, and its output's difference from SDPA's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import TOKENS, measure_models, milliseconds  # noqa: E402

from cogvx.pipeline.speed.attention import per_head_e4m3  # noqa: E402  (what validation runs)


def flash_attention_3():
    """FlashAttention-3's function, or None where its build is not on the path."""
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def compare(out: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = (out.float() - reference.float()).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "rel_diff": (diff.norm() / reference.float().norm()).item()}  # fmt: skip


def rows_for(heads: int) -> dict:
    flop = 4 * TOKENS * TOKENS * 64 * heads  # QK^T and PV; a backward does 2.5 times that
    shape = (1, heads, TOKENS, 64)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    grad = torch.randn_like(q)
    with torch.no_grad():
        reference = F.scaled_dot_product_attention(q, k, v)

    def timed(forward, backward_too: bool = True) -> dict:
        with torch.no_grad():
            row = {"forward_ms": milliseconds(forward)}
        if backward_too:
            row["forward_backward_ms"] = milliseconds(lambda: forward().backward(grad))
            row["forward_backward_tflops"] = 3.5 * flop / row["forward_backward_ms"] / 1e9
        row["forward_tflops"] = flop / row["forward_ms"] / 1e9
        return row

    rows = {"sdpa": timed(lambda: F.scaled_dot_product_attention(q, k, v)) | compare(reference, reference)}
    fa3 = flash_attention_3()
    if fa3 is None:
        return rows
    # FlashAttention-3 takes [B, L, H, D]; the transposes are views, as in a processor that calls it.
    ql, kl, vl = (t.transpose(1, 2) for t in (q, k, v))

    def bf16():
        return fa3(ql, kl, vl).transpose(1, 2)

    rows["fa3"] = timed(bf16)  # forward and backward: outside no_grad
    with torch.no_grad():
        rows["fa3"] |= compare(bf16(), reference)
        q8, k8, v8 = (per_head_e4m3(t.detach().contiguous()) for t in (ql, kl, vl))

        def fp8():
            return fa3(q8[0], k8[0], v8[0], q_descale=q8[1], k_descale=k8[1], v_descale=v8[1])

        def fp8_with_quantisation():
            parts = [per_head_e4m3(t.contiguous()) for t in (ql, kl, vl)]
            return fa3(*(p[0] for p in parts), q_descale=parts[0][1], k_descale=parts[1][1], v_descale=parts[2][1])

        try:
            rows["fa3_fp8_forward"] = timed(fp8, backward_too=False) | compare(fp8().transpose(1, 2), reference)
            rows["fa3_fp8_forward"]["with_quantisation_ms"] = milliseconds(fp8_with_quantisation)
        except RuntimeError as err:  # a build without the e4m3 kernels
            rows["fa3_fp8_forward"] = {"error": str(err)[:300]}
    return rows


def main() -> None:
    report = measure_models(
        __doc__, lambda sizes: rows_for(sizes["heads"]), flash_attention_3=flash_attention_3() is not None
    )
    for model, rows in report["models"].items():
        for name, row in rows.items():
            cells = "  ".join(f"{key} {value:.4g}" for key, value in row.items() if isinstance(value, float))
            print(f"{model} {name:16s} {cells or row}")


if __name__ == "__main__":
    main()
