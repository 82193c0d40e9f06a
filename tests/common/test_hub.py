"""cogvx.hub against a local stand-in for the Hub (tests/helpers/hubserver.py), through huggingface_hub's real client.

huggingface_hub reads ``HF_ENDPOINT`` once, at import, so every call runs in a fresh Python process with
``HF_ENDPOINT`` pointing at the local server and ``HF_HOME`` at a private folder (its cache and any stored
token); nothing in the client is patched. Each call prints its result (or the CogvxError's one line) as
JSON on the last stdout line, and the whole traceback of an error on stderr, so tests can check that the
token shows up nowhere.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cogvx import hub, runs
from cogvx.errors import InputError, RunError
from cogvx.preprocess.sources import find_sources
from tests.conftest import CLIPS
from tests.helpers.hubserver import HubServer

TOKEN = "hf_cogvxTestToken0123456789abcdef"

DRIVER = r"""
import json, sys, traceback
from pathlib import Path
from cogvx import hub
from cogvx.errors import CogvxError

for args in json.loads(sys.argv[1]):
    try:
        if args["call"] == "resolve":
            result = str(hub.resolve_dataset(args["data"]))
        else:
            checkpoint = Path(args["checkpoint"]) if args.get("checkpoint") else None
            result = hub.push_run(
                Path(args["run"]), args["repo_id"], private=args.get("private", False),
                commit_message=args["message"], checkpoint=checkpoint,
            )
    except CogvxError as err:
        traceback.print_exc()
        print(json.dumps({"error": str(err), "type": type(err).__name__}))
    else:
        print(json.dumps({"result": result}))
"""


class Client:
    """Runs cogvx.hub in a child process against ``endpoint``, with its own HF_HOME."""

    def __init__(self, endpoint: str, home: Path) -> None:
        self.endpoint, self.home = endpoint, home
        self.outputs: list[str] = []  # every stdout and stderr, to search for the token

    def run(self, calls: list[dict], token: str | None = None, offline: bool = False) -> list[dict]:
        """Each call's answer, the calls made one after another in one process (one import of the client)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=self.endpoint, HF_HOME=str(self.home), HF_HUB_DISABLE_TELEMETRY="1")
        if token is not None:
            env["HF_TOKEN"] = token
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        done = subprocess.run(
            [sys.executable, "-c", DRIVER, json.dumps(calls)], env=env, capture_output=True, text=True, timeout=60
        )
        self.outputs += [done.stdout, done.stderr]
        assert done.returncode == 0, done.stderr
        answers = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        assert len(answers) == len(calls), done.stdout
        return answers

    def resolve(self, *urls: str, **kw) -> dict | list[dict]:
        answers = self.run([{"call": "resolve", "data": url} for url in urls], **kw)
        return answers[0] if len(urls) == 1 else answers

    def push(self, run: Path, repo_id: str, message: str = "LoRA from cogvx", **kw) -> dict:
        token, offline = kw.pop("token", TOKEN), kw.pop("offline", False)
        call = {"call": "push", "run": str(run), "repo_id": repo_id, "message": message, **kw}
        return self.run([call], token=token, offline=offline)[0]


@pytest.fixture
def server():
    with HubServer(token=TOKEN) as running:
        yield running


@pytest.fixture
def client(server, tmp_path) -> Client:
    return Client(server.url, tmp_path / "hf-home")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(answer: dict, kind: str = "InputError") -> str:
    assert answer.get("type") == kind, answer
    assert "\n" not in answer["error"]
    return answer["error"]


# --- datasets in ---


def test_dataset_download_gives_the_same_files_in_the_hf_cache(server, client):
    commit = server.serve_dataset("me/clips", CLIPS)

    folder = Path(client.resolve("hf://datasets/me/clips")["result"])

    assert folder == client.home / "hub" / "datasets--me--clips" / "snapshots" / commit  # HF_HOME's normal cache
    assert _files(folder) == _files(CLIPS)
    local, downloaded = find_sources(CLIPS), find_sources(folder)
    assert [(c.source, c.caption) for c in downloaded.clips] == [(c.source, c.caption) for c in local.clips]
    assert len(downloaded.clips) == 6 and not downloaded.skipped
    assert not server.unhandled
    # The client was sent no token it did not have, and asked for nothing but the dataset's routes.
    assert all("authorization" not in r.headers for r in server.requests)
    assert {r.path.split("/")[1] for r in server.requests} == {"api", "datasets"}

    # Downloaded once, it is found again offline; the snapshot folder is then just a local folder.
    before = len(server.requests)
    assert Path(client.resolve("hf://datasets/me/clips", offline=True)["result"]) == folder
    assert len(server.requests) == before
    assert hub.resolve_dataset(str(folder)) == folder


def test_revision_and_folder_forms(server, client, tmp_path):
    server.serve_dataset("me/clips", CLIPS)
    tree = tmp_path / "v1"
    for part in ("train", "extra"):
        (tree / part).mkdir(parents=True)
        for clip in sorted(CLIPS.glob("*.mp4"))[:2]:
            (tree / part / clip.name).write_bytes(clip.read_bytes())
            (tree / part / clip.with_suffix(".txt").name).write_text(f"{part} {clip.stem}")
    v1 = server.serve_dataset("me/clips", tree, revision="v1")

    whole, train = client.resolve("hf://datasets/me/clips@v1", "hf://datasets/me/clips@v1/train")
    whole, train = Path(whole["result"]), Path(train["result"])
    assert whole.name == v1 and _files(whole) == _files(tree)

    assert train == client.home / "hub" / "datasets--me--clips" / "snapshots" / v1 / "train"
    assert _files(train) == _files(tree / "train")
    stems = [clip.stem for clip in sorted(CLIPS.glob("*.mp4"))[:2]]
    assert [clip.caption for clip in find_sources(train).clips] == [f"train {stem}" for stem in stems]

    # A folder on the default branch: only that folder is fetched.
    fresh = Client(server.url, tmp_path / "fresh-home")
    server.requests.clear()
    root = server.serve_dataset("me/nested", tmp_path / "v1")
    folder = Path(fresh.resolve("hf://datasets/me/nested/extra")["result"])
    assert _files(folder) == _files(tree / "extra")
    downloads = [r.path for r in server.requests if r.method == "GET" and "/resolve/" in r.path]
    fetched = {path.rsplit(f"/{root}/", 1)[-1] for path in downloads}
    assert fetched == {f"extra/{name}" for name in _files(tree / "extra")}
    assert not (folder.parent / "train").exists()


def test_missing_repo_revision_or_folder_is_one_line(server, client):
    server.serve_dataset("me/clips", CLIPS)

    repo, revision, folder = client.resolve(
        "hf://datasets/me/nothing", "hf://datasets/me/clips@v9", "hf://datasets/me/clips/missing"
    )

    message = _one_line_error(repo)
    assert "hf://datasets/me/nothing" in message and "me/nothing" in message and "hf auth login" in message
    message = _one_line_error(revision)
    assert "hf://datasets/me/clips@v9" in message and "'v9'" in message
    message = _one_line_error(folder)
    assert "'missing'" in message and "hf://datasets/me/clips/missing" in message


def test_private_dataset_needs_a_login(server, client):
    server.serve_dataset("me/secret", CLIPS, private=True)

    message = _one_line_error(client.resolve("hf://datasets/me/secret"))
    assert "private" in message and "HF_TOKEN" in message

    folder = Path(client.resolve("hf://datasets/me/secret", token=TOKEN)["result"])
    assert _files(folder) == _files(CLIPS)
    assert server.requests[-1].headers["authorization"] == f"Bearer {TOKEN}"
    assert not any(TOKEN in output for output in client.outputs)


def test_gated_dataset_says_to_accept_its_terms(server, client):
    server.serve_dataset("me/gated", CLIPS, gated=True)

    message = _one_line_error(client.resolve("hf://datasets/me/gated"))
    assert "gated" in message and "accept its terms" in message and "HF_TOKEN" in message

    assert _files(Path(client.resolve("hf://datasets/me/gated", token=TOKEN)["result"])) == _files(CLIPS)


def test_no_network_and_nothing_downloaded_is_one_line(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = Client(f"http://127.0.0.1:{port}", tmp_path / "hf-home")

    message = _one_line_error(client.resolve("hf://datasets/me/clips"))
    assert "cannot reach" in message and "HF_HUB_OFFLINE=1" in message

    message = _one_line_error(client.resolve("hf://datasets/me/clips", offline=True))
    assert "HF_HUB_OFFLINE=1" in message


@pytest.mark.parametrize(
    "url",
    [
        "hf://me/clips",
        "hf://models/me/lora",
        "hf://datasets/me",
        "hf://datasets/me/clips@",
        "hf://datasets/me/cl$ps",
        "hf://datasets/me/clips/../up",
    ],
)
def test_malformed_dataset_url_is_one_line(url):
    with pytest.raises(InputError) as caught:
        hub.resolve_dataset(url)
    assert str(caught.value).startswith(f"--data {url}:") and hub.DATASET_FORM in str(caught.value)
    assert "\n" not in str(caught.value)


def test_dataset_url_parts():
    assert hub.parse_dataset_url("hf://datasets/me/clips@refs/pr/3/train/a") == hub.DatasetURL(
        "hf://datasets/me/clips@refs/pr/3/train/a", "me/clips", "refs/pr/3", "train/a"
    )
    assert hub.parse_dataset_url("hf://datasets/me/clips@refs%2Fpr%2F3").revision == "refs/pr/3"
    assert hub.parse_dataset_url("hf://datasets/me/clips/").folder == ""
    assert hub.hub_url(Path("hf://datasets/me/clips@v1/train")) == "hf://datasets/me/clips@v1/train"
    assert hub.hub_url("hf:/datasets/me/clips") is None  # a string is taken as typed
    assert hub.resolve_dataset("some/folder") == Path("some/folder")
    assert hub.resolve_dataset(Path("meta.csv")) == Path("meta.csv")


# --- a run out ---


def _fake_run(root: Path) -> Path:
    """A run folder with every kind of file `cogvx train` writes, named through cogvx.runs."""
    run = root / "run"
    run.mkdir()
    runs.lora_weights(run).write_bytes(b"LORA" + os.urandom(4096))
    runs.model_card(run).write_text("---\nlibrary_name: diffusers\ntags: [lora]\n---\n# A LoRA\n")
    runs.loss_curve(run).write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    runs.config_toml(run).write_text('model = "tiny"\nrank = 4\n')
    runs.config_json(run).write_text('{"model": "tiny"}')
    runs.metrics(run).write_text('{"step": 1, "loss": 0.5}\n')
    runs.report(run).write_text("<html></html>")
    runs.logs(run).mkdir()
    (runs.logs(run) / "events").write_bytes(b"tensorboard")
    checkpoint = runs.checkpoint(run, 2)
    checkpoint.mkdir()
    runs.checkpoint_lora(checkpoint).write_bytes(b"CKPT" + os.urandom(512))
    runs.checkpoint_state(checkpoint).write_text('{"step": 2}')
    return run


def test_push_sends_the_lora_card_curve_and_config_in_one_commit(server, client, tmp_path):
    run = _fake_run(tmp_path)

    answer = client.push(run, "me/lora", message="LoRA at step 10", private=True)

    commits = server.requests_to("POST", "/commit/")
    assert len(commits) == 1 and commits[0].path == "/api/models/me/lora/commit/main"
    lines = commits[0].ndjson()
    assert lines[0] == {"key": "header", "value": {"summary": "LoRA at step 10", "description": ""}}
    assert {line["key"] for line in lines[1:]} == {"file"}  # inline: no LFS/Xet path was taken
    expected = {name: runs.lora_weights(run) for name in [runs.LORA_WEIGHTS]}
    expected |= {runs.MODEL_CARD: runs.model_card(run), runs.LOSS_CURVE: runs.loss_curve(run)}
    expected |= {runs.CONFIG_TOML: runs.config_toml(run)}
    assert server.model_files("me/lora") == {name: path.read_bytes() for name, path in expected.items()}
    oid = server.models["me/lora"].history[0]["oid"]
    assert answer == {"result": f"{server.url}/me/lora/commit/{oid}"}

    create = server.requests_to("POST", "/api/repos/create")[0].json()
    assert create == {"name": "lora", "organization": "me", "visibility": "private", "type": "model"}
    assert not server.unhandled

    # The token went to the server as a bearer token on every request, and nowhere else.
    assert server.requests and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in server.requests)
    assert not any(TOKEN.encode() in p.read_bytes() for p in run.rglob("*") if p.is_file())
    assert not any(TOKEN in output for output in client.outputs)

    # Pushing the same files again changes nothing (the client skips files the Hub has); a changed file is a
    # second commit to the existing repo.
    assert client.push(run, "me/lora", message="again") == answer
    assert len(server.models["me/lora"].history) == 1
    runs.config_toml(run).write_text('model = "tiny"\nrank = 8\n')
    client.push(run, "me/lora", message="again")
    history = server.models["me/lora"].history
    assert len(history) == 2 and [op["value"]["path"] for op in history[1]["operations"]] == [runs.CONFIG_TOML]


def test_push_of_a_checkpoint_puts_its_lora_under_its_folder(server, client, tmp_path):
    run = _fake_run(tmp_path)
    runs.lora_weights(run).unlink()  # mid-run: no final LoRA yet
    runs.loss_curve(run).unlink()
    checkpoint = runs.checkpoint(run, 2)

    client.push(run, "me/lora", checkpoint=str(checkpoint))

    name = f"{checkpoint.name}/{runs.CHECKPOINT_LORA}"
    assert server.model_files("me/lora") == {
        name: runs.checkpoint_lora(checkpoint).read_bytes(),
        runs.MODEL_CARD: runs.model_card(run).read_bytes(),
        runs.CONFIG_TOML: runs.config_toml(run).read_bytes(),
    }
    assert len(server.requests_to("POST", "/commit/")) == 1


def test_a_refused_token_is_one_line_without_the_token(server, client, tmp_path):
    run = _fake_run(tmp_path)
    wrong = "hf_wrongToken9876543210zyxwvu"

    message = _one_line_error(client.push(run, "me/lora", token=wrong))

    assert "me/lora" in message and "401" in message and "HF_TOKEN" in message
    assert server.requests[0].headers["authorization"] == f"Bearer {wrong}"
    assert not server.requests_to("POST", "/commit/") and "me/lora" not in server.models
    assert not any(wrong in output or TOKEN in output for output in client.outputs)  # tracebacks included


def test_push_without_a_token_stops_before_any_request(server, client, tmp_path):
    run = _fake_run(tmp_path)

    message = _one_line_error(client.push(run, "me/lora", token=None))

    assert "me/lora" in message and "hf auth login" in message and "HF_TOKEN" in message
    assert not server.requests


def test_push_in_offline_mode_is_one_line(server, client, tmp_path):
    message = _one_line_error(client.push(_fake_run(tmp_path), "me/lora", offline=True))
    assert "HF_HUB_OFFLINE" in message and not server.requests


@pytest.mark.parametrize("repo_id", ["me/bad$name", "a/b/c", "me/-lora"])
def test_malformed_repo_id_is_one_line(tmp_path, repo_id):
    with pytest.raises(InputError) as caught:
        hub.push_run(_fake_run(tmp_path), repo_id, commit_message="x")
    assert repr(repo_id) in str(caught.value) and "OWNER/NAME" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_push_needs_the_lora_it_names(tmp_path):
    run = _fake_run(tmp_path)
    runs.lora_weights(run).unlink()
    with pytest.raises(RunError, match=runs.LORA_WEIGHTS):
        hub.push_run(run, "me/lora", commit_message="x")
    with pytest.raises(RunError, match="not a checkpoint folder"):
        hub.push_run(run, "me/lora", commit_message="x", checkpoint=tmp_path / "elsewhere")
    incomplete = runs.checkpoint(run, 4)
    incomplete.mkdir()
    with pytest.raises(RunError, match=runs.CHECKPOINT_LORA):
        hub.push_run(run, "me/lora", commit_message="x", checkpoint=incomplete)


def test_preprocess_reads_a_hub_dataset_and_records_its_url(server, tmp_path):
    from cogvx.shards import Manifest

    server.serve_dataset("me/clips", CLIPS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN=TOKEN)
    env["OMP_NUM_THREADS"] = "1"
    cache = tmp_path / "cache"
    argv = ["preprocess", "--data", "hf://datasets/me/clips", "--model", "tiny", "--output", str(cache)]
    done = subprocess.run(
        [sys.executable, "-m", "cogvx", *argv, "--workers", "0"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = Manifest.load(cache)
    assert manifest.producer["data"] == "hf://datasets/me/clips"
    assert manifest.sample_count == len(list(CLIPS.glob("*.mp4")))
    assert TOKEN not in done.stdout + done.stderr
