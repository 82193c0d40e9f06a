"""Tests of cogvx.pipeline: the objective, LoRA, speed levers, the memory model, model loading."""
