"""Training runs for the resume tests (stopped by an exception or killed at a step or a durable write) and a
CogVideoX 1.5-style tiny model."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

from cogvx import config as configfile
from cogvx.pipeline import models
from cogvx.train.config import TrainConfig


class Stop(Exception):
    """Raised from a step hook to stop a run in this process after a chosen step."""


def resume_config(shards: Path, output: Path, **overrides) -> TrainConfig:
    """A 6-step tiny run that checkpoints every 2 steps, with ``overrides``."""
    # Dropout, warm-up and a cosine schedule make every piece of state matter for the next step's loss.
    settings = dict(
        shards=shards, output=output, max_steps=6, rank=4, alpha=8, lora_dropout=0.1, learning_rate=5e-3,
        lr_scheduler="cosine", lr_warmup_steps=2, mixed_precision="no", workers=0, checkpoint_every=2,
        keep_checkpoints=2, shuffle_buffer=4,
    )  # fmt: skip
    return TrainConfig(**(settings | overrides))


def stop_after(step: int):
    """A step hook that raises ``Stop`` once ``step`` is done."""

    def hook(record):
        if record["step"] == step:
            raise Stop

    return hook


# A run in its own process that SIGKILLs itself at a chosen point: after step N ("step", N) or at the
# N-th durable write into the run folder ("write", N: each fsync or rename there, counted before it
# happens), which lands inside a checkpoint write. The kill is the real signal: no cleanup runs.
KILLED_RUN = """
import os, signal, sys
from cogvx import config as configfile
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run

cfg = configfile.build(TrainConfig, sys.argv[1])
kind, at = sys.argv[2], int(sys.argv[3])
folder = os.path.realpath(cfg.output)
writes = [0]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def counted(real, path_of):
    def call(*args, **kwargs):
        path = os.path.realpath(path_of(*args))
        if path == folder or path.startswith(folder + os.sep):
            writes[0] += 1
            if kind == "write" and writes[0] == at:
                die()
        return real(*args, **kwargs)
    return call

os.fsync = counted(os.fsync, lambda fd: os.readlink(f"/proc/self/fd/{fd}"))
os.replace = counted(os.replace, lambda source, target: source)
run(cfg, on_step=lambda record: die() if kind == "step" and record["step"] == at else None)
"""


def train_until_killed(cfg: TrainConfig, kind: str, at: int, folder: Path) -> int:
    """Run ``cfg`` in a child process that SIGKILLs itself at ("step"|"write", at); its return code."""
    (folder / "killed.toml").write_text(configfile.to_toml(cfg))
    (folder / "killed.py").write_text(KILLED_RUN)
    command = [sys.executable, str(folder / "killed.py"), str(folder / "killed.toml"), kind, str(at)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
    return done.returncode


def tiny_15(folder: Path) -> Path:
    """tiny with a CogVideoX 1.5-style transformer: two latent frames per token (patch_size_t=2)."""
    from diffusers import CogVideoXTransformer3DModel

    shutil.copytree(models.resolve_model("tiny"), folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config.update(patch_size_t=2, patch_bias=False, sample_frames=81)
    torch.manual_seed(3)
    CogVideoXTransformer3DModel.from_config(config).save_pretrained(folder / "transformer")
    return folder
