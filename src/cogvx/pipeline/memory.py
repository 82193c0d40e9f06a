"""How much memory one training step of a CogVideoX transformer needs, per checkpointing mode.

``--checkpointing auto`` predicts the peak allocated memory of each mode and takes the fastest that fits.

A step's peak is the static part, known exactly once the transformer and its LoRA are built (base
weights as stored, LoRA masters in fp32 with their gradients and two Adam moments), plus activations.
Activations scale with one *unit*: the bytes of one block's hidden states, batch x (video + text tokens)
x hidden width x 2 (bf16). With ``L`` blocks, a mode keeps ``per_block`` units for every block until its
backward pass, plus ``transient`` units that exist while one block runs its backward. Each mode carries
its own terms (``speed/checkpointing.py``), and says what of the static part stays on the device
(``swap`` keeps the blocks' frozen weights off it, less two blocks' worth of slots: ``swap.swap_saving``).

The modes' terms are fitted (least squares, ``bench/memory.py --fit``) to measured peaks of CogVideoX-2b
and -5b at one latent size, each mode with and without ``torch.compile``, and checked at a size the fit
never saw: a model of the activations, not a guess per model (BENCHMARKS.md section 6 has the table and
the errors; bench/results/memory_*.json the data).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from cogvx.names import ALLOC_CONF
from cogvx.pipeline.speed.checkpointing import MODES, Mode, faster_than, leanest

# Head room for what the model does not count: allocator rounding, cuDNN/cuBLAS workspaces, the loader's
# pinned batches in flight. Used when picking a mode, not in the prediction itself.
SAFETY = 0.08


@dataclass(frozen=True)
class StepSize:
    """What one step's activations scale with."""

    layers: int
    hidden: int  # num_attention_heads x attention_head_dim
    tokens: int  # per sample: video tokens (after patching) + text tokens
    batch: int

    @property
    def unit(self) -> int:
        """Bytes of one block's bf16 hidden states for the whole batch."""
        return self.batch * self.tokens * self.hidden * 2

    @classmethod
    def of(cls, transformer_config: dict, latent_frames: int, latent_height: int, latent_width: int, batch: int):
        c = transformer_config
        patch, patch_t = c["patch_size"], c.get("patch_size_t") or 1
        video = -(-latent_frames // patch_t) * (latent_height // patch) * (latent_width // patch)
        text = c.get("max_text_seq_length") or 226
        return cls(c["num_layers"], c["num_attention_heads"] * c["attention_head_dim"], video + text, batch)


def static_bytes(transformer: torch.nn.Module, optimizer_states: int = 2) -> int:
    """Weights as stored (buffers included), plus gradients and optimizer moments of the trainable ones."""
    stored = sum(t.numel() * t.element_size() for t in [*transformer.parameters(), *transformer.buffers()])
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    extra = sum(p.numel() * p.element_size() * (1 + optimizer_states) for p in trainable)
    return stored + extra


def predict(static: int, size: StepSize, compiled: bool, swapped: int = 0) -> dict[str, int]:
    """Predicted peak allocated bytes of one training step, per checkpointing mode (fastest first).

    ``swapped``: the device bytes ``swap`` keeps off the GPU (``swap.swap_saving``).
    """
    peaks = {}
    for mode in MODES.values():
        per_block, transient = mode.terms[compiled]
        peaks[mode.name] = int(mode.resident_bytes(static, swapped) + (per_block * size.layers + transient) * size.unit)
    return peaks


def choose(predicted: dict[str, int], budget: int) -> str | None:
    """The fastest mode whose predicted peak, with head room, fits ``budget`` bytes; None if none does."""
    for mode in MODES:
        if predicted[mode] * (1 + SAFETY) <= budget:
            return mode
    return None


@dataclass(frozen=True)
class Plan:
    """What ``--checkpointing auto`` decided, and on what: a run records it beside its settings."""

    mode: Mode
    peaks: dict[str, int]  # predicted peak allocated bytes of every mode, fastest first
    budget: int  # bytes the step may use
    fits: bool  # False: no mode fitted, and ``mode`` is the leanest, tried anyway

    @property
    def peak(self) -> int:
        """The chosen mode's predicted peak, in bytes."""
        return self.peaks[self.mode.name]

    def faster(self) -> dict[str, int]:
        """The predicted peaks of the modes that would have been faster than the chosen one."""
        return {mode.name: self.peaks[mode.name] for mode in faster_than(self.mode)}

    def recorded(self) -> dict[str, object]:
        """JSON-friendly: the chosen mode, its predicted peak, the budget and every mode's prediction."""
        return {
            "mode": self.mode.name,
            "predicted_peak_bytes": self.peak,
            "budget_bytes": self.budget,
            "fits": self.fits,
            "predicted_peaks_bytes": dict(self.peaks),
        }


def plan(predicted: dict[str, int], budget: int) -> Plan:
    """The fastest mode that fits ``budget`` (``choose``), else the leanest, with what led there."""
    name = choose(predicted, budget)
    if name is None:
        return Plan(leanest(), dict(predicted), budget, fits=False)
    return Plan(MODES[name], dict(predicted), budget, fits=True)


def device_budget(device: torch.device, max_memory_gb: float | None = None) -> int:
    """Bytes a step may use on ``device``: ``max_memory_gb`` if given, else what is free plus what we hold."""
    if max_memory_gb is not None:
        return int(max_memory_gb * 1e9)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    import psutil

    return psutil.virtual_memory().available


def use_expandable_segments() -> None:
    """Let PyTorch's CUDA allocator grow segments instead of caching fixed blocks, unless the user chose.

    Reserved memory then stays close to allocated, which is what ``auto`` budgets with (BENCHMARKS.md
    has the reserved against allocated figures). Only effective before CUDA's first allocation.
    """
    os.environ.setdefault(*ALLOC_CONF)
