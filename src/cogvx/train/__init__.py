"""``cogvx train``: a LoRA trained from a cache, the run made of parts with one job each (see loop.py)."""
