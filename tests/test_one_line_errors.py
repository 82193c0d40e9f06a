"""What a user can fix is said in one line, quickly: a hub model that cannot be had, damaged run folders, a
missing optional package. Each case runs the real CLI in a child process with the real condition (no
network, a damaged file, a package that cannot be imported); nothing is patched in the test's process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cogvx.pipeline import models

# The command is timed inside the child after the heavy imports, so a loaded machine's slow imports do not
# count; huggingface_hub's own retries for a file it cannot fetch wait 23 s and more.
TIMED_CLI = """
import sys, time
import diffusers, huggingface_hub, torch, transformers
from cogvx.cli import main
sys.argv = ["cogvx", *sys.argv[1:]]
start = time.monotonic()
try:
    main()
finally:
    print(f"cogvx-took {time.monotonic() - start:.2f}", file=sys.stderr)
"""
FAST_S = 8.0


def closed_port_endpoint() -> str:
    """An http endpoint on localhost that refuses connections: nothing listens on its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def cogvx_cli(*argv: str, env: dict[str, str] | None = None, timed: bool = False) -> subprocess.CompletedProcess:
    """``cogvx ARGV`` in a child process with ``env`` added to a copy of this one's (no HF_ settings of its own)."""
    child = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    child.update(OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1", **(env or {}))
    command = [sys.executable, "-c", TIMED_CLI, *argv] if timed else [sys.executable, "-m", "cogvx", *argv]
    return subprocess.run(command, env=child, capture_output=True, text=True, timeout=180)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The CLI's one-line error: exit 1, no traceback, one ``error:`` line and nothing else on stderr or stdout."""
    lines = [line for line in (done.stdout + done.stderr).splitlines() if not line.startswith("cogvx-took ")]
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    return errors[0]


def took(done: subprocess.CompletedProcess) -> float:
    return float(next(line for line in done.stderr.splitlines() if line.startswith("cogvx-took ")).split()[1])


def hub_cache_with_configs_only(hf_home: Path, repo_id: str) -> None:
    """The tiny model in huggingface_hub's cache layout as ``repo_id``, with its config files and tokenizer but
    none of its weights: what a machine holds after the configs were read and the weights never fetched."""
    commit = "c0" * 20
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    tiny = Path(models.resolve_model("tiny"))
    snapshot = repo / "snapshots" / commit
    for path in tiny.rglob("*"):
        if path.is_file() and not path.name.endswith(".safetensors"):
            target = snapshot / path.relative_to(tiny)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)


@pytest.mark.parametrize("hub", ["offline", "refused"])
def test_preprocess_names_a_hub_model_that_is_neither_cached_nor_reachable_in_one_line_at_once(tmp_path, hub):
    env = {"HF_HOME": str(tmp_path / "hf")}
    env |= {"HF_HUB_OFFLINE": "1"} if hub == "offline" else {"HF_ENDPOINT": closed_port_endpoint()}
    argv = ["preprocess", "--data", "examples/clips", "--output", str(tmp_path / "shards")]
    done = cogvx_cli(*argv, "--model", "someorg/somemodel", env=env, timed=True)

    message = one_line_error(done)
    assert "someorg/somemodel" in message and "not in the local Hugging Face cache" in message, message
    assert "hf download someorg/somemodel" in message and "huggingface-cli download" in message, message
    assert "HF_HUB_OFFLINE=1" in message and "--model" in message, message
    assert ("HF_HUB_OFFLINE is set" if hub == "offline" else "cannot reach http://127.0.0.1") in message, message
    assert took(done) < FAST_S, done.stderr[-2000:]
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("hub", ["offline", "refused"])
def test_train_names_the_transformer_a_half_cached_hub_model_lacks_in_one_line_at_once(tiny_cache, tmp_path, hub):
    """The configs (and so the encoders' identity) are cached, the transformer's weights are not: the
    case of a machine that preprocessed with a model and trains without network."""
    hub_cache_with_configs_only(tmp_path / "hf", "someorg/tinyish")
    env = {"HF_HOME": str(tmp_path / "hf")}
    env |= {"HF_HUB_OFFLINE": "1"} if hub == "offline" else {"HF_ENDPOINT": closed_port_endpoint()}
    argv = ["train", "--shards", str(tiny_cache), "--output", str(tmp_path / "run"), "--max-steps", "1"]
    done = cogvx_cli(*argv, "--model", "someorg/tinyish", "--workers", "0", env=env, timed=True)

    message = one_line_error(done)
    assert "the transformer files of model someorg/tinyish" in message, message
    assert "hf download someorg/tinyish" in message, message
    assert took(done) < FAST_S, done.stderr[-2000:]
