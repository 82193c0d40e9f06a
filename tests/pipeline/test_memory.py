"""The memory model behind ``--checkpointing auto``: its shape, and that it picks what fits.

How close its numbers are to real peaks is measured on a GPU (BENCHMARKS.md section 6), not here.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cogvx.pipeline import memory
from cogvx.pipeline.speed.checkpointing import MODES
from tests.conftest import ROOT

CONFIGS = ROOT / "bench" / "model-configs"
MODELS = {name: json.loads((CONFIGS / f"{name}.json").read_text())["transformer"] for name in
          ("CogVideoX-2b", "CogVideoX-5b", "CogVideoX1.5-5B")}  # fmt: skip


def test_step_size_counts_tokens_as_the_transformer_does():
    two_b = memory.StepSize.of(MODELS["CogVideoX-2b"], 13, 60, 90, batch=1)
    assert (two_b.layers, two_b.hidden, two_b.tokens) == (30, 1920, 13 * 30 * 45 + 226)
    # CogVideoX 1.5 patches time in pairs: an odd latent frame count is padded up.
    one_five = memory.StepSize.of(MODELS["CogVideoX1.5-5B"], 21, 96, 170, batch=2)
    assert one_five.tokens == 11 * 48 * 85 + MODELS["CogVideoX1.5-5B"]["max_text_seq_length"]
    assert one_five.unit == 2 * one_five.tokens * one_five.hidden * 2


@given(
    model=st.sampled_from(sorted(MODELS)),
    frames=st.integers(1, 21),
    height=st.integers(2, 100).map(lambda v: v * 2),
    width=st.integers(2, 100).map(lambda v: v * 2),
    batch=st.integers(1, 4),
    static=st.integers(0, 40 * 10**9),
    compiled=st.booleans(),
)
def test_modes_that_keep_less_need_less(model, frames, height, width, batch, static, compiled):
    size = memory.StepSize.of(MODELS[model], frames, height, width, batch)
    peaks = memory.predict(static, size, compiled)
    assert list(peaks) == list(MODES)
    assert peaks["none"] > peaks["selective"] > peaks["full"] > peaks["offload"] > static


@given(budget_gb=st.floats(0.5, 200), compiled=st.booleans())
def test_auto_takes_the_fastest_mode_that_fits(budget_gb, compiled):
    size = memory.StepSize.of(MODELS["CogVideoX-5b"], 13, 60, 90, batch=1)
    peaks = memory.predict(11 * 10**9, size, compiled)
    budget = int(budget_gb * 1e9)
    chosen = memory.choose(peaks, budget)
    fitting = [m for m in MODES if peaks[m] * (1 + memory.SAFETY) <= budget]
    assert chosen == (fitting[0] if fitting else None)


def test_the_default_recipe_the_benchmarks_measured():
    # Static bytes of the runs in bench/results/train_step_auto_h200.json (2 x base + 16 x LoRA parameters).
    two_b = memory.StepSize.of(MODELS["CogVideoX-2b"], 13, 60, 90, batch=1)
    five_b = memory.StepSize.of(MODELS["CogVideoX-5b"], 13, 60, 90, batch=1)
    on_80gb = 80 * 10**9
    assert memory.choose(memory.predict(2 * 1634801472 + 16 * 58982400, two_b, True), on_80gb) == "none"
    assert memory.choose(memory.predict(2 * 5438162496 + 16 * 132120576, five_b, True), on_80gb) == "selective"
    assert memory.choose(memory.predict(2 * 5438162496 + 16 * 132120576, five_b, True), 12 * 10**9) is None


def test_static_bytes_counts_weights_gradients_and_two_moments():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    frozen = 20 * 2  # bf16 weights and bias
    trainable = 10 * 4  # fp32
    assert memory.static_bytes(model) == frozen + trainable * 3 + trainable


def test_expandable_segments_are_set_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    memory.use_expandable_segments()
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    memory.use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
