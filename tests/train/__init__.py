"""Tests of cogvx.train: the loop, checkpoints and resume, the stream, evaluation, launchers."""
