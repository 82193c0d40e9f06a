"""Speed and memory levers for the CogVideoX transformer's training step: a transformer prepared with them.

Training asks for them by name (``prepare(transformer, Levers(...))``); everything here knows the
CogVideoX block layout (``transformer.transformer_blocks``) and the block call signature
(hidden states, encoder hidden states, then the rest), so it lives with the model code.

All of them go through diffusers' ``gradient_checkpointing_func`` hook: the transformer then calls
one *block runner* per block, and that runner decides what the block keeps for the backward pass:

- ``full``: keep only the block inputs, recompute the whole block in the backward pass (diffusers' own).
- ``selective``: also keep the attention kernel's outputs, so the recompute skips the most expensive
  op (a second attention forward) and redoes only the cheap projections, norms and MLP.
- ``none``: keep everything (fastest, most memory).
- ``offload``: like ``full``, but the block inputs wait in pinned CPU memory instead of on the GPU.

``compile`` compiles the runner once with ``torch.compile``; every block reuses that one graph.
``fp8_base`` stores the frozen base weights of the blocks' linear layers in float8 (e4m3, one scale
per output channel) and widens them to the compute dtype just before each matmul: half the bytes of
bf16 weights; the LoRA weights and all the arithmetic stay in their usual precision.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cogvx.errors import ConfigError

# The checkpointing modes, fastest first (--checkpointing auto tries them in this order); declared here only.
CHECKPOINTING = ("none", "selective", "full", "offload")
AUTO = "auto"  # predict each mode's peak memory and take the fastest that fits (pipeline/memory.py)


@dataclass(frozen=True)
class Levers:
    checkpointing: str  # one of CHECKPOINTING
    compile: bool  # torch.compile of the block runner
    fp8_base: bool  # frozen base weights of the blocks' linear layers in float8


def prepare(transformer: torch.nn.Module, levers: Levers) -> None:
    """Apply ``levers`` to a CogVideoX transformer, in place; call it after the LoRA adapters are added.

    fp8 storage comes after ``add_lora``: the adapters wrap the linear layers whose base weights shrink.
    """
    if levers.fp8_base:
        store_base_weights_in_fp8(transformer)
    configure(transformer, levers.checkpointing, levers.compile)


_ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
)


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _run_full(block, *args):
    return checkpoint(block, *args, use_reentrant=False)


def _run_selective(block, *args):
    context = functools.partial(create_selective_checkpoint_contexts, _keep_attention)
    return checkpoint(block, *args, use_reentrant=False, context_fn=context)


def _run_plain(block, *args):
    return block(*args)


class _PinnedPool:
    """One pinned CPU buffer per block, reused every step, and a side stream for the copies.

    Allocating pinned memory is slow and synchronous, so it happens once; copies to the host run
    on their own stream and overlap the next block's compute.
    """

    def __init__(self):
        self.buffers: dict[tuple[int, tuple[int, ...], torch.dtype], torch.Tensor] = {}
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None

    def stash(self, key: int, tensor: torch.Tensor):
        """Start copying ``tensor`` to the host; returns (buffer, event that marks the copy done)."""
        if not tensor.is_cuda:
            return tensor.detach().clone(), None
        slot = (key, tuple(tensor.shape), tensor.dtype)
        if slot not in self.buffers:
            self.buffers[slot] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        buffer = self.buffers[slot]
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            buffer.copy_(tensor.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        tensor.record_stream(self.stream)  # keep the GPU memory alive until the copy has read it
        return buffer, done


class _OffloadedCheckpoint(torch.autograd.Function):
    """Full recompute whose saved block input waits in pinned CPU memory between forward and backward."""

    @staticmethod
    def forward(ctx, run, block, pool, _force_grad, hidden, encoder, *rest):
        ctx.run, ctx.block, ctx.rest, ctx.device = run, block, rest, hidden.device
        ctx.hidden, ctx.copied = pool.stash(id(block), hidden)
        ctx.encoder = encoder.detach()
        with torch.no_grad():
            out_hidden, out_encoder = run(block, hidden, encoder, *rest)
        return out_hidden, out_encoder

    @staticmethod
    def backward(ctx, grad_hidden, grad_encoder):
        if ctx.copied is not None:
            torch.cuda.current_stream().wait_event(ctx.copied)
        hidden = ctx.hidden.to(ctx.device, non_blocking=True).requires_grad_(True)
        encoder = ctx.encoder.requires_grad_(True)
        with torch.enable_grad():
            out_hidden, out_encoder = ctx.run(ctx.block, hidden, encoder, *ctx.rest)
        torch.autograd.backward((out_hidden, out_encoder), (grad_hidden, grad_encoder))
        return None, None, None, None, hidden.grad, encoder.grad, *([None] * len(ctx.rest))


def _offloaded_runner(inner):
    force_grad = torch.empty(0, requires_grad=True)  # makes autograd call backward even for block 0
    pool = _PinnedPool()

    def run(block, hidden, encoder, *rest):
        return _OffloadedCheckpoint.apply(inner, block, pool, force_grad, hidden, encoder, *rest)

    return run


def configure(transformer: torch.nn.Module, checkpointing: str, compile: bool) -> None:
    """Install the block runner for ``checkpointing`` on a diffusers CogVideoX transformer."""
    if checkpointing not in CHECKPOINTING:
        raise ConfigError(f"--checkpointing must be one of {', '.join(CHECKPOINTING)} (got {checkpointing!r}).")
    if checkpointing == "offload":
        inner = torch.compile(_run_plain) if compile else _run_plain
        runner = _offloaded_runner(inner)
    else:
        runner = {"full": _run_full, "selective": _run_selective, "none": _run_plain}[checkpointing]
        if compile:
            runner = torch.compile(runner)
    if checkpointing == "none" and not compile:
        transformer.disable_gradient_checkpointing()
        return
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=runner)


class Float8Linear(torch.nn.Module):
    """A frozen linear layer whose weight is stored in float8 e4m3 with one scale per output channel."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
        self.register_buffer("weight_fp8", (weight.float() / scale).to(torch.float8_e4m3fn))
        self.register_buffer("scale", scale.to(weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_fp8.to(self.scale.dtype) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _frozen_block_linears(transformer: torch.nn.Module):
    for block in transformer.transformer_blocks:
        for module in list(block.modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear and not child.weight.requires_grad:
                    yield module, child_name, child


def fp8_saving(transformer: torch.nn.Module) -> int:
    """Bytes ``store_base_weights_in_fp8`` would free, without changing anything."""
    linears = [child for _, _, child in _frozen_block_linears(transformer)]
    return sum(child.weight.numel() * (child.weight.element_size() - 1) for child in linears)


def store_base_weights_in_fp8(transformer: torch.nn.Module) -> int:
    """Swap every frozen ``nn.Linear`` inside the transformer blocks for a ``Float8Linear``; returns bytes saved.

    LoRA-wrapped layers keep their adapter and lose only the base weight's precision, as in QLoRA.
    """
    saved = 0
    for module, child_name, child in list(_frozen_block_linears(transformer)):
        saved += child.weight.numel() * (child.weight.element_size() - 1)
        setattr(module, child_name, Float8Linear(child))
    return saved
