"""Train-step benchmark: cogvx's step beside the seed-style step, same inputs, same card, one process.

Real-size CogVideoX transformers are built from the published configs (bench/model-configs) with
random weights, directly on the GPU; speed and memory do not depend on weight values.

    python bench/train_step.py --runs "2b:seed 2b:full 2b:selective+compile" --out results.json

A run is ``MODEL:VARIANT``, or ``MODEL@FxHxW:VARIANT`` for another latent size (``1.5@21x96x170``: 81 frames
at 768x1360). ``MODEL`` may end in ``-i2v`` (``5b-i2v``, ``1.5-i2v``): the image-to-video transformer, built
from the text-to-video config with what the published I2V configs change (twice the input channels; 5b-I2V
learned position embeddings, 1.5-I2V the ``ofs`` embedding), trained with the image latents of each sample's
first frame; its seed-style step is the one of diffusers' ``train_cogvideox_image_to_video_lora.py``.
``seed`` / ``seed-nockpt`` is the reference, the seed-style step of
diffusers' ``train_cogvideox_lora.py`` (bf16 weights, peft adapter, plain AdamW, loss in bf16 under
autocast, with or without diffusers' gradient checkpointing), written here. Every other variant is cogvx's own step
(its shard loader with workers and pinned memory, ``Objective`` in fp32, fused AdamW, fp32 LoRA
masters, bf16 autocast), with ``+``-joined options: a checkpointing mode (``full``, ``selective``,
``none``, ``offload``, ``swap``), ``compile``, ``fp8`` (fp8 storage of frozen base weights), ``fp8mm`` (their
forward products in fp8 too), ``adam8`` (bitsandbytes 8-bit AdamW), ``sdpa`` or ``fa3`` (``--attention``;
cogvx's default, auto, otherwise) and ``noreplay`` (offload and swap run FA3's forward again in the recompute
instead of replaying its outputs: the rows before replay). Timing: median of ``--steps`` steps
after ``--warmup`` steps, CUDA events. ``--profile`` adds one profiled step per run: GPU kernel time split into
attention, matrix products and the rest, and the share of the step the GPU was busy.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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

from cogvx.pipeline import levers, lora, memory  # noqa: E402
from cogvx.pipeline.objective import Objective, pad_for_temporal_patch, rotary_embedding  # noqa: E402
from cogvx.pipeline.speed import attention, replay  # noqa: E402
from cogvx.pipeline.speed import checkpointing as modes  # noqa: E402
from cogvx.pipeline.speed.float8 import fp8_saving  # noqa: E402
from cogvx.pipeline.speed.swap import swap_saving  # noqa: E402
from cogvx.shards import Sample, SampleEntry, ShardRecord, ShardWriter  # noqa: E402
from cogvx.train.config import TrainConfig  # noqa: E402
from cogvx.train.data import ShardStream, make_loader  # noqa: E402
from cogvx.train.step import build_optimizer, step_seed  # noqa: E402

CONFIGS = Path(__file__).parent / "model-configs"
MODELS = {"2b": "CogVideoX-2b.json", "5b": "CogVideoX-5b.json", "1.5": "CogVideoX1.5-5B.json"}
# Latent size of 49 frames at 480x720 (13 x 60 x 90); the tiny smoke model uses 5 x 8 x 12.
SHAPES = {"2b": (13, 60, 90), "5b": (13, 60, 90), "1.5": (13, 60, 90), "tiny": (5, 8, 12)}


def load_config(model: str) -> dict:
    if model.endswith("-i2v"):
        cfg = load_config(model.removesuffix("-i2v"))
        t = cfg["transformer"]
        t["in_channels"] = 2 * t["in_channels"]
        if t.get("patch_size_t"):  # 1.5-I2V: the ofs embedding, as wide as the time embedding
            t["ofs_embed_dim"] = t["time_embed_dim"]
        else:  # 5b-I2V
            t["use_learned_positional_embeddings"] = True
        if model.startswith("1.5"):  # the 1.5 I2V pipeline divides image latents by the scaling factor
            cfg["vae"]["invert_scale_latents"] = True
        return cfg
    if model == "tiny":  # CPU smoke run of this script
        from cogvx.pipeline import models

        source = models.resolve_model("tiny")
        return {sub: models.read_config(source, sub) for sub in ("transformer", "vae", "scheduler")} | {
            "text_encoder": {"d_model": 32}
        }
    return json.loads((CONFIGS / MODELS[model]).read_text())


def useful_tflop(cfg: dict, frames: int, height: int, width: int) -> float:
    """Forward + input-gradient backward, no recompute: the useful work of a step (sizes in latents).

    Per layer: linear layers 2 x 24 N d^2 (QKV, out, 4x MLP; forward and input gradient), attention
    3.5 x 4 N^2 d (QK^T and PV forward; five products in the flash backward).
    """
    t = cfg["transformer"]
    d = t["num_attention_heads"] * t["attention_head_dim"]
    p, p_t = t["patch_size"], t.get("patch_size_t") or 1
    n = (frames + p_t - 1) // p_t * (height // p) * (width // p) + t["max_text_seq_length"]
    return t["num_layers"] * (48 * n * d * d + 14 * n * n * d) / 1e12


def build_transformer(cfg: dict, device: torch.device, seed: int = 0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            transformer = CogVideoXTransformer3DModel(**cfg["transformer"])
    finally:
        torch.set_default_dtype(previous)
    return transformer.to(device=device, dtype=torch.bfloat16)


def image_to_video(cfg: dict) -> bool:
    return cfg["transformer"]["in_channels"] == 2 * cfg["vae"]["latent_channels"]


def image_scale(cfg: dict) -> float:
    scale = cfg["vae"]["scaling_factor"]
    return 1 / scale if cfg["vae"].get("invert_scale_latents") else scale


def make_cache(
    folder: Path, cfg: dict, shape: tuple[int, int, int], samples: int = 8, log_variance: float | None = None
) -> list[ShardRecord]:
    """A small cache of real-size random samples, so cogvx's step reads through its real loader.

    ``log_variance``: every sample's latent log-variance set to this (a sharp posterior, as real clips give),
    instead of random like the mean."""
    channels = cfg["vae"]["latent_channels"] * 2
    text_dim = cfg["text_encoder"]["d_model"]
    records: list[ShardRecord] = []
    writer = ShardWriter(folder, "shard-r00", records.append, max_samples=4)
    g = torch.Generator().manual_seed(0)
    for i in range(samples):
        tensors = {
            "moments": torch.randn(channels, *shape, generator=g).to(torch.bfloat16),
            "prompt_embeds": torch.randn(226, text_dim, generator=g).to(torch.bfloat16),
        }
        if log_variance is not None:
            tensors["moments"][channels // 2 :] = log_variance
        carries: tuple[str, ...] = ()
        if image_to_video(cfg):
            tensors["image_moments"] = torch.randn(channels, 1, *shape[1:], generator=g).to(torch.bfloat16)
            carries = ("image_moments",)
        entry = SampleEntry(f"s{i}", "bench", "h", "b", carries=carries)
        writer.write(Sample(f"s{i}", tensors, {"bucket": "b"}), entry)
    writer.flush()
    return records


class SeedStep:
    """The seed's recipe, written out: what diffusers' train_cogvideox_lora.py does per step."""

    def __init__(self, transformer, cfg, device, checkpointing: bool, batches):
        from diffusers import CogVideoXDPMScheduler
        from peft import LoraConfig

        transformer.requires_grad_(False)
        transformer.add_adapter(
            LoraConfig(r=128, lora_alpha=128, init_lora_weights=True, target_modules=list(lora.DEFAULT_TARGETS))
        )
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        self.transformer, self.device, self.batches = transformer, device, batches
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4, eps=1e-8)
        self.scheduler = CogVideoXDPMScheduler(**cfg["scheduler"])
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.scaling, self.image_scale = cfg["vae"]["scaling_factor"], image_scale(cfg)
        self.tcfg = cfg["transformer"]

    def lora_dtype(self) -> str:
        return str(self.params[0].dtype)

    def __call__(self) -> float:
        moments, embeds, image_moments = self.batches  # the seed keeps posteriors and embeddings on the GPU

        def sample(posterior, scale):
            mean, logvar = posterior.chunk(2, dim=1)
            latents = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * scale
            return latents.permute(0, 2, 1, 3, 4).to(torch.bfloat16)

        model_input = sample(moments, self.scaling)
        # The seed has no patch_size_t and cannot train 1.5 at all; its step with 1.5's padding added.
        model_input = pad_for_temporal_patch(model_input, self.tcfg.get("patch_size_t"))
        b, f, _, h, w = model_input.shape
        noise = torch.randn_like(model_input)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), device=self.device)
        rotary = rotary_embedding(self.tcfg, f, h, w, self.device)
        noisy = self.scheduler.add_noise(model_input, noise, t)
        inputs, extra = noisy, {}
        if image_moments is not None:  # the I2V script: first-frame latents, zero-padded in time, on channels
            image = sample(image_moments, self.image_scale)
            image = torch.cat([image, image.new_zeros((b, f - 1, *image.shape[2:]))], dim=1)
            if torch.rand(()).item() < 0.05:  # noised_image_dropout
                image = torch.zeros_like(image)
            inputs = torch.cat([noisy, image], dim=2)
            if self.tcfg.get("ofs_embed_dim"):
                extra["ofs"] = inputs.new_full((1,), 2.0)
        with torch.autocast(self.device.type, torch.bfloat16):
            out = self.transformer(
                hidden_states=inputs,
                encoder_hidden_states=embeds,
                timestep=t,
                image_rotary_emb=rotary,
                return_dict=False,
                **extra,
            )[0]
            pred = self.scheduler.get_velocity(out, noisy, t)
            weights = (1 / (1 - self.scheduler.alphas_cumprod[t])).reshape(-1, 1, 1, 1, 1)
            loss = torch.mean((weights * (pred - model_input) ** 2).reshape(b, -1), dim=1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach().float().item()


def auto_mode(transformer, cfg, shape, compiled: bool, fp8: bool, device) -> str:
    size = memory.StepSize.of(cfg["transformer"], *shape, batch=1)
    static = memory.static_bytes(transformer) - (fp8_saving(transformer) if fp8 else 0)
    peaks = memory.predict(static, size, compiled, swap_saving(transformer, fp8))
    return memory.plan(peaks, memory.device_budget(device)).mode.name


def attention_of(options: set[str]) -> str:
    """``--attention`` of a variant: ``sdpa`` or ``fa3`` where it names one, else cogvx's default (auto)."""
    return "fa3" if "fa3" in options else "sdpa" if "sdpa" in options else "auto"


class CogvxStep:
    """cogvx's step: its loader, objective, optimizer and precision, with the chosen levers."""

    def __init__(self, transformer, cfg, device, options: set[str], records, folder, shape, seed: int = 0):
        checkpointing = next((o for o in options if o in modes.MODES), "full")
        torch.manual_seed(seed)  # the LoRA's initial A matrices
        self.params = lora.add_lora(transformer, 128, 128, lora.DEFAULT_TARGETS, 0.0)
        if "auto" in options:  # what `cogvx train`'s default picks on this card, the same way
            fp8 = bool(options & {"fp8", "fp8mm"})
            checkpointing = auto_mode(transformer, cfg, shape, "compile" in options, fp8, device)
        self.checkpointing = checkpointing
        chosen = levers.Levers(
            checkpointing, "compile" in options, "fp8" in options, "fp8mm" in options, attention=attention_of(options)
        )
        levers.prepare(transformer, chosen)
        train_cfg = TrainConfig(shards=folder, optimizer="adamw8bit" if "adam8" in options else "adamw")
        self.optimizer = build_optimizer(train_cfg, self.params, 1e-4)
        from diffusers import CogVideoXDPMScheduler

        alphas = CogVideoXDPMScheduler(**cfg["scheduler"]).alphas_cumprod
        i2v = {"image_latent_scale": image_scale(cfg), "noised_image_dropout": 0.05} if image_to_video(cfg) else {}
        self.objective = Objective(cfg["transformer"], alphas, cfg["vae"]["scaling_factor"], **i2v)
        self.transformer, self.device, self.step, self.seed = transformer, device, 0, seed
        stream = ShardStream(folder, records, batch_size=1, seed=seed, random_flip=0.0, shuffle_buffer=4)
        self.batches = iter(make_loader(stream, workers=2, pin_memory=device.type == "cuda"))

    def lora_dtype(self) -> str:
        return str(self.params[0].dtype)

    def loss(self, moments, embeds, seed: int, image_moments=None) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(seed)
        image = {} if image_moments is None else {"image_moments": image_moments}
        with torch.autocast(self.device.type, torch.bfloat16):
            return self.objective(self.transformer, moments, embeds, generator, torch.bfloat16, **image)

    def __call__(self) -> float:
        self.step += 1
        batch = next(self.batches)
        moments = batch["moments"].to(self.device, non_blocking=True)
        embeds = batch["prompt_embeds"].to(self.device, non_blocking=True)
        image = batch.get("image_moments")
        image = None if image is None else image.to(self.device, non_blocking=True)
        loss = self.loss(moments, embeds, step_seed(self.seed, self.step, 0, 0), image)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def probe(self, moments, embeds, image_moments=None) -> tuple[float, float]:
        """Loss and gradient norm on fixed inputs before any update: fast paths must match the plain one."""
        loss = self.loss(moments, embeds, 1234, image_moments)
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in self.params])).item()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), norm


def timed(step, device, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    losses, times = [], []
    for _ in range(warmup):
        losses.append(step())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step())
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - began)
    return times, losses


ATTENTION_KERNELS = ("sdpa", "fmha", "flash", "attention", "attn", "cudnn::fusion")  # the last: cuDNN's backward
MATMUL_KERNELS = ("gemm", "xmma", "cutlass", "nvjet", "matmul", "_mm_")


def profile_step(step) -> dict:
    """One step under the profiler: seconds of GPU kernels by kind, and the step's own wall time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - began
    split = {"attention_s": 0.0, "matmul_s": 0.0, "other_s": 0.0}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA or event.name.startswith(("Memcpy", "Memset")):
            continue
        name = event.name.lower()
        kind = "attention" if any(k in name for k in ATTENTION_KERNELS) else None
        kind = kind or ("matmul" if any(k in name for k in MATMUL_KERNELS) else "other")
        split[f"{kind}_s"] += event.device_time / 1e6
    split["kernels_s"] = sum(split.values())
    split["step_wall_s"] = wall
    return split


def run_one(spec: str, device: torch.device, warmup: int, steps: int, workdir: Path, profiled: bool = False) -> dict:
    # noreplay holds for the whole run: probe, timed steps and profiled step alike.
    with _replay_off() if "noreplay" in spec.split(":")[-1].split("+") else contextlib.nullcontext():
        return _run_one(spec, device, warmup, steps, workdir, profiled)


def _run_one(spec: str, device: torch.device, warmup: int, steps: int, workdir: Path, profiled: bool) -> dict:
    model, variant = spec.split(":")
    model, _, size = model.partition("@")
    cfg = load_config(model)
    frames, height, width = (int(n) for n in size.split("x")) if size else SHAPES[model.removesuffix("-i2v")]
    began = time.perf_counter()
    transformer = build_transformer(cfg, device)
    base_params = sum(p.numel() for p in transformer.parameters())
    result = {"run": spec, "model": model + (f"@{size}" if size else ""), "variant": variant}
    result["latent"] = [frames, height, width]
    g = torch.Generator().manual_seed(7)
    channels, text_dim = cfg["vae"]["latent_channels"] * 2, cfg["text_encoder"]["d_model"]
    moments = torch.randn(1, channels, frames, height, width, generator=g).to(device, torch.bfloat16)
    embeds = torch.randn(1, 226, text_dim, generator=g).to(device, torch.bfloat16)
    image = None
    if image_to_video(cfg):
        image = torch.randn(1, channels, 1, height, width, generator=g).to(device, torch.bfloat16)
    if variant.startswith("seed"):
        batches = (moments, embeds, image)
        step = SeedStep(transformer, cfg, device, checkpointing=variant == "seed", batches=batches)
    else:
        options = set(variant.split("+"))
        folder = Path(tempfile.mkdtemp(dir=workdir))
        shape = (frames, height, width)
        step = CogvxStep(transformer, cfg, device, options, make_cache(folder, cfg, shape), folder, shape)
        result["checkpointing"] = step.checkpointing
        result["probe_loss"], result["probe_grad_norm"] = step.probe(moments, embeds, image)
    if device.type == "cuda":  # what building on the device cached (swap moved most of it out) is not the step's
        torch.cuda.empty_cache()
    result["lora_params"] = sum(p.numel() for p in step.params)
    result["base_params"] = base_params - result["lora_params"]
    result["lora_dtype"] = step.lora_dtype()
    times, losses = timed(step, device, warmup, steps)
    if not variant.startswith("seed"):  # which kernel ran, and whether offload/swap replayed FA3's outputs
        result["attention"] = attention.installed(transformer).recorded()
    result["s_per_step"] = statistics.median(times)
    result["step_times"] = times
    result["losses"] = losses
    result["useful_tflop_per_step"] = useful_tflop(cfg, frames, height, width)
    result["tflops"] = result["useful_tflop_per_step"] / result["s_per_step"]
    if device.type == "cuda":
        result["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        if profiled:
            result["profile"] = profile_step(step)
    result["wall_s"] = time.perf_counter() - began
    del step, transformer
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


@contextlib.contextmanager
def _replay_off():
    """The ``noreplay`` option: FA3's op computes in every recompute, as before replay (for its own row)."""
    original = replay.product
    replay.product = lambda q, k, v, compute: compute(q, k, v)
    try:
        yield
    finally:
        replay.product = original


def environment(device: torch.device) -> dict:
    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()}
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    env["date"] = time.strftime("%Y-%m-%d")
    env["cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default")
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="space-separated MODEL:VARIANT list")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", action="store_true", help="add one profiled step per run")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    report = {"environment": environment(device), "command": " ".join(sys.argv), "results": []}
    with tempfile.TemporaryDirectory() as workdir:
        for spec in args.runs.split():
            try:
                report["results"].append(run_one(spec, device, args.warmup, args.steps, Path(workdir), args.profile))
            except Exception as err:  # one failed variant (e.g. out of memory) must not lose the others
                report["results"].append({"run": spec, "error": f"{type(err).__name__}: {err}"[:500]})
                gc.collect()
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(json.dumps(report["results"][-1], default=str)[:400], flush=True)
            args.out.write_text(json.dumps(report, indent=1, default=str))
    print_table(report)


def print_table(report: dict) -> None:
    seeds = {}
    for r in report["results"]:
        if r.get("variant", "").startswith("seed"):
            seeds[(r["model"], r["variant"])] = r["s_per_step"]
    print(f"\n{report['environment']}")
    print(
        f"{'run':34s} {'s/step':>7s} {'xseed':>6s} {'TFLOP/s':>8s} {'alloc GB':>9s} {'resv GB':>8s} {'probe loss':>11s}"
    )
    for r in report["results"]:
        if "error" in r:
            print(f"{r['run']:34s} ERROR {r['error'][:80]}")
            continue
        ckpt = "seed-nockpt" if r.get("checkpointing") == "none" else "seed"
        ref = seeds.get((r["model"], ckpt)) or seeds.get((r["model"], "seed"))
        ratio = f"{ref / r['s_per_step']:.2f}" if ref else "-"
        run = r["run"] + (f" ({r['checkpointing']})" if "auto" in r["variant"] else "")
        print(
            f"{run:34s} {r['s_per_step']:7.3f} {ratio:>6s} {r['tflops']:8.1f} "
            f"{r.get('peak_allocated_gb', 0):9.2f} {r.get('peak_reserved_gb', 0):8.2f} "
            f"{r.get('probe_loss', float('nan')):11.5f}"
        )
        if "profile" in r:
            f = r["profile"]
            busy = f["kernels_s"] / f["step_wall_s"]
            split = f"attention {f['attention_s']:.3f} s, matmul {f['matmul_s']:.3f} s, other {f['other_s']:.3f} s"
            print(f"{'':34s} {split}, GPU busy {busy:.0%}")


if __name__ == "__main__":
    main()
