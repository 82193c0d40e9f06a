"""The on-disk cache: a folder with ``manifest.json`` and webdataset tar shards of safetensors samples.

This package knows nothing about CogVideoX: it stores named tensors and JSON metadata per sample,
checks shards and samples against the manifest, and never unpickles anything. See docs/cache-format.md.

One module per job, importing only those before it: ``codec`` (a sample's members) <- ``tar`` (the
bounded tar reader) <- ``checks`` (the one sample check) <- ``shardfile`` (a listed shard, opened through
its sha256) <- ``reader`` (checked samples of a shard) <- ``writer`` <- ``verify`` (a whole cache) <-
``rebuild`` (a record from a shard alone); ``manifest``, ``layouts``, ``paths``, ``urls`` and ``store`` are
below them all.
"""

from cogvx.files import write_json_atomic
from cogvx.shards.checks import check_sample
from cogvx.shards.codec import RawSample, Sample, layout_of
from cogvx.shards.manifest import CacheError, Manifest, SampleEntry, ShardRecord, merged_layouts
from cogvx.shards.reader import decode, decode_sample, iter_record_samples, read_shard, record_samples
from cogvx.shards.rebuild import index_shard
from cogvx.shards.shardfile import file_sha256, open_shard, read_verified
from cogvx.shards.tar import iter_raw_samples
from cogvx.shards.tools import rebuild_manifest
from cogvx.shards.verify import check_shards, verify
from cogvx.shards.writer import ShardWriter

__all__ = [
    "CacheError",
    "Manifest",
    "RawSample",
    "Sample",
    "SampleEntry",
    "ShardRecord",
    "ShardWriter",
    "check_sample",
    "check_shards",
    "decode",
    "decode_sample",
    "file_sha256",
    "index_shard",
    "iter_raw_samples",
    "iter_record_samples",
    "layout_of",
    "merged_layouts",
    "open_shard",
    "read_shard",
    "read_verified",
    "rebuild_manifest",
    "record_samples",
    "verify",
    "write_json_atomic",
]
