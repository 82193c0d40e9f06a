"""The names of everything in a cache folder: the one place that spells them.

A cache folder holds ``manifest.json`` (what the cache is), the shards it lists, ``skipped.jsonl``
(inputs preprocessing could not use), optional side files such as the validation prompts, and, while
``cogvx preprocess`` runs, its private ``.lock`` and ``.parts/``. Readers and writers build paths with
these functions; no other module writes these names.
"""

from __future__ import annotations

import re
from pathlib import Path

MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"  # one JSON object per unusable input: {"source", "reason", "detail"}
VALIDATION_PROMPTS = "validation_prompts.safetensors"  # prompt embeddings for validation during training
LOCK = ".lock"  # held by the one `cogvx preprocess` writing the folder
PARTS = ".parts"  # per-rank progress of a multi-process preprocess, merged at its end
DAMAGED_SUFFIX = ".damaged"  # a shard set aside by --repair: never deleted, never read
TEMPORARY_SUFFIX = ".tmp"  # a shard or file being written; renamed into place when complete
# The manifest's ``extras`` entry that lists the validation prompts file: {"file", "prompts", "sha256"}.
VALIDATION_ENTRY = "validation"

SHARD = re.compile(r"^shard-r(\d+)-(\d+)\.tar$")
_TEMPORARY_SHARD = re.compile(r"^shard-r\d+-\d+\.tar\.tmp$")


def manifest(folder: Path) -> Path:
    return Path(folder) / MANIFEST


def skipped(folder: Path) -> Path:
    return Path(folder) / SKIPPED


def validation_prompts(folder: Path) -> Path:
    return Path(folder) / VALIDATION_PROMPTS


def lock(folder: Path) -> Path:
    return Path(folder) / LOCK


def parts(folder: Path) -> Path:
    return Path(folder) / PARTS


def shard_part(folder: Path, rank: int) -> Path:
    return parts(folder) / f"shards.r{rank:02d}.json"


def skipped_part(folder: Path, rank: int) -> Path:
    return parts(folder) / f"skipped.r{rank:02d}.jsonl"


def result_part(folder: Path, rank: int) -> Path:
    return parts(folder) / f"result.r{rank:02d}.json"


def shard_parts(folder: Path) -> list[Path]:
    return sorted(parts(folder).glob("shards.r*.json"))


def skipped_parts(folder: Path) -> list[Path]:
    return sorted(parts(folder).glob("skipped.r*.jsonl"))


def shard_prefix(rank: int) -> str:
    """What the shards of one preprocessing rank are called before their number: ``shard-rNN``."""
    return f"shard-r{rank:02d}"


def shard_name(prefix: str, index: int) -> str:
    """``shard-rNN-NNNNNN.tar``."""
    return f"{prefix}-{index:06d}.tar"


def temporary(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return Path(path).with_name(Path(path).name + TEMPORARY_SUFFIX)


def is_shard(name: str) -> bool:
    """A name our writers give a finished shard (``shard-rNN-NNNNNN.tar``)."""
    return bool(SHARD.match(name))


def is_temporary_shard(name: str) -> bool:
    return bool(_TEMPORARY_SHARD.match(name))


def stale_temporaries(folder: Path) -> list[Path]:
    """Copies of the manifest, the skipped list and side files that were being written (``.NAME.*``: written,
    then renamed over NAME). Only a run that holds the folder's lock may delete them: their writers are gone."""
    names = (MANIFEST, SKIPPED, VALIDATION_PROMPTS)
    return sorted(p for p in Path(folder).iterdir() if any(p.name.startswith(f".{name}.") for name in names))


def temporary_shards(folder: Path, rank: int) -> list[Path]:
    """The half-written shards of ``rank`` in ``folder``."""
    return sorted(Path(folder).glob(f"{shard_prefix(rank)}-*.tar{TEMPORARY_SUFFIX}"))


def shard_numbers(folder: Path, rank: int) -> list[int]:
    """Numbers taken by ``rank``'s shards in ``folder``, set-aside and unfinished ones included."""
    used = re.compile(rf"^{re.escape(shard_prefix(rank))}-(\d+)\.tar")
    return [int(m.group(1)) for p in Path(folder).iterdir() if (m := used.match(p.name))]


def shard_numbers_in(names: list[str], rank: int) -> list[int]:
    """Numbers taken by ``rank``'s shards among file ``names`` (a remote listing), set-aside ones included."""
    used = re.compile(rf"^{re.escape(shard_prefix(rank))}-(\d+)\.tar")
    return [int(m.group(1)) for name in names if (m := used.match(name))]


def set_aside_name(path: Path, attempt: int = 0) -> Path:
    """``NAME.damaged`` (``NAME.damaged.N`` for the N-th other one)."""
    suffix = DAMAGED_SUFFIX if attempt == 0 else f"{DAMAGED_SUFFIX}.{attempt}"
    return Path(path).with_name(Path(path).name + suffix)
