"""The speed and memory levers of a CogVideoX transformer block, one module per concern.

``attention`` (the attention kernel: PyTorch's SDPA or FlashAttention-3), ``checkpointing`` (what a block
keeps for the backward pass, one object per mode), ``swap`` (the blocks' frozen weights in CPU memory),
``float8`` (float8 storage and products of the frozen weights) and ``compiling`` (``torch.compile`` and its
persistent cache); ``inference`` serves forwards without gradients (validation, the eval score) with the same
levers, less the checkpointing. ``pipeline/levers.py`` applies them together.
"""
