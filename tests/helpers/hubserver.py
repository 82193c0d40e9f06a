"""A local stand-in for the Hugging Face Hub's HTTP API, for tests without network.

It speaks just enough of the Hub's API for huggingface_hub's real client, pointed at it with
``HF_ENDPOINT``, to:

- download a model's files served from a local folder (``hf_hub_download``, ``from_pretrained``:
  ``HEAD``/``GET /ID/resolve/REV/PATH``, its info as below);
- download a dataset repo served from a local folder (``snapshot_download``): repo info
  (``GET /api/datasets/ID[/revision/REV]``), the recursive tree listing (``GET /api/datasets/ID/tree/REV``)
  and the files (``HEAD``/``GET /datasets/ID/resolve/REV/PATH``, with the ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length`` headers the client checks);
- upload to a model repo: ``POST /api/repos/create``, ``POST /api/validate-yaml`` (a README.md is checked
  before a commit), ``POST /api/models/ID/preupload/REV`` (always answers "regular", so file contents come
  inline in the commit: no LFS or Xet transfer), ``POST /api/models/ID/commit/REV`` (ndjson), and
  ``GET /api/models/ID[/revision/REV]`` (the client asks for it after a refused create, and for a commit
  that changes nothing, which it skips).

Every request is recorded (method, path, query, headers, body) so tests can assert what was sent. With
``token`` set, writes (and reads of private datasets) need ``Authorization: Bearer <token>``; anything
else gets a 401 as the Hub gives one. Unknown routes get a 404 and are recorded in ``unhandled``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a file's contents: the ETag the Hub sends for a file stored in git (not LFS)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self):
        return json.loads(self.body)

    def ndjson(self) -> list[dict]:
        return [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]


@dataclass
class Repo:
    """One repo: its revisions (branch or tag -> commit id) and each commit's files (path -> bytes)."""

    private: bool = False
    gated: bool = False  # its info and file list are public, its files need a login (and accepted terms)
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # the commits received, oldest first

    def commit_of(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


class HubServer:
    """``with HubServer() as hub:`` serves on ``hub.url`` (127.0.0.1, a free port) from a thread."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.datasets: dict[str, Repo] = {}
        self.models: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.unhandled: list[Request] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hubserver", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # --- content ---

    def serve_dataset(
        self, repo_id: str, folder: Path, revision: str = "main", private: bool = False, gated: bool = False
    ) -> str:
        """Serve every file under ``folder`` as dataset ``repo_id`` at ``revision``; returns the commit id."""
        paths = [path for path in sorted(Path(folder).rglob("*")) if path.is_file()]
        files = {path.relative_to(folder).as_posix(): path.read_bytes() for path in paths}
        repo = self.datasets.setdefault(repo_id, Repo(private=private, gated=gated))
        commit = _commit_id(repo_id, revision, files)
        repo.commits[commit] = files
        repo.refs[revision] = commit
        return commit

    def serve_model(self, repo_id: str, folder: Path, revision: str = "main") -> str:
        """Serve every file under ``folder`` (a diffusers model folder) as model ``repo_id``; returns the commit."""
        paths = [path for path in sorted(Path(folder).rglob("*")) if path.is_file()]
        files = {path.relative_to(folder).as_posix(): path.read_bytes() for path in paths}
        repo = self.models.setdefault(repo_id, Repo())
        commit = _commit_id(repo_id, revision, files)
        repo.commits[commit] = files
        repo.refs[revision] = commit
        return commit

    def model_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.models[repo_id]
        return dict(repo.commits[repo.refs[revision]])

    def requests_to(self, method: str, fragment: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and fragment in r.path]

    # --- handling ---

    def handle(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.requests.append(request)
        parts = [unquote(p) for p in request.path.strip("/").split("/")]
        try:
            return self._route(request, parts)
        except _Reply as reply:
            return reply.status, reply.headers, reply.body

    def _route(self, request: Request, parts: list[str]) -> tuple[int, dict[str, str], bytes]:
        method = request.method
        if parts[:2] == ["api", "datasets"] and method == "GET" and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if not rest:
                return self._repo_info(request, self.datasets, repo_id, "main", "datasets")
            if rest[0] == "revision" and len(rest) >= 2:
                return self._repo_info(request, self.datasets, repo_id, "/".join(rest[1:]), "datasets")
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(request, repo_id, rest[1], "/".join(rest[2:]))
        if parts[:1] == ["datasets"] and method in ("GET", "HEAD") and len(parts) >= 6 and parts[3] == "resolve":
            return self._resolve(request, "/".join(parts[1:3]), parts[4], "/".join(parts[5:]))
        if (
            parts[0] not in ("api", "datasets")
            and method in ("GET", "HEAD")
            and len(parts) >= 5
            and parts[2] == "resolve"
        ):
            return self._resolve(request, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), self.models)
        if parts == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(request)
        if parts == ["api", "validate-yaml"] and method == "POST":
            self._require_token(request)
            return _json(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if method == "GET" and (not rest or (len(rest) >= 2 and rest[0] == "revision")):
                self._require_token(request)
                return self._repo_info(request, self.models, repo_id, "/".join(rest[1:]) or "main", "models")
            if method == "POST" and len(rest) >= 2 and rest[0] == "preupload":
                return self._preupload(request, repo_id, "/".join(rest[1:]))
            if method == "POST" and len(rest) >= 2 and rest[0] == "commit":
                return self._commit(request, repo_id, "/".join(rest[1:]))
        with self._lock:
            self.unhandled.append(request)
        return _json(404, {"error": f"hubserver: no route for {method} {request.path}"})

    def _require_token(self, request: Request, repo_not_found: bool = False) -> None:
        """A 401 as the Hub sends it: for a repo route without access it reads as 'repo not found'."""
        if self.token is None:
            return
        if request.headers.get("authorization") == f"Bearer {self.token}":
            return
        if repo_not_found:
            raise _Reply(*_json(401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}))
        raise _Reply(*_json(401, {"error": INVALID_CREDENTIALS}, {"X-Error-Message": INVALID_CREDENTIALS}))

    def _repo(self, request: Request, repos: dict[str, Repo], repo_id: str) -> Repo:
        repo = repos.get(repo_id)
        if repo is None:
            raise _Reply(*_json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}))
        if repo.private:
            self._require_token(request, repo_not_found=True)
        return repo

    def _commit_or_404(self, repo: Repo, revision: str) -> str:
        commit = repo.commit_of(revision)
        if commit is None:
            message = f"Invalid rev id: {revision}"
            raise _Reply(*_json(404, {"error": message}, {"X-Error-Code": "RevisionNotFound"}))
        return commit

    def _repo_info(self, request, repos, repo_id, revision, kind) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(request, repos, repo_id)
        commit = self._commit_or_404(repo, revision)
        siblings = [{"rfilename": name} for name in sorted(repo.commits[commit])]
        return _json(200, {"id": repo_id, "sha": commit, "private": repo.private, "siblings": siblings})

    def _tree(self, request, repo_id, revision, path) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(request, self.datasets, repo_id)
        commit = self._commit_or_404(repo, revision)
        recursive = request.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{path}/" if path else ""
        entries, folders = [], set()
        for name, data in sorted(repo.commits[commit].items()):
            if not name.startswith(prefix):
                continue
            below = name[len(prefix) :].split("/")
            if len(below) > 1:
                depth = len(below) - 1 if recursive else 1
                folders.update(prefix + "/".join(below[: i + 1]) for i in range(depth))
                if not recursive:
                    continue
            entries.append({"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name})
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        return _json(200, entries)

    def _resolve(self, request, repo_id, revision, path, repos=None) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(request, self.datasets if repos is None else repos, repo_id)
        commit = self._commit_or_404(repo, revision)
        authorized = self.token is not None and request.headers.get("authorization") == f"Bearer {self.token}"
        if repo.gated and not authorized:
            message = f"Access to dataset {repo_id} is restricted. You must have access to it and be authenticated."
            raise _Reply(*_json(401, {"error": message}, {"X-Error-Code": "GatedRepo", "X-Error-Message": message}))
        data = repo.commits[commit].get(path)
        if data is None:
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}
            raise _Reply(*_json(404, {"error": "Entry not found"}, headers))
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(data)}"',
            "X-Repo-Commit": commit,
        }
        return 200, headers, data

    def _create_repo(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        self._require_token(request)
        payload = request.json()
        kind = payload.get("type") or "model"
        if kind != "model":
            return _json(400, {"error": f"hubserver creates model repos only, not {kind}"})
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.models:
            return _json(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        self.models[repo_id] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return _json(200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _preupload(self, request, repo_id, revision) -> tuple[int, dict[str, str], bytes]:
        self._require_token(request)
        repo = self._repo(request, self.models, repo_id)
        current = repo.commits.get(repo.commit_of(revision) or "", {})
        files = []
        for item in request.json()["files"]:
            existing = current.get(item["path"])
            oid = git_blob_sha1(existing) if existing is not None else None
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return _json(200, {"files": files, "commitOid": repo.commit_of(revision)})

    def _commit(self, request, repo_id, revision) -> tuple[int, dict[str, str], bytes]:
        self._require_token(request)
        repo = self._repo(request, self.models, repo_id)
        lines = request.ndjson()
        if not lines or lines[0].get("key") != "header":
            return _json(400, {"error": "the first line must be the commit header"})
        files = dict(repo.commits.get(repo.commit_of(revision) or "", {}))
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:  # lfsFile and anything else would need an upload path this server does not have
                return _json(400, {"error": f"hubserver takes inline (regular) files only, got {key!r}"})
        commit = _commit_id(repo_id, revision, files, salt=str(len(repo.history)))
        repo.commits[commit] = files
        repo.refs[revision] = commit
        repo.history.append({"oid": commit, "header": lines[0]["value"], "operations": lines[1:]})
        url = f"{self.url}/{repo_id}/commit/{commit}"
        return _json(200, {"success": True, "commitOid": commit, "commitUrl": url})


class _Reply(Exception):
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


def _json(status: int, payload, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


def _commit_id(repo_id: str, revision: str, files: dict[str, bytes], salt: str = "") -> str:
    digest = hashlib.sha1(f"{repo_id}\0{revision}\0{salt}".encode())
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + git_blob_sha1(data).encode())
    return digest.hexdigest()


def _handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every reply carries Content-Length

        def _serve(self) -> None:
            split = urlsplit(self.path)
            request = Request(
                method=self.command,
                path=split.path,
                query=parse_qs(split.query),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=self._body(),
            )
            status, headers, body = server.handle(request)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
            pass

    return Handler
