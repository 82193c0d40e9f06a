"""Block swapping: the frozen weights of every transformer block in pinned CPU memory, two device slots taking turns.

The ``swap`` checkpointing mode runs on top of it: two GPU slots take turns holding one block's weights, the
next block's copied in on a side stream while the current one computes (forward, then again for the
recompute in the backward pass). The GPU holds the LoRA weights, the embeddings, two blocks' weights and
one block's activations.
"""

from __future__ import annotations

import functools

import torch

from cogvx.pipeline.speed.float8 import frozen_linears_of, store_base_weights_in_fp8


class BlockSwap:
    """The frozen weights of every block in pinned CPU memory, and two device slots that take turns.

    Before a block runs (a pre-forward hook, or the ``swap`` runner around a compiled block), its weights
    are in a slot: copied there on a side stream while the previous block computed, then the block's
    parameters and buffers are pointed at views of that slot. The next block in the direction of travel
    (up the stack in the forward pass, down it in the backward pass's recompute) is prefetched into the
    other slot as soon as the work queued before it, which may still read that slot, has finished.
    Between uses a block's frozen tensors are empty placeholders of the right dtype.
    """

    SLOTS = 2
    ALIGN = 64  # bytes: every tensor's view starts aligned for any dtype and vectorised kernels

    def __init__(self, blocks: torch.nn.ModuleList, device: torch.device, fp8: bool = False, fp8_matmul: bool = False):
        self.device, self.count = torch.device(device), len(blocks)
        self.cuda = self.device.type == "cuda"
        self.tensors: list[list[tuple[torch.nn.Module, str, bool, torch.dtype, torch.Size, int]]] = []
        self.host: list[torch.Tensor] = []
        for index, block in enumerate(blocks):
            block.to(self.device)  # one block at a time on the device: its fp8 scales are computed there
            if fp8:
                store_base_weights_in_fp8(block, matmul=fp8_matmul)
            self._stash(block)
            block.register_forward_pre_hook(functools.partial(self._before_block, index))
        largest = max(h.numel() for h in self.host)
        self.slots = [torch.empty(largest, dtype=torch.uint8, device=self.device) for _ in range(self.SLOTS)]
        self.index = {id(block): i for i, block in enumerate(blocks)}
        self.resident: list[int | None] = [None] * self.SLOTS
        self.loaded: list[torch.cuda.Event | None] = [None] * self.SLOTS
        self.free: list[torch.cuda.Event | None] = [None] * self.SLOTS
        self.last: int | None = None
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _stash(self, block: torch.nn.Module) -> None:
        entries, offset = [], 0
        for module in block.modules():
            frozen = [(n, t, True) for n, t in module._parameters.items() if t is not None and not t.requires_grad]
            frozen += [(n, t, False) for n, t in module._buffers.items() if t is not None]
            for name, tensor, is_param in frozen:
                entries.append((module, name, is_param, tensor.dtype, tensor.shape, offset))
                offset += -(-tensor.numel() * tensor.element_size() // self.ALIGN) * self.ALIGN
        host = torch.empty(offset, dtype=torch.uint8, pin_memory=self.cuda)
        for module, name, is_param, dtype, shape, start in entries:
            tensor = module._parameters[name] if is_param else module._buffers[name]
            _view(host, start, dtype, shape).copy_(tensor.detach())
            self._point(module, name, is_param, torch.empty(0, dtype=dtype, device=self.device))
        self.tensors.append(entries)
        self.host.append(host)

    @staticmethod
    def _point(module: torch.nn.Module, name: str, is_param: bool, tensor: torch.Tensor) -> None:
        if is_param:
            module._parameters[name].data = tensor
        else:
            module._buffers[name] = tensor

    def _before_block(self, index: int, _module, _args) -> None:
        self.acquire(index)

    def running(self, inner, loop: bool = False):
        """``inner(block, *args)`` with the block's weights brought in first, outside any compiled region;
        ``inner`` calls the block's ``forward``, past the pre-forward hook. ``loop``: the blocks run forward
        only, pass after pass (sampling), so the first block is prefetched while the last one computes."""

        def run(block, *args, **kwargs):
            self.acquire(self.index[id(block)], loop)
            return inner(block, *args, **kwargs)

        return run

    def acquire(self, index: int, loop: bool = False) -> None:
        """Make block ``index``'s weights usable by work queued from now on, and prefetch the next block
        (the next one up the stack after the last one for a ``loop``, see ``running``)."""
        if self.cuda:
            # Everything queued so far, earlier blocks included, must finish before their slot is refilled.
            mark = torch.cuda.Event()
            mark.record(torch.cuda.current_stream(self.device))
            self.free = [mark if block != index else free for block, free in zip(self.resident, self.free, strict=True)]
        slot = self._load(index)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.loaded[slot])
        for module, name, is_param, dtype, shape, start in self.tensors[index]:
            self._point(module, name, is_param, _view(self.slots[slot], start, dtype, shape))
        step = 1 if self.last is None or index > self.last else -1 if index < self.last else 0
        if step == 0:  # the same block twice: the turn between the forward pass and the backward pass
            step = -1 if index == self.count - 1 else 1
        self.last = index
        if loop:
            self._load((index + 1) % self.count)
        elif 0 <= index + step < self.count:
            self._load(index + step)

    def _load(self, index: int) -> int:
        if index in self.resident:
            return self.resident.index(index)
        # An empty slot, else the one not holding the block in use (the last one acquired).
        slot = min(range(self.SLOTS), key=lambda s: (self.resident[s] is not None, self.resident[s] == self.last))
        if self.resident[slot] is not None:  # its previous block must not read the slot through stale views
            for module, name, is_param, dtype, _shape, _start in self.tensors[self.resident[slot]]:
                self._point(module, name, is_param, torch.empty(0, dtype=dtype, device=self.device))
        host, target = self.host[index], self.slots[slot][: self.host[index].numel()]
        if self.cuda:
            if self.free[slot] is not None:
                self.stream.wait_event(self.free[slot])
            with torch.cuda.stream(self.stream):
                target.copy_(host, non_blocking=True)
                self.loaded[slot] = torch.cuda.Event()
                self.loaded[slot].record(self.stream)
        else:
            target.copy_(host)
        self.resident[slot] = index
        return slot


def _view(flat: torch.Tensor, start: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    size = dtype.itemsize * max(1, int(torch.Size(shape).numel()))
    return flat[start : start + size].view(dtype)[: torch.Size(shape).numel()].view(shape)


def swap_saving(transformer: torch.nn.Module, fp8: bool = False) -> int:
    """Device bytes ``swap`` frees: the blocks' frozen tensors (as stored, fp8 or not) less its two slots."""
    sizes = []
    for block in transformer.transformer_blocks:
        frozen = [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())
        linears = {id(child.weight) for _, _, child in frozen_linears_of(block)} if fp8 else set()
        sizes.append(sum(t.numel() * (1 if id(t) in linears else t.element_size()) for t in frozen))
    return sum(sizes) - BlockSwap.SLOTS * max(sizes)
