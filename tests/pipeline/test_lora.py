"""LoRA adapters: what add_lora builds, the state that checkpoints carry, the file diffusers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cogvx import runs
from cogvx.errors import ConfigError, ModelError
from cogvx.pipeline.lora import DEFAULT_TARGETS, add_lora, load_lora_state, lora_state_dict, save_lora

# A one-block CogVideoX transformer, built in memory in well under a second.
TRANSFORMER = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 16,
    "text_embed_dim": 32,
    "num_layers": 1,
    "sample_height": 8,
    "sample_width": 12,
    "patch_size": 2,
    "max_text_seq_length": 226,
}
ATTENTION = "transformer_blocks.0.attn1"


def transformer(dtype: torch.dtype = torch.float32):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(2)
    return CogVideoXTransformer3DModel(**TRANSFORMER).to(dtype).eval()


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 2, 4, 4, 6, generator=g),
        "encoder_hidden_states": torch.randn(1, 226, 32, generator=g),
        "timestep": torch.tensor([500]),
        "return_dict": False,
    }


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-zero LoRA weights, as after training (B starts at zero, so a fresh adapter changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_add_lora_freezes_the_base_and_returns_fp32_adapters_of_the_given_rank_alpha_and_dropout():
    model = transformer(torch.bfloat16)
    params = add_lora(model, rank=4, alpha=12, targets=("to_q", "to_v"), dropout=0.25)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {f"{ATTENTION}.{m}.lora_{ab}.default.weight" for m in ("to_q", "to_v") for ab in "AB"}
    assert trainable == expected
    assert {id(p) for p in params} == {id(p) for name, p in model.named_parameters() if name in expected}
    assert all(p.dtype == torch.float32 for p in params)  # fp32 master weights ...
    frozen = [p for name, p in model.named_parameters() if name not in expected]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # ... over the base left as it was

    for name in ("to_q", "to_v"):
        layer = model.get_submodule(f"{ATTENTION}.{name}")
        assert layer.lora_A["default"].weight.shape == (4, layer.in_features)
        assert layer.lora_B["default"].weight.shape == (layer.out_features, 4)
        assert layer.scaling["default"] == 12 / 4
        assert layer.lora_dropout["default"].p == 0.25
    assert not hasattr(model.get_submodule(f"{ATTENTION}.to_k"), "lora_A")


def test_a_fresh_adapter_leaves_the_model_unchanged():
    """B starts at zero and A does not, as diffusers' script initialises them: step 0 is the base model."""
    base = transformer()
    with torch.no_grad():
        expected = base(**inputs())[0]
    params = add_lora(base, rank=4, alpha=8, targets=DEFAULT_TARGETS, dropout=0.0)
    lora_b = [p for name, p in base.named_parameters() if "lora_B" in name]
    lora_a = [p for name, p in base.named_parameters() if "lora_A" in name]
    assert len(params) == 2 * len(lora_a) == 2 * 4  # to_q, to_k, to_v, to_out.0: the default targets
    assert all(not p.any() for p in lora_b) and all(p.abs().sum() > 0 for p in lora_a)
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs())[0], expected, rtol=0, atol=0)


def test_a_target_that_matches_nothing_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="to_qq"):
        add_lora(transformer(), rank=4, alpha=4, targets=("to_qq",), dropout=0.0)


def test_lora_state_round_trips_into_a_fresh_adapter():
    trained = transformer()
    add_lora(trained, rank=4, alpha=12, targets=("to_q", "to_v"), dropout=0.0)
    randomise(trained, seed=1)
    state = lora_state_dict(trained)

    expected = {f"{ATTENTION}.{m}.lora_{ab}.weight" for m in ("to_q", "to_v") for ab in "AB"}
    assert set(state) == expected
    for key, tensor in state.items():
        assert tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.requires_grad
        torch.testing.assert_close(tensor, trained.get_parameter(key.replace(".weight", ".default.weight")))

    fresh = transformer()
    add_lora(fresh, rank=4, alpha=12, targets=("to_q", "to_v"), dropout=0.0)
    load_lora_state(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs())[0], trained(**inputs())[0], rtol=0, atol=0)


def test_lora_state_for_other_modules_is_refused_naming_the_first_three_keys():
    trained = transformer()
    add_lora(trained, rank=4, alpha=4, targets=DEFAULT_TARGETS, dropout=0.0)  # to_q, to_k, to_v, to_out.0
    narrower = transformer()
    add_lora(narrower, rank=4, alpha=4, targets=("to_q",), dropout=0.0)
    extra = [f"{ATTENTION}.{m}.lora_{ab}.weight" for m in ("to_k", "to_v", "to_out.0") for ab in "AB"]
    with pytest.raises(ModelError) as error:
        load_lora_state(narrower, lora_state_dict(trained))
    assert str(error.value) == f"LoRA weights do not fit this transformer: {extra[:3]} ..."


def test_saved_weights_carry_rank_and_alpha_and_load_in_diffusers_at_the_trained_scale(tmp_path: Path):
    from diffusers import CogVideoXPipeline

    trained = transformer()
    add_lora(trained, rank=4, alpha=12, targets=("to_q", "to_v"), dropout=0.0)
    randomise(trained, seed=1)
    path = save_lora(trained, tmp_path)

    assert path == runs.lora_weights(tmp_path) == tmp_path / "pytorch_lora_weights.safetensors" and path.is_file()
    with safe_open(str(path), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = set(f.keys())
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 12
    assert sorted(metadata["transformer.target_modules"]) == ["to_q", "to_v"]
    assert keys == {f"transformer.{k}" for k in lora_state_dict(trained)}

    # What CogVideoXPipeline.load_lora_weights does: read the file and its metadata, load into the transformer.
    state, adapter = CogVideoXPipeline.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    loaded = transformer()
    CogVideoXPipeline.load_lora_into_transformer(state, transformer=loaded, metadata=adapter)
    with torch.no_grad():
        base = transformer()(**inputs())[0]
        reference = trained(**inputs())[0]
        assert (reference - base).abs().max() > 1e-2  # the LoRA matters, so the scale is seen
        torch.testing.assert_close(loaded(**inputs())[0], reference, rtol=1e-6, atol=1e-6)
