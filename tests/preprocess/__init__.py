"""Tests of cogvx.preprocess: clips in, samples out, local and remote caches, resume after a kill."""
