"""``--checkpointing auto``: the fastest checkpointing mode whose predicted peak fits every process's device."""

from __future__ import annotations

from cogvx.pipeline import memory
from cogvx.pipeline.speed import float8, swap
from cogvx.shards import Manifest
from cogvx.train.config import TrainConfig


def choose_checkpointing(accelerator, cfg: TrainConfig, transformer, manifest: Manifest, compiled: bool) -> memory.Plan:
    """``--checkpointing auto``: the fastest mode whose predicted peak fits every process's device, said aloud.

    Planned for the cache's largest bucket, so no batch of the run needs more than the prediction.
    """
    from accelerate.utils import gather_object

    shapes = [layout["moments"]["shape"][1:] for layout in manifest.layouts().values()]
    frames, height, width = max(shapes, key=lambda shape: shape[0] * shape[1] * shape[2])
    size = memory.StepSize.of(dict(transformer.config), frames, height, width, cfg.batch_size)
    fp8 = cfg.fp8_base or cfg.fp8_matmul  # both store the blocks' frozen weights in float8
    static = memory.static_bytes(transformer) - (float8.fp8_saving(transformer) if fp8 else 0)
    peaks = memory.predict(static, size, compiled, swap.swap_saving(transformer, fp8))
    budget = memory.device_budget(accelerator.device, cfg.max_memory)
    if accelerator.num_processes > 1:  # one mode for all: the tightest device decides
        budget = min(gather_object([budget]))
    plan = memory.plan(peaks, budget)
    where = f"{_size(budget)} " + ("allowed by --max-memory" if cfg.max_memory else "available")
    if not plan.fits:
        accelerator.print(
            f"[warning] --checkpointing auto: even {plan.mode.name} is predicted to need {_size(plan.peak)}, more "
            f"than the {where}; trying it anyway. A smaller --batch-size, --fp8-base or smaller buckets need less."
        )
        return plan
    why = "; ".join(f"{name} would need {_size(peak)}" for name, peak in plan.faster().items())
    accelerator.print(
        f"--checkpointing auto: {plan.mode.name} (predicted peak {_size(plan.peak)} of {where}"
        + (f"; {why}" if why else "")
        + ")."
    )
    return plan


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"
