"""``cogvx train --push-to-hub``: a real run uploads its LoRA and card through huggingface_hub's real client.

The Hub is the local stand-in of tests/helpers/hubserver.py, reached through ``HF_ENDPOINT`` (read by the client at
import, so the run is a child process); nothing in the client is patched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cogvx import runs
from tests.helpers.hubserver import HubServer

TOKEN = "hf_cogvxTrainPushToken0123456789"


def _train(cache: Path, run: Path, hub: HubServer, home: Path, *extra: str, token: str | None = TOKEN):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    if token:
        env["HF_TOKEN"] = token
    argv = ["train", "--shards", str(cache), "--output", str(run), "--max-steps", "2", "--rank", "4", "--workers", "0"]
    argv += ["--checkpoint-every", "1", "--push-to-hub", "--hub-model-id", "me/tiny-lora", *extra]
    return subprocess.run([sys.executable, "-m", "cogvx", *argv], env=env, capture_output=True, text=True, timeout=300)


def test_train_pushes_the_lora_card_and_checkpoints_and_never_writes_the_token(tiny_cache, tmp_path):
    run = tmp_path / "run"
    with HubServer(token=TOKEN) as hub:
        done = _train(tiny_cache, run, hub, tmp_path / "hf", "--push-checkpoints")
        assert done.returncode == 0, done.stderr[-3000:]
        files = hub.model_files("me/tiny-lora")
        history = hub.models["me/tiny-lora"].history

    assert files[runs.LORA_WEIGHTS] == runs.lora_weights(run).read_bytes()
    assert files[runs.MODEL_CARD] == runs.model_card(run).read_bytes()
    assert files[runs.CONFIG_TOML] == runs.config_toml(run).read_bytes()
    assert files[runs.LOSS_CURVE] == runs.loss_curve(run).read_bytes()
    # Each checkpoint's LoRA went up as it was written; the last push is the finished run.
    checkpoint = runs.checkpoint(run, 2)
    assert files[f"{checkpoint.name}/{runs.CHECKPOINT_LORA}"] == runs.checkpoint_lora(checkpoint).read_bytes()
    assert f"{runs.checkpoint(run, 1).name}/{runs.CHECKPOINT_LORA}" in files
    assert len(history) == 3
    assert "pushed to " in done.stdout + done.stderr

    written = [p for p in [*run.rglob("*"), *Path(tmp_path / "hf").rglob("*")] if p.is_file()]
    assert not [str(p) for p in written if TOKEN.encode() in p.read_bytes()]
    assert TOKEN not in done.stdout + done.stderr


def test_a_push_without_a_login_is_one_line_and_the_run_stays_complete(tiny_cache, tmp_path):
    run = tmp_path / "run"
    with HubServer(token=TOKEN) as hub:
        done = _train(tiny_cache, run, hub, tmp_path / "hf", token=None)
        assert not hub.requests  # refused before any request
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert "me/tiny-lora" in message and "--resume auto" in message and "hf auth login" in message
    assert runs.lora_weights(run).is_file() and runs.model_card(run).is_file()

    # The way back it names: the same command with --resume auto trains nothing more and pushes.
    with HubServer(token=TOKEN) as hub:
        again = _train(tiny_cache, run, hub, tmp_path / "hf", "--resume", "auto")
        assert again.returncode == 0, again.stderr[-3000:]
        assert hub.model_files("me/tiny-lora")[runs.LORA_WEIGHTS] == runs.lora_weights(run).read_bytes()
    assert len(runs.read_metrics(run)) == 2


def test_push_needs_a_model_id(tiny_cache):
    import pytest

    from cogvx.errors import ConfigError
    from cogvx.train.config import TrainConfig

    with pytest.raises(ConfigError, match="--push-to-hub needs --hub-model-id"):
        TrainConfig(shards=tiny_cache, push_to_hub=True)
