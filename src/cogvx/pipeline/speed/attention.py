"""The attention kernel of the CogVideoX blocks: PyTorch's SDPA or FlashAttention-3, as ``--attention`` says.

diffusers' ``CogVideoXAttnProcessor2_0`` calls ``F.scaled_dot_product_attention`` directly (not through
``attention_dispatch``), so ``install`` gives every block a processor of our own, ``CogVideoXProcessor``, that
computes the same projections, norms and rotary embedding and hands the one attention product to an
``Attention`` object, shared by all blocks of a transformer:

- ``sdpa``: always SDPA, called as diffusers calls it (the same numbers, bit for bit);
- ``fa3``: FlashAttention-3 (FA3, module ``flash_attn_interface``), refused at the start where it is not
  installed or the GPU is not a Hopper one;
- ``auto``: where FA3 is usable (installed, Hopper GPU, bf16/fp16, a head size it has), the faster of the two
  for each shape, dtype and gradient mode, timed with CUDA events the first time that combination comes
  (on random inputs of its own generator: the run's numbers and random streams stay as they were); SDPA
  elsewhere. Under ``torch.compile`` the choice is made before the compiled block runs (``primed``).

``--fp8-attention``: validation sampling's forwards run FA3's float8 kernel, q, k and v scaled per head into
e4m3; training steps stay in bf16, since no released kernel has a float8 backward at head size 64, and so does
the eval score (``bf16_forwards``), so that scores compare across runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from cogvx.errors import ConfigError
from cogvx.names import AUTO
from cogvx.pipeline.speed import replay
from cogvx.pipeline.speed.float8 import E4M3_MAX

SDPA, FA3, FA3_FP8 = "sdpa", "fa3", "fa3-fp8"
SETTINGS = (AUTO, SDPA, FA3)  # --attention's values
FA3_MODULE = "flash_attn_interface"
FA3_BUILD = "bench/fa3_build.sh"
TIMED_CALLS = 3  # per kernel, after one warm-up call; the median decides

# The kernels whose outputs the selective checkpointing mode keeps: SDPA's backends and FA3's forward op.
_SDPA_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
)
_FA3_FORWARD_OPS = ("flash_attn_3::_flash_attn_forward", "cogvx::flash_attention_3")

Key = tuple[tuple[int, ...], torch.dtype, bool]  # (q's [B, H, L, D] shape, compute dtype, gradients on)


def is_attention_kernel(op: Any) -> bool:
    """Whether a dispatched op is an attention kernel (an SDPA backend or FlashAttention-3's forward)."""
    return op in _SDPA_OPS or getattr(getattr(op, "_schema", None), "name", None) in _FA3_FORWARD_OPS


# FlashAttention-3's bf16 product as one op of ours with its own autograd: FA3's public function is an
# autograd.Function around an in-place backward op, which Dynamo fails to trace inside a compiled block with
# gradients (measured on an H100: "RuntimeError when making fake tensor call" on its backward). One functional
# op with a fake and a registered backward compiles as a single node, and selective checkpointing saves its outputs.
# Its body runs eagerly, compiled block or not: there ``offload`` and ``swap`` replay the forward pass's outputs in
# the recompute (``replay``).
@torch.library.custom_op("cogvx::flash_attention_3", mutates_args=())
def flash_attention_3_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FA3's forward of [B, L, H, D] tensors (no mask, not causal): the output and the softmax's log-sum-exp."""
    return replay.product(q, k, v, _fa3_forward)


def _fa3_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, *_ = importlib.import_module(FA3_MODULE)._flash_attn_forward(q, k, v, softmax_scale=q.shape[-1] ** -0.5)
    return out, lse


@flash_attention_3_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length, heads, _ = q.shape
    return q.new_empty((*q.shape[:3], v.shape[-1])), q.new_empty((batch, heads, length), dtype=torch.float32)


@torch.library.custom_op("cogvx::flash_attention_3_backward", mutates_args=())
def flash_attention_3_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA3's backward: the gradients of q, k and v from the forward's output and log-sum-exp."""
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    importlib.import_module(FA3_MODULE)._flash_attn_backward(
        dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, softmax_scale=q.shape[-1] ** -0.5
    )
    return dq, dk, dv


@flash_attention_3_backward.register_fake
def _(dout, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _keep_for_backward(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)


def _flash_attention_3_grads(ctx, dout: torch.Tensor, _dlse: torch.Tensor):
    return flash_attention_3_backward(dout, *ctx.saved_tensors)


flash_attention_3_op.register_autograd(_flash_attention_3_grads, setup_context=_keep_for_backward)


def flash_attention_3() -> tuple[Callable[..., torch.Tensor] | None, str | None]:
    """FlashAttention-3's ``flash_attn_func``, or None and why it cannot be imported."""
    try:
        return importlib.import_module(FA3_MODULE).flash_attn_func, None
    except ImportError as err:
        return None, str(err).splitlines()[0] if str(err) else type(err).__name__


def check(setting: str, fp8_forward: bool, device: torch.device | None = None) -> None:
    """Refuse ``--attention fa3`` or ``--fp8-attention`` where FA3 cannot run: not importable, or (with
    ``device``) not a Hopper GPU, or (for float8) a build without float8 kernels."""
    if setting not in SETTINGS:
        raise ConfigError(f"--attention must be one of {', '.join(SETTINGS)} (got {setting!r})")
    asked = [flag for flag, on in (("--attention fa3", setting == FA3), ("--fp8-attention", fp8_forward)) if on]
    if not asked:
        return
    flag = " and ".join(asked)
    flash, reason = flash_attention_3()
    if flash is None:
        raise ConfigError(
            f"{flag} needs FlashAttention-3 (python module {FA3_MODULE}), which does not import here ({reason}); "
            f"build and install it ({FA3_BUILD} builds it) or use --attention auto and no --fp8-attention"
        )
    if device is None:
        return
    device = torch.device(device)
    if not _hopper(device):
        what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"the {device.type} device"
        raise ConfigError(
            f"{flag} needs a Hopper GPU (compute capability 9.x, e.g. H100 or H200) and runs on {what}; "
            "use --attention auto and no --fp8-attention"
        )
    if fp8_forward:
        probe = torch.ones(1, 128, 1, 64, device=device).to(torch.float8_e4m3fn)
        descale = torch.ones(1, 1, device=device)
        try:
            flash(probe, probe, probe, q_descale=descale, k_descale=descale, v_descale=descale)
        except RuntimeError as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"--fp8-attention: this FlashAttention-3 build has no float8 kernels ({first}); rebuild it without "
                f"FLASH_ATTENTION_DISABLE_FP8 ({FA3_BUILD}) or drop --fp8-attention"
            ) from err


def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype SDPA would compute ``t`` in: autocast's, where autocast is on, else ``t``'s own."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


class Attention:
    """Which kernel each attention product of one transformer runs, and the per-shape choices of ``auto``.

    ``flash`` is FA3's ``flash_attn_func`` (None: SDPA everywhere); ``for_device`` finds it. ``inference`` is
    set by the transformer's hooks (``install``) for a forward without gradients: only those may run float8.
    ``replay`` keeps FA3's outputs of ``offload``'s and ``swap``'s forward pass for their recompute; their
    forward pass, without gradients, takes the kernel chosen for training, so that both runs agree.
    """

    def __init__(self, setting: str = AUTO, fp8_forward: bool = False, flash: Callable[..., Any] | None = None):
        if setting not in SETTINGS:
            raise ConfigError(f"--attention must be one of {', '.join(SETTINGS)} (got {setting!r})")
        self.setting, self.fp8_forward = setting, fp8_forward
        self.flash = None if setting == SDPA else flash
        self.fa3_note = "not asked for" if setting == SDPA else "available" if flash is not None else "absent"
        self.chosen: dict[Key, str] = {}  # auto's measured choices
        self.timings: dict[Key, dict[str, float]] = {}  # milliseconds per kernel, or the error that ruled it out
        self.inference = False
        self.replay = replay.AttentionReplay()

    @classmethod
    def for_device(cls, setting: str, fp8_forward: bool, device: torch.device | str) -> Attention:
        """The kernels for ``device``: FA3 where importable and the device is a Hopper GPU (``check`` has
        refused ``fa3`` and ``fp8_forward`` elsewhere)."""
        check(setting, fp8_forward, device)
        if setting == SDPA:
            return cls(setting, fp8_forward)
        flash, reason = flash_attention_3()
        attention = cls(setting, fp8_forward, flash if flash is not None and _hopper(torch.device(device)) else None)
        if flash is None:
            attention.fa3_note = f"absent ({reason})"
        elif attention.flash is None:
            attention.fa3_note = "installed, not used: not a Hopper GPU"
        return attention

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Softmax attention of [B, H, L, D] tensors (no mask, not causal), [B, H, L, D] out."""
        kernel = self.kernel_for(query)
        if kernel == SDPA:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        dtype = _compute_dtype(query)
        # FA3 takes [B, L, H, D]: transposed views, the head size still the last, unit-stride dimension.
        q, k, v = (t.to(dtype).transpose(1, 2) for t in (query, key, value))
        if kernel == FA3_FP8:
            (q, q_descale), (k, k_descale), (v, v_descale) = (per_head_e4m3(t) for t in (q, k, v))
            out = self.flash(q, k, v, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
        else:
            out = flash_attention_3_op(q, k, v)[0]
        return out.transpose(1, 2)

    def kernel_for(self, query: torch.Tensor) -> str:
        """The kernel for this product: SDPA, FA3, or FA3's float8 forward."""
        if self.flash is None:
            return SDPA
        dtype = _compute_dtype(query)
        if dtype not in (torch.bfloat16, torch.float16) or not fa3_head_size(query.shape[-1]):
            return SDPA
        if self.fp8_forward and self.inference and not torch.is_grad_enabled():
            return FA3_FP8
        if self.setting == FA3:
            return FA3
        key = (tuple(query.shape), dtype, torch.is_grad_enabled() or self.replay.forwarding)
        kernel = self.chosen.get(key)
        if kernel is not None:
            return kernel
        if torch.compiler.is_compiling():  # not primed (``primed`` measures before the compiled block runs)
            return SDPA
        return self.measure(key, query.device)

    def prime(self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> None:
        """Make ``auto``'s choice for the block's coming attention product (text and video tokens together),
        outside any compiled region (``offload``'s and ``swap``'s forward pass, without gradients, takes the
        training choice: ``kernel_for``)."""
        if self.flash is None or self.setting != AUTO:
            return
        heads = attn.heads
        shape = (hidden_states.shape[0], heads, hidden_states.shape[1] + encoder_hidden_states.shape[1])
        shape += (attn.inner_dim // heads,)
        dtype = _compute_dtype(hidden_states)
        if dtype not in (torch.bfloat16, torch.float16) or not fa3_head_size(shape[-1]):
            return
        if (shape, dtype, torch.is_grad_enabled()) not in self.chosen:
            self.measure((shape, dtype, torch.is_grad_enabled()), hidden_states.device)

    def measure(self, key: Key, device: torch.device) -> str:
        """Time SDPA and FA3 on random inputs of ``key``'s shape and keep the faster (FA3 failing: SDPA).

        The inputs come from a generator of their own, and the timing runs outside whatever the caller has
        on (a checkpoint's saved-tensor hooks and dispatch modes, autocast), so it changes nothing else.
        """
        from torch.utils._python_dispatch import _disable_current_modes

        shape, dtype, grad = key
        generator = torch.Generator(device).manual_seed(0)
        inputs = [torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(3)]
        timings: dict[str, Any] = {}
        with (
            _disable_current_modes(),
            replay.outside(),
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
            torch.autocast(device.type, enabled=False),
            torch.enable_grad() if grad else torch.no_grad(),
        ):
            for kernel in (SDPA, FA3):
                try:
                    timings[kernel] = _milliseconds(functools.partial(self._run_once, kernel, inputs, grad), device)
                except RuntimeError as err:  # a shape or build FA3 has no kernel for: it is recorded, SDPA runs
                    timings[kernel] = str(err).splitlines()[0] if str(err) else type(err).__name__
        measured = {kernel: ms for kernel, ms in timings.items() if isinstance(ms, float)}
        self.timings[key] = timings
        self.chosen[key] = min(measured, key=measured.get) if FA3 in measured else SDPA
        return self.chosen[key]

    def _run_once(self, kernel: str, inputs: list[torch.Tensor], grad: bool) -> None:
        q, k, v = (t.detach().requires_grad_(grad) for t in inputs)
        if kernel == SDPA:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = flash_attention_3_op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[0].transpose(1, 2)
        if grad:
            out.backward(torch.ones_like(out))

    def recorded(self) -> dict[str, Any]:
        """What ran, for the run folder's config.json: the setting, FA3's state, auto's choice per shape, and
        whether ``offload``'s or ``swap``'s recompute replayed FA3's outputs (and the host memory that holds)."""
        kernels = {
            f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} {'train' if grad else 'no-grad'}": {
                "kernel": kernel,
                "ms": self.timings.get((shape, dtype, grad), {}),
            }
            for (shape, dtype, grad), kernel in self.chosen.items()
        }
        return {
            "setting": self.setting,
            "fa3": self.fa3_note,
            "fp8_forward": self.fp8_forward,
            "chosen": kernels,
            "replay": self.replay.recorded(),
        }


def fa3_head_size(head_dim: int) -> bool:
    """Whether FlashAttention-3 has kernels for this head size (up to 256, multiples of 8)."""
    return head_dim <= 256 and head_dim % 8 == 0


def per_head_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [B, L, H, D] in float8 e4m3, each (batch, head) scaled so its largest magnitude maps to e4m3's,
    and the [B, H] float32 descale FlashAttention-3 multiplies back."""
    amax = x.abs().amax(dim=(1, 3)).float().clamp(min=1e-12)
    scale = E4M3_MAX / amax
    return (x.float() * scale[:, None, :, None]).to(torch.float8_e4m3fn), (1.0 / scale).contiguous()


def _milliseconds(call: Callable[[], None], device: torch.device) -> float:
    """The median time of ``TIMED_CALLS`` calls after a warm-up: CUDA events on a GPU, the wall clock elsewhere."""
    call()
    times = []
    for _ in range(TIMED_CALLS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            call()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


class CogVideoXProcessor:
    """A CogVideoX attention layer's forward (as diffusers' ``CogVideoXAttnProcessor2_0`` computes it: text and
    video tokens attended together, q/k norms, rotary embedding on the video tokens), its product by ``attention``."""

    def __init__(self, attention: Attention):
        self.attention = attention

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        text_tokens = encoder_hidden_states.shape[1]
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, length, _ = tokens.shape

        def heads_first(t: torch.Tensor) -> torch.Tensor:  # [B, L, H*D] -> [B, H, L, D], a view
            return t.view(batch, length, attn.heads, -1).transpose(1, 2)

        query, key, value = (
            heads_first(attn.to_q(tokens)),
            heads_first(attn.to_k(tokens)),
            heads_first(attn.to_v(tokens)),
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat(
                [query[:, :, :text_tokens], apply_rotary_emb(query[:, :, text_tokens:], image_rotary_emb)], 2
            )
            if not attn.is_cross_attention:
                key = torch.cat(
                    [key[:, :, :text_tokens], apply_rotary_emb(key[:, :, text_tokens:], image_rotary_emb)], 2
                )
        if attention_mask is None:
            out = self.attention(query, key, value)
        else:  # CogVideoX passes none; a mask keeps diffusers' SDPA call
            mask = attn.prepare_attention_mask(attention_mask, length, batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        return out[:, text_tokens:], out[:, :text_tokens]


def install(transformer: torch.nn.Module, attention: Attention) -> None:
    """Route every attention product of a CogVideoX transformer through ``attention`` (replacing one installed
    earlier), and mark its forwards without gradients for ``--fp8-attention``."""
    earlier = getattr(transformer, "_cogvx_attention_hooks", ())
    for handle in earlier:
        handle.remove()
    transformer.set_attn_processor(CogVideoXProcessor(attention))
    transformer._cogvx_attention = attention

    def before(module, args, kwargs) -> None:
        attention.inference = not torch.is_grad_enabled()

    def after(module, args, kwargs, output) -> None:
        attention.inference = False

    transformer._cogvx_attention_hooks = (
        transformer.register_forward_pre_hook(before, with_kwargs=True),
        transformer.register_forward_hook(after, with_kwargs=True, always_call=True),
    )


def installed(transformer: torch.nn.Module) -> Attention | None:
    """The ``Attention`` installed on ``transformer`` (None: diffusers' own processors)."""
    return getattr(transformer, "_cogvx_attention", None)


@contextlib.contextmanager
def bf16_forwards(model: torch.nn.Module) -> Iterator[None]:
    """Forwards without gradients in the bf16 kernel, whatever ``--fp8-attention`` says: the eval score is computed
    as every run computes it, so scores of runs with and without float8 attention compare."""
    kernels = next((m._cogvx_attention for m in model.modules() if hasattr(m, "_cogvx_attention")), None)
    if kernels is None or not kernels.fp8_forward:
        yield
        return
    kernels.fp8_forward = False
    try:
        yield
    finally:
        kernels.fp8_forward = True


def replay_of(block: torch.nn.Module) -> replay.AttentionReplay | None:
    """Where a block's FA3 outputs wait for its recompute (None: the block runs diffusers' own processor)."""
    processor = getattr(block.attn1, "processor", None)
    return processor.attention.replay if isinstance(processor, CogVideoXProcessor) else None


def primed(runner: Callable[..., Any]) -> Callable[..., Any]:
    """``runner(block, hidden_states, encoder_hidden_states, ...)`` that makes ``auto``'s kernel choice for the
    block's attention first, outside the compiled region the runner may be."""

    def run(block, *args, **kwargs):
        processor = getattr(block.attn1, "processor", None)
        if isinstance(processor, CogVideoXProcessor):
            hidden = args[0] if args else kwargs["hidden_states"]
            encoder = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
            processor.attention.prime(block.attn1, hidden, encoder)
        return runner(block, *args, **kwargs)

    return run
