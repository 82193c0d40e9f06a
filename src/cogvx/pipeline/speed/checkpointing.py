"""Activation checkpointing: one object per ``--checkpointing`` mode (block runner, memory terms), in one registry.

Every mode goes through diffusers' ``gradient_checkpointing_func`` hook: the transformer then calls one
*block runner* per block, and that runner decides what the block keeps for the backward pass. Each mode
also carries its activation terms in the memory model (``pipeline/memory.py``): ``(per_block, transient)``
units, with and without ``torch.compile``, fitted (least squares, ``bench/memory.py --fit``) to measured
peaks (BENCHMARKS.md section 6).

This module is the only place that spells the modes' names: everything else looks a mode up in ``MODES``
(``named``) and asks the object.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cogvx.errors import ConfigError
from cogvx.names import AUTO  # noqa: F401 (re-exported)
from cogvx.pipeline.speed.attention import is_attention_kernel, primed, replay_of
from cogvx.pipeline.speed.compiling import compile_runner

if TYPE_CHECKING:
    from cogvx.pipeline.speed.swap import BlockSwap


Runner = Callable[..., Any]  # runner(block, hidden_states, encoder_hidden_states, *rest)


class Mode:
    """A checkpointing mode: what each transformer block keeps between its forward and its backward pass."""

    name: ClassVar[str]
    # (per_block, transient) activation units, keyed by whether the block runner is compiled.
    terms: ClassVar[dict[bool, tuple[float, float]]]
    swaps_weights: ClassVar[bool] = False  # the blocks' frozen weights live in CPU memory (speed/swap.py)

    def runner(self, compile: bool, swap: BlockSwap | None = None) -> Runner | None:
        """The block runner to install; None: no hook, the transformer's own forward."""
        raise NotImplementedError

    def resident_bytes(self, static: int, swapped: int) -> int:
        """The static part of a step's peak on the device: all of it, unless the mode keeps ``swapped`` off it."""
        return static - swapped if self.swaps_weights else static

    def __repr__(self) -> str:
        return f"<checkpointing {self.name}>"


class NoCheckpointing(Mode):
    """Keep everything each block computed (fastest, most memory)."""

    name = "none"
    terms = {True: (13.84, 30.2), False: (19.81, 31.57)}

    def runner(self, compile: bool, swap: BlockSwap | None = None) -> Runner | None:
        return compile_runner(_run_plain) if compile else None


class Selective(Mode):
    """Keep each block's input and its attention kernel's outputs (SDPA's or FlashAttention-3's): the recompute
    skips the most expensive op (a second attention forward) and redoes only the cheap projections, norms and MLP."""

    name = "selective"
    terms = {True: (1.97, 19.11), False: (1.64, 42.21)}

    def runner(self, compile: bool, swap: BlockSwap | None = None) -> Runner | None:
        return compile_runner(_run_selective) if compile else _run_selective


class Full(Mode):
    """Keep only each block's input, recompute the whole block in the backward pass (diffusers' own)."""

    name = "full"
    terms = {True: (0.61, 35.21), False: (0.61, 43.24)}

    def runner(self, compile: bool, swap: BlockSwap | None = None) -> Runner | None:
        return compile_runner(_run_full) if compile else _run_full


class Offload(Mode):
    """Like ``full``, but the block inputs wait in pinned CPU memory instead of on the GPU.

    Where the attention kernel is FlashAttention-3, its output and log-sum-exp wait in pinned CPU memory too
    (``replay``: about 110 MB per block for 5b at 49x480x720, 4.7 GB in all) and the recompute replays them
    instead of running attention's forward a second time; where SDPA runs, the whole block is recomputed.
    """

    name = "offload"
    terms = {True: (-0.09, 39.26), False: (-0.09, 44.23)}  # as fitted: no block input stays on the GPU

    def runner(self, compile: bool, swap: BlockSwap | None = None) -> Runner | None:
        return _offloaded_runner(compile_runner(_run_plain) if compile else _run_plain)


class Swap(Mode):
    """Like ``offload`` (FlashAttention-3's outputs replayed in the recompute, from pinned CPU memory, as there),
    and the frozen base weights of the blocks live in pinned CPU memory too (speed/swap.py): the static part
    lacks them, less two blocks' worth of slots (``swap.swap_saving``)."""

    name = "swap"
    # Compiled: fitted apart (bench/memory.py --fit-swap) to the compiled swap peaks of 2b, 5b, 5b-I2V, 1.5,
    # 1.5-I2V at 13x60x90 and 1.5 at 21x96x170: the weights are in the static part, and its compiled block
    # keeps less. Eager: offload's, not measured apart.
    terms = {True: (-0.08, 32.47), False: (-0.09, 44.23)}
    swaps_weights = True

    def runner(self, compile: bool, swap: BlockSwap | None = None) -> Runner | None:
        if swap is None:
            raise ValueError("checkpointing mode swap needs the transformer prepared by levers.prepare")
        return _offloaded_runner(compile_runner(_run_unhooked) if compile else _run_unhooked, swap)


# The modes by name, fastest first (--checkpointing auto tries them in this order).
MODES: MappingProxyType[str, Mode] = MappingProxyType(
    {mode.name: mode for mode in (NoCheckpointing(), Selective(), Full(), Offload(), Swap())}
)


def named(name: str) -> Mode:
    """The mode called ``name`` (as ``--checkpointing`` spells it)."""
    if name not in MODES:
        raise ConfigError(f"--checkpointing must be one of {', '.join(MODES)} (got {name!r}).")
    return MODES[name]


def leanest() -> Mode:
    """The mode that needs the least memory (the last of ``MODES``)."""
    return list(MODES.values())[-1]


def faster_than(mode: Mode) -> list[Mode]:
    """The modes ``auto`` would have preferred to ``mode``."""
    order = list(MODES.values())
    return order[: order.index(mode)]


def install(transformer: torch.nn.Module, mode: Mode, compile: bool, swap: BlockSwap | None = None) -> None:
    """Install ``mode``'s block runner on a diffusers CogVideoX transformer."""
    runner = mode.runner(compile, swap)
    if runner is None:
        transformer.disable_gradient_checkpointing()
        return
    # The attention kernel is chosen before the block runs: a compiled block cannot time kernels inside.
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=primed(runner))


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if is_attention_kernel(op) else CheckpointPolicy.PREFER_RECOMPUTE


def _run_full(block, *args):
    return checkpoint(block, *args, use_reentrant=False)


def _run_selective(block, *args):
    context = functools.partial(create_selective_checkpoint_contexts, _keep_attention)
    return checkpoint(block, *args, use_reentrant=False, context_fn=context)


def _run_plain(block, *args):
    return block(*args)


def _run_unhooked(block, *args):
    # For ``swap``, whose runner has brought the weights in already: each block's pre-forward hook carries
    # its own index, and a compiled region that traced it would be recompiled for every block.
    return block.forward(*args)


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
    """Full recompute whose saved block input waits in pinned CPU memory between forward and backward; the
    recompute replays the forward pass's FlashAttention-3 outputs instead of running its forward again (``replay``)."""

    @staticmethod
    def forward(ctx, run, block, pool, _force_grad, hidden, encoder, *rest):
        ctx.run, ctx.block, ctx.rest, ctx.device = run, block, rest, hidden.device
        ctx.hidden, ctx.copied = pool.stash(id(block), hidden)
        ctx.encoder = encoder.detach()
        ctx.replay = replay_of(block)
        keeping = ctx.replay.forward_pass(id(block)) if ctx.replay else contextlib.nullcontext()
        with torch.no_grad(), keeping as ctx.ticket:
            out_hidden, out_encoder = run(block, hidden, encoder, *rest)
        return out_hidden, out_encoder

    @staticmethod
    def backward(ctx, grad_hidden, grad_encoder):
        if ctx.copied is not None:
            torch.cuda.current_stream().wait_event(ctx.copied)
        hidden = ctx.hidden.to(ctx.device, non_blocking=True).requires_grad_(True)
        encoder = ctx.encoder.requires_grad_(True)
        # Set here, on the autograd engine's thread, where the recompute runs.
        replaying = ctx.replay.recompute(id(ctx.block), ctx.ticket) if ctx.replay else contextlib.nullcontext()
        with torch.enable_grad(), replaying:
            out_hidden, out_encoder = ctx.run(ctx.block, hidden, encoder, *ctx.rest)
        torch.autograd.backward((out_hidden, out_encoder), (grad_hidden, grad_encoder))
        return None, None, None, None, hidden.grad, encoder.grad, *([None] * len(ctx.rest))


def _offloaded_runner(inner: Runner, swap: BlockSwap | None = None) -> Runner:
    force_grad = torch.empty(0, requires_grad=True)  # makes autograd call backward even for block 0
    pool = _PinnedPool()
    if swap is not None:
        inner = swap.running(inner)

    def run(block, hidden, encoder, *rest):
        return _OffloadedCheckpoint.apply(inner, block, pool, force_grad, hidden, encoder, *rest)

    return run
