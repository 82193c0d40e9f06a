"""Remote stores on localhost, for tests without network: a real S3-compatible server and a web server.

``s3`` starts moto's standalone server (``ThreadedMotoServer``) on a free port, points the standard
client settings at it (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``; profile files pointed away), creates a bucket of its own, and yields the
``s3://bucket/prefix`` base as a string that also carries ``client`` (boto3), ``bucket``, ``prefix``,
``endpoint`` and ``secret`` (a unique string: grep written files for it) plus ``upload``/``put``/``get``.
Everything reaches the server through real HTTP, as a real bucket would be reached: nothing is patched.

``http_server`` serves a local folder read-only with Python's ``http.server`` (plain HTTP on 127.0.0.1,
no range requests, as the simplest static server) and yields its base URL (``http://127.0.0.1:PORT/``),
also carrying ``folder`` (what it serves) and ``requests`` (every ``(method, path)`` it answered).
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class S3Base(str):
    """``s3://bucket/prefix`` with the server's client and secret attached."""

    client: object
    bucket: str
    prefix: str
    endpoint: str
    secret: str

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def upload(self, folder: Path, prefix: str | None = None) -> str:
        """Put every file directly inside ``folder`` under ``prefix`` (default: this base's); its URL."""
        prefix = self.prefix if prefix is None else prefix
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                self.client.upload_file(str(path), self.bucket, f"{prefix}/{path.name}")
        return f"s3://{self.bucket}/{prefix}"

    def put(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data)

    def get(self, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()

    def names(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/")
        return sorted(item["Key"].removeprefix(f"{self.prefix}/") for item in listed.get("Contents", []))


@pytest.fixture(name="s3")
def s3_fixture(monkeypatch, tmp_path: Path):
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        secret = f"cogvx-test-secret-{uuid.uuid4().hex}"
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)
        settings = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "cogvx-test-key",
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        }
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        client = boto3.client("s3", endpoint_url=endpoint)
        bucket = f"cogvx-{uuid.uuid4().hex[:12]}"  # moto's state is per process: a bucket per test
        client.create_bucket(Bucket=bucket)
        base = S3Base(f"s3://{bucket}/cache")
        base.client, base.bucket, base.prefix, base.endpoint, base.secret = client, bucket, "cache", endpoint, secret
        yield base
    finally:
        server.stop()


class HttpBase(str):
    """``http://127.0.0.1:PORT/`` with the served folder and the requests answered."""

    folder: Path
    requests: list[tuple[str, str]]
    shutdown: object  # stops serving (the port then refuses connections)

    def serve(self, folder: Path, name: str) -> str:
        """Copy ``folder`` to ``name`` in the served folder; its URL."""
        shutil.copytree(folder, self.folder / name)
        return f"{self}{name}/"


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args, requests: list, **kwargs):
        self._requests = requests
        super().__init__(*args, **kwargs)

    def send_head(self):
        self._requests.append((self.command, self.path))
        return super().send_head()

    def log_message(self, format, *args):  # noqa: A002 -- quiet: the test output stays readable
        pass


@pytest.fixture(name="http_server")
def http_server_fixture(tmp_path: Path):
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[tuple[str, str]] = []
    handler = partial(_Handler, directory=str(folder), requests=requests)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = HttpBase(f"http://127.0.0.1:{server.server_address[1]}/")
        base.folder, base.requests = folder, requests
        base.shutdown = lambda: (server.shutdown(), server.server_close())
        yield base
    finally:
        server.shutdown()
        server.server_close()
