"""A small Hub-compatible HTTP server for tests: what ``huggingface_hub`` 2.x calls to create a repo, commit files
(regular and LFS uploads, ``HF_HUB_DISABLE_XET=1``), list a tree and download files.

Endpoints (model repos only): ``POST /api/repos/create``, ``POST /api/validate-yaml``,
``GET /api/models/{repo}[/revision/{rev}]``, ``POST /api/models/{repo}/branch/{branch}``,
``POST /api/models/{repo}/preupload/{rev}``, ``POST /{repo}.git/info/lfs/objects/batch``, ``PUT /lfs-upload/{oid}``,
``POST /lfs-verify``, ``POST /api/models/{repo}/commit/{rev}[?create_pr=1]`` (NDJSON; a pull request becomes
``refs/pr/N``), ``GET /api/models/{repo}/tree/{rev}[/{path}]``,
``POST /api/models/{repo}/paths-info/{rev}``, ``HEAD|GET /{repo}/resolve/{rev}/{path}``.

Every answer is recorded in ``HubState.responses`` as ``(method, path, status)``. A commit is applied all at once or not at all. ``HubState.fail_next`` makes the next matching request answer an
error status (for retry and error-path tests). Only write requests need a token; an unknown token is refused with
401 everywhere, as the Hub does. The server never records request headers, so it never holds a token in its log.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_blob_sha1(self.content)


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=dict)

    def head(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.branches[revision][-1]
        for commits in self.branches.values():
            for commit in commits:
                if commit.oid == revision:
                    return commit
        return None


@dataclass
class Failure:
    method: str
    pattern: re.Pattern
    status: int
    remaining: int


class HubState:
    """Everything the server knows: repos, LFS objects, injected failures and a request log (no headers)."""

    def __init__(self, tokens: set[str]) -> None:
        self.tokens = set(tokens)
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.signatures: dict[str, str] = {}
        self.failures: list[Failure] = []
        self.log: list[str] = []
        self.responses: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()

    def fail_next(self, method: str, path_regex: str, status: int, times: int = 1) -> None:
        """Answer ``status`` to the next ``times`` requests whose method and path match."""
        self.failures.append(Failure(method, re.compile(path_regex), status, times))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].head(revision)
        return {path: f.content for path, f in commit.files.items()}

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        return list(self.repos[repo_id].branches[branch])


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _new_oid() -> str:
    return hashlib.sha1(uuid.uuid4().bytes).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    # -- plumbing ------------------------------------------------------------------------------------------------
    def log_message(self, format: str, *args) -> None:  # the request line only; never the headers
        pass

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base(self) -> str:
        return self.server.url

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.state.responses.append((self.command, urlsplit(self.path).path, status))
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _token_ok(self, required: bool) -> bool:
        auth = self.headers.get("Authorization")
        if auth is None:
            return not required
        token = auth.removeprefix("Bearer ").strip()
        return token in self.state.tokens

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        self.state.log.append(f"{method} {path}")
        body = b"" if method in ("GET", "HEAD") else self._body()
        for failure in self.state.failures:
            if failure.remaining > 0 and failure.method == method and failure.pattern.search(path):
                failure.remaining -= 1
                return self._json(failure.status, {"error": f"injected {failure.status}"})
        # LFS uploads go to a pre-signed URL (as to S3 on the Hub): no token, the signature in the URL is checked
        write = method in ("POST", "PUT") and not path.startswith(("/api/validate-yaml", "/lfs-upload/"))
        if not self._token_ok(required=write):
            message = "Invalid credentials in Authorization header"
            return self._json(401, {"error": message}, {"X-Error-Message": message})
        try:
            for route_method, pattern, handler in _ROUTES:
                match = re.fullmatch(pattern, path)
                if route_method == method and match:
                    with self.state.lock:
                        return handler(self, match, body)
            raise HubError(404, f"no route for {method} {path}")
        except HubError as err:
            headers = {"X-Error-Code": err.code} if err.code else {}
            if method == "HEAD":
                return self._send(err.status, b"", headers, head=True)
            return self._json(err.status, {"error": err.message}, headers)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- helpers -------------------------------------------------------------------------------------------------
    def _repo(self, repo_id: str) -> Repo:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self.headers.get("Authorization")):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.head(unquote(revision))
        if commit is None:
            raise HubError(404, f"Revision {revision} not found", "RevisionNotFound")
        return commit

    def _entry(self, path: str, stored: StoredFile) -> dict:
        entry = {"type": "file", "path": path, "size": len(stored.content), "oid": git_blob_sha1(stored.content)}
        if stored.lfs:
            entry["lfs"] = {"oid": stored.oid, "size": len(stored.content), "pointerSize": 134}
        return entry

    # -- routes --------------------------------------------------------------------------------------------------
    def validate_yaml(self, match, body):
        self._json(200, {"errors": [], "warnings": []})

    def create_repo(self, match, body):
        payload = json.loads(body)
        name, organization = payload["name"], payload.get("organization")
        repo_id = f"{organization}/{name}" if organization else f"user/{name}"
        if repo_id in self.state.repos:
            return self._json(409, {"error": "You already created this model repo", "url": f"{self.base}/{repo_id}"})
        attributes = StoredFile(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", lfs=False)
        initial = Commit(_new_oid(), "initial commit", {".gitattributes": attributes})
        self.state.repos[repo_id] = Repo(private=bool(payload.get("private")), branches={"main": [initial]})
        self._json(200, {"url": f"{self.base}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex})

    def create_branch(self, match, body):
        repo = self._repo(match["repo"])
        branch = unquote(match["branch"])
        if branch in repo.branches:
            raise HubError(409, f"Reference {branch} already exists")
        repo.branches[branch] = [repo.branches["main"][-1]]
        self._json(200, {})

    def model_info(self, match, body):
        repo = self._repo(match["repo"])
        commit = self._commit(repo, match["rev"] or "main")
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        self._json(
            200,
            {
                "_id": uuid.uuid4().hex,
                "id": match["repo"],
                "modelId": match["repo"],
                "sha": commit.oid,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "library_name": "transformers",
                "siblings": siblings,
            },
        )

    def preupload(self, match, body):
        repo = self._repo(match["repo"])
        commit = self._commit(repo, match["rev"])
        files = []
        for item in json.loads(body)["files"]:
            lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] > 1_000_000
            existing = commit.files.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing is not None else None,
                }
            )
        self._json(200, {"files": files, "commitOid": commit.oid})

    def lfs_batch(self, match, body):
        self._repo(match["repo"])
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs:
                signature = uuid.uuid4().hex
                self.state.signatures[obj["oid"]] = signature
                entry["actions"] = {
                    "upload": {"href": f"{self.base}/lfs-upload/{obj['oid']}?signature={signature}"},
                    "verify": {"href": f"{self.base}/lfs-verify"},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, match, body):
        signature = parse_qs(urlsplit(self.path).query).get("signature", [None])[0]
        if signature is None or self.state.signatures.get(match["oid"]) != signature:
            raise HubError(403, "invalid or missing upload signature")
        if hashlib.sha256(body).hexdigest() != match["oid"]:
            raise HubError(400, "sha256 mismatch")
        self.state.lfs[match["oid"]] = body
        self._send(200)

    def lfs_verify(self, match, body):
        payload = json.loads(body)
        stored = self.state.lfs.get(payload["oid"])
        if stored is None or len(stored) != payload["size"]:
            raise HubError(404, "object not found")
        self._json(200, {})

    def commit(self, match, body):
        repo = self._repo(match["repo"])
        branch = unquote(match["rev"])
        if branch not in repo.branches:
            raise HubError(404, f"Revision {branch} not found", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]
        if header.get("key") != "header":
            raise HubError(400, "the first NDJSON line must be the header")
        files = dict(repo.branches[branch][-1].files)
        for line in lines[1:]:  # validate and build everything before anything becomes visible
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.state.lfs:
                    raise HubError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(self.state.lfs[value["oid"]], lfs=True)
            elif line["key"] == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif line["key"] == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: f for p, f in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"unknown commit operation {line['key']!r}")
        commit = Commit(_new_oid(), header["value"]["summary"], files)
        url = f"{self.base}/{match['repo']}/commit/{commit.oid}"
        if parse_qs(urlsplit(self.path).query).get("create_pr") in (["1"], ["true"], ["True"]):
            # A pull request: a new ref refs/pr/N from the branch head, the commit on it; the branch is untouched.
            number = 1 + sum(name.startswith("refs/pr/") for name in repo.branches)
            repo.branches[f"refs/pr/{number}"] = [*repo.branches[branch], commit]
            pr = f"{self.base}/{match['repo']}/discussions/{number}"
            return self._json(200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": pr})
        repo.branches[branch].append(commit)
        self._json(200, {"success": True, "commitOid": commit.oid, "commitUrl": url})

    def tree(self, match, body):
        repo = self._repo(match["repo"])
        commit = self._commit(repo, match["rev"])
        prefix = (match["path"] or "").strip("/")
        recursive = parse_qs(urlsplit(self.path).query).get("recursive", ["False"])[0].lower() == "true"
        entries, folders = [], set()
        for path, stored in sorted(commit.files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())})
            if recursive or len(parts) == 1:
                entries.append(self._entry(path, stored))
        if prefix and not entries:
            raise HubError(404, f"{prefix} not found", "EntryNotFound")
        self._json(200, entries)

    def paths_info(self, match, body):
        repo = self._repo(match["repo"])
        commit = self._commit(repo, match["rev"])
        form = parse_qs(body.decode())
        result = [self._entry(p, commit.files[p]) for p in form.get("paths", []) if p in commit.files]
        self._json(200, result)

    def resolve(self, match, body, head: bool = False):
        repo = self._repo(match["repo"])
        commit = self._commit(repo, match["rev"])
        stored = commit.files.get(unquote(match["path"]))
        if stored is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{stored.oid}"',
            "Content-Type": "application/octet-stream",
        }
        self._send(200, stored.content, headers, head=head)

    def resolve_head(self, match, body):
        self.resolve(match, body, head=True)


_REV = r"(?P<rev>[^/]+)"
_ROUTES = [
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", _Handler.create_branch),
    ("GET", rf"/api/models/{REPO}(?:/revision/{_REV})?", _Handler.model_info),
    ("POST", rf"/api/models/{REPO}/preupload/{_REV}", _Handler.preupload),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", _Handler.lfs_upload),
    ("POST", r"/lfs-verify", _Handler.lfs_verify),
    ("POST", rf"/api/models/{REPO}/commit/{_REV}", _Handler.commit),
    ("GET", rf"/api/models/{REPO}/tree/{_REV}(?:/(?P<path>.*))?", _Handler.tree),
    ("POST", rf"/api/models/{REPO}/paths-info/{_REV}", _Handler.paths_info),
    ("GET", rf"/{REPO}/resolve/{_REV}/(?P<path>.+)", _Handler.resolve),
    ("HEAD", rf"/{REPO}/resolve/{_REV}/(?P<path>.+)", _Handler.resolve_head),
]


class HubServer(ThreadingHTTPServer):
    """The server on ``127.0.0.1`` (a free port); ``url`` is what ``HF_ENDPOINT`` should be."""

    daemon_threads = True

    def __init__(self, tokens: set[str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = HubState(tokens)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
