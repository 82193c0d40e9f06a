"""The sample checks every reader shares: a sample against its manifest index line and its bucket's layout.

The record reader, ``verify`` and the rebuild all call these, so a sample one of them accepts, the
others accept too. (``ShardWriter`` refuses its caller's mistakes with ValueErrors of its own.)
"""

from __future__ import annotations

import json
from typing import Any

import torch

from cogvx.locations import parent_of
from cogvx.shards.codec import INDEX, INDEX_FIELDS, META, RawSample, Sample, index_line, layout_of, short
from cogvx.shards.layouts import describe_layout, sample_layout
from cogvx.shards.manifest import CacheError, SampleEntry, ShardRecord


def verify_hint(origin: str) -> str:
    """The sentence that ends a refusal of a sample or shard read from ``origin``."""
    return f"The shard is unusable; run `cogvx shards verify {parent_of(origin)}` for how to repair it"


def check_sample(
    sample: Sample,
    entry: SampleEntry | None,
    layout: dict[str, dict[str, Any]],
    origin: str,
    fix: str | None = None,
) -> None:
    """Refuse a decoded sample that training cannot use, with a CacheError naming ``origin`` and the key.

    Checks its .json against its manifest index line (``entry``; None when the manifest has no index)
    and its tensors against its bucket's ``layout`` (names, dtypes, shapes); floating tensors must be
    finite (no NaN or Inf). ``fix``, a sentence, ends the message (default: run `cogvx shards verify`).
    """
    where = f"Sample {sample.key} in {origin}"
    fix = fix or verify_hint(origin)
    check_index(sample.meta, entry, where, fix)
    found = layout_of(sample)
    # Tensors a sample may carry (image latents) are part of its bucket's layout only where it carries them.
    layout = sample_layout(layout, entry.carries if entry is not None else tuple(found))
    if found != layout:
        bucket = sample.meta.get("bucket")
        raise CacheError(
            f"{where} holds {describe_layout(found) or 'no tensors'}, but bucket {bucket} is "
            f"{describe_layout(layout) or 'empty'}; training cannot batch it. {fix}."
        )
    for name, tensor in sample.tensors.items():
        if not all_finite(tensor):
            raise CacheError(f"{where}: tensor {name} holds NaN or Inf. {fix}.")


def check_index(meta: Any, entry: SampleEntry | None, where: str, fix: str) -> None:
    """The .json of a sample must be an object that agrees with its manifest index line."""
    if not isinstance(meta, dict):
        raise CacheError(f"{where}: its .json is a {type(meta).__name__}, not an object. {fix}.")
    if not isinstance(meta.get("bucket"), str):
        raise CacheError(f"{where}: its .json has no bucket. {fix}.")
    if entry is None:
        return
    expected = {name: getattr(entry, name) for name in INDEX_FIELDS}
    if INDEX in meta:
        expected = {**expected, INDEX: index_line(entry)}
    for name, value in expected.items():
        if meta.get(name) != value:
            raise CacheError(
                f"{where}: its .json says {name} {short(meta.get(name))}, the manifest's index says "
                f"{short(value)}: the shard or the manifest was changed. {fix}."
            )


def check_listed(
    raw: RawSample, entry: SampleEntry | None, record: ShardRecord, fix: str, required: tuple[str, ...] = (META,)
) -> dict[str, Any]:
    """A raw sample's .json, parsed and checked against its index line and its shard's record.

    ``required``: the members it must have, checked first, in order. Returns the parsed .json.
    """
    where = f"Sample {raw.key} in {raw.origin}"
    missing = [ext for ext in required if ext not in raw.members]
    if missing:
        raise CacheError(f"{where} has no .{missing[0]} member. {fix}.")
    try:
        meta = json.loads(raw.members[META])
    except (ValueError, RecursionError) as err:  # RecursionError: nested too deep
        raise CacheError(f"{where}: its .json cannot be parsed ({err}). {fix}.") from err
    check_index(meta, entry, where, fix)
    # A shard that recorded its layouts recorded every bucket it holds.
    if record.layouts and meta["bucket"] not in record.layouts:
        raise CacheError(
            f"{where}: its bucket {meta['bucket']} has no layout in the manifest's record of the shard. {fix}."
        )
    return meta


# Floating dtypes by their bits: a value is NaN or Inf exactly when its exponent bits are all ones, so
# "magnitude bits >= that exponent" over an integer view finds one in a single pass, with no float
# arithmetic on a tensor that may hold anything.
_FLOAT_BITS = {
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor`` (always true of integer tensors)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    bits = _FLOAT_BITS.get(tensor.dtype)
    if bits is None:  # float8 and other rare types
        return bool(torch.isfinite(tensor.float()).all())
    kind, magnitude, exponent = bits
    ints = tensor.detach().cpu().contiguous().view(kind).numpy()
    return int((ints & magnitude).max()) < exponent
