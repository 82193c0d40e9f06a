"""``torch.compile`` of the block runner and the VAE encoder, and the compile cache kept between launches."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Each bucket gives the encoder two or three chunk shapes (the first chunk has one frame more, later ones
# carry the causal convolutions' cache); compiled for fixed shapes, a cache of many buckets needs room.
VAE_RECOMPILE_LIMIT = 64


def compile_runner(runner: Callable) -> Callable:
    """A block runner compiled once: every block reuses that one graph (the runner takes the block as input)."""
    return torch.compile(runner)


def compile_cache_dir() -> Path:
    """Where compiled kernels are kept between launches: ``$XDG_CACHE_HOME/cogvx/torch-compile``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cogvx" / "torch-compile"


def use_persistent_compile_cache(folder: Path | None = None) -> None:
    """Keep Inductor's compiled graphs and kernels in ``folder`` (default ``compile_cache_dir()``), unless the
    user set ``TORCHINDUCTOR_CACHE_DIR``: a later launch with the same shapes loads them instead of compiling
    (PyTorch's default lives under /tmp, which many machines empty on reboot)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder or compile_cache_dir()))


def compile_vae_encoder(vae: torch.nn.Module, backend: str = "inductor") -> None:
    """Compile a CogVideoX VAE's encoder in place, for fixed shapes (one graph per chunk shape).

    Only the encoder is compiled: ``vae.encode`` keeps diffusers' own frame chunking, tiling and posterior.
    """
    import torch._dynamo

    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), VAE_RECOMPILE_LIMIT))
    vae.encoder.compile(dynamic=False, backend=backend)


# One 49x480x720 clip through CogVideoX's VAE on one H200 (BENCHMARKS.md section 9): 0.951 s plain, 0.438 s with
# the encoder compiled; the first compiled encode of a shape took 53.3 s with an empty compile cache, 5.0 s warm.
VAE_REFERENCE_VOLUME = 49 * 480 * 720  # frames x height x width
VAE_SAVED_S = 0.951 - 0.438  # per clip of that volume
VAE_COMPILE_S = {False: 53.3, True: 5.0}  # by whether the compile cache holds this encoder's shapes


@dataclass(frozen=True)
class VaeCompile:
    """Whether preprocessing compiles the VAE's encoder, and why (the run's report says both)."""

    on: bool
    why: str


def vae_compile_choice(setting: bool | None, device: torch.device, clips: int, volume: int, warm: bool) -> VaeCompile:
    """``--compile`` / ``--no-compile`` as given; left out, compile on a GPU when it pays for itself in this run:
    when the ``clips`` to encode (each of ``volume`` pixels: frames x height x width) save more than the compile
    costs, as measured (``VAE_SAVED_S`` per reference clip, ``VAE_COMPILE_S`` by the compile cache being ``warm``)."""
    if setting is not None:
        return VaeCompile(setting, "--compile" if setting else "--no-compile")
    if device.type != "cuda":
        return VaeCompile(False, "no GPU")
    saved = clips * VAE_SAVED_S * volume / VAE_REFERENCE_VOLUME
    cost = VAE_COMPILE_S[warm]
    state = "warm" if warm else "empty"
    why = (
        f"{clips} clips to encode save about {saved:.0f} s; compiling costs about {cost:.0f} s ({state} compile cache)"
    )
    return VaeCompile(saved > cost, why)


def vae_compile_stamp(identity: dict[str, Any], dtype: torch.dtype, shape: tuple[int, int, int], device) -> Path:
    """The file saying this VAE's encoder was compiled for ``shape`` in the compile cache: written after a run
    that compiled it has encoded, read by the next run's ``vae_compile_choice`` (``warm``). It sits beside the
    kernels (``TORCHINDUCTOR_CACHE_DIR`` or ``compile_cache_dir()``), so emptying that folder empties both."""
    device = torch.device(device)
    key = {"torch": torch.__version__, "vae": identity, "dtype": str(dtype), "shape": list(shape)}
    key["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or compile_cache_dir())
    return folder / f"cogvx-vae-{digest}.compiled"
