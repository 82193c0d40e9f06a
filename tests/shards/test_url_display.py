"""Locations with secrets in them: ``user:password@`` and query strings reach the server and nothing else.

A web server (Python's http.server) and an S3-compatible one (moto's) on localhost; every command that
takes a location is run through the CLI, and everything it printed or wrote is searched for the secret.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cogvx.cli import app
from cogvx.shards import Manifest
from cogvx.shards.store import display, join
from tests.conftest import property_examples
from tests.helpers.preprocessing import captioned_clip

SECRET = "cogvx-url-secret-7f3a"
TRAIN = dict(max_steps=1, rank=4, alpha=4, mixed_precision="fp32", checkpoint_every=0, seed=3, shuffle_buffer=2)

_word = st.text("abcXYZ019_-.~", min_size=1, max_size=8).filter(lambda w: w not in (".", ".."))


@settings(max_examples=property_examples(40))
@given(
    scheme=st.sampled_from(["https", "http", "s3", "memory", "gs"]),
    userinfo=st.sampled_from(["", "reader@", f"reader:{SECRET}@"]),
    folders=st.lists(_word, max_size=3),
    slash=st.booleans(),
    query=st.sampled_from(["", f"?token={SECRET}", f"?X-Sig={SECRET}&expires=9&p=a/b"]),
    names=st.lists(_word, min_size=1, max_size=2),
)
def test_a_child_name_goes_after_the_path_and_before_the_query(scheme, userinfo, folders, slash, query, names):
    path = "/".join(["", *folders]) + ("/" if slash and folders else "")
    url = f"{scheme}://{userinfo}host.example{path}{query}"
    joined = url
    for name in names:
        joined = join(joined, name)
    parts, given_parts = urlsplit(joined), urlsplit(url)
    assert parts.query == given_parts.query and parts.netloc == given_parts.netloc, "the access form keeps both"
    assert parts.path == "/".join(["", *folders, *names])
    assert display(joined) == f"{scheme}://host.example" + "/".join(["", *folders, *names])
    assert display(joined) == join(display(url), "/".join(names))
    assert SECRET not in display(joined)
    local = join(Path("/a") / "cache", names[0])
    assert local == str(Path("/a/cache") / names[0]) and display(local) == local


def _train_settings(folder: Path) -> list[str]:
    path = folder / "steps.toml"
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in TRAIN.items()))
    return ["--config", str(path), "--workers", "0"]


def _written_with(folder: Path, secret: str) -> list[str]:
    return [
        str(p) for p in folder.rglob("*") if secret in p.name or (p.is_file() and secret.encode() in p.read_bytes())
    ]


def test_inspect_verify_and_train_from_a_url_with_a_password_and_a_token_show_neither(
    tiny_cache: Path, http_server, tmp_path: Path, capfd
):
    served = http_server.serve(tiny_cache, "cache")
    bad = http_server.serve(tiny_cache, "bad")
    damaged = Manifest.load(tiny_cache).shards[0].name
    (http_server.folder / "bad" / damaged).write_bytes(b"changed")
    secret_url = served.replace("http://", f"http://reader:{SECRET}@") + f"?token={SECRET}"
    shown = served.rstrip("/")
    runner, said = CliRunner(), []

    out = runner.invoke(app, ["shards", "inspect", secret_url])
    assert out.exit_code == 0 and f"cache {shown}" in " ".join(out.output.split()), out.output
    said.append(out.output)
    out = runner.invoke(app, ["shards", "verify", secret_url])
    assert out.exit_code == 0 and "ok" in out.output, out.output
    said.append(out.output)
    bad_url = bad.replace("http://", f"http://reader:{SECRET}@") + f"?token={SECRET}"
    out = runner.invoke(app, ["shards", "verify", bad_url, "--quick"])
    assert out.exit_code == 1 and f"{bad.rstrip('/')}/{damaged}" in " ".join(out.output.split()), out.output
    said.append(out.output)

    run, kept = tmp_path / "run", tmp_path / "kept"
    out = runner.invoke(
        app,
        ["train", "--shards", secret_url, "--output", str(run), "--cache-dir", str(kept), *_train_settings(tmp_path)],
    )
    assert out.exit_code == 0, out.output
    said.append(out.output)
    assert json.loads((run / "config.json").read_text())["shards"] == shown
    assert f'shards = "{shown}"' in (run / "config.toml").read_text()

    # The token went with every request, after the file's path, as a signed URL needs it.
    asked = [path for method, path in http_server.requests if method == "GET"]
    assert "/cache/manifest.json?token=" + SECRET in asked, asked
    assert all(path.endswith(f"?token={SECRET}") for path in asked), asked
    captured = capfd.readouterr()
    for text in [*said, captured.out, captured.err]:
        assert SECRET not in text, text
    assert _written_with(run, SECRET) == [] and _written_with(kept, SECRET) == []


def test_preprocess_refuses_a_bucket_url_whose_secret_would_name_the_objects(s3, tmp_path: Path, capfd):
    data = tmp_path / "data"
    captioned_clip(data, "clip.mp4", frames=15)
    runner = CliRunner()
    bucket_root = f"s3://{s3.bucket}"
    for url in (f"{s3}?token={SECRET}", f"s3://reader:{SECRET}@{s3.bucket}/{s3.prefix}"):
        out = runner.invoke(app, ["preprocess", "--data", str(data), "--output", url, "--model", "tiny"])
        assert out.exit_code == 1, out.output
        line = " ".join(out.output.split())
        assert line.startswith(f"error: {bucket_root}/{s3.prefix} cannot be used: s3:// takes no"), line
        assert SECRET not in out.output
    listed = s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])
    assert listed == [], "a refused run writes nothing"
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err
