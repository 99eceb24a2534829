"""A loopback stand-in for the Hugging Face Hub, reached through the real `huggingface_hub` client.

It serves repos from local directories: model info (with siblings, card data, tags), file
downloads with HEAD and Range requests (what `hf_hub_download`, `snapshot_download` and the
safetensors metadata API use), and child listings by `base_model:` filters. It records every
request so tests can assert what was (and was not) downloaded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class FakeRepo:
    repo_id: str
    root: Path
    sha: str = ""
    card_data: dict = field(default_factory=dict)
    tags: list = field(default_factory=list)
    gated: bool = False
    private: bool = False
    downloads: int = 0
    likes: int = 0
    extra: dict = field(default_factory=dict)  # more model-info keys (baseModels, childrenModelCount, ...)
    refs: set = field(default_factory=lambda: {"main"})  # branch and tag names besides the commit sha

    def has_revision(self, revision: Optional[str]) -> bool:
        return revision is None or revision == self.sha or unquote(revision) in self.refs

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.faults: dict[str, list[int]] = {}  # path regex -> statuses to answer first, in order (0: hang up)
        self.token: Optional[str] = None  # when set, private and gated repos need it
        self.write_tokens: dict[str, str] = {}  # token -> user name allowed to create and upload
        self.fail_commits = 0  # how many coming commits to reject (HTTP 400, which clients do not retry)
        self.latency = 0.0  # seconds each answer waits, as a remote Hub's round trip would
        self.in_flight = self.peak_in_flight = 0
        self._lock = threading.Lock()
        self.upload_root = Path(tempfile.mkdtemp(prefix="fake-hub-uploads-"))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, root: Path, **kwargs) -> FakeRepo:
        digest = hashlib.sha1(repo_id.encode() + b"".join(p.read_bytes()[:4096] for p in sorted(root.rglob("*"))
                                                          if p.is_file())).hexdigest()
        repo = FakeRepo(repo_id, Path(root), sha=digest, **kwargs)
        self.repos[repo_id] = repo
        return repo

    def downloaded(self, repo_id: str) -> set[str]:
        """Files of `repo_id` fetched with a full (non-Range) GET."""
        prefix = f"/{repo_id}/resolve/"
        return {p[len(prefix):].split("/", 1)[1] for m, p in self.requests
                if m == "GET" and p.startswith(prefix) and not p.endswith(" range")}

    # ------------------------------------------------------------------------------------------

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in two sends: without this, Nagle's algorithm and the
                # client's delayed ACK add ~40 ms to every keep-alive request.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def parse_request(self) -> bool:
                """A request has arrived: count it in flight, and wait out the latency before answering."""
                parsed = super().parse_request()
                if parsed:
                    with hub._lock:
                        hub.in_flight += 1
                        hub.peak_in_flight = max(hub.peak_in_flight, hub.in_flight)
                    self._counted = True
                    if hub.latency:
                        time.sleep(hub.latency)
                return parsed

            def handle_one_request(self) -> None:
                self._counted = False
                try:
                    super().handle_one_request()
                finally:
                    if self._counted:
                        with hub._lock:
                            hub.in_flight -= 1

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _json(self, status: int, payload, headers: Optional[dict] = None) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str) -> None:
                self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

            def _fault(self, path: str) -> bool:
                """Answer with the next injected status for `path`: 0 drops the connection unanswered."""
                for pattern, statuses in hub.faults.items():
                    if statuses and re.search(pattern, path):
                        status = statuses.pop(0)
                        if status == 0:
                            self.close_connection = True
                        else:
                            self._json(status, {"error": "injected"}, {"Retry-After": "0"})
                        return True
                return False

            def _authorized(self, repo: FakeRepo) -> bool:
                if not (repo.private or repo.gated):
                    return True
                return hub.token is not None and self.headers.get("Authorization") == f"Bearer {hub.token}"

            def _repo(self, repo_id: str, revision: Optional[str] = None) -> Optional[FakeRepo]:
                repo = hub.repos.get(repo_id)
                if repo is None or (repo.private and not self._authorized(repo)):
                    self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
                    return None
                if not repo.has_revision(revision):
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return None
                return repo

            def do_HEAD(self) -> None:
                self._dispatch()

            def _user(self) -> Optional[str]:
                auth = self.headers.get("Authorization", "")
                return hub.write_tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self) -> None:
                path = unquote(urlparse(self.path).path)
                body = self._body()
                hub.requests.append(("POST", path))
                if self._fault(path):
                    return
                if path == "/api/validate-yaml":  # the Hub checks README metadata before a commit
                    import yaml

                    content = json.loads(body)["content"]
                    match = re.match(r"^---\n(.*?)\n---", content, re.S)
                    try:
                        meta = yaml.safe_load(match.group(1)) if match else {}
                    except yaml.YAMLError as exc:
                        return self._json(400, {"errors": [{"message": str(exc)}]})
                    if not isinstance(meta, dict):
                        return self._json(400, {"errors": [{"message": "metadata must be a mapping"}]})
                    return self._json(200, {"warnings": []})
                user = self._user()
                if user is None:
                    return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                if path == "/api/repos/create":
                    data = json.loads(body)
                    repo_id = f"{data.get('organization') or user}/{data['name']}"
                    if repo_id in hub.repos:
                        return self._json(409, {"error": "You already created this model repo",
                                                "url": f"{hub.endpoint}/{repo_id}"})
                    root = hub.upload_root / repo_id.replace("/", "__")
                    root.mkdir(parents=True)
                    hub.add_repo(repo_id, root, private=data.get("visibility") == "private")
                    return self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                match = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit)/(?P<rev>[^/]+)$", path)
                repo = hub.repos.get(match["repo"]) if match else None
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository Not Found for url: {path}")
                if match["op"] == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if hub.fail_commits:
                    hub.fail_commits -= 1
                    return self._error(400, "BadRequest", "injected commit rejection")
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        target = repo.root / item["value"]["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(base64.b64decode(item["value"]["content"]))
                repo.sha = hashlib.sha1(repo.sha.encode() + body).hexdigest()
                return self._json(200, {"commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{repo.sha}",
                                        "commitOid": repo.sha})

            def do_DELETE(self) -> None:
                path = unquote(urlparse(self.path).path)
                data = json.loads(self._body() or b"{}")
                hub.requests.append(("DELETE", path))
                if self._fault(path):
                    return
                user = self._user()
                if user is None:
                    return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                repo_id = f"{data.get('organization') or user}/{data.get('name')}"
                if path != "/api/repos/delete" or hub.repos.pop(repo_id, None) is None:
                    return self._error(404, "RepoNotFound", f"Repository Not Found: {repo_id}")
                return self._json(200, {})

            def do_GET(self) -> None:
                self._dispatch()

            def _dispatch(self) -> None:
                url = urlparse(self.path)
                path = unquote(url.path)
                hub.requests.append((self.command, path + (" range" if self.headers.get("Range") else "")))
                if self._fault(path):
                    return
                match = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+|[^/]+)(?:/revision/(?P<rev>[^/]+))?$", path)
                if match:
                    return self._model_info(match["repo"], match["rev"], parse_qs(url.query))
                match = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+|[^/]+)/tree/(?P<rev>[^/]+)/?$", path)
                if match:
                    return self._tree(match["repo"], match["rev"])
                if path == "/api/whoami-v2":
                    user = self._user()
                    if user is None:
                        return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                    return self._json(200, {"type": "user", "name": user, "orgs": [],
                                            "auth": {"accessToken": {"displayName": "test", "role": "write"}}})
                if path == "/api/models":
                    return self._list_models(parse_qs(url.query))
                match = re.match(r"^/(?P<repo>[^/]+/[^/]+|[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", path)
                if match:
                    return self._resolve(match["repo"], match["rev"], match["file"])
                self._error(404, "EntryNotFound", f"no route for {path}")

            def _info_payload(self, repo: FakeRepo, files_metadata: bool) -> dict:
                siblings = []
                for name in repo.files():
                    entry = {"rfilename": name}
                    if files_metadata:
                        entry["size"] = (repo.root / name).stat().st_size
                    siblings.append(entry)
                payload = {
                    "_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.sha,
                    "private": repo.private, "gated": "auto" if repo.gated else False, "disabled": False,
                    "downloads": repo.downloads, "likes": repo.likes, "tags": repo.tags,
                    "siblings": siblings, "cardData": repo.card_data or None,
                    "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
                }
                payload.update(repo.extra)
                return payload

            def _model_info(self, repo_id: str, revision: Optional[str], query: dict) -> None:
                repo = self._repo(repo_id, revision)  # model info of a gated repo is public; its files are not
                if repo is None:
                    return
                self._json(200, self._info_payload(repo, "files_metadata" in query or "blobs" in query))

            def _tree(self, repo_id: str, revision: str) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                entries = []
                for name in repo.files():
                    data = (repo.root / name).read_bytes()
                    entries.append({"type": "file", "path": name, "size": len(data),
                                    "oid": hashlib.sha1(data).hexdigest()})
                self._json(200, entries)

            def _list_models(self, query: dict) -> None:
                filters = query.get("filter", [])
                found = [r for r in hub.repos.values() if not r.private and all(f in r.tags for f in filters)]
                self._json(200, [self._info_payload(r, False) for r in found])

            def _resolve(self, repo_id: str, revision: str, file: str) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                if not self._authorized(repo):
                    self._error(401 if self.headers.get("Authorization") is None else 403, "GatedRepo",
                                "Access to model is restricted and you are not in the authorized list.")
                    return
                target = repo.root / file
                if not target.is_file():
                    self._json(404, {"error": "Entry not found"},
                               {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha})
                    return
                data = target.read_bytes()
                etag = hashlib.sha256(data).hexdigest()
                status, body = 200, data
                range_header = self.headers.get("Range")
                if range_header:
                    start_s, _, end_s = range_header.removeprefix("bytes=").partition("-")
                    start = int(start_s)
                    end = min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
                    body = data[start:end + 1]
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", repo.sha)
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

        return Handler
