"""Validation benchmark: one prompt sampled the seed's way and cogvx's way, same transformer, same card.

Real-size CogVideoX transformers with random weights (``train_step.build_transformer``), a rank-128 LoRA, one
prompt, ``--steps`` sampling steps at ``--guidance`` (classifier-free guidance against the empty prompt),
49 frames at 480x720 by default. Prompt embeddings are random and precomputed, and the result stays in latent
space, so T5 and the VAE are not in either time.

- ``seed_validation_s``: what diffusers' ``train_cogvideox_lora.py`` calls in ``log_validation``: a
  ``CogVideoXPipeline`` around the bf16 transformer with its peft LoRA (bf16, as the seed trains it), the
  ``CogVideoXDPMScheduler`` of the config, here given ``prompt_embeds``/``negative_prompt_embeds`` and
  ``output_type="latent"``.
- ``validation_s``: cogvx's ``run_validation`` (its own per-prompt time, file written) on the transformer as
  ``cogvx train`` prepares it on this card by default: ``--checkpointing auto`` for this video size, the
  blocks compiled on a GPU, fp32 LoRA masters, bf16 autocast. ``--variants`` adds other levers, ``+``-joined
  as in train_step.py (``auto+compile+fp8mm``, ``none``: eager).

Both are warm: one sampling of ``--warmup-steps`` steps first. Its time is ``first_call_s``; ``compile_s`` is
what it took beyond its steps at the warm pace (the compile, with a cold Inductor cache). Both draw the same
noise from the same seed, so ``latents_max_abs_diff`` and ``latents_rel_diff`` compare their latents.

    python bench/validation.py --models 5b 2b --out bench/results/validation_5b_2b_h100.json
    python bench/validation.py --models tiny --device cpu --steps 2 --out /tmp/validation.json  # smoke run
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from train_step import attention_of, auto_mode, build_transformer, environment, load_config  # noqa: E402

from cogvx import runs  # noqa: E402
from cogvx.pipeline import levers, lora, models  # noqa: E402
from cogvx.pipeline.speed import attention  # noqa: E402
from cogvx.pipeline.speed import checkpointing as modes  # noqa: E402
from cogvx.train.validation import ValidationSet, run_validation  # noqa: E402

RANK = 128
SEED = 42
DEFAULT = "default"  # the variant `cogvx train` runs by default: auto checkpointing, compiled on a GPU
SIZES = {"tiny": (17, 64, 96)}  # frames, height, width; every other model: 49 x 480 x 720


def model_info(model: str, cfg: dict) -> models.ModelInfo:
    vae, transformer = cfg["vae"], cfg["transformer"]
    spatial = 2 ** (len(vae["block_out_channels"]) - 1)
    return models.ModelInfo(
        name=model,
        source="bench",
        vae_fingerprint="",
        text_encoder_fingerprint="",
        scaling_factor=float(vae["scaling_factor"]),
        latent_channels=int(vae["latent_channels"]),
        text_embed_dim=int(cfg["text_encoder"]["d_model"]),
        spatial_compression=spatial,
        temporal_compression=int(vae.get("temporal_compression_ratio", 4)),
        native_size=(480, 720),
        max_text_tokens=int(transformer["max_text_seq_length"]),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def seed_run(cfg: dict, device: torch.device, embeds, negative, size, steps: int, guidance: float, warmup: int):
    """Seconds of the first (``warmup`` steps) and the timed (``steps``) pipeline call, and the latents."""
    from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline
    from peft import LoraConfig

    transformer = build_transformer(cfg, device)
    transformer.requires_grad_(False)
    config = LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=True, target_modules=list(lora.DEFAULT_TARGETS))
    transformer.add_adapter(config)
    transformer.enable_gradient_checkpointing()  # the seed trains with it; sampling runs without gradients
    scheduler = CogVideoXDPMScheduler.from_config(cfg["scheduler"])
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    frames, height, width = size

    def sample(count: int) -> tuple[float, torch.Tensor]:
        synchronize(device)
        began = time.perf_counter()
        latents = pipe(
            prompt_embeds=embeds.to(device),
            negative_prompt_embeds=negative.to(device),
            num_frames=frames,
            height=height,
            width=width,
            num_inference_steps=count,
            guidance_scale=guidance,
            use_dynamic_cfg=False,
            generator=torch.Generator().manual_seed(SEED),
            output_type="latent",
        ).frames
        synchronize(device)
        return time.perf_counter() - began, latents.cpu()

    first, _ = sample(warmup)
    seconds, latents = sample(steps)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0
    return first, seconds, latents, peak


def cogvx_run(model: str, cfg: dict, device, variant: str, embeds, negative, size, steps, guidance, warmup, folder):
    """``run_validation`` with the levers of ``variant``: the first call's and the timed call's seconds, the latents."""
    frames, height, width = size
    options = set(variant.split("+"))
    if variant == DEFAULT:  # TrainConfig's defaults: checkpointing auto, compile where the device is a GPU
        options = {"auto", "compile"} if device.type == "cuda" else {"auto"}
    transformer = build_transformer(cfg, device)
    torch.manual_seed(0)
    lora.add_lora(transformer, RANK, RANK, lora.DEFAULT_TARGETS, 0.0)
    info = model_info(model, cfg)
    compression = (info.spatial_compression, info.temporal_compression)
    latent = ((frames - 1) // compression[1] + 1, height // compression[0], width // compression[0])
    fp8 = bool(options & {"fp8", "fp8mm"})
    if "auto" in options:  # what `cogvx train` picks for a cache of this video size on this card
        mode = auto_mode(transformer, cfg, latent, "compile" in options, fp8, device)
    else:
        mode = next((o for o in options if o in modes.MODES), "none")
    chosen = levers.Levers(
        mode, "compile" in options, "fp8" in options, "fp8mm" in options,
        attention=attention_of(options), fp8_attention="fp8attn" in options,
    )  # fmt: skip
    levers.prepare(transformer, chosen)
    validation = ValidationSet(["a benchmark prompt"], embeds, negative, frames, height, width)
    autocast = functools.partial(torch.autocast, device.type, torch.bfloat16)

    def sample(count: int, step: int):
        done = run_validation(
            transformer, validation, output=folder, step=step, seed=SEED, model_name=model, info=info,
            scheduler_config=cfg["scheduler"], num_inference_steps=count, guidance_scale=guidance,
            dtype=torch.bfloat16, autocast=autocast,
        )  # fmt: skip
        return done.seconds[0], runs.read_validation_sample(done.paths[0])[0]

    first, _ = sample(warmup, 0)
    seconds, latents = sample(steps, 1)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0
    levers_used = {"checkpointing": mode, "compile": "compile" in options, "fp8_base": "fp8" in options}
    levers_used["fp8_matmul"] = "fp8mm" in options
    kernels = attention.installed(transformer)
    levers_used["attention"] = kernels.recorded() if kernels is not None else "diffusers"
    return first, seconds, latents, peak, levers_used


def run_model(model: str, device, variants: list[str], steps: int, guidance: float, warmup: int, workdir: Path):
    cfg = load_config(model)
    size = SIZES.get(model, (49, 480, 720))
    g = torch.Generator().manual_seed(7)
    text_dim = cfg["text_encoder"]["d_model"]
    embeds = torch.randn(1, 226, text_dim, generator=g).to(torch.bfloat16)
    negative = torch.randn(1, 226, text_dim, generator=g).to(torch.bfloat16)
    common = {"model": model, "size": list(size), "steps": steps, "guidance": guidance, "lora_rank": RANK}
    release(device)
    seed_first, seed_s, seed_latents, seed_peak = seed_run(cfg, device, embeds, negative, size, steps, guidance, warmup)
    release(device)
    rows = []
    for variant in variants:
        row = common | {"variant": variant, "seed_validation_s": seed_s, "seed_first_call_s": seed_first}
        row["seed_peak_allocated_gb"] = seed_peak
        try:
            folder = Path(tempfile.mkdtemp(dir=workdir))
            args = (embeds, negative, size, steps, guidance, warmup, folder)
            first, seconds, latents, peak, used = cogvx_run(model, cfg, device, variant, *args)
        except Exception as err:  # one failed variant (e.g. out of memory) must not lose the others
            row["error"] = f"{type(err).__name__}: {err}"[:500]
        else:
            difference = (latents.float() - seed_latents.float()).flatten()
            row |= used | {"validation_s": seconds, "first_call_s": first, "peak_allocated_gb": peak}
            row["compile_s"] = max(0.0, first - warmup * seconds / steps)
            row["speedup"] = seed_s / seconds
            row["latents_max_abs_diff"] = difference.abs().max().item()
            row["latents_rel_diff"] = (difference.norm() / seed_latents.float().norm()).item()
        release(device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def print_table(report: dict) -> None:
    print(f"\n{report['environment']}")
    head = f"{'model':6s} {'variant':24s} {'mode':10s} {'seed_validation_s':>17s} {'validation_s':>12s}"
    print(f"{head} {'speedup':>7s} {'compile_s':>9s} {'rel diff':>8s}")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['model']:6s} {r['variant']:24s} ERROR {r['error'][:80]}")
            continue
        print(
            f"{r['model']:6s} {r['variant']:24s} {r['checkpointing']:10s} {r['seed_validation_s']:17.2f} "
            f"{r['validation_s']:12.2f} {r['speedup']:7.2f} {r['compile_s']:9.1f} {r['latents_rel_diff']:8.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["5b", "2b"], help="2b, 5b, 1.5 or tiny (CPU smoke run)")
    parser.add_argument("--variants", nargs="+", default=[DEFAULT], help="cogvx's levers: default, or +-joined")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # TrainConfig's allow_tf32 default
    torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as workdir:
        # A cold Inductor cache, so compile_s is what a first launch pays.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(workdir) / "inductor"))
        import peft

        report = {"environment": environment(device) | {"peft": peft.__version__}, "command": " ".join(sys.argv)}
        report["results"] = []
        for model in args.models:
            rows = run_model(model, device, args.variants, args.steps, args.guidance, args.warmup_steps, Path(workdir))
            report["results"] += rows
            args.out.write_text(json.dumps(report, indent=1, default=str))
    print_table(report)


if __name__ == "__main__":
    main()
