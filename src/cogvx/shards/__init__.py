"""The on-disk cache: a folder with ``manifest.json`` and webdataset tar shards of safetensors samples.

This package knows nothing about CogVideoX: it stores named tensors and JSON metadata per sample,
checks shards and samples against the manifest, and never unpickles anything. See docs/cache-format.md.
"""

from cogvx.shards.io import (
    Sample,
    ShardWriter,
    check_sample,
    check_shards,
    decode_sample,
    index_shard,
    iter_raw_samples,
    iter_record_samples,
    layout_of,
    open_shard,
    read_shard,
    read_verified,
    verify,
)
from cogvx.shards.manifest import (
    CacheError,
    Manifest,
    SampleEntry,
    ShardRecord,
    merged_layouts,
    write_json_atomic,
)
from cogvx.shards.tools import rebuild_manifest

__all__ = [
    "CacheError",
    "Manifest",
    "Sample",
    "SampleEntry",
    "ShardRecord",
    "ShardWriter",
    "check_sample",
    "check_shards",
    "decode_sample",
    "index_shard",
    "iter_raw_samples",
    "iter_record_samples",
    "layout_of",
    "merged_layouts",
    "open_shard",
    "read_shard",
    "read_verified",
    "rebuild_manifest",
    "verify",
    "write_json_atomic",
]
