"""Attention replay (``pipeline/speed/replay.py``): ``offload`` and ``swap`` recompute each block without running
FlashAttention-3's forward a second time, and compute exactly what they computed without replay.

FA3 is played by ``tests/helpers/flash.py``'s stand-in (SDPA in FA3's layout, its calls counted). Without replay,
``offload`` is ``full`` with the block inputs on the host: ``full`` (which never replays) is the reference. On a
CPU everything runs eagerly and deterministically, and a replayed output is the forward pass's own bytes, so the
losses and the LoRA gradients must be equal bit for bit (tolerance zero).
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cogvx import runs
from cogvx.pipeline import levers, lora, models
from cogvx.pipeline.objective import Objective
from cogvx.pipeline.speed import attention
from tests.conftest import property_examples
from tests.helpers.commands import cli
from tests.helpers.flash import StandIn, install_stand_in


@pytest.fixture
def stand_in(monkeypatch) -> StandIn:
    return install_stand_in(monkeypatch)


def _model(mode: str, kernel: str, stand_in: StandIn, layers: int = 2, auto_fa3: bool = False) -> torch.nn.Module:
    """The tiny transformer with ``layers`` blocks, LoRA adapters (non-zero B), in bf16, ``mode`` (``+compile``:
    its runner compiled) installed and
    ``kernel`` (an ``--attention`` setting) with the stand-in as FA3; ``auto``, whatever the clock says, chooses
    SDPA for every shape, or (``auto_fa3``) FA3 for training and SDPA without gradients."""
    from diffusers import CogVideoXTransformer3DModel

    source = models.resolve_model("tiny")
    config = dict(CogVideoXTransformer3DModel.load_config(source, subfolder="transformer"), num_layers=layers)
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel.from_config(config)
    lora.add_lora(transformer, 4, 8, lora.DEFAULT_TARGETS, 0.0)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    transformer.to(torch.bfloat16)
    mode, compiled = mode.removesuffix("+compile"), mode.endswith("+compile")
    levers.prepare(transformer, levers.Levers(mode, compile=compiled, fp8_base=False, attention="sdpa"), "cpu")
    kernels = attention.Attention(kernel, flash=stand_in.flash_attn_func)
    if kernel == attention.AUTO:
        pick = {True: attention.FA3 if auto_fa3 else attention.SDPA, False: attention.SDPA}
        kernels.measure = lambda key, device: kernels.chosen.setdefault(key, pick[key[2]])
    attention.install(transformer, kernels)
    return transformer


def _loss(transformer: torch.nn.Module, frames: int = 4, size: tuple[int, int] = (8, 12), seed: int = 3):
    """The objective's loss on fixed inputs of ``frames`` latent frames of ``size``."""
    source = models.resolve_model("tiny")
    objective = Objective(transformer.config, models.load_scheduler(source).alphas_cumprod, 0.7)
    g = torch.Generator().manual_seed(seed)
    moments, embeds = torch.randn(1, 8, frames, *size, generator=g), torch.randn(1, 226, 32, generator=g)
    return objective(transformer, moments, embeds, torch.Generator().manual_seed(1), torch.bfloat16)


def _grads(transformer: torch.nn.Module) -> torch.Tensor:
    """The LoRA gradients, concatenated; cleared for the next backward."""
    params = [p for p in transformer.parameters() if p.requires_grad]
    grads = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return grads


def _step(transformer: torch.nn.Module, frames: int = 4, size: tuple[int, int] = (8, 12), seed: int = 3):
    """One step's loss and LoRA gradients."""
    loss = _loss(transformer, frames, size, seed)
    loss.backward()
    return loss.detach(), _grads(transformer)


def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@settings(max_examples=property_examples(3), deadline=None)
@given(layers=st.integers(1, 3), frames=st.sampled_from([2, 4]), size=st.sampled_from([(8, 12), (6, 8)]))
def test_replay_computes_what_the_recompute_computed_with_one_fa3_forward_per_block(
    stand_in: StandIn, layers: int, frames: int, size: tuple[int, int]
):
    """``offload`` and ``swap`` with FA3: the loss and LoRA gradients of ``full`` bit for bit (two steps: the
    second finds the host buffers of the first), FA3's forward once per block and step instead of twice."""
    reference = _model("full", attention.FA3, stand_in, layers)
    before = stand_in.calls
    want = _step(reference, frames, size)
    assert stand_in.calls - before == 2 * layers  # forward pass, then the recompute
    for mode in ("offload", "swap"):
        transformer = _model(mode, attention.FA3, stand_in, layers)
        for _ in range(2):
            before = stand_in.calls
            assert _same(_step(transformer, frames, size), want), mode
            assert stand_in.calls - before == layers, mode
        kept = attention.installed(transformer).replay
        assert not kept.entries  # every stored product was consumed
        assert kept.recorded() == {"active": True, "host_bytes": kept.host_bytes(), "pinned": False}
        config = transformer.config
        tokens = 226 + frames * (size[0] // config.patch_size) * (size[1] // config.patch_size)
        out_bytes = -(-tokens * config.num_attention_heads * config.attention_head_dim * 2 // 64) * 64  # bf16
        assert kept.host_bytes() == layers * (out_bytes + tokens * config.num_attention_heads * 4)  # fp32 lse


@pytest.mark.parametrize("mode", ["offload", "swap"])
def test_with_sdpa_nothing_is_kept_and_the_mode_computes_as_before(stand_in: StandIn, mode: str):
    """``auto`` choosing SDPA (or ``sdpa``): no FA3 forward, nothing stored, the numbers of ``full``."""
    for kernel in (attention.AUTO, attention.SDPA):
        want = _step(_model("full", kernel, stand_in))
        transformer = _model(mode, kernel, stand_in)
        before = stand_in.calls
        assert _same(_step(transformer), want)
        assert stand_in.calls == before
        kept = attention.installed(transformer).replay
        assert kept.recorded() == {"active": False, "host_bytes": 0, "pinned": False}


@pytest.mark.parametrize("mode", ["offload", "swap"])
def test_auto_runs_the_training_kernel_in_the_forward_pass_without_gradients(stand_in: StandIn, mode: str):
    """``auto`` choosing FA3 for training and SDPA for forwards without gradients: the offloaded forward pass
    (without gradients) runs FA3 like its recompute, which replays it; validation's forwards run SDPA."""
    want = _step(_model("full", attention.AUTO, stand_in, auto_fa3=True))
    transformer = _model(mode, attention.AUTO, stand_in, auto_fa3=True)
    before = stand_in.calls
    assert _same(_step(transformer), want)
    assert stand_in.calls - before == 2  # one per block
    kernels = attention.installed(transformer)
    assert kernels.replay.recorded()["active"] and {grad for _, _, grad in kernels.chosen} == {True}
    with torch.no_grad():
        _loss(transformer)
    assert stand_in.calls - before == 2 and set(kernels.chosen.values()) == {attention.FA3, attention.SDPA}


@pytest.mark.parametrize("mode", ["offload", "swap"])
def test_a_compiled_block_replays_too(stand_in: StandIn, mode: str, monkeypatch):
    """FA3's op runs its body eagerly inside the compiled block (Dynamo traces only its fake), so the compiled
    runner replays as the eager one does: one FA3 forward per block and step, no graph break, and the eager
    numbers bit for bit (the captured graphs run eagerly: ``aot_eager``)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    want = _step(_model(mode, attention.AUTO, stand_in, auto_fa3=True))
    transformer = _model(f"{mode}+compile", attention.AUTO, stand_in, auto_fa3=True)
    for _ in range(2):
        before = stand_in.calls
        loss, grads = _step(transformer)
        assert stand_in.calls - before == 2  # one per block
        assert torch.equal(loss, want[0]), (loss, want[0])
        assert torch.equal(grads, want[1]), (grads - want[1]).abs().max()
    assert not torch._dynamo.utils.counters["graph_break"]
    assert attention.installed(transformer).replay.recorded()["active"]


def test_a_recompute_never_replays_another_forward(stand_in: StandIn):
    """A stored product is replayed only in the recompute of the forward pass that stored it: a new shape, a
    forward that raised halfway, or a newer forward before an older graph's backward all compute correctly."""
    reference = _model("full", attention.FA3, stand_in, layers=3)
    want_small, want_large = _step(reference, 2, (6, 8)), _step(reference, 4, (8, 12))
    want_other = _step(reference, 4, (8, 12), seed=5)
    transformer = _model("offload", attention.FA3, stand_in, layers=3)
    assert _same(_step(transformer, 4, (8, 12)), want_large)
    assert _same(_step(transformer, 2, (6, 8)), want_small)  # other shapes: replayed from the right forward

    # A forward that raises in the second block: the first block's stored product is never replayed.
    block = transformer.transformer_blocks[1]
    handle = block.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("halfway")))
    with pytest.raises(RuntimeError, match="halfway"):
        _step(transformer, 4, (8, 12), seed=5)
    handle.remove()
    assert _same(_step(transformer, 4, (8, 12)), want_large)

    # Two forwards, then the older graph's backward: its blocks' products were replaced, so it computes.
    older, newer = _loss(transformer), _loss(transformer, seed=5)
    before = stand_in.calls
    older.backward()
    assert stand_in.calls - before == 3  # every block ran FA3's forward again
    assert _same((older.detach(), _grads(transformer)), want_large)
    before = stand_in.calls
    newer.backward()
    assert stand_in.calls == before  # the newer graph's products were kept for it
    assert _same((newer.detach(), _grads(transformer)), want_other)


def test_forwards_outside_the_offloaded_runner_keep_nothing(stand_in: StandIn):
    """Validation sampling and the eval score (forwards without gradients, outside the runner) store nothing."""
    transformer = _model("swap", attention.FA3, stand_in)
    before = stand_in.calls
    with torch.no_grad():
        _loss(transformer)
    kept = attention.installed(transformer).replay
    assert stand_in.calls - before == 2 and not kept.entries and kept.host_bytes() == 0


def test_the_run_folder_records_replay(tiny_cache, tmp_path):
    """Through the CLI: config.json's attention record says whether replay ran and the host memory it holds.
    FA3 runs only on a Hopper GPU (``Attention.for_device``), so on a CPU it records replay off and no bytes."""
    result = cli(
        "train", "--shards", str(tiny_cache), "--output", str(tmp_path / "run"), "--max-steps", "2",
        "--rank", "4", "--workers", "0", "--checkpoint-every", "0", "--checkpointing", "offload",
    )  # fmt: skip
    assert result.code == 0, result.stdout[-2000:]
    config = runs.read_config(tmp_path / "run")
    recorded = config[runs.ATTENTION_KERNELS]
    assert config["checkpointing"] == "offload" and recorded["fa3"].startswith("absent")
    assert recorded["replay"] == {"active": False, "host_bytes": 0, "pinned": False}


def test_a_training_run_with_fa3_replays_and_records_it(stand_in: StandIn, tiny_cache, tmp_path, monkeypatch):
    """The whole wiring, through the CLI: ``--checkpointing offload --attention fa3`` runs FA3's forward once per
    block and step, and config.json says replay ran and what it holds. FA3 runs only on a Hopper GPU, so this
    test alone lets the stand-in pass for one on the CPU."""
    monkeypatch.setattr(attention, "_hopper", lambda device: True)
    before = stand_in.calls
    result = cli(
        "train", "--shards", str(tiny_cache), "--output", str(tmp_path / "run"), "--max-steps", "2",
        "--rank", "4", "--workers", "0", "--checkpoint-every", "0", "--checkpointing", "offload",
        "--attention", "fa3",
    )  # fmt: skip
    assert result.code == 0, result.stdout[-2000:]
    recorded = runs.read_config(tmp_path / "run")[runs.ATTENTION_KERNELS]
    assert recorded["setting"] == "fa3" and recorded["replay"]["active"] and recorded["replay"]["host_bytes"] > 0
    assert stand_in.calls - before == 2 * 2  # 2 steps, 2 blocks, once each
