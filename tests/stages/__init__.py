"""Tests of the stages that read a run folder: sample, render, report, compare."""
