"""Small caches for the shards tests: samples with their index lines, a written cache, raw tar bytes."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import torch

from cogvx.shards import Manifest, Sample, SampleEntry, ShardRecord, ShardWriter

BUCKET = "1x16x16"
LAYOUT = {
    "moments": {"dtype": "float32", "shape": [2, 1, 2, 2]},
    "prompt_embeds": {"dtype": "float32", "shape": [3, 4]},
}


def sample_and_entry(i: int) -> tuple[Sample, SampleEntry]:
    """Sample ``k{i}`` of bucket BUCKET (layout LAYOUT, a .jpg extra) and its index line."""
    tensors = {"moments": torch.full((2, 1, 2, 2), float(i)), "prompt_embeds": torch.arange(12.0).reshape(3, 4) + i}
    entry = SampleEntry(f"k{i}", f"v{i}", f"h{i}", BUCKET, size=100 + i, mtime_ns=10**18 + i, caption_hash=f"c{i}")
    return Sample(f"k{i}", tensors, {"bucket": BUCKET, "i": i}, {"jpg": bytes([i]) * 3}), entry


def manifest_of(folder: Path, records: list[ShardRecord]) -> Manifest:
    """A manifest listing ``records``, saved in ``folder``."""
    manifest = Manifest(producer={"model": "test"}, params={}, schema={}, shards=records)
    manifest.save(folder)
    return manifest


def written_cache(folder: Path, samples: int = 3, header: dict | None = None) -> Manifest:
    """A cache of ``samples`` samples (``sample_and_entry``), two to a shard."""
    records: list[ShardRecord] = []
    writer = ShardWriter(folder, "shard-r00", records.append, max_samples=2, header=header)
    for i in range(samples):
        writer.write(*sample_and_entry(i))
    writer.flush()
    return manifest_of(folder, records)


def tar_bytes(members: list[tuple[str, bytes]], pax: dict[str, str] | None = None) -> bytes:
    """A pax tar of ``members`` (name, bytes), with ``pax`` as its global header."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers=pax or {}) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def refusal_without_blocking(fifo: Path, call, seconds: float = 5.0) -> BaseException:
    """What ``call`` raises for a FIFO nobody writes to; fails (instead of hanging) if it blocks opening it."""
    import threading

    raised: list[BaseException] = []

    def target():
        try:
            call()
        except BaseException as err:  # handed to the test below
            raised.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer appears: the blocked open returns
        thread.join(seconds)
        pytest.fail(f"opening {fifo} blocked")
    assert raised, f"{fifo} was read as if it were a file"
    return raised[0]
