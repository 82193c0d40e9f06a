"""Loss curves: does a numerics-changing lever train like the plain recipe? (issue 15's guard rail)

    python bench/curve.py --model 2b@13x32x48 --recipes "selective+compile selective+compile+fp8mm" \
        --seeds 0 1 2 --steps 300 --out bench/results/curve_2b_h100.json

Each (recipe, seed) trains a fresh LoRA (rank 128) on the same real-size transformer with random base weights
(built from the published config with one fixed seed, so every run starts from the same model) for ``--steps``
steps through cogvx's own step (bench/train_step.py's ``CogvxStep``: loader, objective, optimizer). The seed
sets the LoRA's initial matrices, the data order and every step's noise and timesteps. The cache: ``--samples``
random latent means with a sharp posterior (log-variance -6, as encoded clips have) and random prompt
embeddings. ``--seeds`` may be split over processes (one per GPU) writing separate files; ``bench/tables.py``
merges them, smooths each curve and checks the lever's curves against the plain recipe's run-to-run spread.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import SHAPES, CogvxStep, build_transformer, environment, load_config, make_cache  # noqa: E402

BASE_SEED = 1000  # the base model's random weights, the same for every run


def train_curve(model: str, recipe: str, seed: int, steps: int, samples: int, device: torch.device) -> dict:
    name, _, size = model.partition("@")
    cfg = load_config(name)
    shape = tuple(int(n) for n in size.split("x")) if size else SHAPES[name.removesuffix("-i2v")]
    transformer = build_transformer(cfg, device, seed=BASE_SEED)
    with tempfile.TemporaryDirectory() as folder:
        records = make_cache(Path(folder), cfg, shape, samples=samples, log_variance=-6.0)
        step = CogvxStep(transformer, cfg, device, set(recipe.split("+")), records, Path(folder), shape, seed=seed)
        losses, began = [], time.perf_counter()
        for _ in range(steps):
            losses.append(step())
        seconds = time.perf_counter() - began
    del step, transformer
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"recipe": recipe, "seed": seed, "losses": losses, "s_per_step": seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="2b@13x32x48", help="MODEL[@FxHxW] (latent size), as in train_step.py")
    parser.add_argument("--recipes", required=True, help="space-separated variants, the plain one first")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"environment": environment(device), "command": " ".join(sys.argv), "model": args.model}
    report |= {"recipes": args.recipes.split(), "steps": args.steps, "samples": args.samples, "runs": []}
    for seed in args.seeds:
        for recipe in args.recipes.split():
            run = train_curve(args.model, recipe, seed, args.steps, args.samples, device)
            report["runs"].append(run)
            tail = sum(run["losses"][-50:]) / len(run["losses"][-50:])
            print(f"{recipe} seed {seed}: {run['s_per_step']:.3f} s/step, last-50 mean loss {tail:.5f}", flush=True)
            args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
