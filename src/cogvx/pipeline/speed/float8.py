"""Float8 storage and products of the frozen base weights of the transformer blocks' linear layers.

``fp8_base`` stores each frozen ``nn.Linear`` weight in float8 (e4m3, one scale per output channel) and widens
it to the compute dtype just before each matmul: half the bytes of bf16 weights; the LoRA weights and all the
arithmetic stay in their usual precision. ``fp8_matmul`` goes further (it implies the storage): the forward
products with those weights run on the GPU's float8 units, each input row scaled into e4m3 first; the input
gradient and everything else stay in the compute dtype. That changes the numbers a little more than storage
alone, so it is opt-in (BENCHMARKS.md has its loss curves).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cogvx.errors import ConfigError

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


def frozen_linears_of(block: torch.nn.Module):
    """(parent module, child name, layer) of every frozen ``nn.Linear`` inside ``block``."""
    for module in list(block.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and not child.weight.requires_grad:
                yield module, child_name, child


def _frozen_block_linears(transformer: torch.nn.Module):
    for block in transformer.transformer_blocks:
        yield from frozen_linears_of(block)


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
    linears = _frozen_block_linears(transformer) if blocks is not None else frozen_linears_of(transformer)
    for module, child_name, child in list(linears):
        saved += child.weight.numel() * (child.weight.element_size() - 1)
        setattr(module, child_name, Float8Linear(child, matmul))
    return saved
