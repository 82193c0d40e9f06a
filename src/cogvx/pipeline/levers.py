"""The one entry point to the speed and memory levers: a CogVideoX transformer prepared for its training step.

Training and the benchmarks ask for them together (``prepare(transformer, Levers(...), device)``); each lever
lives in a module of its own under ``pipeline/speed/``: the attention kernel (``attention``), checkpointing
modes and their block runners (``checkpointing``), block swapping (``swap``), float8 storage and products
(``float8``), ``torch.compile`` and its persistent cache (``compiling``), and the path of forwards without
gradients, validation and the eval score (``inference``). All of them know the CogVideoX block layout
(``transformer.transformer_blocks``) and the block call signature (hidden states, encoder hidden states,
then the rest), so they live with the model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cogvx.names import AUTO
from cogvx.pipeline.speed import attention, inference
from cogvx.pipeline.speed.checkpointing import Mode, install, named
from cogvx.pipeline.speed.float8 import check_fp8_matmul, store_base_weights_in_fp8
from cogvx.pipeline.speed.swap import BlockSwap


@dataclass(frozen=True)
class Levers:
    checkpointing: Mode  # one of checkpointing.MODES, or its name
    compile: bool  # torch.compile of the block runner
    fp8_base: bool  # frozen base weights of the blocks' linear layers in float8
    fp8_matmul: bool = False  # their forward products in float8 too (implies fp8_base)
    attention: str = AUTO  # the attention kernel: one of attention.SETTINGS
    fp8_attention: bool = False  # FlashAttention-3's float8 forward for forwards without gradients

    def __post_init__(self):
        if isinstance(self.checkpointing, str):
            object.__setattr__(self, "checkpointing", named(self.checkpointing))

    @property
    def fp8(self) -> bool:
        return self.fp8_base or self.fp8_matmul


def prepare(transformer: torch.nn.Module, levers: Levers, device: torch.device | str | None = None) -> None:
    """Apply ``levers`` to a CogVideoX transformer, in place; call it after the LoRA adapters are added.

    ``device``: where training runs; the transformer is moved there (all of it, or for ``swap`` all but the
    blocks' frozen weights, which go to pinned CPU memory block by block, so the GPU never holds the
    whole model). fp8 storage comes after ``add_lora``: the adapters wrap the linear layers whose base
    weights shrink; it runs on ``device``, one block at a time for ``swap``. Forwards without gradients get
    the same levers without the checkpointing: the compiled block, the float8 layers, the swapped weights,
    and the attention kernel (``attention.installed(transformer)`` tells what it chose).
    """
    device = torch.device(device) if device is not None else next(transformer.parameters()).device
    if levers.fp8_matmul:
        check_fp8_matmul(device)
    kernels = attention.Attention.for_device(levers.attention, levers.fp8_attention, device)  # refuses first
    swap = None
    if levers.checkpointing.swaps_weights:
        swap = BlockSwap(transformer.transformer_blocks, device, fp8=levers.fp8, fp8_matmul=levers.fp8_matmul)
        transformer.to(device)  # the rest: embeddings, final norm and projection, LoRA weights
    else:
        transformer.to(device)
        if levers.fp8:
            store_base_weights_in_fp8(transformer, matmul=levers.fp8_matmul)
    attention.install(transformer, kernels)
    install(transformer, levers.checkpointing, levers.compile, swap)
    inference.install(transformer, levers.compile, swap)
