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
- ``swap``: like ``offload``, and the frozen base weights of the blocks live in pinned CPU memory too:
  two GPU slots take turns holding one block's weights, the next block's copied in on a side stream
  while the current one computes (forward, then again for the recompute in the backward pass). The
  GPU holds the LoRA weights, the embeddings, two blocks' weights and one block's activations.

``compile`` compiles the runner once with ``torch.compile``; every block reuses that one graph.
``fp8_base`` stores the frozen base weights of the blocks' linear layers in float8 (e4m3, one scale
per output channel) and widens them to the compute dtype just before each matmul: half the bytes of
bf16 weights; the LoRA weights and all the arithmetic stay in their usual precision. ``fp8_matmul`` goes
further (it implies the storage): the forward products with those weights run on the GPU's float8 units,
each input row scaled into e4m3 first; the input gradient and everything else stay in the compute dtype.
That changes the numbers a little more than storage alone, so it is opt-in (BENCHMARKS.md has its loss curves).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cogvx.errors import ConfigError

# The checkpointing modes, fastest first (--checkpointing auto tries them in this order); declared here only.
CHECKPOINTING = ("none", "selective", "full", "offload", "swap")
AUTO = "auto"  # predict each mode's peak memory and take the fastest that fits (pipeline/memory.py)


@dataclass(frozen=True)
class Levers:
    checkpointing: str  # one of CHECKPOINTING
    compile: bool  # torch.compile of the block runner
    fp8_base: bool  # frozen base weights of the blocks' linear layers in float8
    fp8_matmul: bool = False  # their forward products in float8 too (implies fp8_base)

    @property
    def fp8(self) -> bool:
        return self.fp8_base or self.fp8_matmul


def prepare(transformer: torch.nn.Module, levers: Levers, device: torch.device | str | None = None) -> None:
    """Apply ``levers`` to a CogVideoX transformer, in place; call it after the LoRA adapters are added.

    ``device``: where training runs; the transformer is moved there (all of it, or for ``swap`` all but the
    blocks' frozen weights, which go to pinned CPU memory block by block, so the GPU never holds the
    whole model). fp8 storage comes after ``add_lora``: the adapters wrap the linear layers whose base
    weights shrink; it runs on ``device``, one block at a time for ``swap``.
    """
    device = torch.device(device) if device is not None else next(transformer.parameters()).device
    if levers.fp8_matmul:
        check_fp8_matmul(device)
    swap = None
    if levers.checkpointing == "swap":
        swap = BlockSwap(transformer.transformer_blocks, device, fp8=levers.fp8, fp8_matmul=levers.fp8_matmul)
        transformer.to(device)  # the rest: embeddings, final norm and projection, LoRA weights
    else:
        transformer.to(device)
        if levers.fp8:
            store_base_weights_in_fp8(transformer, matmul=levers.fp8_matmul)
    configure(transformer, levers.checkpointing, levers.compile, swap)


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


def _offloaded_runner(inner, swap: BlockSwap | None = None):
    force_grad = torch.empty(0, requires_grad=True)  # makes autograd call backward even for block 0
    pool = _PinnedPool()
    if swap is not None:
        inner = swap.running(inner)

    def run(block, hidden, encoder, *rest):
        return _OffloadedCheckpoint.apply(inner, block, pool, force_grad, hidden, encoder, *rest)

    return run


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

    def running(self, inner):
        """``inner(block, *args)`` with the block's weights brought in first, outside any compiled region;
        ``inner`` calls the block's ``forward``, past the pre-forward hook."""

        def run(block, *args):
            self.acquire(self.index[id(block)])
            return inner(block, *args)

        return run

    def acquire(self, index: int) -> None:
        """Make block ``index``'s weights usable by work queued from now on, and prefetch the next block."""
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
        if 0 <= index + step < self.count:
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
        linears = {id(child.weight) for _, _, child in _frozen_linears_of(block)} if fp8 else set()
        sizes.append(sum(t.numel() * (1 if id(t) in linears else t.element_size()) for t in frozen))
    return sum(sizes) - BlockSwap.SLOTS * max(sizes)


def configure(transformer: torch.nn.Module, checkpointing: str, compile: bool, swap: BlockSwap | None = None) -> None:
    """Install the block runner for ``checkpointing`` on a diffusers CogVideoX transformer."""
    if checkpointing not in CHECKPOINTING:
        raise ConfigError(f"--checkpointing must be one of {', '.join(CHECKPOINTING)} (got {checkpointing!r}).")
    if checkpointing == "swap" and swap is None:
        raise ValueError("checkpointing='swap' needs the transformer prepared by levers.prepare")
    if checkpointing in ("offload", "swap"):
        inner = _run_unhooked if swap is not None else _run_plain
        runner = _offloaded_runner(torch.compile(inner) if compile else inner, swap)
    else:
        runner = {"full": _run_full, "selective": _run_selective, "none": _run_plain}[checkpointing]
        if compile:
            runner = torch.compile(runner)
    if checkpointing == "none" and not compile:
        transformer.disable_gradient_checkpointing()
        return
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=runner)


E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantise_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor in float8 e4m3 with one float32 scale per row (its largest magnitude maps to e4m3's)."""
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


class Float8Linear(torch.nn.Module):
    """A frozen linear layer whose weight is stored in float8 e4m3 with one scale per output channel.

    ``matmul``: the forward product runs in float8 (``torch._scaled_mm``, input rows scaled into e4m3);
    otherwise the weight is widened to the input's dtype and multiplied as usual.
    """

    def __init__(self, linear: torch.nn.Linear, matmul: bool = False):
        super().__init__()
        weight = linear.weight.detach()
        weight_fp8, scale = quantise_rows(weight)
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("scale", scale.to(weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The float8 units take inner and outer sizes in multiples of 16; other layers keep the widened path.
        self.matmul = matmul and self.in_features % 16 == 0 and self.out_features % 16 == 0

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_fp8.to(self.scale.dtype) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul:
            kind = x.device.type
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
            if dtype == torch.bfloat16:  # the float8 product's output type on every backend
                out = _Float8Matmul.apply(x.to(dtype), self.weight_fp8, self.scale)
                return out if self.bias is None else out + self.bias.to(dtype)
        return F.linear(x, self.weight, self.bias)


class _Float8Matmul(torch.autograd.Function):
    """``x @ weight.T`` with ``x`` quantised per row to e4m3, for a frozen float8 weight with per-row scales.

    Only the input needs a gradient; it is computed from the widened weight in ``x``'s dtype, so the
    float8 rounding of activations touches the forward values and not the gradients' arithmetic.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight_fp8, scale)
        quantised, row_scale = quantise_rows(x.reshape(-1, x.shape[-1]))
        out = torch._scaled_mm(
            quantised, weight_fp8.t(), scale_a=row_scale, scale_b=scale.float().t(), out_dtype=x.dtype
        )
        return out.reshape(*x.shape[:-1], weight_fp8.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight_fp8, scale = ctx.saved_tensors
        return grad @ (weight_fp8.to(grad.dtype) * scale.to(grad.dtype)), None, None


def check_fp8_matmul(device: torch.device) -> None:
    """Refuse ``fp8_matmul`` on a GPU without float8 matrix units (before Ada and Hopper), or where this PyTorch
    has no row-scaled float8 product for the card: one tiny product on the device tells."""
    if device.type != "cuda":
        return
    name = torch.cuda.get_device_name(device)
    if torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(
            f"--fp8-matmul needs a GPU with float8 matrix units (Ada, Hopper or newer); {name} has none. "
            "Use --fp8-base (float8 storage only) instead."
        )
    square = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(
            square,
            square.t(),
            scale_a=torch.ones(16, 1, device=device),
            scale_b=torch.ones(1, 16, device=device),
            out_dtype=torch.bfloat16,
        )
    except RuntimeError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"--fp8-matmul: PyTorch {torch.__version__} has no row-scaled float8 product on {name} ({reason}). "
            "Use --fp8-base (float8 storage only) instead."
        ) from err


def _frozen_block_linears(transformer: torch.nn.Module):
    for block in transformer.transformer_blocks:
        yield from _frozen_linears_of(block)


def _frozen_linears_of(block: torch.nn.Module):
    for module in list(block.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and not child.weight.requires_grad:
                yield module, child_name, child


def fp8_saving(transformer: torch.nn.Module) -> int:
    """Bytes ``store_base_weights_in_fp8`` would free, without changing anything."""
    linears = [child for _, _, child in _frozen_block_linears(transformer)]
    return sum(child.weight.numel() * (child.weight.element_size() - 1) for child in linears)


def store_base_weights_in_fp8(transformer: torch.nn.Module, matmul: bool = False) -> int:
    """Swap every frozen ``nn.Linear`` inside the transformer blocks (or inside one block, given a block)
    for a ``Float8Linear`` (its forward product in float8 if ``matmul``); returns bytes saved.

    LoRA-wrapped layers keep their adapter and lose only the base weight's precision, as in QLoRA.
    """
    saved = 0
    blocks = getattr(transformer, "transformer_blocks", None)
    linears = _frozen_block_linears(transformer) if blocks is not None else _frozen_linears_of(transformer)
    for module, child_name, child in list(linears):
        saved += child.weight.numel() * (child.weight.element_size() - 1)
        setattr(module, child_name, Float8Linear(child, matmul))
    return saved


def compile_cache_dir() -> Path:
    """Where compiled kernels are kept between launches: ``$XDG_CACHE_HOME/cogvx/torch-compile``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cogvx" / "torch-compile"


def use_persistent_compile_cache(folder: Path | None = None) -> None:
    """Keep Inductor's compiled graphs and kernels in ``folder`` (default ``compile_cache_dir()``), unless the
    user set ``TORCHINDUCTOR_CACHE_DIR``: a later launch with the same shapes loads them instead of compiling
    (PyTorch's default lives under /tmp, which many machines empty on reboot)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder or compile_cache_dir()))


# Each bucket gives the encoder two or three chunk shapes (the first chunk has one frame more, later ones
# carry the causal convolutions' cache); compiled for fixed shapes, a cache of many buckets needs room.
VAE_RECOMPILE_LIMIT = 64


def compile_vae_encoder(vae: torch.nn.Module, backend: str = "inductor") -> None:
    """Compile a CogVideoX VAE's encoder in place, for fixed shapes (one graph per chunk shape).

    Only the encoder is compiled: ``vae.encode`` keeps diffusers' own frame chunking, tiling and posterior.
    """
    import torch._dynamo

    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), VAE_RECOMPILE_LIMIT))
    vae.encoder.compile(dynamic=False, backend=backend)
