"""Encoder fingerprints follow what T5 and the VAE compute, not how a config file was written.

The published CogVideoX-2b, -5b and 1.5-5B configs (bench/model-configs/) are spelled as transformers 4
wrote them on the hub (`torch_dtype`) and as transformers 5 writes them (`dtype`, and its own extra
keys), in fp16, bf16 and fp32: the same encoder keeps one fingerprint, and any field that changes the
computation changes it. 2b and 5b share T5 and VAE (they differ only in the VAE's scaling factor,
applied at train time), so a 2b cache passes the training check for 5b.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cogvx.errors import ModelError
from cogvx.pipeline import models
from cogvx.pipeline.compat import check_cache_fits
from cogvx.shards import Manifest
from tests.conftest import ROOT, property_examples

PUBLISHED = {
    name: json.loads((ROOT / "bench" / "model-configs" / f"{name}.json").read_text())
    for name in ("CogVideoX-2b", "CogVideoX-5b", "CogVideoX1.5-5B")
}
STORAGE_DTYPES = ("float16", "bfloat16", "float32")

# What transformers 4.x wrote into THUDM/CogVideoX-*/text_encoder/config.json beside the published fields.
T5_TRANSFORMERS_4_KEYS = {
    "_name_or_path": "google/t5-v1_1-xxl",
    "classifier_dropout": 0.0,
    "decoder_start_token_id": 0,
    "dropout_rate": 0.1,
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "num_decoder_layers": 24,
    "output_past": True,
    "transformers_version": "4.44.2",
    "use_cache": True,
}
# What diffusers wrote into vae/config.json beside the published fields (older files lack the newer keys).
VAE_DIFFUSERS_KEYS = {"_class_name": "AutoencoderKLCogVideoX", "_diffusers_version": "0.30.0.dev0"}
VAE_KEYS_ADDED_LATER = ("latents_mean", "latents_std", "shift_factor", "use_quant_conv", "use_post_quant_conv")

# Fields that change the embeddings or latents, each with another valid value.
T5_COMPUTING_CHANGES = {
    "vocab_size": 32100,
    "d_model": 2048,
    "d_kv": 128,
    "d_ff": 5120,
    "num_layers": 12,
    "num_heads": 32,
    "relative_attention_num_buckets": 64,
    "relative_attention_max_distance": 256,
    "layer_norm_epsilon": 1e-5,
    "feed_forward_proj": "relu",
}
VAE_COMPUTING_CHANGES = {
    "block_out_channels": [128, 256, 512, 512],
    "latent_channels": 32,
    "layers_per_block": 2,
    "norm_num_groups": 16,
    "norm_eps": 1e-5,
    "act_fn": "gelu",
    "temporal_compression_ratio": 8,
    "in_channels": 4,
    "out_channels": 4,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "down_block_types": ["CogVideoXDownBlock3D"] * 3,
}


def t5_transformers_4(config: dict, dtype: str) -> dict:
    return config | T5_TRANSFORMERS_4_KEYS | {"torch_dtype": dtype}


def t5_transformers_5(config: dict, dtype: str, tmp: Path) -> dict:
    """The file transformers 5 (installed here) writes for this config: `dtype`, its own defaults and keys."""
    from transformers import T5Config

    T5Config.from_dict(t5_transformers_4(config, dtype)).save_pretrained(tmp)
    return json.loads((tmp / "config.json").read_text())


def vae_file(config: dict, scaling_factor: float, old_diffusers: bool) -> dict:
    written = config | VAE_DIFFUSERS_KEYS | {"scaling_factor": scaling_factor}
    if old_diffusers:
        written = {k: v for k, v in written.items() if k not in VAE_KEYS_ADDED_LATER}
    return written


def reordered(config: dict, order: list[int]) -> dict:
    keys = list(config)
    return {keys[i]: config[keys[i]] for i in order}


@st.composite
def t5_spellings(draw, tmp_path_factory):
    name = draw(st.sampled_from(sorted(PUBLISHED)))
    dtype = draw(st.sampled_from(STORAGE_DTYPES))
    config = PUBLISHED[name]["text_encoder"]
    if draw(st.booleans()):
        written = t5_transformers_5(config, dtype, tmp_path_factory.mktemp("t5"))
    else:
        written = t5_transformers_4(config, dtype)
    written["architectures"] = draw(st.sampled_from([["T5EncoderModel"], ["T5ForConditionalGeneration"], None]))
    written["_name_or_path"] = draw(st.text(max_size=20))
    return reordered(written, draw(st.permutations(range(len(written)))))


@settings(max_examples=property_examples(12))
@given(data=st.data())
def test_one_t5_encoder_has_one_fingerprint_in_any_spelling(data, tmp_path_factory):
    reference = models.text_encoder_fingerprint(PUBLISHED["CogVideoX-2b"]["text_encoder"])
    written = data.draw(t5_spellings(tmp_path_factory))
    assert models.text_encoder_fingerprint(written) == reference


@settings(max_examples=property_examples(12))
@given(
    name=st.sampled_from(sorted(PUBLISHED)),
    scaling_from=st.sampled_from(sorted(PUBLISHED)),
    old_diffusers=st.booleans(),
    order=st.randoms(use_true_random=False),
)
def test_one_vae_has_one_fingerprint_whatever_its_scaling_factor_and_spelling(name, scaling_from, old_diffusers, order):
    reference = models.vae_fingerprint(PUBLISHED["CogVideoX-2b"]["vae"])
    written = vae_file(PUBLISHED[name]["vae"], PUBLISHED[scaling_from]["vae"]["scaling_factor"], old_diffusers)
    keys = list(written)
    order.shuffle(keys)
    assert models.vae_fingerprint({k: written[k] for k in keys}) == reference


@settings(max_examples=property_examples(12))
@given(field=st.sampled_from(sorted(T5_COMPUTING_CHANGES)), dtype=st.sampled_from(STORAGE_DTYPES))
def test_any_t5_field_that_changes_the_computation_changes_the_fingerprint(field, dtype):
    published = PUBLISHED["CogVideoX-5b"]["text_encoder"]
    changed = t5_transformers_4(published, dtype) | {field: T5_COMPUTING_CHANGES[field]}
    assert changed[field] != published.get(field)
    assert models.text_encoder_fingerprint(changed) != models.text_encoder_fingerprint(published)


@pytest.mark.parametrize("field", sorted(VAE_COMPUTING_CHANGES))
def test_any_vae_field_that_changes_the_computation_changes_the_fingerprint(field):
    published = PUBLISHED["CogVideoX-5b"]["vae"]
    changed = published | {field: VAE_COMPUTING_CHANGES[field]}
    assert changed[field] != published.get(field, models.vae_fields({})[field])
    assert models.vae_fingerprint(changed) != models.vae_fingerprint(published)


def test_a_t5_field_left_out_at_its_default_is_the_same_encoder():
    published = PUBLISHED["CogVideoX-2b"]["text_encoder"]
    # transformers derives these from feed_forward_proj; T5's default distance is 128.
    sparse = {
        k: v
        for k, v in published.items()
        if k not in ("dense_act_fn", "is_gated_act", "relative_attention_max_distance")
    }
    assert models.text_encoder_fingerprint(sparse) == models.text_encoder_fingerprint(published)


def model_folder(root: Path, name: str, dtype: str, spelling: str) -> Path:
    """A diffusers model folder holding only the published configs, spelled as a given library wrote them."""
    config = PUBLISHED[name]
    folder = root / f"{name}-{dtype}-{spelling}"
    for sub in ("transformer", "vae", "text_encoder"):
        (folder / sub).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    (folder / "transformer" / "config.json").write_text(json.dumps(config["transformer"]))
    (folder / "vae" / "config.json").write_text(
        json.dumps(vae_file(config["vae"], config["vae"]["scaling_factor"], False))
    )
    if spelling == "transformers-5":
        text = t5_transformers_5(config["text_encoder"], dtype, root / f"t5-{name}-{dtype}")
    else:
        text = t5_transformers_4(config["text_encoder"], dtype)
    (folder / "text_encoder" / "config.json").write_text(json.dumps(text))
    return folder


def cache_manifest(made_by: models.ModelInfo) -> Manifest:
    """The manifest fields training checks, as preprocess records them."""
    return Manifest(producer={"model": made_by.name, "encoders": made_by.encoder_identity()}, params={}, schema={})


@pytest.mark.parametrize(
    "cache_model, train_model",
    [
        (("CogVideoX-2b", "float16", "transformers-4"), ("CogVideoX-5b", "bfloat16", "transformers-4")),
        (("CogVideoX-2b", "float16", "transformers-4"), ("CogVideoX-5b", "bfloat16", "transformers-5")),
        (("CogVideoX-5b", "bfloat16", "transformers-5"), ("CogVideoX-2b", "float16", "transformers-5")),
        (("CogVideoX-2b", "bfloat16", "transformers-5"), ("CogVideoX1.5-5B", "float32", "transformers-4")),
    ],
)
def test_a_2b_cache_trains_5b_on_the_published_configs(cache_model, train_model, tmp_path: Path):
    made_by = models.ModelInfo.read(str(model_folder(tmp_path, *cache_model)))
    trains = models.ModelInfo.read(str(model_folder(tmp_path, *train_model)))
    assert made_by.encoder_identity() == trains.encoder_identity()
    check_cache_fits(cache_manifest(made_by), trains, tmp_path / "shards")  # does not raise
    # ... while the scaling factor, which training applies from its own model, stays each model's.
    assert trains.scaling_factor == PUBLISHED[train_model[0]]["vae"]["scaling_factor"]


def test_a_cache_from_another_t5_is_refused_by_training(tmp_path: Path):
    made_by = models.ModelInfo.read(str(model_folder(tmp_path, "CogVideoX-2b", "float16", "transformers-4")))
    other = model_folder(tmp_path, "CogVideoX-5b", "bfloat16", "transformers-5")
    text = json.loads((other / "text_encoder" / "config.json").read_text())
    (other / "text_encoder" / "config.json").write_text(json.dumps(text | {"num_layers": 12}))
    with pytest.raises(ModelError, match="text_encoder_fingerprint"):
        check_cache_fits(cache_manifest(made_by), models.ModelInfo.read(str(other)), tmp_path / "shards")


# The fingerprints caches already record for the published models: they may never change.
RECORDED = {"vae_fingerprint": "7d95657d88ce3b7d", "text_encoder_fingerprint": "414133ca345b233b"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_published_models_keep_the_fingerprints_their_caches_record(name, tmp_path: Path):
    info = models.ModelInfo.read(str(model_folder(tmp_path, name, "bfloat16", "transformers-4")))
    assert {key: info.encoder_identity()[key] for key in RECORDED} == RECORDED


def test_the_vae_arguments_are_those_of_the_installed_diffusers_class():
    """The fingerprint fills in defaults from a table, not from diffusers' class (importing it takes seconds)."""
    import inspect

    from diffusers import AutoencoderKLCogVideoX

    arguments = inspect.signature(AutoencoderKLCogVideoX.__init__).parameters
    assert {name: arg.default for name, arg in arguments.items() if name != "self"} == models.VAE_ARGUMENTS


def test_reading_a_model_imports_no_diffusers_model(tmp_path: Path):
    """``ModelInfo.read`` runs before any work of a preprocess run starts: configs only, no model classes."""
    import subprocess
    import sys

    folder = model_folder(tmp_path, "CogVideoX-2b", "bfloat16", "transformers-4")
    code = f"import sys; from cogvx.pipeline import models; models.ModelInfo.read({str(folder)!r}); print(*sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not [name for name in loaded if name.split(".")[0] in ("diffusers", "peft", "sklearn")]
