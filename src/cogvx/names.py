"""Names and defaults that the stage configs share with the heavy modules that use them, importable without torch.

The configs (and so the CLI's help) need these at import time; the modules that own their meaning
(``pipeline/models.py``, ``pipeline/lora.py``, ``pipeline/speed/checkpointing.py``, ``shards/writer.py``,
``media.py``) import them from here, so each is written once and ``cogvx --help`` loads no tensor library.
"""

from __future__ import annotations

DEFAULT_MODEL = "THUDM/CogVideoX-2b"
# The frame rate CogVideoX 1.0 was trained at: clips are sampled at it and videos written at it by default.
NATIVE_FPS = 8
DTYPE_NAMES = ("bf16", "fp16", "fp32")  # the one dtype vocabulary (pipeline/models.py maps them to torch dtypes)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # TrainConfig.targets' default: attention projections
AUTO = "auto"  # --checkpointing: predict each mode's peak memory and take the fastest that fits (pipeline/memory.py)
# A shard is finished once it reaches either limit (PreprocessConfig's shard_max_mb / shard_max_samples).
SHARD_MAX_BYTES = 512 * 2**20
SHARD_MAX_SAMPLES = 1000
# Set before CUDA's first allocation (pipeline/memory.py's use_expandable_segments says why), unless the user chose.
ALLOC_CONF = ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
SHEET_COLUMNS = 8  # frames per video in a contact sheet, unless sheet_columns says otherwise
