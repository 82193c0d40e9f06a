"""Bucket layouts: which tensors the samples of one bucket hold, with their dtypes and shapes, and their bytes."""

from __future__ import annotations

import math
from typing import Any

from cogvx.errors import CacheError

# Tensors a sample may hold beyond its bucket's base ones (``moments``, ``prompt_embeds``); each sample's index
# line lists those it holds in ``carries``. ``image_moments``: the VAE moments of the first frame, for
# image-to-video (``cogvx preprocess --image-latents``).
IMAGE_MOMENTS = "image_moments"
CARRIED_TENSORS = (IMAGE_MOMENTS,)
# What each tensor of one bucket looks like: {bucket: {tensor name: {"dtype": "bfloat16", "shape": [...]}}}.
Layouts = dict[str, dict[str, dict[str, Any]]]
# The tensors a sample may hold, with the shape each has (its number of dimensions is checked): the base ones,
# which every sample holds, and the carried ones. Training reads them by these names and shapes.
TENSOR_SHAPES = {"moments": "[2C, F, H, W]", "prompt_embeds": "[L, D]", IMAGE_MOMENTS: "[2C, 1, H, W]"}
BASE_TENSORS = ("moments", "prompt_embeds")
# Bytes per element of each dtype a layout may name (torch's names, as the writer records them).
DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
TAR_BLOCK = 512  # a tar member is a header block and its payload padded to whole blocks


def joined_layout(known: dict[str, dict[str, Any]], layout: dict[str, dict[str, Any]]) -> dict | None:
    """One bucket's layout covering both, or None where they disagree.

    They agree when they hold the same base tensors alike and every carried tensor (``CARRIED_TENSORS``) that
    both hold alike: a bucket may hold samples with and without a carried tensor (a cache gaining image
    latents), and its layout then lists it, for the samples that carry it (``sample_layout``).
    """
    if known == layout:
        return known
    names = set(known) | set(layout)
    if any(n not in CARRIED_TENSORS and (n not in known or n not in layout) for n in names):
        return None
    if any(known[n] != layout[n] for n in set(known) & set(layout)):
        return None
    return {n: known.get(n) or layout[n] for n in sorted(names)}


def sample_layout(layout: dict[str, dict[str, Any]], carries: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The tensors one sample of a bucket must hold: the base ones, and the carried ones it says it carries."""
    return {n: spec for n, spec in layout.items() if n not in CARRIED_TENSORS or n in carries}


def merge_layouts(into: Layouts, layouts: Layouts, origin: str) -> None:
    """Add ``layouts`` to ``into``; a bucket laid out differently in both is a CacheError naming ``origin``."""
    for bucket, layout in layouts.items():
        known = into.setdefault(bucket, layout)
        joined = joined_layout(known, layout)
        if joined is not None:
            into[bucket] = joined  # a new dict when it grew: the shard's own record stays as written
        else:
            raise CacheError(
                f"{origin} stores bucket {bucket} as {describe_layout(layout)}, but other shards of the cache as "
                f"{describe_layout(known)}; one cache holds one layout per bucket. Write it to a new folder."
            )


def layout_bytes(layout: dict[str, dict[str, Any]]) -> int:
    """Bytes the tensors of ``layout`` take in a safetensors blob (without its header)."""
    total = 0
    for spec in layout.values():
        itemsize = DTYPE_BYTES.get(spec["dtype"])
        if itemsize is None:
            raise CacheError(f"The manifest names an unknown tensor dtype {spec['dtype']!r}.")
        total += math.prod(spec["shape"]) * itemsize
    return total


def min_sample_bytes(layouts: Layouts) -> int:
    """The fewest bytes one sample of a shard with these bucket layouts takes in its tar: two members
    (``K.safetensors``: an 8-byte header length and the base tensors of its bucket; ``K.json``: not empty),
    each a header block and at least one block of payload. No layouts (an older cache): 4 blocks."""
    tensors = min((layout_bytes(sample_layout(layout, ())) for layout in layouts.values()), default=0)
    return 3 * TAR_BLOCK + -(-(8 + tensors) // TAR_BLOCK) * TAR_BLOCK


def describe_layout(layout: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{name} {spec['dtype']} {list(spec['shape'])}" for name, spec in sorted(layout.items()))
