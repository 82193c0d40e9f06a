"""Peak memory of cogvx's training step per checkpointing mode, model and latent size: the data that
``cogvx.pipeline.memory`` is fitted to and checked against.

    python bench/memory.py --models 2b 5b --sizes 13x40x60 13x60x90 \
        --variants "none+compile selective+compile full+compile offload+compile" --out memory.json

Each case is one run of ``bench/train_step.py``'s cogvx step (real-size random transformer, rank 128,
batch 1, its loader, fused AdamW): 2 warm-up steps, then the peak allocated memory of one more step.
``--fit CALIBRATION_SIZE`` (offline, no GPU) fits each mode's two coefficients on the cases at that
size and prints every case's prediction error, so the other size is an out-of-sample check.
``--fit-swap`` (offline) fits ``swap``'s compiled coefficients to the swap rows of ``bench/train_step.py``
result files, the static part counted as ``auto`` counts it (fp8 storage, less ``swap.swap_saving``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import train_step  # noqa: E402

# LoRA masters in fp32 with their gradients and AdamW's two moments: 4 x 4 bytes per parameter.
LORA_BYTES_PER_PARAM = 16


def case_size(result: dict) -> tuple[int, dict]:
    """(activation unit in bytes, transformer config) of one measured case."""
    from cogvx.pipeline.memory import StepSize

    config = train_step.load_config(result["model"])["transformer"]
    size = StepSize.of(config, *result["latent"], batch=1)
    return size, config


def static_bytes(result: dict) -> int:
    return 2 * result["base_params"] + LORA_BYTES_PER_PARAM * result["lora_params"]


def fit(results: list[dict], calibration: str) -> None:
    """Least squares per mode on the calibration size; then every case's error."""
    ok = [r for r in results if "peak_allocated_gb" in r]
    by_mode: dict[str, list[dict]] = {}
    for r in ok:
        by_mode.setdefault(r["variant"], []).append(r)
    fitted = {}
    for mode, cases in sorted(by_mode.items()):
        rows, targets = [], []
        for r in cases:
            if "x".join(map(str, r["latent"])) != calibration:
                continue
            size, _ = case_size(r)
            rows.append([size.layers * size.unit, size.unit])
            targets.append(r["peak_allocated_gb"] * 1e9 - static_bytes(r))
        if len(rows) < 2:
            print(f"{mode}: fewer than two calibration cases, not fitted")
            continue
        solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64), torch.tensor(targets).double()[:, None])
        fitted[mode] = tuple(round(float(v), 2) for v in solution.solution.flatten())
    print("coefficients (per_block, transient):", json.dumps(fitted))
    print(f"{'case':32} {'measured GB':>12} {'predicted GB':>13} {'error':>7}")
    for r in results:
        name = f"{r['model']} {'x'.join(map(str, r.get('latent', [])))} {r.get('variant', r['run'])}"
        mode = r.get("variant", "")
        if mode not in fitted or "latent" not in r:
            print(f"{name:32} {r.get('error', '')[:60]}")
            continue
        size, _ = case_size(r)
        per_block, transient = fitted[mode]
        predicted = static_bytes(r) + (per_block * size.layers + transient) * size.unit
        if "peak_allocated_gb" in r:
            measured = r["peak_allocated_gb"]
            error = predicted / 1e9 / measured - 1
            print(f"{name:32} {measured:12.2f} {predicted / 1e9:13.2f} {error:+7.1%}")
        else:
            print(f"{name:32} {'OOM':>12} {predicted / 1e9:13.2f}   ({r.get('error', '')[:40]})")


def swap_case(result: dict):
    """(step size, static bytes as stored, bytes ``swap`` keeps off the device) of one measured swap run,
    counted as ``auto`` counts them; the transformer is built on the meta device (no memory)."""
    from diffusers import CogVideoXTransformer3DModel

    from cogvx.pipeline import lora, memory
    from cogvx.pipeline.speed.float8 import fp8_saving
    from cogvx.pipeline.speed.swap import swap_saving

    config = train_step.load_config(result["model"].split("@")[0])["transformer"]
    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel(**config).to(torch.bfloat16)
    lora.add_lora(transformer, 128, 128, lora.DEFAULT_TARGETS, 0.0)
    fp8 = "fp8" in result["variant"].split("+")
    static = memory.static_bytes(transformer) - (fp8_saving(transformer) if fp8 else 0)
    return memory.StepSize.of(config, *result["latent"], batch=1), static, swap_saving(transformer, fp8)


def fit_swap(results: list[dict]) -> None:
    """Least squares of ``swap``'s (per_block, transient) on every compiled swap row; then each row's error."""
    cases = []
    for r in results:
        options = set(r["variant"].split("+"))
        if {"swap", "compile"} <= options and "peak_allocated_gb" in r:
            size, static, swapped = swap_case(r)
            cases.append((r, size, static - swapped))
    rows = torch.tensor([[size.layers * size.unit, size.unit] for _, size, _ in cases], dtype=torch.float64)
    targets = torch.tensor([r["peak_allocated_gb"] * 1e9 - static for r, _, static in cases], dtype=torch.float64)
    per_block, transient = (round(float(v), 2) for v in torch.linalg.lstsq(rows, targets[:, None]).solution.flatten())
    print(f"swap, compiled (per_block, transient): ({per_block}, {transient})")
    for r, size, static in cases:
        predicted = (static + (per_block * size.layers + transient) * size.unit) / 1e9
        measured = r["peak_allocated_gb"]
        print(f"{r['run']:40} {measured:8.2f} {predicted:8.2f} {predicted / measured - 1:+7.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["2b", "5b"])
    parser.add_argument("--sizes", nargs="+", default=["13x40x60", "13x60x90"], help="latent FxHxW")
    parser.add_argument("--variants", default="none+compile selective+compile full+compile offload+compile")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fit", metavar="CALIBRATION_SIZE", help="fit on this size's cases of --results")
    parser.add_argument("--fit-swap", action="store_true", help="fit swap's coefficients on --results")
    parser.add_argument("--results", type=Path, nargs="+", help="JSON files written by earlier runs (for --fit)")
    args = parser.parse_args()
    if args.fit or args.fit_swap:
        results = [r for path in args.results for r in json.loads(path.read_text())["results"]]
        if args.fit_swap:
            fit_swap(results)
        else:
            fit(results, args.fit)
        return
    device = torch.device("cuda")
    report = {"environment": train_step.environment(device), "command": " ".join(sys.argv), "results": []}
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models:
            for size in args.sizes:
                shape = tuple(int(v) for v in size.split("x"))
                train_step.SHAPES[model] = shape  # the case's latent size, read by run_one
                for variant in args.variants.split():
                    spec = f"{model}:{variant}"
                    try:
                        result = train_step.run_one(spec, device, warmup=2, steps=1, workdir=Path(workdir))
                    except Exception as err:  # out of memory is a result: that mode does not fit
                        result = {"run": spec, "model": model, "variant": variant, "latent": list(shape)}
                        result["error"] = f"{type(err).__name__}: {err}"[:300]
                        del err
                        gc.collect()
                        torch._dynamo.reset()
                        torch.cuda.empty_cache()
                    report["results"].append(result)
                    print(json.dumps({k: result.get(k) for k in ("run", "latent", "peak_allocated_gb", "error")}))
                    args.out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
