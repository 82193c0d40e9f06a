"""The on-disk cache: a folder with ``manifest.json`` and webdataset tar shards of safetensors samples.

This package knows nothing about CogVideoX: it stores named tensors and JSON metadata per sample,
checks shards against the manifest, and never unpickles anything. See docs/cache-format.md.
"""

from cogvx.shards.io import (
    Sample,
    ShardWriter,
    decode_sample,
    iter_raw_samples,
    iter_record_samples,
    read_shard,
    read_verified,
    verify,
)
from cogvx.shards.manifest import (
    MANIFEST_NAME,
    CacheError,
    Manifest,
    SampleEntry,
    ShardRecord,
    write_json_atomic,
)

__all__ = [
    "MANIFEST_NAME",
    "CacheError",
    "Manifest",
    "Sample",
    "SampleEntry",
    "ShardRecord",
    "ShardWriter",
    "decode_sample",
    "iter_raw_samples",
    "iter_record_samples",
    "read_shard",
    "read_verified",
    "verify",
    "write_json_atomic",
]
