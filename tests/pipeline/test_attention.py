"""The attention kernel lever (``pipeline/speed/attention.py``): SDPA exactly as diffusers calls it, FlashAttention-3
wired in the right layout, refused in one line where it cannot run, and the setting reaching the model.

No FlashAttention-3 build runs on a CPU: where a test needs one, ``tests/helpers/flash.py``'s ``StandIn`` plays
``flash_attn_interface`` (SDPA in FA3's layout: a layout and wiring test, not one of FA3's kernels).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cogvx import config as configfile
from cogvx import runs
from cogvx.errors import ConfigError
from cogvx.pipeline import levers, models
from cogvx.pipeline.objective import Objective
from cogvx.pipeline.speed import attention
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train
from tests.helpers.commands import cli
from tests.helpers.flash import FA3_INSTALLED, StandIn, install_stand_in

needs_no_fa3 = pytest.mark.skipif(FA3_INSTALLED, reason="FlashAttention-3 is installed here: nothing to refuse")


@pytest.fixture
def stand_in(monkeypatch) -> StandIn:
    return install_stand_in(monkeypatch)


def _tiny(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    transformer = models.load_transformer(models.resolve_model("tiny"), dtype)
    transformer.requires_grad_(True)
    return transformer


def _loss(transformer: torch.nn.Module, bf16: bool = False) -> torch.Tensor:
    """The objective's loss on fixed inputs."""
    source = models.resolve_model("tiny")
    objective = Objective(transformer.config, models.load_scheduler(source).alphas_cumprod, 0.7)
    g = torch.Generator().manual_seed(3)
    moments, embeds = torch.randn(1, 8, 4, 8, 12, generator=g), torch.randn(1, 226, 32, generator=g)
    dtype = torch.bfloat16 if bf16 else torch.float32
    return objective(transformer, moments, embeds, torch.Generator().manual_seed(1), dtype)


def _loss_and_grads(transformer: torch.nn.Module, bf16: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss and the gradient of every parameter."""
    for p in transformer.parameters():
        p.grad = None
    loss = _loss(transformer, bf16)
    loss.backward()
    return loss.detach(), [p.grad for p in transformer.parameters()]


def _close(a, b, exact_loss: bool = False) -> bool:
    """Same loss (exactly, or to 1e-3) and the same gradients to bf16 rounding."""
    if not (torch.equal(a[0], b[0]) if exact_loss else torch.allclose(a[0], b[0], rtol=1e-3)):
        return False
    return all(
        (x is None) == (y is None) and (x is None or torch.allclose(x.float(), y.float(), rtol=1e-2, atol=1e-3))
        for x, y in zip(a[1], b[1], strict=True)
    )


def _same(a, b) -> bool:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    return torch.equal(loss_a, loss_b) and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b, strict=True))


@pytest.mark.parametrize("setting", ["sdpa", "auto"])
def test_the_sdpa_path_is_diffusers_attention_bit_for_bit(setting: str):
    """Our processor (``auto`` without FA3 is SDPA too) gives diffusers' loss and every gradient, bit for bit."""
    reference = _loss_and_grads(_tiny())
    transformer = _tiny()
    levers.prepare(transformer, levers.Levers("none", compile=False, fp8_base=False, attention=setting), "cpu")
    assert isinstance(transformer.transformer_blocks[0].attn1.processor, attention.CogVideoXProcessor)
    assert _same(_loss_and_grads(transformer), reference)


def test_fa3_gets_its_layout_and_its_forward_is_kept_by_selective_checkpointing(stand_in: StandIn):
    """Through the stand-in (SDPA computed in FA3's layout) the model computes SDPA's numbers exactly, so q, k, v
    and the output are transposed right; ``selective`` keeps FA3's forward output, ``full`` recomputes it."""
    reference = _loss_and_grads(_tiny(torch.bfloat16), bf16=True)
    for mode, forwards in (("selective", 2), ("full", 4)):  # 2 blocks; the recompute runs each block again
        transformer = _tiny(torch.bfloat16)
        levers.prepare(transformer, levers.Levers(mode, compile=False, fp8_base=False, attention="sdpa"), "cpu")
        attention.install(transformer, attention.Attention(attention.FA3, flash=stand_in.flash_attn_func))
        before = stand_in.calls
        # The forward is SDPA's exactly; the stand-in's backward is softmax attention's in closed form (fp32 from
        # the log-sum-exp, as FA3's), so the gradients agree to bf16 rounding, not bit for bit.
        assert _close(_loss_and_grads(transformer, bf16=True), reference, exact_loss=True), mode
        assert stand_in.calls - before == forwards, mode


def test_auto_times_both_kernels_once_per_shape_without_touching_the_run(stand_in: StandIn):
    """``auto`` measures each (shape, dtype, gradients) once, on inputs of its own generator (the global random
    stream stays where it was), keeps a kernel for it and records what it chose."""
    kernels = attention.Attention(attention.AUTO, flash=stand_in.flash_attn_func)
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.bfloat16) for _ in range(3))
    state = torch.get_rng_state()
    with torch.no_grad():
        out = kernels(q, k, v)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    key = ((1, 2, 40, 16), torch.bfloat16, False)
    assert kernels.chosen[key] in (attention.SDPA, attention.FA3) and set(kernels.timings[key]) == {"sdpa", "fa3"}
    calls = stand_in.calls
    with torch.no_grad():
        kernels(q, k, v)
    assert stand_in.calls - calls == (kernels.chosen[key] == attention.FA3)  # no second measurement
    assert kernels.recorded()["chosen"]["1x2x40x16 bfloat16 no-grad"]["kernel"] == kernels.chosen[key]
    q, k, v = q.float(), k.float(), v.float()  # fp32: FA3 has no kernel, SDPA runs unmeasured
    assert torch.equal(kernels(q, k, v), F.scaled_dot_product_attention(q, k, v)) and len(kernels.chosen) == 1


def test_fp8_attention_runs_only_forwards_without_gradients(stand_in: StandIn):
    """``--fp8-attention``: a no-grad forward (validation, the eval score) runs the float8 kernel, within a few
    percent of bf16 (per-head scaling); a training step's forward and backward stay bf16."""
    reference = _loss_and_grads(_tiny(torch.bfloat16), bf16=True)
    transformer = _tiny(torch.bfloat16)
    levers.prepare(transformer, levers.Levers("selective", compile=False, fp8_base=False, attention="sdpa"), "cpu")
    attention.install(transformer, attention.Attention(attention.FA3, True, flash=stand_in.flash_attn_func))
    # The training step runs the bf16 kernel (its gradients the stand-in's closed form: bf16 rounding apart).
    assert _close(_loss_and_grads(transformer, bf16=True), reference, exact_loss=True) and stand_in.float8_calls == 0
    with torch.no_grad():
        fp8_loss = _loss(transformer, bf16=True)
    assert stand_in.float8_calls == 2  # one per block
    assert fp8_loss.item() == pytest.approx(reference[0].item(), rel=0.05)


def test_a_compiled_block_with_fa3_is_the_eager_one_without_graph_breaks(stand_in: StandIn, monkeypatch):
    """``auto`` chooses before the compiled block runs (``primed``), so Dynamo traces FA3's custom op in one graph
    per block runner, and the captured graphs compute the eager numbers (run eagerly: ``aot_eager``)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))

    def run(compile: bool):
        transformer = _tiny(torch.bfloat16)
        levers.prepare(transformer, levers.Levers("selective", compile=compile, fp8_base=False), "cpu")
        kernels = attention.Attention(attention.AUTO, flash=stand_in.flash_attn_func)
        kernels.measure = lambda key, device: kernels.chosen.setdefault(key, attention.FA3)  # FA3, whatever the clock
        attention.install(transformer, kernels)
        calls = stand_in.calls
        result = _loss_and_grads(transformer, bf16=True)
        assert stand_in.calls > calls  # FA3 ran
        return result

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run(compile=True)
    assert not torch._dynamo.utils.counters["graph_break"]
    eager = run(compile=False)
    assert torch.allclose(compiled[0], eager[0], rtol=1e-3)
    for got, want in zip(compiled[1], eager[1], strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-3)


def test_fa3_off_hopper_is_refused_or_left_out(stand_in: StandIn):
    """Installed but on a CPU (or a GPU other than Hopper): ``fa3`` and ``--fp8-attention`` are refused in one line
    naming the flag, ``auto`` runs SDPA and says why."""
    with pytest.raises(ConfigError, match=r"^--attention fa3 needs a Hopper GPU .*use --attention auto"):
        attention.Attention.for_device(attention.FA3, False, "cpu")
    with pytest.raises(ConfigError, match=r"^--fp8-attention needs a Hopper GPU"):
        attention.Attention.for_device(attention.AUTO, True, "cpu")
    chosen = attention.Attention.for_device(attention.AUTO, False, "cpu")
    assert chosen.flash is None and chosen.recorded()["fa3"] == "installed, not used: not a Hopper GPU"


@needs_no_fa3
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--attention", "fa3"], r"--attention fa3 needs FlashAttention-3 .*bench/fa3_build\.sh"),
        (["--fp8-attention"], r"--fp8-attention needs FlashAttention-3 .*bench/fa3_build\.sh"),
        (["--attention", "sometimes"], r"--attention must be one of auto, sdpa, fa3"),
        (["--attention", "sdpa", "--fp8-attention"], r"--fp8-attention runs FlashAttention-3"),
    ],
)
def test_the_cli_refuses_fa3_where_it_cannot_run_in_one_line(flags: list[str], message: str, tiny_cache, tmp_path):
    result = cli("train", "--shards", str(tiny_cache), "--output", str(tmp_path / "run"), *flags)
    assert re.search(message, result.error_line())
    assert not (tmp_path / "run").exists()  # refused before any work


def test_the_attention_setting_of_a_config_file_reaches_the_model(tiny_cache: Path, tmp_path: Path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'shards = "{tiny_cache}"\nattention = "sdpa"\n')
    cfg = configfile.build(
        TrainConfig, toml, output=tmp_path / "run", max_steps=1, rank=4, workers=0, checkpoint_every=0
    )
    assert cfg.attention == "sdpa"
    used = attention.installed(train(cfg).model)
    assert used is not None and used.setting == "sdpa"
    recorded = runs.read_config(tmp_path / "run")[runs.ATTENTION_KERNELS]
    assert recorded["setting"] == "sdpa" and recorded["fa3"] == "not asked for"


def test_the_eval_score_never_runs_float8_attention(stand_in: StandIn):
    """``--fp8-attention`` speeds up validation sampling only: the held-out score's forwards run the bf16 kernel,
    so runs with and without it score alike; after scoring, validation's forwards are float8 again."""
    from cogvx.train import evaluation

    reference = _loss(_tiny(torch.bfloat16), bf16=True).detach()
    transformer = _tiny(torch.bfloat16)
    levers.prepare(transformer, levers.Levers("selective", compile=False, fp8_base=False, attention="sdpa"), "cpu")
    attention.install(transformer, attention.Attention(attention.FA3, True, flash=stand_in.flash_attn_func))
    with evaluation.scoring(transformer):
        scored = _loss(transformer, bf16=True)
    assert stand_in.float8_calls == 0 and torch.equal(scored, reference)
    with torch.no_grad():
        _loss(transformer, bf16=True)
    assert stand_in.float8_calls == 2  # one per block


def test_fp8_attention_without_validation_is_refused_not_ignored(stand_in: StandIn, tiny_cache, tmp_path):
    """FlashAttention-3 importable (the stand-in): ``--fp8-attention`` on a run that samples no validation videos
    would change nothing, so the CLI refuses it in one line; with ``--validation-every`` it gets past the config."""
    result = cli("train", "--shards", str(tiny_cache), "--output", str(tmp_path / "run"), "--fp8-attention")
    assert "--fp8-attention samples the validation videos" in result.error_line()
    assert "--validation-every N" in result.error_line()
    assert not (tmp_path / "run").exists()
    cfg = configfile.build(
        TrainConfig, None, shards=tiny_cache, output=tmp_path / "run", fp8_attention=True, validation_every=5
    )
    assert cfg.fp8_attention
