"""A stand-in for FlashAttention-3 (module ``flash_attn_interface``), which no CPU can run.

It is a layout and wiring stand-in only: it computes PyTorch's SDPA in FA3's [batch, tokens, heads, head size]
layout, as a custom op of FA3's name (``flash_attn_3::_flash_attn_forward``), so the transposes, the
checkpointing policies, the compiled graph and the float8 scaling around it are checked, not FA3's kernels
(bench/attention.py measures those). ``calls`` counts its forwards (both its entry points).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from cogvx.pipeline import models
from cogvx.pipeline.speed import attention

FA3_INSTALLED = importlib.util.find_spec(attention.FA3_MODULE) is not None


def _forward_op():
    """The stand-in's forward as a custom op named like FA3's (registered once per process), counting its calls."""
    if hasattr(_forward_op, "op"):
        return _forward_op.op

    @torch.library.custom_op("flash_attn_3::_flash_attn_forward", mutates_args=())
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _forward_op.calls += 1
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    @forward.register_fake
    def _(q, k, v):
        return torch.empty_like(q)

    def backward(ctx, grad):
        q, k, v = (t.detach().requires_grad_(True) for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return torch.autograd.grad(out.transpose(1, 2), (q, k, v), grad)

    forward.register_autograd(backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))
    _forward_op.op, _forward_op.calls = forward, 0
    return forward


class StandIn(types.ModuleType):
    """``flash_attn_interface`` for a layout test: SDPA in [B, L, H, D]; float8 inputs are descaled first."""

    def __init__(self):
        super().__init__(attention.FA3_MODULE)
        self.op, self.float8_calls = _forward_op(), 0

    def flash_attn_func(
        self, q, k, v, softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None
    ):
        assert q.stride(-1) == 1 and not causal and softmax_scale is None
        if q.dtype == torch.float8_e4m3fn:
            self.float8_calls += 1
            q, k, v = (t.float() * s[:, None, :, None] for t, s in ((q, q_descale), (k, k_descale), (v, v_descale)))
            return self.op(q, k, v).to(torch.bfloat16)
        return self.op(q, k, v)

    def _flash_attn_forward(self, q, k, v, softmax_scale=None):
        """FA3's internal forward as cogvx's op calls it: [B, L, H, D] out and [B, H, L] log-sum-exp (fp32)."""
        assert q.stride(-1) == 1 and softmax_scale == q.shape[-1] ** -0.5
        _forward_op.calls += 1
        with torch.autocast(q.device.type, enabled=False):  # a kernel of its own: fp32 lse under autocast too
            scores = (q.transpose(1, 2).float() @ k.transpose(1, 2).float().transpose(-1, -2)) * softmax_scale
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous(), torch.logsumexp(scores, dim=-1), None, None  # FA3's is contiguous

    def _flash_attn_backward(self, dout, q, k, v, out, lse, dq, dk, dv, softmax_scale):
        """FA3's internal backward: softmax attention's gradients, in closed form from the forward's log-sum-exp,
        written into ``dq``, ``dk``, ``dv`` (an op's body runs below autograd: no recompute with autograd here)."""
        assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
        q, k, v, o, do = (t.transpose(1, 2).float() for t in (q, k, v, out, dout))  # [B, H, L, D]
        with torch.autocast(q.device.type, enabled=False):
            p = torch.exp(q @ k.transpose(-1, -2) * softmax_scale - lse[..., None])  # the softmax, from lse
            ds = p * (do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
            grads = (ds @ k * softmax_scale, ds.transpose(-1, -2) @ q * softmax_scale, p.transpose(-1, -2) @ do)
        for into, grad in zip((dq, dk, dv), grads, strict=True):
            into.copy_(grad.transpose(1, 2))

    @property
    def calls(self) -> int:
        return _forward_op.calls


def install_stand_in(monkeypatch: pytest.MonkeyPatch) -> StandIn:
    """The stand-in importable as ``flash_attn_interface`` for the rest of the test (skipped where FA3 is
    installed: its op name is taken)."""
    if FA3_INSTALLED:
        pytest.skip("FlashAttention-3 is installed here: its op name is taken")
    # diffusers and transformers look for FA3 while importing their models (lazily, at first use): they import
    # first, so that whatever order the tests run in, they never meet the stand-in (it has no import spec).
    models.load_transformer(models.resolve_model("tiny"), torch.float32)
    importlib.import_module("diffusers.loaders.peft")
    module = StandIn()
    monkeypatch.setitem(sys.modules, attention.FA3_MODULE, module)
    return module
