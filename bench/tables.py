"""Write the result tables of BENCHMARKS.md from bench/results/*.json (numbers are never typed by hand).

python bench/tables.py          # rewrites the blocks between <!-- table:NAME --> markers
"""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from eval_cost import BUDGET, EVERY, MAX_STEPS, TARGET_STEPS, cost, once_s, smallest_every  # noqa: E402
from memory import swap_case  # noqa: E402  (bench/memory.py)
from train_step import load_config, useful_tflop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "BENCHMARKS.md"

# Runs made before the pinned-buffer pool (speed.py's first offload allocated pinned memory every step).
FIRST_OFFLOAD = {"train_step_2b_h100.json", "train_step_5b_h100.json"}


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def train_rows(model: str, variants: list[str], seed_variant: str) -> str:
    runs = {}
    for name in ("train_step_2b_h100.json", "train_step_5b_h100.json", "train_step_offload_h100.json"):
        for r in load(name)["results"]:
            if r["model"] == model:
                label = r["variant"] + (
                    " (first offload)" if "offload" in r["variant"] and name in FIRST_OFFLOAD else ""
                )
                runs[label] = r
    seed = runs[seed_variant]
    plain = runs.get("full" if seed_variant == "seed" else "none")
    header = (
        "| step | s/step | vs seed | useful TFLOP/s | peak allocated GB | peak reserved GB | probe loss (vs plain) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for variant in variants:
        r = runs[variant]
        tflops = useful_tflop(load_config(model), *r["latent"]) / r["s_per_step"]
        if "probe_loss" in r and plain:
            probe = f"{r['probe_loss']:.5f} ({abs(r['probe_loss'] - plain['probe_loss']) / plain['probe_loss']:.1e})"
        else:
            probe = "-"
        name = "seed-style" if variant.startswith("seed") else f"cogvx {variant}"
        lines.append(
            f"| {name} | {r['s_per_step']:.3f} | {seed['s_per_step'] / r['s_per_step']:.2f}x | {tflops:.0f} | "
            f"{r['peak_allocated_gb']:.2f} | {r['peak_reserved_gb']:.2f} | {probe} |"
        )
    return "\n".join(lines)


def table_train_2b() -> str:
    order = ["seed", "full", "full+compile", "selective", "selective+compile", "selective+compile+fp8",
             "offload+fp8", "offload+fp8+adam8 (first offload)"]  # fmt: skip
    return train_rows("2b", order, "seed")


def table_train_2b_nockpt() -> str:
    return train_rows("2b", ["seed-nockpt", "none", "none+compile"], "seed-nockpt")


def table_train_5b() -> str:
    order = ["seed", "full", "selective+compile", "selective+compile+fp8", "full+fp8+adam8", "offload+fp8",
             "offload+fp8+adam8 (first offload)"]  # fmt: skip
    return train_rows("5b", order, "seed")


def table_preprocess() -> str:
    r = load("preprocess_2b_h100.json")
    pure, ours = r["pure"], r["cogvx"]
    whole = ours["wall_s"] / ours["clips"]
    v1 = load("preprocess_2b_h100_v1_load_estimated.json")
    return "\n".join([
        "| measurement | s per 49x480x720 clip | clips/min | vs pure |",
        "|---|---|---|---|",
        f"| pure encode: VAE {pure['vae_s_per_clip']:.3f} s + T5 {pure['t5_s_per_clip']:.3f} s (frames decoded before) "
        f"| {pure['pure_s_per_clip']:.3f} | {60 / pure['pure_s_per_clip']:.1f} | 1.00 |",
        f"| `cogvx preprocess`, {ours['clips']} clips, {ours['workers']} decode workers: encoding phase (encoders "
        f"on the GPU at {ours['timeline']['encoders']:.1f} s to the last sample written) "
        f"| {ours['wall_s_per_clip']:.3f} | {60 / ours['wall_s_per_clip']:.1f} | **{r['ratio_wall_to_pure']:.2f}** |",
        f"| the same run, whole (encoder load included, {ours['wall_s']:.1f} s) "
        f"| {whole:.3f} | {60 / whole:.1f} | {whole / pure['pure_s_per_clip']:.2f} |",
        f"| first version (workers started after the encoders loaded; load estimated apart, on the CPU) "
        f"| {v1['cogvx']['wall_s_per_clip']:.3f} | {60 / v1['cogvx']['wall_s_per_clip']:.1f} "
        f"| {v1['ratio_wall_to_pure']:.2f} |",
        f"| decord decode of one clip on one core (for reference) | {pure['decode_s_per_clip_one_core']:.3f} | | |",
    ])  # fmt: skip


def table_reuse() -> str:
    r = load("cache_reuse_2b_h100.json")["reuse"]
    return "\n".join([
        "| start of training, 100 clips, CogVideoX-2b | seconds to the first optimizer step |",
        "|---|---|",
        f"| `cogvx train` on the cache (model load, LoRA, loader, step 1) | {r['cogvx_start_to_first_step_s']:.1f} |",
        f"| seed-style: decode + VAE-encode all 100 clips, T5 all prompts ({r['seed_encode_everything_s']:.1f} s), "
        f"then the same start | {r['seed_start_to_first_step_s']:.1f} |",
        f"| **speed-up** | **{r['seed_start_to_first_step_s'] / r['cogvx_start_to_first_step_s']:.1f}x** |",
    ])  # fmt: skip


def table_loader() -> str:
    lines = ["| reader | 0 workers (samples/s) | 2 workers (samples/s) |", "|---|---|---|"]
    for label, name in (("v1 (whole shard read into memory)", "loader_cpu_v1_whole_shard_in_memory.json"),
                        ("now", "loader_cpu.json")):  # fmt: skip
        r = load(name)["results"]
        lines.append(f"| bare webdataset + safetensors ({label} run) | {r['bare-0w']['samples_per_s']:.0f} | "
                     f"{r['bare-2w']['samples_per_s']:.0f} |")  # fmt: skip
        ours = (r["cogvx-0w"]["samples_per_s"], r["ratio-0w"], r["cogvx-2w"]["samples_per_s"], r["ratio-2w"])
        lines.append(f"| cogvx reader, {label} | {ours[0]:.0f} ({ours[1]:.2f}x) | {ours[2]:.0f} ({ours[3]:.2f}x) |")
    return "\n".join(lines)


def table_loader_s3() -> str:
    r = load("loader_s3_cpu.json")["results"]
    lines = ["| cogvx reader on the same shards | 0 workers (samples/s) | 2 workers (samples/s) |", "|---|---|---|"]
    for label, name in (("local disk", "disk"), ("`s3://` (moto on localhost), no cache", "s3"),
                        ("`s3://` with a warm `--cache-dir`", "s3-cache-dir")):  # fmt: skip
        cells = []
        for w in (0, 2):
            ratio = f" ({r[f'ratio-{name}-{w}w']['median']:.2f}x)" if name != "disk" else ""
            cells.append(f"{r[f'{name}-{w}w']['samples_per_s']:.1f}{ratio}")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def table_multi_gpu() -> str:
    ddp = load("ddp_2b_2xh100.json")
    one, two = ddp["runs"]
    lines = [
        "| workload | 1 GPU | 2 GPUs | scaling |",
        "|---|---|---|---|",
        f"| `cogvx train`, CogVideoX-2b, full checkpointing (samples/s, median of steps 4-10) "
        f"| {one['samples_per_s']:.3f} | {two['samples_per_s']:.3f} | **{ddp['scaling']:.2f}x** |",
    ]
    launches = {}
    for name in ("preprocess_2gpu_48clips_2xh100.json", "preprocess_2gpu_96clips_2xh100.json"):
        m = load(name)["multi"]
        runs = m["runs"]
        launches[m["clips"]] = {gpus: runs[gpus]["wall_s"] for gpus in ("1", "2")}
        lines.append(
            f"| `torchrun -m cogvx preprocess`, {m['clips']} clips (clips/min; wall less a CPU-timed model load) "
            f"| {runs['1']['clips_per_min']:.1f} | {runs['2']['clips_per_min']:.1f} | **{m['scaling']:.2f}x** |"
        )
    # A straight line through the two launches of each GPU count: wall = fixed + clips * per_clip.
    (small, walls_small), (large, walls_large) = sorted(launches.items())
    per_clip = {g: (walls_large[g] - walls_small[g]) / (large - small) for g in ("1", "2")}
    fixed = {g: walls_small[g] - small * per_clip[g] for g in ("1", "2")}
    lines += [
        f"| derived from the two rows above: wall seconds per extra clip "
        f"| {per_clip['1']:.3f} | {per_clip['2']:.3f} | {per_clip['1'] / per_clip['2']:.2f}x |",
        f"| derived: fixed seconds per launch (the line's intercept) | {fixed['1']:.1f} | {fixed['2']:.1f} | |",
    ]
    return "\n".join(lines)


def table_memory() -> str:
    """Measured peak per mode beside ``cogvx.pipeline.memory``'s prediction (fitted on 13x40x60 only)."""
    from memory import case_size, static_bytes

    from cogvx.pipeline import memory

    lines = [
        "| model | latent (video) | mode | measured GB | predicted GB | error | in the fit |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("memory_2b_h200.json", "memory_5b_h200.json"):
        for r in load(name)["results"]:
            mode, compiled = r["variant"].split("+")[0], r["variant"].endswith("+compile")
            size, _ = case_size(r)
            predicted = memory.predict(static_bytes(r), size, compiled)[mode] / 1e9
            latent = "x".join(map(str, r["latent"]))
            video = {"13x40x60": "49x320x480", "13x60x90": "49x480x720"}.get(latent, latent)
            fitted = "yes" if latent == "13x40x60" else "no"
            measured = r["peak_allocated_gb"]
            lines.append(
                f"| {r['model']} | {latent} ({video}) | {r['variant']} | {measured:.2f} | {predicted:.2f} | "
                f"{predicted / measured - 1:+.1%} | {fitted} |"
            )
    return "\n".join(lines)


def table_auto() -> str:
    """What ``--checkpointing auto`` picks for an 80 GB card, against the seed-style step, same run and card."""
    from memory import case_size, static_bytes

    from cogvx.pipeline import memory

    runs = {r["run"]: r for r in load("train_step_auto_h200.json")["results"]}
    lines = [
        "| model | auto picks (80 GB card) | predicted peak GB | s/step | seed-style s/step | vs seed | "
        "peak allocated GB (seed) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in ("2b", "5b"):
        seed = runs[f"{model}:seed"]
        probe = next(r for key, r in runs.items() if key.startswith(f"{model}:") and "compile" in key)
        size, _ = case_size(probe)
        predicted = memory.predict(static_bytes(probe), size, compiled=True)
        mode = memory.choose(predicted, 80 * 10**9)
        r = runs[f"{model}:{mode}+compile"]
        lines.append(
            f"| {model} | {mode}+compile | {predicted[mode] / 1e9:.1f} | {r['s_per_step']:.3f} | "
            f"{seed['s_per_step']:.3f} | {seed['s_per_step'] / r['s_per_step']:.2f}x | "
            f"{r['peak_allocated_gb']:.2f} ({seed['peak_allocated_gb']:.2f}) |"
        )
    return "\n".join(lines)


def runs_against_seed(name: str) -> str:
    """Every run of one result file beside the seed-style step (checkpointing on) of its model, same run and card."""
    results = [r for r in load(name)["results"] if "error" not in r]
    seeds = {r["model"]: r for r in results if r["variant"] == "seed"}
    lines = [
        "| model (latent) | recipe | checkpointing | s/step | vs seed | peak allocated GB | peak reserved GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        seed = seeds.get(r["model"])
        ratio = f"{seed['s_per_step'] / r['s_per_step']:.2f}x" if seed else "-"
        mode = r.get("checkpointing", "full (diffusers)" if r["variant"] == "seed" else "")
        lines.append(
            f"| {r['model'].split('@')[0]} ({'x'.join(map(str, r['latent']))}) | {r['variant']} | {mode} | "
            f"{r['s_per_step']:.3f} | {ratio} | {r['peak_allocated_gb']:.2f} | {r['peak_reserved_gb']:.2f} |"
        )
    return "\n".join(lines)


# Tables of every run of one result file beside its seed-style step (``runs_against_seed``), by marker name.
AGAINST_SEED = {
    "swap": "train_step_swap_fixed_h200.json",
    "swap_first": "train_step_swap_h200.json",
    "swap_reserved": "train_step_swap_h200_rerun.json",
    "cogvideox15_49": "train_step_15_49x480x720_h200.json",
    "cogvideox15_81": "train_step_15_81x768x1360_h200.json",
    "i2v_49": "train_step_i2v_49x480x720_h200.json",
    "i2v_81": "train_step_15_81x768x1360_i2v_h200.json",
    "swap_replay": "train_step_swap_replay_h100.json",
    "swap_replay_first": "train_step_swap_replay_first_attempt_h100.json",
}


def table_swap_prediction() -> str:
    """``auto``'s prediction for ``swap`` beside every swap peak measured since the compiled-runner fix."""
    from cogvx.pipeline import memory

    lines = ["| model (latent) | recipe | measured GB | predicted GB | error |", "|---|---|---|---|---|"]
    for name in ("train_step_swap_fixed_h200.json", "train_step_15_81x768x1360_i2v_h200.json"):
        for r in load(name)["results"]:
            options = set(r["variant"].split("+"))
            if "swap" not in options:
                continue
            size, static, swapped = swap_case(r)
            predicted = memory.predict(static, size, "compile" in options, swapped)["swap"] / 1e9
            measured = r["peak_allocated_gb"]
            lines.append(
                f"| {r['model'].split('@')[0]} ({'x'.join(map(str, r['latent']))}) | {r['variant']} | {measured:.2f} | "
                f"{predicted:.2f} | {predicted / measured - 1:+.1%} |"
            )
    return "\n".join(lines)


def _side_by_side(header: str, left: dict, right: dict, rows: list[tuple[str, str]]) -> str:
    """A three-column table: each row's label, then its format string applied to ``left`` and to ``right``."""
    lines = [header, "|---|---|---|"]
    lines += [f"| {label} | {cell.format(**left)} | {cell.format(**right)} |" for label, cell in rows]
    return "\n".join(lines)


def table_vae_compile() -> str:
    return _side_by_side(
        "| CogVideoX-2b VAE, bf16, one 49x480x720 clip | empty compile cache | warm compile cache |",
        load("vae_encode_cold_h200.json"),
        load("vae_encode_warm_h200.json"),
        [
            ("plain `vae.encode` (s)", "{plain_s:.3f}"),
            ("compiled encoder (s, median after the first)", "{compiled_s:.3f}"),
            ("**speed-up**", "**{speedup:.2f}x**"),
            ("first compiled encode (s)", "{compiled_first_s:.1f}"),
            ("whole process (s)", "{process_s:.1f}"),
            ("max abs difference of the moments, compiled vs plain (largest value)",
             "{max_abs_difference:.4f} ({max_abs_value:.2f})"),
            ("mean abs difference", "{mean_abs_difference:.4f}"),
        ],
    )  # fmt: skip


def table_launch() -> str:
    """Seconds from just before a process starts; one row per launch of bench/preprocess.py --parts launch."""
    files = {
        "launch_2b_h200.json": "A",
        "launch_2b_h200_t5_thread_experiment.json": "B: T5 on its own thread, straight to the GPU",
        "launch_2b_h200_t5_device_map_experiment.json": "C: T5 straight to the GPU",
    }
    lines = [
        "| run | launch | imports done | VAE and T5 on the GPU | first sample written / first optimizer step | exit |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in files.items():
        runs = load(name)["launch"]
        for key, run in runs.items():
            if key == "clips":
                continue
            loaded = max(run.get("encoders_s", 0.0), run.get("text_encoder_s", 0.0)) or None
            first = run.get("first_written_s", run.get("first_step_s"))
            lines.append(
                f"| {label} | {key.replace('_', ' ')} | {run['imported_s']:.1f} | "
                f"{f'{loaded:.1f}' if loaded else '-'} | {first:.1f} | {run['end_s']:.1f} |"
            )
    return "\n".join(lines)


def table_cudnn() -> str:
    return _side_by_side(
        "| plain `vae.encode`, CogVideoX-2b VAE, one 49x480x720 clip | `cudnn.benchmark` on | off |",
        load("vae_plain_cudnn_on_h200.json"),
        load("vae_plain_cudnn_off_h200.json"),
        [("first call (s)", "{plain_first_s:.2f}"), ("later calls (s, median)", "{plain_s:.3f}")],
    )


def table_fp8_matmul() -> str:
    """Goal 2's runs: the fastest recipes within the seed's memory, each with one profiled step."""
    results = [r for r in load("train_step_fp8mm_h100.json")["results"] if "error" not in r]
    seeds = {(r["model"], r["variant"]): r for r in results if r["variant"].startswith("seed")}
    lines = [
        "| model | step | s/step | vs seed | peak allocated GB | probe loss | attention s | matrix products s | "
        "other kernels s | GPU busy | ceiling if only attention were left |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reference = r["variant"] if r["variant"].startswith("seed") else None  # each seed-style step is its own 1.00x
        seed = seeds[(r["model"], reference or ("seed-nockpt" if r.get("checkpointing") == "none" else "seed"))]
        f = r["profile"]
        name = r["variant"] if r["variant"].startswith("seed") else f"cogvx {r['variant']}"
        probe = f"{r['probe_loss']:.5f}" if "probe_loss" in r else "-"
        ceiling = "-" if r["variant"].startswith("seed") else f"{seed['s_per_step'] / f['attention_s']:.2f}x"
        lines.append(
            f"| {r['model']} | {name} | {r['s_per_step']:.3f} | {seed['s_per_step'] / r['s_per_step']:.2f}x | "
            f"{r['peak_allocated_gb']:.2f} | {probe} | {f['attention_s']:.3f} | {f['matmul_s']:.3f} | "
            f"{f['other_s']:.3f} | {f['kernels_s'] / f['step_wall_s']:.0%} | "
            f"{ceiling} |"
        )
    return "\n".join(lines)


def table_attention_kernels() -> str:
    models = load("kernels_h100.json")["models"]
    lines = [
        "| model | SDPA backend | forward ms | forward+backward ms | forward+backward TFLOP/s |",
        "|---|---|---|---|---|",
    ]
    for model, parts in models.items():
        attention = parts["attention"]
        for backend, row in attention.items():
            if backend == "default_backend" or "error" in row:
                continue
            label = f"default (picks {attention['default_backend']})" if backend == "default" else backend
            lines.append(
                f"| {model} | {label} | {row['forward_ms']:.2f} | {row['forward_backward_ms']:.2f} | "
                f"{row['forward_backward_tflops']:.0f} |"
            )
    return "\n".join(lines)


def attention_rates(model: str) -> dict[str, float]:
    """Measured attention forward+backward TFLOP/s by kernel at the model's shape (kernels_h100.json, and
    attention_h100.json's FlashAttention-3 rows where that build was measured)."""
    attention = load("kernels_h100.json")["models"][model]["attention"]
    rates: dict[str, float] = {}
    for name, row in attention.items():
        if name == "default_backend" or "error" in row:
            continue
        label = f"SDPA {attention['default_backend'] if name == 'default' else name}"  # default: the kernel it picked
        rates[label] = max(rates.get(label, 0.0), row["forward_backward_tflops"])
    if (RESULTS / "attention_h100.json").exists():
        for name, row in load("attention_h100.json")["models"][model].items():
            if "forward_backward_tflops" in row and name != "sdpa":
                rates[name] = row["forward_backward_tflops"]
    return rates


def roofline(r: dict) -> dict:
    """The step ``r`` would take with attention at the fastest measured kernel rate and its products as profiled.

    Attention work per step: layers x 4 N^2 d for a forward, 2.5 times that for the backward, and one forward
    more where the block is recomputed (full checkpointing: the seed-style step); selective and none run it once.
    """
    t = load_config(r["model"])["transformer"]
    d = t["num_attention_heads"] * t["attention_head_dim"]
    p, p_t = t["patch_size"], t.get("patch_size_t") or 1
    frames, height, width = r["latent"]
    n = (frames + p_t - 1) // p_t * (height // p) * (width // p) + t["max_text_seq_length"]
    forwards = 3.5 if r.get("checkpointing") in ("selective", "none") else 4.5
    attention_tflop = t["num_layers"] * forwards * 4 * n * n * d / 1e12
    kernel, rate = max(attention_rates(r["model"]).items(), key=lambda item: item[1])
    step = attention_tflop / rate + r["profile"]["matmul_s"]
    return {"attention_tflop": attention_tflop, "kernel": kernel, "rate": rate, "step_s": step}


ROOFLINE_RUNS = ("train_step_fp8mm_h100.json", "train_step_fa3_h100.json")
# train_step_fa3_h100.json has no 5b seed-style step: the run before it, on another H100 of the same session, has.
SEED_ELSEWHERE = "train_step_fa3_first_attempt_h100.json"


def _seed_steps(name: str) -> dict[tuple[str, str], dict]:
    results = [r for r in load(name)["results"] if "error" not in r]
    return {(r["model"], r["variant"]): r for r in results if r["variant"].startswith("seed")}


def table_roofline() -> str:
    """Each recipe against its roofline: attention at the fastest measured rate, products at their profiled rates,
    every other kernel and all idle time gone."""
    lines = [
        "| result file | model | step | s/step | vs seed | attention TFLOP | fastest attention kernel (TFLOP/s) "
        "| roofline step s | step / roofline | roofline vs seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ROOFLINE_RUNS:
        seeds = _seed_steps(name)
        for r in load(name)["results"]:
            if "error" in r or r["variant"].startswith("seed"):
                continue
            wanted = (r["model"], "seed-nockpt" if r.get("checkpointing") == "none" else "seed")
            seed, mark = seeds.get(wanted), ""
            if seed is None:
                seed, mark = _seed_steps(SEED_ELSEWHERE)[wanted], "\\*"
            roof = roofline(r)
            lines.append(
                f"| `{name}` | {r['model']} | cogvx {r['variant']} | {r['s_per_step']:.3f} | "
                f"{seed['s_per_step'] / r['s_per_step']:.2f}x{mark} | {roof['attention_tflop']:.0f} | "
                f"{roof['kernel']} ({roof['rate']:.0f}) | {roof['step_s']:.3f} | "
                f"{r['s_per_step'] / roof['step_s']:.2f} | {seed['s_per_step'] / roof['step_s']:.2f}x{mark} |"
            )
    return "\n".join(lines)


def table_fa3_kernels() -> str:
    """bench/attention.py: SDPA (cuDNN) against FlashAttention-3's bf16 and float8-forward kernels, same card."""
    lines = [
        "| model | kernel | forward ms | forward TFLOP/s | forward+backward ms | forward+backward TFLOP/s "
        "| output vs SDPA: max abs (rel.) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, rows in load("attention_h100.json")["models"].items():
        for kernel, row in rows.items():
            both = (
                f"{row['forward_backward_ms']:.2f} | {row['forward_backward_tflops']:.0f}"
                if "forward_backward_ms" in row
                else "- | -"
            )
            label = {"sdpa": "SDPA (cuDNN)", "fa3": "FlashAttention-3 bf16"}.get(
                kernel, "FlashAttention-3 float8 forward"
            )
            if "with_quantisation_ms" in row:
                label += f" ({row['with_quantisation_ms']:.2f} ms with its eager per-head quantisation)"
            lines.append(
                f"| {model} | {label} | {row['forward_ms']:.2f} | {row['forward_tflops']:.0f} | {both} | "
                f"{row['max_abs_diff']:.1e} ({row['rel_diff']:.1e}) |"
            )
    return "\n".join(lines)


def table_fa3_step() -> str:
    """bench/train_step.py --profile: the fastest recipe with SDPA and with FlashAttention-3, one H100."""
    lines = [
        "| result file | model | step | s/step | vs seed | peak allocated GB | probe loss | attention s "
        "| matrix products s | other kernels s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in (SEED_ELSEWHERE, "train_step_fa3_h100.json"):
        seeds = _seed_steps(name)
        for r in load(name)["results"]:
            if "error" in r:
                model, variant = r["run"].split(":", 1)
                lines.append(f"| `{name}` | {model} | cogvx {variant} | failed: {r['error'].splitlines()[0][:50]} |"
                             " | | | | | |")  # fmt: skip
                continue
            seed, mark = seeds.get((r["model"], "seed")), ""
            if seed is None:
                seed, mark = _seed_steps(SEED_ELSEWHERE)[(r["model"], "seed")], "\\*"
            f = r["profile"]
            name_ = r["variant"] if r["variant"].startswith("seed") else f"cogvx {r['variant']}"
            probe = f"{r['probe_loss']:.5f}" if "probe_loss" in r else "-"
            lines.append(
                f"| `{name}` | {r['model']} | {name_} | {r['s_per_step']:.3f} | "
                f"{seed['s_per_step'] / r['s_per_step']:.2f}x{mark} | {r['peak_allocated_gb']:.2f} | {probe} | "
                f"{f['attention_s']:.3f} | {f['matmul_s']:.3f} | {f['other_s']:.3f} |"
            )
    return "\n".join(lines)


LAUNCH_PHASES = {
    "train": ("imports", "accelerator", "setup", "loader_started", "transformer_loaded", "lora_added",
              "levers_installed", "first_batch", "first_forward", "first_step"),
    "preprocess": ("imports", "clips_found", "configs", "loader", "first_decoded", "vae", "t5", "first_prompt",
                   "first_latent", "first_written"),
}  # fmt: skip


def table_launch_h100() -> str:
    """bench/launch.py: fresh processes, seconds from just before each starts to each phase of its own timeline."""
    lines = []
    for command, phases in LAUNCH_PHASES.items():
        lines += [
            f"| {command} | compile | compile cache | " + " | ".join(phases) + " |",
            "|---|---|---|" + "---|" * len(phases),
        ]
        for r in load("launch_2b_h100.json")["rows"] + load("launch_5b_h100.json")["rows"]:
            if r["command"] != command:
                continue
            # A row without its timeline (the 5b experiment's cold launch) has its first step only.
            timeline = r.get("timeline") or {"first_step": r["first_step_s"]}
            offset = r["first_step_s"] - timeline["first_step"] if command == "train" else 0.0
            # Phases added after a run was measured show as "-" in its row.
            cells = " | ".join(f"{timeline[phase] + offset:.1f}" if phase in timeline else "-" for phase in phases)
            lines.append(
                f"| {r['model']} {command} | {'yes' if r['compile'] else 'no'} | {r['compile_cache']} | {cells} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def table_linear_kernels() -> str:
    models = load("kernels_h100.json")["models"]
    lines = [
        "| model | product (tokens x in -> out) | bf16 ms | float8 ms | row quantisation alone ms | "
        "fused QKV: three products ms | one fused product ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, parts in models.items():
        for row in parts["linears"]:
            shape = f"{row['linear']} ({row['in']} -> {row['out']})"
            if "three_ms" in row:
                cells = f"| | | | {row['three_ms']:.3f} | {row['fused_ms']:.3f} |"
            else:
                cells = f"| {row['bf16_ms']:.3f} | {row['fp8_ms']:.3f} | {row['quantise_ms']:.3f} | | |"
            lines.append(f"| {model} | {shape} {cells}")
    return "\n".join(lines)


SMOOTHING = 25  # steps in the trailing mean of every loss curve


def _curves() -> tuple[dict, dict[str, dict[int, list[float]]]]:
    """The curve runs of every seed's file, smoothed: {recipe: {seed: curve}}."""
    files = sorted(RESULTS.glob("curve_2b_h200_seed*.json"))
    curves: dict[str, dict[int, list[float]]] = {}
    for path in files:
        for run in json.loads(path.read_text())["runs"]:
            losses = run["losses"]
            smooth = [sum(losses[max(0, i - SMOOTHING + 1) : i + 1]) / (i + 1 - max(0, i - SMOOTHING + 1))
                      for i in range(len(losses))]  # fmt: skip
            curves.setdefault(run["recipe"], {})[run["seed"]] = smooth
    return json.loads(files[0].read_text()), curves


def curve_check(report: dict, curves: dict[str, dict[int, list[float]]]) -> dict:
    """The lever's smoothed curves against the plain recipe's run-to-run spread, step by step."""
    plain_name, lever_name = report["recipes"]
    plain, lever = curves[plain_name], curves[lever_name]
    steps, seeds = len(next(iter(plain.values()))), sorted(plain)
    inside, paired, spread = 0, [], []
    for t in range(steps):
        low, high = min(plain[s][t] for s in seeds), max(plain[s][t] for s in seeds)
        mean = sum(lever[s][t] for s in seeds) / len(seeds)
        inside += low <= mean <= high
        paired.append(max(abs(lever[s][t] - plain[s][t]) for s in seeds))
        spread.append(high - low)
    ordered = sorted(spread)
    return {"plain": plain_name, "lever": lever_name, "steps": steps, "seeds": seeds, "inside": inside / steps,
            "max_paired": max(paired), "median_spread": ordered[len(ordered) // 2],
            "min_spread": ordered[0]}  # fmt: skip


def table_curve() -> str:
    report, curves = _curves()
    c = curve_check(report, curves)
    plain, lever = curves[c["plain"]], curves[c["lever"]]
    lines = [
        f"| steps | {c['plain']}: mean of 3 seeds (min-max) | {c['lever']}: mean (min-max) | "
        "largest same-seed difference |",
        "|---|---|---|---|",
    ]
    for start in range(0, c["steps"], 50):
        window = range(start, min(start + 50, c["steps"]))

        def stats(curve: dict[int, list[float]], window: range = window) -> str:
            means = [sum(curve[s][t] for t in window) / len(window) for s in c["seeds"]]
            return f"{sum(means) / len(means):.4f} ({min(means):.4f}-{max(means):.4f})"

        diff = max(abs(lever[s][t] - plain[s][t]) for s in c["seeds"] for t in window)
        lines.append(f"| {start + 1}-{window[-1] + 1} | {stats(plain)} | {stats(lever)} | {diff:.4f} |")
    lines.append(
        f"| all {c['steps']} | the lever's mean curve inside the plain recipe's min-max band at "
        f"**{c['inside']:.0%}** of steps | largest same-seed difference {c['max_paired']:.4f} | "
        f"plain run-to-run spread: median {c['median_spread']:.4f}, smallest {c['min_spread']:.4f} |"
    )
    write_curve_plot(curves, c)
    return "\n".join(lines)


def write_curve_plot(curves: dict, c: dict, path: Path = RESULTS / "curve_2b_h200.svg") -> None:
    """An SVG line plot of the smoothed curves: the plain recipe's seeds solid, the lever's dashed."""
    width, height, pad = 720, 360, 50
    values = [v for recipe in curves.values() for curve in recipe.values() for v in curve[SMOOTHING:]]
    low, high = min(values), max(values)

    def point(t: int, v: float) -> str:
        x = pad + (width - 2 * pad) * t / (c["steps"] - 1)
        y = height - pad - (height - 2 * pad) * (v - low) / (high - low)
        return f"{x:.1f},{y:.1f}"

    colours = ["#1f77b4", "#d62728", "#2ca02c"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>']  # fmt: skip
    for recipe, style in ((c["plain"], 'stroke-width="2"'), (c["lever"], 'stroke-width="1" stroke-dasharray="3 3"')):
        for colour, seed in zip(colours, c["seeds"], strict=False):
            line = " ".join(point(t, v) for t, v in enumerate(curves[recipe][seed]) if t >= SMOOTHING)
            colour = colour if recipe == c["plain"] else "black"  # drawn over the plain curve of its seed
            parts.append(f'<polyline fill="none" stroke="{colour}" {style} points="{line}"/>')
    parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>')
    parts.append(f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>')
    for v in (low, (low + high) / 2, high):
        x, y = point(0, v).split(",")
        parts.append(f'<text x="{pad - 6}" y="{y}" text-anchor="end">{v:.3f}</text>')
    for t in (SMOOTHING, c["steps"] // 2, c["steps"]):
        x, _ = point(t - 1, low).split(",")
        parts.append(f'<text x="{x}" y="{height - pad + 16}" text-anchor="middle">{t}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">step (loss: mean of the last '
                 f'{SMOOTHING} steps)</text>')  # fmt: skip
    parts.append(f'<text x="{pad}" y="20">{c["plain"]}: seeds {", ".join(map(str, c["seeds"]))} in blue, red, '
                 f'green; {c["lever"]}: black dashes over its seed</text>')  # fmt: skip
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def table_multi_gpu_4() -> str:
    """Whole 64-clip launches on 1 and 4 GPUs of one host, warm compile cache."""
    lines = [
        "| launch | GPUs | wall s | encoders on the GPU s | first sample s | last sample s | clips/min, whole "
        "| clips/min, encoding phase |",
        "|---|---|---|---|---|---|---|---|",
    ]
    scaling = []
    for name, label in (("preprocess_4gpu_64clips_h200.json", "compile cache warmed on all 4 GPUs"),
                        ("preprocess_4gpu_64clips_h200_warm_1gpu_only.json", "warmed on GPU 0 only")):  # fmt: skip
        m = load(name)["multi"]
        for gpus, run in m["runs"].items():
            t = run["timeline"]
            lines.append(
                f"| {label} | {gpus} | {run['wall_s']:.1f} | {t['encoders']:.1f} | {t['first_written']:.1f} | "
                f"{t['encoded']:.1f} | {run['clips_per_min']:.1f} | {run['clips_per_min_encoding']:.1f} |"
            )
        scaling.append(f"{label}: **{m['scaling']:.2f}x** whole, {m['scaling_encoding']:.2f}x encoding phase")
    return "\n".join(lines + ["", "Scaling, 4 GPUs vs 1: " + "; ".join(scaling) + "."])


def table_compile_index() -> str:
    """One process after another on a 2-GPU host, one compile cache: does a warm cache serve another GPU index?"""
    lines = ["| process, in order | device | first compiled encode s | whole process s |", "|---|---|---|---|"]
    for label, name in (("1: empty cache", "vae_index_gpu1_cold_h200.json"),
                        ("2: same GPU again", "vae_index_gpu1_warm_h200.json"),
                        ("3: the other GPU", "vae_index_gpu0_after_gpu1_h200.json")):  # fmt: skip
        r = load(name)
        device = r["command"].split("--device ")[1].split()[0]
        lines.append(f"| {label} | `{device}` | {r['compiled_first_s']:.1f} | {r['process_s']:.1f} |")
    return "\n".join(lines)


def eval_cost_rows(report: dict) -> str:
    """bench/eval_cost.py's result: the eval pass beside the training step, and its share of a run's wall time."""
    lines = [
        "| model (checkpointing) | s/step | eval pass s (forwards) | once per run s (base pass, compile) | "
        "max steps | " + " | ".join(f"eval every {every}" for every in EVERY) + " |",
        "|---|---|---|---|---|" + "---|" * len(EVERY),
    ]
    notes = []
    for r in report["results"]:
        if "error" in r:
            notes.append(f"{r['model']}: {r['error'][:120]}")
            continue
        for total in MAX_STEPS:
            cells = " | ".join(f"{cost(r, every, total):.1%}" for every in EVERY)
            lines.append(
                f"| {r['model']} ({r['checkpointing']}) | {r['step_s']:.3f} | "
                f"{r['eval_pass_s']:.2f} ({r['forwards_per_pass']}) | {once_s(r):.1f} | {total} | {cells} |"
            )
        every = smallest_every(r)
        notes.append(
            f"{r['model']}: the most frequent cadence within {BUDGET:.0%} at {TARGET_STEPS} steps is "
            + (f"**eval every {every}**" if every else "none")
        )
    return "\n".join([*lines, "", "; ".join(notes) + "."])


def at_clips(result: dict, clips: int) -> dict:
    """``result`` (measured with ``held_out_samples`` clips) with its passes scaled to ``clips`` clips: a pass is
    one forward per (clip, timestep), so its seconds scale with the forwards; the first pass's compile does not."""
    scale = clips / result["held_out_samples"]
    compile_s = max(0.0, result["eval_first_pass_s"] - result["eval_pass_s"])
    return result | {
        "held_out_samples": clips,
        "forwards_per_pass": round(result["forwards_per_pass"] * scale),
        "eval_pass_s": result["eval_pass_s"] * scale,
        "base_pass_s": result["base_pass_s"] * scale,
        "eval_first_pass_s": result["eval_pass_s"] * scale + compile_s,
    }


def table_eval_cost() -> str:
    return eval_cost_rows(load("eval_cost_h100.json"))


def table_eval_cost_default() -> str:
    from cogvx.train import heldout

    measured = load("eval_cost_h100.json")
    return eval_cost_rows(measured | {"results": [at_clips(r, heldout.DEFAULT_MAX_CLIPS) for r in measured["results"]]})


VALIDATION_RUNS = ("validation_5b_h100.json", "validation_5b_fp8mm_h100.json", "validation_fa3_5b_h100.json")


def table_validation() -> str:
    """bench/validation.py: one prompt, 50 steps, guidance 6, 49x480x720, the seed's pipeline vs cogvx's validation.

    Each result file is one machine: its rows compare with the seed-style sampling of the same file."""
    lines = [
        "| result file | model | cogvx recipe | seed-style s (peak GB) | cogvx s (peak GB) | speedup | first call s "
        "| latents rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in VALIDATION_RUNS:
        if not (RESULTS / name).exists():
            continue
        for r in load(name)["results"]:
            if "error" in r:
                continue
            recipe = r["checkpointing"] + ("+compile" if r["compile"] else "") + ("+fp8mm" if r["fp8_matmul"] else "")
            kernels = r.get("attention")
            if isinstance(kernels, dict) and kernels["setting"] != "auto":
                recipe += f"+{kernels['setting']}" + ("+fp8 attention forward" if kernels["fp8_forward"] else "")
            lines.append(
                f"| `{name}` | {r['model']} | {recipe} | {r['seed_validation_s']:.1f} "
                f"({r['seed_peak_allocated_gb']:.1f}) | {r['validation_s']:.1f} ({r['peak_allocated_gb']:.1f}) | "
                f"**{r['speedup']:.2f}x** | {r['first_call_s']:.1f} | {r['latents_rel_diff']:.1e} |"
            )
    return "\n".join(lines)


def table_experiment() -> str:
    """bench/experiment.py, the sides run apart on one machine and merged: measured, and projected to 200 steps."""
    r = load("experiment_5b_h100.json")
    steps, projection = r["settings"]["steps"], r["projection"]
    cogvx, seed = r["cogvx"]["phases"], r["seed"]["phases"]
    rate = projection["s_per_step"]
    seed_validations = [v for v in r["seed"]["validated_at"] if not v["after_lora"]]
    # The seed's validations: from the first one's start to its LoRA, less the steps trained in between.
    seed_validation_s = r["seed"]["wall_s"] - seed_validations[0]["began_s"]
    seed_validation_s -= (steps - seed_validations[0]["step"]) * rate["seed"]
    encoded = f"decoded at {seed['clips_decoded_s']:.1f}, encoded at {seed['clips_encoded_s']:.1f}"
    rows = [
        ("steps run", f"{steps}", f"{steps}"),
        ("validated at step", ", ".join(map(str, r["cogvx"]["validated_at"])),
         ", ".join(str(v["step"]) for v in seed_validations)),
        ("training starts (s)", f"{cogvx['preprocess_wall_s']:.1f} (preprocess ends)",
         f"{seed['training_started_s']:.1f} ({encoded})"),
        ("train process: first step (s from its start)", f"{cogvx['train_first_step_s']:.1f}", "-"),
        ("s per step", f"{rate['cogvx']:.3f} (median)", f"{rate['seed']:.3f} (steps before the first validation)"),
        ("two validations (s)", f"{cogvx['train_validation_s']:.1f}",
         f"{seed_validation_s:.1f} (first one's start to the LoRA, less the steps between)"),
        (f"**wall, {steps} steps (s)**", f"**{r['cogvx_wall_s']:.1f}**", f"**{r['seed_wall_s']:.1f}**"),
        (f"wall projected to {projection['steps']} steps (s)", f"{projection['cogvx_wall_s']:.1f}",
         f"{projection['seed_wall_s']:.1f}"),
    ]  # fmt: skip
    lines = ["| 5b, 32 clips of 49x480x720, rank 128 | cogvx | seed script |", "|---|---|---|"]
    lines += [f"| {label} | {a} | {b} |" for label, a, b in rows]
    measured, projected = r["ratio_seed_to_cogvx"], projection["ratio_seed_to_cogvx"]
    lines += ["", f"| | measured | projected to {projection['steps']} steps |", "|---|---|---|"]
    lines.append(f"| seed wall / cogvx wall | **{measured:.2f}x** | **{projected:.2f}x** |")
    return "\n".join(lines)


def table_replay_gradients() -> str:
    """The probe's gradient norm (fixed batch, before any update) of the runs that found and checked the replay bug."""
    lines = ["| result file | run | probe loss | probe gradient norm | replayed |", "|---|---|---|---|---|"]
    for name in (
        "train_step_swap_replay_first_attempt_h100.json",
        "train_step_replay_debug_h100.json",
        "train_step_replay_check_h100.json",
        "train_step_swap_replay_h100.json",
    ):
        for r in load(name)["results"]:
            if "probe_grad_norm" not in r:
                continue
            replayed = (r.get("attention") or {}).get("replay", {}).get("active")
            if "noreplay" in r["variant"]:
                replayed = (
                    "no (probe)" if name == "train_step_replay_check_h100.json" else "yes (probe), no (timed steps)"
                )
            lines.append(
                f"| `{name}` | {r['run']} | {r['probe_loss']:.6f} | {r['probe_grad_norm']:.6f} | "
                f"{'yes' if replayed is True else 'no' if replayed is False else replayed} |"
            )
    return "\n".join(lines)


def table_environment() -> str:
    seen = {}
    for path in sorted(RESULTS.glob("*.json")):
        env = json.loads(path.read_text()).get("environment", {})
        seen[path.name] = ", ".join(f"{k} {v}" for k, v in env.items())
    return "\n".join(["| result file | environment |", "|---|---|"] + [f"| `{k}` | {v} |" for k, v in seen.items()])


def main() -> None:
    text = DOC.read_text()
    builders = {k[6:]: v for k, v in globals().items() if k.startswith("table_")}
    builders |= {name: functools.partial(runs_against_seed, result) for name, result in AGAINST_SEED.items()}
    for name, build in builders.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n)(?:(?!<!-- table:).)*?(<!-- /table -->)", re.S)
        text, count = pattern.subn(lambda m, b=build: m.group(1) + b() + "\n" + m.group(2), text)
        if not count:
            print(f"no <!-- table:{name} --> block in {DOC.name}")
    DOC.write_text(text)


if __name__ == "__main__":
    main()
