"""Speed and memory levers compute the same thing as the plain path (issue 5's guard rails)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cogvx.errors import ConfigError
from cogvx.pipeline import levers, lora, models
from cogvx.pipeline.objective import Objective
from cogvx.pipeline.speed import compiling
from cogvx.pipeline.speed.checkpointing import MODES
from cogvx.pipeline.speed.float8 import Float8Linear, check_fp8_matmul
from cogvx.pipeline.speed.swap import swap_saving
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train
from tests.conftest import property_examples


def _loss_and_grads(
    chosen: str, passes: int = 1, layers: int | None = None, bf16: bool = False
) -> tuple[float, torch.Tensor]:
    """Loss and LoRA gradient on fixed inputs, with the given ``+``-joined levers (the last of ``passes``);
    ``layers``: the tiny model with that many blocks (random weights) instead of its own two; ``bf16``: the
    base weights in bf16 and the step under bf16 autocast, as a bf16 run computes (the LoRA weights stay fp32)."""
    source = models.resolve_model("tiny")
    if layers is None:
        transformer = models.load_transformer(source, torch.float32)
    else:
        from diffusers import CogVideoXTransformer3DModel

        config = dict(CogVideoXTransformer3DModel.load_config(source, subfolder="transformer"), num_layers=layers)
        transformer = CogVideoXTransformer3DModel.from_config(config)
    torch.manual_seed(0)
    params = lora.add_lora(transformer, 4, 8, lora.DEFAULT_TARGETS, 0.0)
    with torch.no_grad():  # non-zero B matrices, so the LoRA path carries gradient and signal
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    if bf16:
        transformer.to(torch.bfloat16)
        for p in params:
            p.data = p.data.float()
    options = set(chosen.split("+"))
    mode = next((o for o in options if o in MODES), "full")
    chosen_levers = levers.Levers(
        mode, compile="compile" in options, fp8_base="fp8" in options, fp8_matmul="fp8mm" in options
    )
    levers.prepare(transformer, chosen_levers, "cpu")
    objective = Objective(transformer.config, models.load_scheduler(source).alphas_cumprod, 0.7)
    g = torch.Generator().manual_seed(3)
    moments, embeds = torch.randn(1, 8, 4, 8, 12, generator=g), torch.randn(1, 226, 32, generator=g)
    dtype = torch.bfloat16 if bf16 else torch.float32
    for _ in range(passes):  # later passes find the blocks' weights in whatever slot the last one left them
        for p in params:
            p.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = objective(transformer, moments, embeds, torch.Generator().manual_seed(1), dtype)
        loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in params])


@pytest.fixture(scope="module")
def plain():
    return _loss_and_grads("none")


@pytest.mark.parametrize("chosen", ["full", "selective", "offload", "swap", "selective+compile", "swap+compile"])
def test_checkpointing_modes_and_compile_match_the_plain_path(plain, chosen: str):
    torch._dynamo.reset()
    loss, grads = _loss_and_grads(chosen, passes=2 if chosen.startswith("swap") else 1)
    ref_loss, ref_grads = plain
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert ((grads - ref_grads).norm() / ref_grads.norm()).item() < 1e-4


def test_a_compiled_runner_is_compiled_once_for_all_blocks():
    """Every block reuses the same few graphs, so a 30- or 42-block model compiles no more than a 5-block one;
    a graph per block would hit Dynamo's recompile limit and fall back to eager for the rest (``swap``'s
    pre-forward hooks, one per block, each carrying its index, once did that). The first block's input needs
    no gradient and later ones do, and ``swap`` runs each block once without gradients and once, in the
    recompute, with them: at most three graphs."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _loss_and_grads("swap+compile", passes=2, layers=5)
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3


def test_fp8_base_weights_stay_within_one_percent_and_halve_the_bytes(plain):
    loss, grads = _loss_and_grads("full+fp8")
    ref_loss, ref_grads = plain
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    assert ((grads - ref_grads).norm() / ref_grads.norm()).item() < 0.1  # quantised base, as in QLoRA
    # Swapped fp8 blocks are quantised one at a time on the device: the same numbers as all at once.
    swapped, offloaded = _loss_and_grads("swap+fp8"), _loss_and_grads("offload+fp8")
    assert swapped[0] == pytest.approx(offloaded[0], rel=1e-6)
    torch.testing.assert_close(swapped[1], offloaded[1], rtol=1e-5, atol=1e-7)
    linear = torch.nn.Linear(64, 32).requires_grad_(False)
    stored = Float8Linear(linear)
    assert stored.weight_fp8.element_size() == 1 and stored.weight_fp8.dtype == torch.float8_e4m3fn
    x = torch.randn(5, 64)
    torch.testing.assert_close(stored(x), linear(x), rtol=0.1, atol=0.05)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.fixture(scope="module")
def plain_bf16():
    return _loss_and_grads("none", bf16=True)


@pytest.mark.parametrize("mode", ["selective", "swap"])
def test_fp8_matmul_stays_within_one_percent_of_bf16_and_multiplies_in_float8(plain_bf16, mode: str):
    """Under bf16 autocast, the only place its float8 products engage (``swap`` blocks are quantised one at a
    time, and the second pass finds their weights in whichever slot the first left them)."""
    passes = 2 if mode == "swap" else 1
    loss, grads = _loss_and_grads(f"{mode}+fp8mm", passes=passes, bf16=True)
    ref_loss, ref_grads = plain_bf16
    assert loss == pytest.approx(ref_loss, rel=1e-2)  # measured 3e-4
    assert _relative(grads, ref_grads) < 0.1  # measured 0.036 (fp8 storage alone: 0.033)
    # The products really ran in float8: falling back to the widened weights would give fp8 storage's numbers
    # (its gradient measured 0.017 away).
    stored_loss, stored_grads = _loss_and_grads(f"{mode}+fp8", passes=passes, bf16=True)
    assert loss != stored_loss and _relative(grads, stored_grads) > 1e-3


def test_fp8_matmul_compiles_without_graph_breaks_to_the_eager_function(monkeypatch):
    """Dynamo and AOTAutograd trace the float8 product (a custom autograd Function around ``torch._scaled_mm``)
    inside the selectively checkpointed block, and the traced graphs compute the eager numbers. Inductor's own
    kernels are measured on the GPU (bench/curve.py, BENCHMARKS.md): compiling with it takes about a minute
    on a CPU with a cold cache, so here the captured graphs run eagerly."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loss, grads = _loss_and_grads("selective+compile+fp8mm", bf16=True)
    assert not torch._dynamo.utils.counters["graph_break"]
    eager_loss, eager_grads = _loss_and_grads("selective+fp8mm", bf16=True)
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    assert _relative(grads, eager_grads) < 1e-4


_CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
)


@pytest.mark.parametrize("device", ["cpu", _CUDA])
def test_the_float8_product_tracks_the_widened_weights_on_float8_units_and_is_refused_without(device: str):
    """One layer: the float8 product is close to fp8 storage's widened product, its input gradient is storage's
    own, it engages only in bf16 compute, and a GPU without float8 units (before Ada and Hopper) refuses it."""
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(ConfigError, match="--fp8-base"):
            check_fp8_matmul(torch.device(device))
        return
    check_fp8_matmul(torch.device(device))
    torch.manual_seed(4)
    linear = torch.nn.Linear(256, 128, device=device).requires_grad_(False)
    x = torch.randn(64, 256, device=device)
    # fp32 compute: the widened path
    assert torch.equal(Float8Linear(linear, matmul=True)(x), Float8Linear(linear)(x))
    linear.to(torch.bfloat16)
    stored, multiplied = Float8Linear(linear), Float8Linear(linear, matmul=True)
    assert multiplied.matmul and not Float8Linear(torch.nn.Linear(24, 8), matmul=True).matmul
    inputs = [x.to(torch.bfloat16).requires_grad_(True) for _ in range(2)]
    with torch.autocast(device, torch.bfloat16):
        out, widened = multiplied(inputs[0]), stored(inputs[1])
    assert out.dtype == torch.bfloat16 and 0 < _relative(out, widened) < 0.05  # measured 0.026 on a CPU
    grad = torch.randn_like(out)
    out.backward(grad)
    widened.backward(grad)
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad)


@settings(max_examples=property_examples(12))
@given(
    inner=st.sampled_from([16, 24, 48, 64]),
    outer=st.sampled_from([8, 16, 32, 80]),
    leading=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_float8_product_tracks_the_widened_one_at_any_size(inner, outer, leading, bias, seed):
    """Any layer size (the float8 product engages only for multiples of 16, else the widened path), any
    leading shape (a single row included), with or without bias: the output keeps its shape and stays near
    fp8 storage's, and the input gradient is storage's own."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(inner, outer, bias=bias).requires_grad_(False).to(torch.bfloat16)
    stored, multiplied = Float8Linear(linear), Float8Linear(linear, matmul=True)
    assert multiplied.matmul == (inner % 16 == 0 and outer % 16 == 0)
    x = torch.randn(*leading, inner)
    inputs = [x.to(torch.bfloat16).requires_grad_(True) for _ in range(2)]
    with torch.autocast("cpu", torch.bfloat16):
        out, widened = multiplied(inputs[0]), stored(inputs[1])
    assert out.shape == widened.shape == (*leading, outer) and out.dtype == torch.bfloat16
    if multiplied.matmul:
        assert 0 < _relative(out, widened) < 0.1  # e4m3 rounding of the input rows: it really ran in float8
    else:
        assert torch.equal(out, widened)
    grad = torch.randn_like(out)
    out.backward(grad)
    widened.backward(grad)
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad)


def test_prepare_applies_the_levers_it_is_given():
    source = models.resolve_model("tiny")
    transformer = models.load_transformer(source, torch.float32)
    lora.add_lora(transformer, 4, 8, lora.DEFAULT_TARGETS, 0.0)
    levers.prepare(transformer, levers.Levers(checkpointing="selective", compile=False, fp8_base=True))
    assert transformer.gradient_checkpointing
    stored = [m for m in transformer.transformer_blocks.modules() if isinstance(m, Float8Linear)]
    assert stored and all(m.weight_fp8.dtype == torch.float8_e4m3fn for m in stored)
    levers.prepare(transformer, levers.Levers(checkpointing="none", compile=False, fp8_base=False))
    assert not transformer.gradient_checkpointing
    transformer = models.load_transformer(source, torch.float32)
    lora.add_lora(transformer, 4, 8, lora.DEFAULT_TARGETS, 0.0)
    levers.prepare(transformer, levers.Levers("selective", compile=False, fp8_base=False, fp8_matmul=True))
    stored = [m for m in transformer.transformer_blocks.modules() if isinstance(m, Float8Linear)]
    assert stored and all(m.matmul for m in stored)  # fp8_matmul implies the storage; the tiny sizes are x16
    with pytest.raises(ConfigError, match="--checkpointing must be one of none, selective, full, offload, swap"):
        levers.Levers("sometimes", compile=False, fp8_base=False)


def test_the_training_loop_with_levers_tracks_the_plain_run(tiny_cache: Path, tmp_path: Path):
    def losses(name: str, **chosen) -> list[float]:
        cfg = TrainConfig(
            shards=tiny_cache, output=tmp_path / name, max_steps=3, rank=4, mixed_precision="no", workers=0,
            checkpoint_every=0, **chosen,
        )  # fmt: skip
        return train(cfg).losses

    reference = losses("plain", checkpointing="none")
    assert losses("selective", checkpointing="selective") == pytest.approx(reference, rel=1e-5)
    assert losses("compiled", checkpointing="full", compile=True) == pytest.approx(reference, rel=1e-4)
    assert losses("lean", checkpointing="offload", fp8_base=True) == pytest.approx(reference, rel=1e-2)
    assert losses("swapped", checkpointing="swap") == pytest.approx(reference, rel=1e-5)
    with pytest.raises(ConfigError, match="--checkpointing must be one of"):
        TrainConfig(shards=tiny_cache, checkpointing="sometimes")


def test_the_training_loop_multiplies_in_float8_when_asked(tiny_cache: Path, tmp_path: Path):
    """``fp8_matmul`` reaches the blocks in a bf16 run (its products run only in bf16 compute, so another
    precision is refused rather than silently ignored)."""

    def losses(name: str, **chosen) -> list[float]:
        cfg = TrainConfig(
            shards=tiny_cache, output=tmp_path / name, max_steps=2, rank=4, mixed_precision="bf16", workers=0,
            checkpointing="selective", checkpoint_every=0, **chosen,
        )  # fmt: skip
        return train(cfg).losses

    reference, multiplied = losses("plain"), losses("fp8mm", fp8_matmul=True)
    assert multiplied == pytest.approx(reference, rel=1e-2)  # measured 3e-4
    assert multiplied != reference and multiplied != losses("fp8", fp8_base=True)  # not fp8 storage alone
    with pytest.raises(ConfigError, match="--fp8-matmul needs --mixed-precision bf16"):
        TrainConfig(shards=tiny_cache, fp8_matmul=True, mixed_precision="fp32")


def test_swapped_blocks_hold_no_weights_between_uses_and_run_without_gradients():
    """``swap`` keeps every block's frozen tensors off the device but for the two slots, and the no-grad path
    (validation calls the blocks directly, not through the checkpoint runner) brings them in by itself."""
    source = models.resolve_model("tiny")
    reference = models.load_transformer(source, torch.float32)
    transformer = models.load_transformer(source, torch.float32)
    torch.manual_seed(0)
    lora.add_lora(transformer, 4, 8, lora.DEFAULT_TARGETS, 0.0)
    expected = swap_saving(transformer)
    levers.prepare(transformer, levers.Levers("swap", compile=False, fp8_base=False), "cpu")
    frozen = [p for p in transformer.transformer_blocks.parameters() if not p.requires_grad]
    assert frozen and all(p.numel() == 0 for p in frozen)
    per_block = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in reference.transformer_blocks]
    assert expected == sum(per_block) - 2 * max(per_block)
    g = torch.Generator().manual_seed(5)
    inputs = {
        "hidden_states": torch.randn(1, 2, 4, 8, 12, generator=g),
        "encoder_hidden_states": torch.randn(1, 226, 32, generator=g),
        "timestep": torch.tensor([500]),
        "return_dict": False,
    }
    with torch.no_grad():
        # A fresh LoRA's B matrices are zero: the adapted model computes the base model's function.
        out = transformer(**inputs)[0]
        torch.testing.assert_close(out, reference(**inputs)[0], rtol=1e-5, atol=1e-5)


def test_the_compiled_vae_encoder_traces_the_plain_function(tmp_path: Path, monkeypatch):
    """The graphs ``compile_vae_encoder`` captures compute diffusers' encode, chunking and causal cache included.

    Inductor's own numerics are measured on the GPU (bench/vae_encode.py, BENCHMARKS.md): compiling the tiny
    VAE with it takes minutes on a CPU, so here the captured graphs run eagerly."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiling.use_persistent_compile_cache()
    assert Path(__import__("os").environ["TORCHINDUCTOR_CACHE_DIR"]) == tmp_path / "cogvx" / "torch-compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "chosen"))  # the user's own setting wins
    compiling.use_persistent_compile_cache()
    assert __import__("os").environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "chosen")
    torch._dynamo.reset()
    vae = models.load_vae(models.resolve_model("tiny"), torch.float32)
    g = torch.Generator().manual_seed(2)
    # 17 frames: two chunks, the second reading the causal convolutions' cache
    clips = [torch.rand(1, 3, 17, 32, 48, generator=g) * 2 - 1]
    with torch.no_grad():
        plain = [vae.encode(clip).latent_dist.parameters for clip in clips]
        compiling.compile_vae_encoder(vae, backend="eager")
        compiled = [vae.encode(clip).latent_dist.parameters for clip in clips]
    for got, want in zip(compiled, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert type(vae.encoder).__name__ != "OptimizedModule"  # compiled in place: state-dict keys unchanged
