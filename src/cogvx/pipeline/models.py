"""Where a CogVideoX model comes from, and loading each of its components on demand.

A model is named by a hub id (``THUDM/CogVideoX-2b``), a local diffusers-format folder, or one of the
built-in tiny random models (``tiny``, ``tiny-2b``, ``tiny-i2v``, ``tiny-1.5-i2v``). Every name resolves to something
``from_pretrained`` understands, so the tiny models travel exactly the same code path as real ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cogvx.errors import ConfigError, ModelError
from cogvx.names import DEFAULT_MODEL, DTYPE_NAMES, NATIVE_FPS  # noqa: F401 (re-exported)

# Prompt length in T5 tokens when a transformer config does not say (every published CogVideoX says 226);
# the model's own `max_text_seq_length` decides it everywhere else.
DEFAULT_TEXT_TOKENS = 226

# Frames per video when a transformer config does not say (diffusers' CogVideoXTransformer3DModel default).
DEFAULT_FRAMES = 49

# CogVideoX 1.5's transformer config gives sample_height = sample_width = 300 (latent pixels): the extent of
# the rotary table its positions are sliced from (diffusers' conversion script), not the size it was trained
# at, which only its model card states: 768x1360. That one case is mapped here; for every other config the
# native size is sample_height/sample_width times the VAE's spatial compression (480x720 for 2b and 5b).
ROTARY_TABLE_NATIVE_SIZES = {(300, 300): (768, 1360)}

DTYPES = dict(zip(DTYPE_NAMES, (torch.bfloat16, torch.float16, torch.float32), strict=True))

# The T5 fields that change what the encoder computes from token ids. Everything else in its config file
# (storage dtype, spelled `torch_dtype` by transformers 4 and `dtype` by 5, `architectures`, library
# versions, decoder and generation settings, dropout, initialisation) leaves the embeddings unchanged.
# Values are read through T5Config, so defaults and derived fields (`feed_forward_proj` ->
# `dense_act_fn`, `is_gated_act`) count whether or not a file spells them out.
T5_COMPUTE_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "dense_act_fn",
    "is_gated_act",
    "layer_norm_epsilon",
)

# VAE constructor arguments that do not change the latents it encodes: the scaling factor is applied at
# train time from the training model's own config (2b and 5b differ only there); `force_upcast` and
# `invert_scale_latents` tell pipelines how to decode in fp16 and how to scale image latents.
VAE_NON_COMPUTE_FIELDS = ("scaling_factor", "force_upcast", "invert_scale_latents")


# The constructor arguments of diffusers' AutoencoderKLCogVideoX and their defaults, which the VAE fingerprint
# fills in for keys a config file leaves out. Written out here because importing that class imports all of
# diffusers' models (seconds at every preprocess start, before any work can begin); tests/pipeline/
# test_fingerprint.py checks the table against the installed class, so a diffusers that changes it is noticed.
VAE_ARGUMENTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("CogVideoXDownBlock3D",) * 4,
    "up_block_types": ("CogVideoXUpBlock3D",) * 4,
    "block_out_channels": (128, 256, 256, 512),
    "latent_channels": 16,
    "layers_per_block": 3,
    "act_fn": "silu",
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "temporal_compression_ratio": 4,
    "sample_height": 480,
    "sample_width": 720,
    "scaling_factor": 1.15258426,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "invert_scale_latents": False,
}


def choose_model(given: str | None, *recorded: tuple[str | None, str]) -> str:
    """``--model``'s one rule: the model given, else the first one recorded with the input, else an error.

    ``recorded`` are (model name or None, where it would be recorded) pairs, e.g. the cache's manifest or
    a run's config.json; the error names every place that was looked at.
    """
    if given:
        return given
    for name, where in recorded:
        if name is not None and not isinstance(name, str):
            raise ModelError(
                f"{where} names the model as {name!r}, not a model name: correct it there, or pass --model."
            )
        if name:
            return name
    places = " nor ".join(where for _name, where in recorded) or "the input"
    raise ModelError(f"Neither {places} names a base model: pass --model.")


def native_size(transformer: dict[str, Any], spatial: int) -> tuple[int, int]:
    """(height, width) in pixels a transformer was trained at, from its config (ROTARY_TABLE_NATIVE_SIZES)."""
    grid = (transformer["sample_height"], transformer["sample_width"])
    if transformer.get("patch_size_t") and grid in ROTARY_TABLE_NATIVE_SIZES:
        return ROTARY_TABLE_NATIVE_SIZES[grid]
    return grid[0] * spatial, grid[1] * spatial


def parse_dtype(name: str) -> torch.dtype:
    """``bf16`` / ``fp16`` / ``fp32`` to a torch dtype, with a clear error otherwise."""
    if name not in DTYPES:
        raise ConfigError(f"Unknown dtype {name!r}: use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def cache_home() -> Path:
    """Folder for cogvx's own files (the tiny models): $COGVX_HOME, else $XDG_CACHE_HOME/cogvx."""
    if "COGVX_HOME" in os.environ:
        return Path(os.environ["COGVX_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cogvx"


def resolve_model(name: str) -> str:
    """A model name as given by the user to a path or hub id that ``from_pretrained`` accepts."""
    from cogvx.pipeline import tiny

    if name in tiny.VARIANTS:
        return str(tiny.materialise(name, cache_home()))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"{path} is not a diffusers model folder (no model_index.json). Point --model at the folder "
                "that holds model_index.json and the transformer/, vae/, text_encoder/, tokenizer/ and "
                "scheduler/ subfolders, or pass a hub id such as THUDM/CogVideoX-2b."
            )
        return str(path.resolve())
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelError(
            f"--model {name!r} is neither an existing folder nor a hub id of the form owner/name "
            f"(nor one of the built-in models: {', '.join(tiny.VARIANTS)})."
        )
    return name


def read_config(source: str, subfolder: str, revision: str | None = None) -> dict[str, Any]:
    """One component's config file, without touching its weights (``revision``: of a hub model)."""
    name = "scheduler_config.json" if subfolder == "scheduler" else "config.json"
    local = Path(source) / subfolder / name
    if local.is_file():
        return json.loads(local.read_text())
    from cogvx import hub

    return json.loads(hub.model_file(source, f"{subfolder}/{name}", revision).read_text())


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def text_encoder_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The T5 settings that decide the embeddings, normalised through T5Config (defaults filled in)."""
    from transformers import T5Config

    normalised = T5Config.from_dict(config)
    return {name: getattr(normalised, name) for name in T5_COMPUTE_FIELDS}


def vae_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The VAE's constructor arguments that decide its latents, defaults filled in; file-only keys dropped."""
    fields = {name: config.get(name, default) for name, default in VAE_ARGUMENTS.items()}
    # JSON round trip: tuples (the class's defaults) and lists (a file's values) hash alike.
    return {k: json.loads(json.dumps(v)) for k, v in fields.items() if k not in VAE_NON_COMPUTE_FIELDS}


# How cogvx 0.1 caches fingerprinted encoders: the whole config file minus these keys (and the VAE's scaling
# factor). Such a fingerprint changes with storage details, but where it matches, the encoder is the same one,
# so those caches keep working without being encoded again.
_LEGACY_VOLATILE_KEYS = ("_name_or_path", "_diffusers_version", "transformers_version", "_class_name", "_commit_hash")


def legacy_fingerprint(config: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """The fingerprint caches written before fingerprints hashed what encoders compute carry."""
    return _digest({k: v for k, v in config.items() if k not in _LEGACY_VOLATILE_KEYS and k not in ignore})


def text_encoder_fingerprint(config: dict[str, Any]) -> str:
    """A short, stable hash of what a T5 encoder config computes: equal for the same encoder in any spelling."""
    return _digest(text_encoder_fields(config))


def vae_fingerprint(config: dict[str, Any]) -> str:
    """A short, stable hash of what a VAE config computes (its scaling factor left out: applied at train time)."""
    return _digest(vae_fields(config))


@dataclass(frozen=True)
class ModelInfo:
    """What the cache and the trainer need to know about a model, read from configs alone."""

    name: str
    source: str
    vae_fingerprint: str
    text_encoder_fingerprint: str
    scaling_factor: float
    latent_channels: int
    text_embed_dim: int
    spatial_compression: int
    temporal_compression: int
    native_size: tuple[int, int]  # (height, width) in pixels the transformer was trained at
    max_text_tokens: int  # T5 tokens per prompt: the transformer's max_text_seq_length
    native_frames: int = DEFAULT_FRAMES  # frames per video the transformer was trained at: its sample_frames
    # Frame counts the model uses as it was trained are 1 + k * frame_step: the VAE's temporal compression
    # (4), times the latent frames CogVideoX 1.5 packs into one token (patch_size_t 2): 8k+1 there, so that a
    # video's latent frames pad (the first repeated) to whole tokens as in its training at 81 frames.
    frame_step: int = 4
    # The same encoders' fingerprints as older caches recorded them (see legacy_fingerprint).
    legacy_fingerprints: tuple[tuple[str, str], ...] = ()
    revision: str | None = None  # a hub model's branch, tag or commit (--model-revision)
    variant: str | None = None  # weights files named NAME.VARIANT.safetensors, e.g. fp16 (--model-variant)
    # The task follows the transformer: an image-to-video one reads the noisy video latents and the image
    # latents concatenated on channels, so it takes twice the VAE's latent channels in.
    image_to_video: bool = False
    # The VAE config's word on how I2V pipelines scale image latents: CogVideoX 1.5 divides by the scaling
    # factor where 1.0 multiplies (diffusers' CogVideoXImageToVideoPipeline.prepare_latents).
    invert_scale_latents: bool = False
    in_channels: int = 0  # the transformer's input channels (0: not read)

    def check_task(self) -> None:
        """Refuse a transformer that is neither text-to-video nor image-to-video for its VAE."""
        if self.in_channels not in (self.latent_channels, 2 * self.latent_channels):
            raise ModelError(
                f"{self.name}'s transformer takes {self.in_channels} channels in, and its VAE makes "
                f"{self.latent_channels} (latent_channels): cogvx trains text-to-video ({self.latent_channels}) and "
                f"image-to-video ({2 * self.latent_channels}) models only."
            )

    @property
    def image_latent_scale(self) -> float:
        """What image latents are multiplied by before they join the transformer's input."""
        return 1.0 / self.scaling_factor if self.invert_scale_latents else self.scaling_factor

    @classmethod
    def read(cls, name: str, revision: str | None = None, variant: str | None = None) -> ModelInfo:
        source = resolve_model(name)
        if revision is not None and Path(source).is_dir():
            raise ModelError(
                f"--model-revision {revision} applies to hub models, and {name} is a local folder "
                f"({source}): check out that revision there, or leave --model-revision out."
            )
        vae = read_config(source, "vae", revision)
        text = read_config(source, "text_encoder", revision)
        transformer = read_config(source, "transformer", revision)
        spatial = 2 ** (len(vae["block_out_channels"]) - 1)
        latent_channels = int(vae["latent_channels"])
        in_channels = int(transformer.get("in_channels", latent_channels))
        # The scaling factor is applied at train time, so caches stay valid across 2b and 5b.
        return cls(
            name=name,
            source=source,
            vae_fingerprint=vae_fingerprint(vae),
            text_encoder_fingerprint=text_encoder_fingerprint(text),
            scaling_factor=float(vae["scaling_factor"]),
            latent_channels=latent_channels,
            text_embed_dim=int(text["d_model"]),
            spatial_compression=spatial,
            temporal_compression=int(vae.get("temporal_compression_ratio", 4)),
            native_size=native_size(transformer, spatial),
            max_text_tokens=int(transformer.get("max_text_seq_length", DEFAULT_TEXT_TOKENS)),
            native_frames=int(transformer.get("sample_frames", DEFAULT_FRAMES)),
            frame_step=int(vae.get("temporal_compression_ratio", 4)) * int(transformer.get("patch_size_t") or 1),
            legacy_fingerprints=(
                ("vae_fingerprint", legacy_fingerprint(vae, ignore=("scaling_factor",))),
                ("text_encoder_fingerprint", legacy_fingerprint(text)),
            ),
            revision=revision,
            variant=variant,
            image_to_video=in_channels == 2 * latent_channels,
            invert_scale_latents=bool(vae.get("invert_scale_latents", False)),
            in_channels=in_channels,
        )

    def read_config(self, subfolder: str) -> dict[str, Any]:
        return read_config(self.source, subfolder, self.revision)

    def load_transformer(self, dtype: torch.dtype, device: torch.device | str = "cpu"):
        return load_transformer(self.source, dtype, device, revision=self.revision, variant=self.variant)

    def load_vae(self, dtype: torch.dtype, device: torch.device | str = "cpu"):
        return load_vae(self.source, dtype, device, revision=self.revision, variant=self.variant)

    def load_text_encoder(self, dtype: torch.dtype, device: torch.device | str = "cpu"):
        return load_text_encoder(self.source, dtype, device, revision=self.revision, variant=self.variant)

    def load_scheduler(self):
        return load_scheduler(self.source, revision=self.revision)

    def from_pretrained_args(self) -> dict[str, Any]:
        """What a diffusers pipeline's ``from_pretrained`` needs to read this model's files."""
        return {"revision": self.revision, "variant": self.variant}

    def recorded(self) -> dict[str, str]:
        """How caches and runs record this model: its name, and its revision and variant when given."""
        return {"model": self.name} | {
            key: value for key, value in (("revision", self.revision), ("variant", self.variant)) if value
        }

    def encoder_identity(self) -> dict[str, Any]:
        """The part of a model that a cache depends on: the encoders, and the prompt length it reads."""
        return {
            "vae_fingerprint": self.vae_fingerprint,
            "text_encoder_fingerprint": self.text_encoder_fingerprint,
            "latent_channels": self.latent_channels,
            "text_embed_dim": self.text_embed_dim,
            "max_text_tokens": self.max_text_tokens,
        }

    def identity_mismatch(self, stored: dict[str, Any]) -> list[str]:
        """The encoder-identity keys in which a cache's recorded ``stored`` identity differs from this model's.

        A fingerprint in the older form (whole config files hashed) counts as equal when it is this model's
        in that form: the same encoders, so the cache fits.
        """
        legacy = dict(self.legacy_fingerprints)
        return [
            key
            for key, value in self.encoder_identity().items()
            if stored.get(key) != value and (key not in legacy or stored.get(key) != legacy[key])
        ]


@contextlib.contextmanager
def quiet_loading():
    """Load weights without the libraries' noise in cogvx's output: their loading progress bars, and the
    FutureWarning diffusers raises for ``torch_dtype`` (the keyword every supported diffusers accepts), and the
    UserWarning huggingface_hub raises for an argument diffusers passes it."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated", category=FutureWarning)
        # diffusers still passes this argument to huggingface_hub, which ignores it.
        warnings.filterwarnings("ignore", message=".*`local_dir_use_symlinks` argument", category=UserWarning)
        for module, _ in bars:
            module.disable_progress_bar()
        try:
            yield
        finally:
            for module, enabled in bars:
                if enabled:
                    module.enable_progress_bar()


def _from_pretrained(load, source: str, subfolder: str, revision: str | None, **kwargs):
    """``load(source, subfolder=...)`` (a ``from_pretrained``), that for a hub model the hub cannot serve now reads
    the local cache alone and says in one line what is missing, instead of retrying for minutes."""
    if Path(source).is_dir():
        return load(source, subfolder=subfolder, revision=revision, **kwargs)
    from cogvx import hub

    config = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}.get(subfolder, "config.json")
    why = hub.unreachable(source, f"{subfolder}/{config}", revision)
    if why is None:
        return load(source, subfolder=subfolder, revision=revision, **kwargs)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Their messages about each weights file they looked for and did not find would precede the one line.
    levels = [(module, module.get_verbosity()) for module in (diffusers_logging, transformers_logging)]
    for module, _ in levels:
        module.set_verbosity(module.CRITICAL)
    try:
        return load(source, subfolder=subfolder, revision=revision, local_files_only=True, **kwargs)
    except OSError as err:  # what diffusers and transformers raise for a file the cache does not hold
        raise ModelError(hub.model_not_cached(source, revision, why, subfolder)) from err
    finally:
        for module, level in levels:
            module.set_verbosity(level)


def load_transformer(
    source: str, dtype: torch.dtype, device: torch.device | str = "cpu", *, revision=None, variant=None
):
    """The transformer in ``dtype`` on ``device``, each weight read from its file straight to the device.

    On the ``meta`` device nothing is read but the config: the model's shapes and dtypes, for planning.
    """
    from diffusers import CogVideoXTransformer3DModel

    device = torch.device(device)
    if device.type == "meta":
        with device:
            model = CogVideoXTransformer3DModel.from_config(read_config(source, "transformer", revision))
        # diffusers' ``to`` warns of the modules kept in float32 even when there are none, as for this model.
        return torch.nn.Module.to(model, dtype)
    with quiet_loading():
        # With a device map of one device no full copy is made in CPU memory first (then moved by .to).
        return _from_pretrained(
            CogVideoXTransformer3DModel.from_pretrained,
            source,
            "transformer",
            revision,
            torch_dtype=dtype,
            variant=variant,
            device_map={"": device},
        )


def load_vae(source: str, dtype: torch.dtype, device: torch.device | str = "cpu", *, revision=None, variant=None):
    from diffusers import AutoencoderKLCogVideoX

    with quiet_loading():
        vae = _from_pretrained(
            AutoencoderKLCogVideoX.from_pretrained, source, "vae", revision, torch_dtype=dtype, variant=variant
        )
    return vae.to(device)


def load_text_encoder(
    source: str, dtype: torch.dtype, device: torch.device | str = "cpu", *, revision=None, variant=None
):
    from transformers import AutoTokenizer, T5EncoderModel

    with quiet_loading():
        tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, source, "tokenizer", revision)
        encoder = _from_pretrained(
            T5EncoderModel.from_pretrained, source, "text_encoder", revision, dtype=dtype, variant=variant
        ).to(device)
    return tokenizer, encoder.eval()


def load_scheduler(source: str, *, revision=None):
    from diffusers import CogVideoXDPMScheduler

    return _from_pretrained(CogVideoXDPMScheduler.from_pretrained, source, "scheduler", revision)
