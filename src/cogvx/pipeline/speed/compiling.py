"""``torch.compile`` of the block runner and the VAE encoder, and the compile cache kept between launches."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

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
