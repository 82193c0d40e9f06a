"""Data-parallel training: `torchrun -m cogvx train` with 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogvx.runs import read_metrics
from tests.conftest import run_launcher

# `python -m cogvx` under torchrun, with each rank's final LoRA captured for the comparison.
_LAUNCH = """
import os, sys
from safetensors.torch import save_file
import cogvx.train.loop as loop
from cogvx.cli import app
from cogvx.pipeline import lora

real_run = loop.run

def run_and_keep_weights(cfg, **kwargs):
    result = real_run(cfg, **kwargs)
    save_file(lora.lora_state_dict(result.model), f"{sys.argv[1]}/rank{os.environ['RANK']}.safetensors")
    return result

loop.run = run_and_keep_weights
app(sys.argv[2:], prog_name="cogvx")
"""


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tiny_cache: Path, tmp_path: Path):
    script = tmp_path / "launch.py"
    script.write_text(_LAUNCH)
    output = tmp_path / "run"
    steps = 4
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
        str(tmp_path), "train", "--shards", str(tiny_cache), "--output", str(output), "--max-steps", str(steps),
        "--rank", "4", "--learning-rate", "1e-2", "--mixed-precision", "no", "--workers", "0",
        "--checkpoint-every", "2", "--lora-dropout", "0.1",
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = run_launcher(command, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # One metrics file, each step once, and each step trained one sample on each of the two processes.
    records = read_metrics(output)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    per_rank = [r["samples"] for r in records]
    assert all(len(ranks) == 2 and all(len(keys) == 1 for keys in ranks) for ranks in per_rank)
    rank0 = [ranks[0][0] for ranks in per_rank]
    rank1 = [ranks[1][0] for ranks in per_rank]
    assert rank0 != rank1  # the processes read different streams
    assert list(output.glob("metrics*")) == [output / "metrics.jsonl"]

    # DDP kept the replicas identical, and the saved LoRA is theirs.
    weights = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    saved = load_file(output / "pytorch_lora_weights.safetensors")
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(w.abs().sum() > 0 for k, w in weights[0].items() if "lora_B" in k)  # training moved lora_B
    assert all(torch.equal(saved[f"transformer.{k}"], w) for k, w in weights[0].items())
    assert (output / "checkpoint-000002" / "state.json").is_file()


# Each report is one write of a whole line: the two processes share the pipe, and print() writes the
# text and its newline apart, so lines of both could interleave.
_DIVERGED = """
import sys
import torch
from accelerate import Accelerator
from cogvx.train.launch import check_replicas_agree as _check_replicas_agree

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
_check_replicas_agree(accelerator, [torch.nn.Parameter(torch.ones(3))])  # the same on both: no error
sys.stdout.write(f"rank {rank}: equal ok\\n"); sys.stdout.flush()
differ = torch.ones(3)
differ[1] += rank * 1e-6  # one weight a little off on process 1
try:
    _check_replicas_agree(accelerator, [torch.nn.Parameter(differ)])
except RuntimeError as err:
    sys.stdout.write(f"rank {rank}: {err}\\n"); sys.stdout.flush()
accelerator.wait_for_everyone()
accelerator.end_training()
"""


@pytest.mark.slow
def test_replicas_whose_lora_differs_stop_with_an_error_on_every_process(tmp_path: Path):
    script = tmp_path / "diverged.py"
    script.write_text(_DIVERGED)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    done = run_launcher(command, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum("equal ok" in line for line in lines) == 2, done.stdout[-3000:]
    for rank in (0, 1):
        found = [line for line in lines if f"rank {rank}: The LoRA weights differ between processes" in line]
        assert len(found) == 1 and "data-parallel training went out of sync" in found[0], done.stdout[-3000:]


@pytest.mark.slow
def test_a_data_parallel_run_into_a_busy_folder_stops_every_process_at_once(tiny_cache: Path, tmp_path: Path):
    """The main process is refused the run folder's lock; the others learn it instead of waiting forever."""
    from cogvx.train.checkpoint import lock_run_folder

    output = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cogvx",
        "train", "--shards", str(tiny_cache), "--output", str(output), "--max-steps", "2", "--rank", "4",
        "--mixed-precision", "no", "--workers", "0",
    ]  # fmt: skip
    with lock_run_folder(output):  # another run holds the folder
        done = run_launcher(command, env=os.environ | {"OMP_NUM_THREADS": "1", "COLUMNS": "1000"})
    assert done.returncode != 0
    refusal = f"error: Another `cogvx train` is running in {output}. Wait for it to finish, or use another --output."
    assert done.stderr.count(refusal) == 2, done.stderr[-3000:]  # both processes, one line each
    assert sorted(p.name for p in output.iterdir()) == [".lock"]  # nothing written
