"""Built-in tiny CogVideoX models with random weights, for tests and the CPU quick start.

Each variant is written once as a real diffusers model folder (model_index.json plus transformer/,
vae/, text_encoder/, tokenizer/, scheduler/) and then loaded like any downloaded model. Weights come
from fixed seeds, so every machine builds the same model.

- ``tiny``: rotary position embeddings and the 5b scheduler/VAE scaling, like CogVideoX-5b.
- ``tiny-2b``: sin-cos position embeddings and the 2b scaling, like CogVideoX-2b. Its VAE and text
  encoder are identical to ``tiny``'s, as the real 2b and 5b share theirs, so one cache serves both.
- ``tiny-i2v``: image-to-video like CogVideoX-5b-I2V: twice the latent channels in (noisy video plus
  image latents), learned position embeddings beside rotary ones, a ``CogVideoXImageToVideoPipeline``.
- ``tiny-1.5-i2v``: image-to-video like CogVideoX1.5-5B-I2V: two latent frames per token
  (``patch_size_t`` 2), no patch-embedding bias, the ``ofs`` embedding, and a VAE whose config says
  ``invert_scale_latents`` (how the 1.5 I2V pipeline scales image latents).

Every variant shares one VAE and text encoder (the scaling factor and ``invert_scale_latents`` only say
how latents are used), so one cache serves them all, as one cache serves the real 2b, 5b and 5b-I2V.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from cogvx import files

# Bump when the construction below changes, so stale folders are rebuilt.
BUILD_VERSION = 1

REQUIRED_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)

_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}

TINY_LATENT_CHANNELS = 4
TINY_TIME_EMBED_DIM = 16

VARIANTS = {
    "tiny": {"rotary": True, "scaling_factor": 0.7, "snr_shift_scale": 1.0},
    "tiny-2b": {"rotary": False, "scaling_factor": 1.15258426, "snr_shift_scale": 3.0},
    # As CogVideoX-5b-I2V's transformer config: in_channels 2x the latent channels, learned position
    # embeddings (added to the tokens) beside the rotary ones.
    "tiny-i2v": {
        "rotary": True,
        "scaling_factor": 0.7,
        "snr_shift_scale": 1.0,
        "transformer": {"in_channels": 2 * TINY_LATENT_CHANNELS, "use_learned_positional_embeddings": True},
        "pipeline": "CogVideoXImageToVideoPipeline",
    },
    # As CogVideoX1.5-5B-I2V: temporal patches of 2, no patch bias, the ofs embedding (its width is the
    # time embedding's: the two are added), no learned position embeddings, 81 sample frames.
    "tiny-1.5-i2v": {
        "rotary": True,
        "scaling_factor": 0.7,
        "snr_shift_scale": 1.0,
        "transformer": {
            "in_channels": 2 * TINY_LATENT_CHANNELS,
            "patch_size_t": 2,
            "patch_bias": False,
            "ofs_embed_dim": TINY_TIME_EMBED_DIM,
            "use_learned_positional_embeddings": False,
            "sample_frames": 81,
        },
        "vae": {"invert_scale_latents": True},
        "pipeline": "CogVideoXImageToVideoPipeline",
    },
}

TEXT_DIM = 32

# A small closed vocabulary is enough: captions only need to map to stable token ids.
_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "with",
    "in",
    "on",
    "over",
    "under",
    "from",
    "to",
    "across",
    "left",
    "right",
    "up",
    "down",
    "slides",
    "moves",
    "bounces",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "orange",
    "purple",
    "disc",
    "square",
    "circle",
    "ball",
    "box",
    "gradient",
    "background",
    "slowly",
    "quickly",
    "video",
    "clip",
    "camera",
    "scene",
    "light",
    "dark",
    "small",
    "large",
    "person",
    "cat",
    "dog",
    "car",
    "tree",
    "sky",
    "water",
]


def materialise(variant: str, home: Path) -> Path:
    """The folder of a tiny variant, building it first if it is not there yet."""
    folder = home / "models" / f"{variant}-v{BUILD_VERSION}"
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a concurrent or interrupted build never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=folder.parent))
    try:
        build(variant, staging)
        missing = [name for name in REQUIRED_FILES if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"Building the {variant} model left out {missing}; nothing was published.")
        files.follow_umask(staging)  # mkdtemp made it private; a model folder is shared like any other
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def build(variant: str, folder: Path, transformer_config: dict | None = None) -> None:
    """Write a tiny random CogVideoX of the given variant into ``folder``.

    ``transformer_config`` overrides the transformer's settings (tests build e.g. a model that reads
    prompts of 30 tokens with ``{"max_text_seq_length": 30}``); VAE and text encoder stay the variant's.
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel

    spec = VARIANTS[variant]
    transformer_settings = (
        {
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "in_channels": TINY_LATENT_CHANNELS,
            "out_channels": TINY_LATENT_CHANNELS,
            "time_embed_dim": TINY_TIME_EMBED_DIM,
            "text_embed_dim": TEXT_DIM,
            "num_layers": 2,
            "sample_height": 8,
            "sample_width": 12,
            "sample_frames": 49,
            "patch_size": 2,
            "temporal_compression_ratio": 4,
            "max_text_seq_length": 226,
            "use_rotary_positional_embeddings": spec["rotary"],
        }
        | spec.get("transformer", {})
        | (transformer_config or {})
    )
    tokenizer = _tokenizer(transformer_settings["max_text_seq_length"])
    tokenizer.save_pretrained(folder / "tokenizer")

    _write_text_encoder(len(tokenizer), folder / "text_encoder")

    torch.manual_seed(1)
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=TINY_LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_height=64,
        sample_width=96,
        scaling_factor=spec["scaling_factor"],
        **spec.get("vae", {}),
    )
    vae.save_pretrained(folder / "vae")

    torch.manual_seed(2)
    transformer = CogVideoXTransformer3DModel(**transformer_settings)
    transformer.save_pretrained(folder / "transformer")

    CogVideoXDPMScheduler(**_SCHEDULER, snr_shift_scale=spec["snr_shift_scale"]).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": spec.get("pipeline", "CogVideoXPipeline"),
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "CogVideoXDPMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _write_text_encoder(vocab_size: int, folder: Path) -> None:
    """A tiny random T5 encoder (seeded, so every build of a variant is the same model) into ``folder``."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    _save_text_encoder(text_encoder, folder)


def _save_text_encoder(model, folder: Path) -> None:
    """What ``save_pretrained`` writes, on every rank.

    transformers 5 writes model files only on rank 0 once torch.distributed is initialised, so under
    torchrun or accelerate launch a rank that builds the tiny model would publish it without them.
    """
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _tokenizer(max_length: int):
    from transformers import T5Tokenizer

    pieces = [f"\u2581{w}" for w in _WORDS] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    pieces += [f"\u2581{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces = list(dict.fromkeys(pieces))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
