"""What a user can fix is said in one line, quickly: a hub model that cannot be had, damaged run folders, a
missing optional package. Each case runs the real CLI in a child process with the real condition (no
network, a damaged file, a package that cannot be imported); nothing is patched in the test's process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cogvx import runs
from cogvx.cli import app
from cogvx.pipeline import models
from tests.helpers.hubserver import HubServer
from tests.helpers.runfolders import PROMPTS, make_validation, train_lora

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


# --------------------------------------------------------------------------- damaged run folders


@pytest.fixture(scope="module")
def trained_run(tiny_cache, tmp_path_factory) -> Path:
    """A finished tiny run with one step of validation latents: what report, render and sample read."""
    run = train_lora(tiny_cache, tmp_path_factory.mktemp("trained") / "run", steps=2)
    make_validation(run, steps=(2,), prompts=PROMPTS[:1])
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def cli_one_line_error(*argv: str) -> str:
    """``cogvx ARGV`` through the real CLI in this process: exit 1 with one ``error:`` line and nothing else."""
    result = CliRunner().invoke(app, list(argv))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def set_config(run: Path, text: str) -> Path:
    runs.config_json(run).write_text(text)
    return runs.config_json(run)


def test_report_names_a_config_json_that_is_not_json(run_copy):
    path = set_config(run_copy, '{"model": "tiny", "rank": ')
    message = cli_one_line_error("report", str(run_copy))
    assert str(path) in message and "not valid JSON" in message


@pytest.mark.parametrize(
    ("command", "key", "value"),
    [("report", "model", 5), ("report", "shards", ["a", "b"]), ("sample", "model", {"name": "tiny"})],
)
def test_a_config_json_value_of_the_wrong_type_is_one_line_naming_the_file_and_key(run_copy, command, key, value):
    config = json.loads(runs.config_json(run_copy).read_text()) | {key: value}
    path = set_config(run_copy, json.dumps(config))
    argv = ["report", str(run_copy)] if command == "report" else ["sample", "--lora", str(run_copy), "--prompt", "x"]
    message = cli_one_line_error(*argv)
    assert str(path) in message and key in message, message
    assert repr(value) in message, message


def test_a_config_json_without_keys_still_reports_from_what_the_run_holds(run_copy):
    set_config(run_copy, "{}")
    result = CliRunner().invoke(app, ["report", str(run_copy)])
    assert result.exit_code == 0, result.output
    assert (
        runs.report(run_copy).is_file()
        and runs.validation_video(runs.validation_sample(runs.validation_step(run_copy, 2), 0)).is_file()
    )


@pytest.mark.parametrize("size", [0, 50, 4000])
def test_sample_names_a_cut_short_lora_file_before_loading_the_model(run_copy, size):
    weights = runs.lora_weights(run_copy)
    with weights.open("r+b") as f:
        f.truncate(size)
    message = cli_one_line_error("sample", "--lora", str(run_copy), "--prompt", "x", "--steps", "1")
    assert str(weights) in message and "not a readable safetensors file" in message, message
    assert "copy it again" in message and "train it again" in message, message


def test_render_names_cut_short_validation_latents(run_copy):
    sample = runs.validation_sample(runs.validation_step(run_copy, 2), 0)
    with sample.open("r+b") as f:
        f.truncate(sample.stat().st_size // 2)
    message = cli_one_line_error("render", str(run_copy))
    assert str(sample) in message and "not a readable safetensors file" in message, message


# --------------------------------------------------------------------------- a missing optional package

# Put first on PYTHONPATH, this makes ``import imageio_ffmpeg`` fail in the child as if it were not installed.
BLOCK_IMAGEIO_FFMPEG = """
import sys


class BlockImageioFfmpeg:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "imageio_ffmpeg":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, BlockImageioFfmpeg())
"""


def test_report_without_imageio_ffmpeg_is_one_line_with_the_pip_command(run_copy, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_IMAGEIO_FFMPEG)
    path = os.pathsep.join(p for p in (str(blocker), os.environ.get("PYTHONPATH", "")) if p)
    done = cogvx_cli("report", str(run_copy), env={"PYTHONPATH": path})

    message = one_line_error(done)
    assert "pip install imageio imageio-ffmpeg" in message and "imageio_ffmpeg" in message, message
    assert not list(runs.validation(run_copy).rglob("*.mp4")) and not runs.report(run_copy).exists()


def test_a_hub_model_downloaded_once_needs_no_network_after(tmp_path):
    """The same command first downloads the model from the hub (tests/helpers/hubserver.py), then runs from the cache
    alone while the endpoint refuses connections."""
    env = {"HF_HOME": str(tmp_path / "hf")}
    argv = ["preprocess", "--data", "examples/clips", "--model", "someorg/tinyhub", "--workers", "0"]
    with HubServer() as hub:
        hub.serve_model("someorg/tinyhub", Path(models.resolve_model("tiny")))
        online = cogvx_cli(*argv, "--output", str(tmp_path / "online"), env=env | {"HF_ENDPOINT": hub.url})
        assert online.returncode == 0, online.stderr[-3000:]
        assert hub.requests_to("GET", "/someorg/tinyhub/resolve/")

    offline = cogvx_cli(*argv, "--output", str(tmp_path / "offline"), env=env | {"HF_ENDPOINT": closed_port_endpoint()})
    assert offline.returncode == 0, offline.stderr[-3000:]
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("online", "offline")]
    assert (
        manifests[0]["producer"] == manifests[1]["producer"] and manifests[0]["producer"]["model"] == "someorg/tinyhub"
    )


def test_a_hub_model_the_endpoint_does_not_have_is_one_line(tmp_path):
    argv = ["preprocess", "--data", "examples/clips", "--output", str(tmp_path / "shards")]
    with HubServer() as hub:
        done = cogvx_cli(
            *argv, "--model", "someorg/nosuchmodel", env={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url}
        )
    message = one_line_error(done)
    assert "someorg/nosuchmodel" in message and "no such model" in message and hub.url in message, message
