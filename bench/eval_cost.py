"""Eval-score cost: one held-out eval pass beside the training step it interrupts, same model, same card, one process.

    python bench/eval_cost.py --models 2b 5b --out bench/results/eval_cost_h100.json
    python bench/eval_cost.py --models tiny --device cpu --steps 2 --out /tmp/eval_cost.json   # CPU smoke run

Per model: the real-size transformer with random weights at 49x480x720 (latent 13x60x90), LoRA rank 128,
prepared as ``cogvx train`` prepares it by default on this device (``--checkpointing auto``; compiled on a
GPU; expandable CUDA segments), as ``bench/train_step.py``'s ``auto`` step. The compile cache is not the
persistent one, so the first passes pay a cold compile, as a first launch does. Its cache holds
``HELD_OUT`` (the default held-out count) held-out samples beside the training ones; training reads only
the others (``heldout.training_shards``).

- ``step_s``: median of ``--steps`` training steps after ``--warmup`` (CUDA events, ``train_step.timed``).
- ``base_pass_s``: the base-model pass (LoRA off) ``Evaluator.base_fields`` runs once per run, timed before
  any LoRA pass, as in a run, so it pays the compile of the no-gradient graphs.
- ``eval_first_pass_s``, ``eval_pass_s``: ``Evaluator.after_step``'s pass; the first one, then the median of
  the later ones (``--eval-passes`` in all). Each is the ``eval_seconds`` the Evaluator itself reports.

Cost of the eval score at a cadence, as a fraction of the run's wall time: with ``evals = ceil(max_steps /
eval_every)`` (one every ``eval_every`` steps, and one at the last step),

    once = base_pass_s + (eval_first_pass_s - eval_pass_s)      # paid once per run: compile of the eval graphs
    cost = (evals * eval_pass_s + once) / (max_steps * step_s + evals * eval_pass_s + once)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import train_step  # noqa: E402

from cogvx.pipeline import memory  # noqa: E402
from cogvx.shards import Manifest  # noqa: E402
from cogvx.shards.store import open_store  # noqa: E402
from cogvx.train import evaluation, heldout  # noqa: E402

HELD_OUT = heldout.DEFAULT_MAX_CLIPS  # what a cache of 80 clips or more holds out by default
TRAINING_SAMPLES = 8  # enough for the loader's shuffle buffer; timing does not depend on how many
EVERY = (100, 250, 500, 1000)
MAX_STEPS = (500, 1000, 2000)
BUDGET = 0.05  # the goal: the eval score costs at most 5% of training wall time
TARGET_STEPS = 1000  # the run length at which the smallest cadence within BUDGET is reported


def evals(eval_every: int, max_steps: int) -> int:
    """Eval passes in a run: one every ``eval_every`` steps, and one at the last step (``Evaluator.due``)."""
    return max_steps // eval_every + (1 if max_steps % eval_every else 0)


def once_s(result: dict) -> float:
    """Eval seconds paid once per run: the base pass and the first pass's compile."""
    return result["base_pass_s"] + max(0.0, result["eval_first_pass_s"] - result["eval_pass_s"])


def cost(result: dict, eval_every: int, max_steps: int) -> float:
    """The eval score's share of a run's wall time (module docstring)."""
    spent = evals(eval_every, max_steps) * result["eval_pass_s"] + once_s(result)
    return spent / (max_steps * result["step_s"] + spent)


def smallest_every(result: dict, max_steps: int = TARGET_STEPS, budget: float = BUDGET) -> int | None:
    """The most frequent cadence within ``budget`` (the cost falls as ``eval_every`` grows); None if none is."""
    return next((every for every in range(1, max_steps + 1) if cost(result, every, max_steps) <= budget), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_model(model: str, device: torch.device, warmup: int, steps: int, passes: int, workdir: Path) -> dict:
    began = time.perf_counter()
    cfg = train_step.load_config(model)
    shape = train_step.SHAPES[model]
    folder = Path(tempfile.mkdtemp(dir=workdir))
    records = train_step.make_cache(folder, cfg, shape, samples=HELD_OUT + TRAINING_SAMPLES)
    store = open_store(folder)
    manifest = Manifest(producer={"name": "bench"}, params={}, schema={}, shards=records)
    # make_cache gives every sample one content hash (one clip), so the held-out keys are named here.
    eval_set = heldout.EvalSet(frozenset(f"s{i}" for i in range(HELD_OUT)), HELD_OUT, store.location)
    options = {"auto", "compile"} if device.type == "cuda" else {"auto"}  # cogvx train's default compile
    transformer = train_step.build_transformer(cfg, device)
    step = train_step.CogvxStep(
        transformer, cfg, device, options, heldout.training_shards(records, eval_set), folder, shape
    )
    evaluator = evaluation.Evaluator(
        eval_set,
        store,
        manifest,
        step.objective,
        every=1,
        compute_dtype=torch.bfloat16,
        device=device,
        autocast=lambda: torch.autocast(device.type, torch.bfloat16),
    )
    result = {"model": model, "latent": list(shape), "checkpointing": step.checkpointing}
    result["compiled"] = "compile" in options
    result["held_out_samples"] = len(eval_set.scored)
    result["timesteps_per_sample"] = evaluation.EVAL_TIMESTEPS
    result["forwards_per_pass"] = len(evaluator.pairs)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    times, losses = train_step.timed(step, device, warmup, steps)
    result["step_s"], result["step_times"], result["losses"] = statistics.median(times), times, losses
    synchronize(device)
    base = evaluator.base_fields(step.transformer)
    result["base_pass_s"], result["base_loss"] = base["eval_seconds"], base["eval_base_loss"]
    pass_times, scores = [], []
    for n in range(1, passes + 1):
        synchronize(device)
        fields = evaluator.after_step(step.transformer, n, last=False)
        pass_times.append(fields["eval_seconds"])
        scores.append(fields["eval_loss"])
    result["eval_pass_times"], result["eval_losses"] = pass_times, scores
    result["eval_first_pass_s"] = pass_times[0]
    result["eval_pass_s"] = statistics.median(pass_times[1:] or pass_times)
    if device.type == "cuda":
        result["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    result["cost"] = {f"{every}/{total}": cost(result, every, total) for every in EVERY for total in MAX_STEPS}
    result["smallest_eval_every_within_budget"] = smallest_every(result)
    result["wall_s"] = time.perf_counter() - began
    del step, transformer, evaluator
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def print_table(report: dict) -> None:
    print(f"\n{report['environment']}")
    print(f"{'model':6s} {'ckpt':10s} {'step s':>7s} {'eval pass s':>12s} {'first s':>8s} {'base s':>7s} {'fwd':>4s}")
    done = [r for r in report["results"] if "error" not in r]
    for r in report["results"]:
        if "error" in r:
            print(f"{r['model']:6s} ERROR {r['error'][:100]}")
            continue
        print(
            f"{r['model']:6s} {r['checkpointing']:10s} {r['step_s']:7.3f} {r['eval_pass_s']:12.2f} "
            f"{r['eval_first_pass_s']:8.2f} {r['base_pass_s']:7.2f} {r['forwards_per_pass']:4d}"
        )
    print(f"\neval cost, share of wall time (budget {BUDGET:.0%})")
    print(f"{'model':6s} {'eval_every':>10s} " + " ".join(f"{f'{n} steps':>11s}" for n in MAX_STEPS))
    for r in done:
        for every in EVERY:
            cells = " ".join(f"{r['cost'][f'{every}/{total}']:11.1%}" for total in MAX_STEPS)
            print(f"{r['model']:6s} {every:10d} {cells}")
    for r in done:
        every = r["smallest_eval_every_within_budget"]
        within = (
            f"eval_every {every}" if every else f"none (even one eval costs {cost(r, TARGET_STEPS, TARGET_STEPS):.1%})"
        )
        print(f"{r['model']}: smallest cadence within {BUDGET:.0%} at {TARGET_STEPS} steps: {within}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["2b", "5b"], choices=["2b", "5b", "tiny"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--eval-passes", type=int, default=2, help="LoRA passes: the first, then the timed ones")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    memory.use_expandable_segments()  # as cogvx train does, before anything touches CUDA
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    report = {"environment": train_step.environment(device), "command": " ".join(sys.argv), "results": []}
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models:
            try:
                result = run_model(model, device, args.warmup, args.steps, args.eval_passes, Path(workdir))
            except Exception as err:  # one model failing (out of memory) must not lose the other's numbers
                result = {"model": model, "error": f"{type(err).__name__}: {err}"[:500]}
                gc.collect()
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            report["results"].append(result)
            print(json.dumps(result, default=str)[:400], flush=True)
            args.out.write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    if any("error" in r for r in report["results"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
