"""Tests of cogvx.shards: the cache format, its reader, writer, verifier and stores."""
