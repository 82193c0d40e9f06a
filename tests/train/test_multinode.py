"""Many nodes: two torchrun "nodes" on this machine train exactly as one node with as many processes.

Each node is its own `torchrun --nnodes 2 --node-rank K --nproc-per-node 2` (static rendezvous on
127.0.0.1, gloo on CPU processes) running `python -m cogvx train`, as docs/training.md tells users to
start them. Each node runs in a folder of its own and is given the same relative `--output`: the run
folders are two disks that do not see each other, so anything node 1 wrote would show there.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cogvx.runs import read_metrics

STEPS = 3
TIMEOUT = 240  # seconds for a launch of both nodes
GRACE = 20  # seconds a node may go on after the other failed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(cache: Path, *extra: str) -> list[str]:
    return [
        "-m", "cogvx", "train", "--shards", str(cache), "--output", "run", "--max-steps", str(STEPS),
        "--rank", "4", "--learning-rate", "1e-2", "--mixed-precision", "no", "--workers", "0",
        "--lora-dropout", "0.1", "--seed", "5", "--checkpoint-every", str(STEPS), *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "COLUMNS": "1000"}


def _kill_tree(process: subprocess.Popen) -> None:
    try:
        launcher = psutil.Process(process.pid)
        for proc in [*launcher.children(recursive=True), launcher]:
            proc.kill()
    except psutil.NoSuchProcess:
        pass


def _node(rank: int, port: int, per_node: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
        "--nproc-per-node", str(per_node), "--master-addr", "127.0.0.1", "--master-port", str(port),
    ]  # fmt: skip


def _launch(launches: list[tuple[list[str], Path]]) -> list[subprocess.CompletedProcess]:
    """Launchers run together, each in its folder; once one fails the others have GRACE seconds to end
    (a node whose peer died would wait for it), then every process left is killed."""
    running = []
    for command, folder in launches:
        folder.mkdir(exist_ok=True)
        out = open(folder / "launch.out", "w+")  # noqa: SIM115 - read back below
        err = open(folder / "launch.err", "w+")  # noqa: SIM115
        running.append((subprocess.Popen(command, cwd=folder, env=_env(), stdout=out, stderr=err, text=True), out, err))
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p, _, _ in running) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p, _, _ in running):
                deadline = min(deadline, time.monotonic() + GRACE)
            time.sleep(0.2)
        hung = any(p.poll() is None for p, _, _ in running)
    finally:
        for p, _, _ in running:
            _kill_tree(p)
            p.wait(timeout=60)
    done = []
    for p, out, err in running:
        out.seek(0), err.seek(0)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()))
        out.close(), err.close()
    if hung:
        tails = "\n".join(d.stderr[-3000:] for d in done)
        pytest.fail(f"a launch hung (killed after {TIMEOUT} s, or {GRACE} s after another failed):\n{tails}")
    return done


def _rank_keys(records: list[dict]) -> list[set[str]]:
    """The samples each process trained on over the run (metrics.jsonl lists them per process per step)."""
    world = len(records[0]["samples"])
    return [{key for r in records for key in r["samples"][rank]} for rank in range(world)]


@pytest.mark.slow
def test_two_nodes_of_two_processes_train_as_one_node_of_four(tiny_cache: Path, tmp_path: Path):
    nodes, single = [tmp_path / "node0", tmp_path / "node1"], tmp_path / "single"
    port = _free_port()
    standalone = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    launches = _launch(
        [(_node(0, port, 2) + _train(tiny_cache), nodes[0]), (_node(1, port, 2) + _train(tiny_cache), nodes[1])]
        + [(standalone + _train(tiny_cache), single)]
    )
    for name, done in zip(["node 0", "node 1", "one node"], launches, strict=True):
        assert done.returncode == 0, f"{name}:\n{done.stdout[-2000:]}{done.stderr[-4000:]}"

    two, one = read_metrics(nodes[0] / "run"), read_metrics(single / "run")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    # Global rank r is the same process in both launches: same samples, same noise, same losses.
    assert [r["samples"] for r in two] == [r["samples"] for r in one]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-6, abs=0)
    for records in (two, one):
        shares = _rank_keys(records)
        assert len(shares) == 4 and all(shares)
        assert sum(map(len, shares)) == len(set().union(*shares))  # no sample on two processes

    # Only the global main process (node 0's first) took the lock and wrote the run folder; node 1's
    # first process, local rank 0 as well, wrote nothing on its own disk.
    written = {p.name for p in (nodes[0] / "run").iterdir()}
    assert {".lock", "metrics.jsonl", "config.toml", "pytorch_lora_weights.safetensors"} <= written
    assert f"checkpoint-{STEPS:06d}" in written
    assert not (nodes[1] / "run").exists()
    said = [done.stdout + done.stderr for done in launches[:2]]
    assert f"trained {STEPS} steps" in said[0] and "trained" not in said[1]

    # Resuming needs the checkpoint on every node: node 1 cannot see node 0's disk, so every process
    # stops with one line, before loading the model, instead of node 1 starting over while node 0
    # resumes. (One process a node: the refusal is the same, and it costs half the start-up.)
    port, resume = _free_port(), _train(tiny_cache, "--resume", "auto")
    launches = _launch([(_node(0, port, 1) + resume, nodes[0]), (_node(1, port, 1) + resume, nodes[1])])
    assert all(done.returncode != 0 for done in launches)
    stderr = launches[0].stderr + launches[1].stderr
    refusal = (
        f"error: The main process resumes from run/checkpoint-{STEPS:06d}, which process 1 cannot read (no "
        "state.json there). On several machines --output must be a folder every machine reads at the same path "
        "(a shared filesystem), or copy the run folder to each machine."
    )
    assert stderr.count(refusal) == 2, stderr[-4000:]
    assert not (nodes[1] / "run").exists()
