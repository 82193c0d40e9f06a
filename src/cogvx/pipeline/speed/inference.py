"""Forwards without gradients (validation sampling, the eval score) on the run's fastest path for them.

diffusers' CogVideoX transformer calls its ``gradient_checkpointing_func`` hook, where the training block
runner sits, only while gradients are on; without them it calls each block directly, so a forward under
``torch.no_grad()`` would run the blocks eagerly, past the compiled runner. ``install`` gives such forwards a
runner of their own: the block's forward, compiled if the run compiles, and, for swapped weights, after the
swap slots have brought the block's weights in (``BlockSwap.running``, the first block prefetched while the
last one computes, since sampling runs pass after pass forward). Nothing is kept for a backward pass and
nothing is recomputed, whatever the checkpointing mode. Float8 layers sit inside the blocks, so they serve
both paths.

The transformer's forward pre-hook points each block's ``forward`` at that runner for a forward without
gradients, and its forward hook (called on errors too) takes it away again, so training forwards, and the
graphs compiled for them, never see it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from cogvx.pipeline.speed.attention import primed
from cogvx.pipeline.speed.compiling import compile_runner

if TYPE_CHECKING:
    from cogvx.pipeline.speed.swap import BlockSwap


class InferencePath:
    """The runner of no-grad forwards installed on one transformer, and the hooks that install it per forward."""

    def __init__(self, transformer: torch.nn.Module, runner: Callable[..., Any]):
        self.runner = runner
        self.handles = (
            transformer.register_forward_pre_hook(self._before, with_kwargs=True),
            transformer.register_forward_hook(self._after, with_kwargs=True, always_call=True),
        )

    def _before(self, transformer: torch.nn.Module, args, kwargs) -> None:
        if torch.is_grad_enabled():
            return
        for block in transformer.transformer_blocks:
            block.forward = functools.partial(self.runner, block)

    @staticmethod
    def _after(transformer: torch.nn.Module, args, kwargs, output) -> None:
        for block in transformer.transformer_blocks:
            block.__dict__.pop("forward", None)  # back to the class's forward

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def inference_runner(block_forward: Callable[..., Any], compile: bool, swap: BlockSwap | None = None):
    """``runner(block, *args, **kwargs)`` for forwards without gradients, or None where the transformer's own
    direct block calls are already the fastest (eager, weights on the device)."""
    if not compile and swap is None:
        return None
    # The block class's forward, bound here: inside a compiled region every block is then only an input, so
    # all of them share one graph (``type(block).forward`` there would break the graph).
    run = _forwarding(block_forward)
    run = compile_runner(run) if compile else run
    return primed(swap.running(run, loop=True) if swap is not None else run)


def install(transformer: torch.nn.Module, compile: bool, swap: BlockSwap | None = None) -> InferencePath | None:
    """Make forwards of ``transformer`` without gradients run its blocks on the inference runner (replacing
    one installed earlier); returns the installed path, or None where none is needed."""
    earlier = getattr(transformer, "_cogvx_inference", None)
    if earlier is not None:
        earlier.remove()
    block_forward = type(transformer.transformer_blocks[0]).forward
    runner = inference_runner(block_forward, compile, swap)
    transformer._cogvx_inference = InferencePath(transformer, runner) if runner is not None else None
    return transformer._cogvx_inference


def _forwarding(block_forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(block, *args, **kwargs):
        return block_forward(block, *args, **kwargs)

    return run
