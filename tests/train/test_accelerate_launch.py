"""`accelerate launch` runs both stages data-parallel, as torchrun does (two CPU processes, gloo).

The commands are the ones docs/training.md gives for a machine without GPUs, as a user types them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cogvx.shards import Manifest
from tests.conftest import CLIPS, run_launcher


def _accelerate() -> list[str]:
    """The `accelerate` command of this environment."""
    script = Path(sys.executable).parent / "accelerate"
    return [str(script)] if script.is_file() else [shutil.which("accelerate") or "accelerate"]


def _launch(*args: str, cwd: Path) -> None:
    # docs/training.md: without GPUs, --multi-gpu (accelerate's flag for "several processes through
    # torch's launcher") starts the processes, which then run on the CPU with gloo.
    command = [*_accelerate(), "launch", "--multi-gpu", "--num-processes", "2", "-m", "cogvx", *args]
    done = run_launcher(command, cwd=cwd, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_accelerate_launch_preprocesses_and_trains_on_two_processes(tmp_path: Path):
    _launch("preprocess", "--data", str(CLIPS), "--model", "tiny", "--output", "shards", "--workers", "0", cwd=tmp_path)
    manifest = Manifest.load(tmp_path / "shards")
    assert sorted(s.name.split("-")[1] for s in manifest.shards) == ["r00", "r01"]  # each rank wrote its own
    assert manifest.sample_count == 6

    args = ["--shards", "shards", "--output", "run", "--max-steps", "3", "--rank", "4", "--workers", "0"]
    _launch("train", *args, "--mixed-precision", "no", "--checkpoint-every", "0", cwd=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(len(m["samples"]) == 2 for m in lines)  # two processes trained every step
    # Each rank streams its own disjoint share of the cache: no sample is ever on both.
    assert not {k for m in lines for k in m["samples"][0]} & {k for m in lines for k in m["samples"][1]}
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="with several GPUs accelerate starts the processes itself")
def test_accelerate_launch_without_multi_gpu_on_a_cpu_machine_says_what_to_add(tiny_cache: Path, tmp_path: Path):
    """accelerate's plain launcher would train one process for --num-processes 2: refused, with the fix."""
    args = ["--shards", str(tiny_cache), "--output", "run", "--max-steps", "1", "--rank", "4", "--workers", "0"]
    command = [*_accelerate(), "launch", "--num-processes", "2", "-m", "cogvx", "train", *args]
    done = run_launcher(command, cwd=tmp_path, env=os.environ | {"COLUMNS": "1000"})
    assert done.returncode == 1
    expected = (
        "error: `accelerate launch` was asked for 2 processes but started one (without several GPUs its plain "
        "launcher runs a single process). Add --multi-gpu, which starts them through torch's launcher (gloo on "
        "CPUs): accelerate launch --multi-gpu --num-processes 2 -m cogvx train ..."
    )
    assert expected in done.stderr.splitlines(), done.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_tiny_model_built_by_two_ranks_at_once_is_complete(tmp_path: Path):
    """Both ranks of a fresh launch build the tiny model; whichever publishes it, it must be whole."""
    script = tmp_path / "build.py"
    script.write_text(
        "import torch.distributed as dist\n"
        "from cogvx.pipeline import models\n"
        "dist.init_process_group('gloo')\n"  # as the stages do before they resolve the model
        "models.ModelInfo.read('tiny')\n"
        "dist.destroy_process_group()\n"
    )
    env = os.environ | {"COGVX_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = run_launcher(command, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    from cogvx.pipeline.tiny import REQUIRED_FILES

    folder = tmp_path / "home" / "models" / "tiny-v1"
    assert all((folder / name).is_file() for name in REQUIRED_FILES)
