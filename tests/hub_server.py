"""A loopback Hugging Face Hub emulator for tests: enough of the Hub's HTTP API for `huggingface_hub` 2.x and
`transformers` to push and load models, served on 127.0.0.1 only.

Served (model repos only):

- `HEAD/GET /{repo}/resolve/{revision}/{path}`: file content with `X-Repo-Commit`, `ETag` (`X-Linked-Etag` /
  `X-Linked-Size` for LFS files); 404 with `X-Error-Code` `RepoNotFound`, `RevisionNotFound` or `EntryNotFound`.
- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{revision}`: `sha`, `siblings`, ...
- `GET /api/models/{repo}/tree/{revision}[/{path}]`, `POST /api/models/{repo}/paths-info/{revision}`,
  `GET /api/models/{repo}/refs`.
- `GET /api/whoami-v2`, `POST /api/repos/create`, `POST /api/models/{repo}/branch/{branch}`,
  `POST /api/validate-yaml`.
- Uploads: `POST /api/models/{repo}/preupload/{revision}` (upload mode per file), the LFS batch API
  (`POST /{repo}.git/info/lfs/objects/batch`, then `PUT` of the content and a verify `POST`), and
  `POST /api/models/{repo}/commit/{revision}` (NDJSON: header, inline base64 files, LFS pointers, deletions).

Every commit gets a real 40-hex id (sha1 over its parent, message and file hashes). Tokens are checked
(`Authorization: Bearer ...`); writes need a token with the `write` role. Xet is never offered: clients must run with
`HF_HUB_DISABLE_XET=1` (the `hub_endpoint` fixtures in the tests set it), so uploads take the LFS path.

Usage:
    with HubEmulator(tokens={"hf_write": ("alice", "write")}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        ...
    hub.requests  # [(method, path), ...] every request served, for assertions
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".npy", ".h5", ".msgpack", ".onnx")
# Files larger than this are stored through LFS whatever their name (the real Hub uses 10 MB).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def blob_id(self) -> str:
        return git_blob_sha1(self.content)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, StoredFile]
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_id: str
    private: bool
    owner: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if len(revision) == 40 and revision in self.commits:
            return self.commits[revision]
        return None


class HubEmulator:
    """The emulated Hub: in-memory repositories plus a threaded HTTP server on 127.0.0.1 (free port)."""

    def __init__(self, tokens: dict[str, tuple[str, str]] | None = None, orgs: dict[str, list[str]] | None = None):
        # token -> (user name, role "read" | "write")
        self.tokens = tokens if tokens is not None else {"hf_emulator_write": ("emulator-user", "write")}
        # user name -> organisations the user may write to
        self.orgs = orgs if orgs is not None else {}
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the emulator first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubEmulator:
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> HubEmulator:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- state helpers (also used by tests to seed repositories) ---------------------------------------------------

    def create_repo(self, repo_id: str, owner: str = "emulator-user", private: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_id=repo_id, private=private, owner=owner)
            initial = self._new_commit(repo, None, "initial commit", {".gitattributes": StoredFile(b"", False)})
            repo.branches["main"] = initial.sha
            self.repos[repo_id] = repo
            return repo

    def _new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, StoredFile]) -> Commit:
        digest = hashlib.sha1()
        digest.update((parent or "").encode())
        digest.update(message.encode())
        digest.update(repr(time.time_ns()).encode())  # two identical commits are still two commits
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + files[path].sha256.encode())
        commit = Commit(sha=digest.hexdigest(), parent=parent, message=message, files=files)
        repo.commits[commit.sha] = commit
        return commit

    def seed_folder(self, repo_id: str, folder: str | Path, branch: str = "main", message: str = "seed") -> str:
        """Commit every file of `folder` into `repo_id` (created if needed); returns the commit id."""
        with self.lock:
            repo = self.repos.get(repo_id) or self.create_repo(repo_id)
            head = repo.resolve(branch) or repo.resolve("main")
            files = dict(head.files) if head else {}
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file():
                    relative = path.relative_to(folder).as_posix()
                    content = path.read_bytes()
                    files[relative] = StoredFile(content, _is_lfs(relative, len(content)))
            commit = self._new_commit(repo, head.sha if head else None, message, files)
            repo.branches[branch] = commit.sha
            return commit.sha

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def uploads(self) -> list[tuple[str, str]]:
        """Requests that write (anything but GET/HEAD), in order."""
        return [(method, path) for method, path in self.requests if method not in ("GET", "HEAD")]


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size > LFS_SIZE_THRESHOLD


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Handler(BaseHTTPRequestHandler):
    hub: HubEmulator
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    # -- plumbing --------------------------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head_only=False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # A HEAD response announces the length but carries no body (also for errors).
        if not head_only and self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _user(self) -> tuple[str, str] | None:
        authorization = self.headers.get("Authorization", "")
        if not authorization.startswith("Bearer "):
            return None
        token = authorization[len("Bearer ") :]
        if token not in self.hub.tokens:
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _require_write(self, repo_id: str) -> str:
        user = self._user()
        if user is None:
            raise _HubError(401, None, "You must be authenticated to write (no token in Authorization header)")
        name, role = user
        if role != "write":
            raise _HubError(403, None, f"token of {name!r} is read-only; a write token is needed")
        namespace = repo_id.split("/")[0] if "/" in repo_id else name
        if namespace != name and namespace not in self.hub.orgs.get(name, []):
            raise _HubError(403, None, f"{name!r} cannot write to namespace {namespace!r}")
        return name

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        repo = self.hub.repos.get(repo_id)
        user = self._user()
        if repo is None or (repo.private and (user is None or user[0] != repo.owner)):
            raise _HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        if write:
            self._require_write(repo_id)
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        with self.hub.lock:
            self.hub.requests.append((method, split.path))
        segments = [unquote(part) for part in split.path.strip("/").split("/")]
        query = parse_qs(split.query)
        try:
            body = self._read_body() if method in ("POST", "PUT") else b""
            with self.hub.lock:
                self._route(method, segments, query, body)
        except _HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._json(error.status, {"error": error.message}, headers)

    do_GET = lambda self: self._dispatch("GET")  # noqa: E731
    do_HEAD = lambda self: self._dispatch("HEAD")  # noqa: E731
    do_POST = lambda self: self._dispatch("POST")  # noqa: E731
    do_PUT = lambda self: self._dispatch("PUT")  # noqa: E731

    # -- routes ----------------------------------------------------------------------------------------------------

    def _route(self, method: str, segments: list[str], query: dict, body: bytes) -> None:
        if segments[:2] == ["api", "whoami-v2"] and method == "GET":
            return self._whoami()
        if segments[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(body)
        if segments[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(body)
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            repo_id = "/".join(segments[2:4])
            return self._model_api(method, repo_id, segments[4:], query, body)
        if segments[:1] == ["lfs-upload"] and method == "PUT":
            return self._lfs_upload(segments[1], body)
        if segments[:1] == ["lfs-verify"] and method == "POST":
            return self._lfs_verify(body)
        if len(segments) >= 5 and segments[1].endswith(".git") and segments[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{segments[0]}/{segments[1][: -len('.git')]}", body)
        if "resolve" in segments and method in ("GET", "HEAD"):
            index = segments.index("resolve")
            repo_id = "/".join(segments[:index])
            revision, path = segments[index + 1], "/".join(segments[index + 2 :])
            return self._resolve(method, repo_id, revision, path)
        raise _HubError(404, None, f"emulator has no route for {method} /{'/'.join(segments)}")

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        name, role = user
        orgs = [{"name": org, "type": "org"} for org in self.hub.orgs.get(name, [])]
        self._json(200, {"type": "user", "name": name, "orgs": orgs, "auth": {"accessToken": {"role": role}}})

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        if content.startswith("---"):
            header = content[3:].split("\n---", 1)[0]
            try:
                data = yaml.safe_load(header)
            except yaml.YAMLError as error:
                return self._json(400, {"errors": [{"message": f"invalid YAML: {error}"}]})
            if data is not None and not isinstance(data, dict):
                return self._json(400, {"errors": [{"message": "metadata must be a mapping"}]})
        self._json(200, {"errors": [], "warnings": []})

    def _create_repo(self, body: bytes) -> None:
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise _HubError(400, None, "the emulator only hosts model repositories")
        user = self._user()
        if user is None:
            raise _HubError(401, None, "You must be authenticated to create a repository")
        repo_id = f"{payload.get('organization') or user[0]}/{payload['name']}"
        self._require_write(repo_id)
        if repo_id in self.hub.repos:  # the Hub's 409 still carries the url, which `exist_ok=True` callers read
            message = "You already created this model repo"
            return self._json(
                409, {"error": message, "url": f"{self.hub.url}/{repo_id}"}, {"X-Error-Message": message}
            )
        private = payload.get("private") or payload.get("visibility") == "private"
        self.hub.create_repo(repo_id, owner=user[0], private=bool(private))
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _model_api(self, method: str, repo_id: str, rest: list[str], query: dict, body: bytes) -> None:
        if not rest and method == "GET":
            repo = self._repo(repo_id)
            return self._json(200, self._model_info(repo, self._commit(repo, "main")))
        action = rest[0]
        if action == "revision" and method == "GET":
            repo = self._repo(repo_id)
            return self._json(200, self._model_info(repo, self._commit(repo, rest[1])))
        if action == "tree" and method == "GET":
            repo = self._repo(repo_id)
            commit = self._commit(repo, rest[1])
            prefix = "/".join(rest[2:])
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._json(200, self._tree(commit, prefix, recursive))
        if action == "paths-info" and method == "POST":
            repo = self._repo(repo_id)
            commit = self._commit(repo, rest[1])
            paths = parse_qs(body.decode()).get("paths", [])
            if not paths and body.startswith(b"{"):
                paths = json.loads(body).get("paths", [])
            return self._json(200, [self._entry(path, commit.files[path]) for path in paths if path in commit.files])
        if action == "refs" and method == "GET":
            repo = self._repo(repo_id)
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha} for name, sha in repo.branches.items()
            ]
            return self._json(200, {"branches": branches, "tags": [], "converts": []})
        if action == "branch" and method == "POST":
            repo = self._repo(repo_id, write=True)
            branch = rest[1]
            if branch in repo.branches:
                raise _HubError(409, None, f"branch {branch} already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.branches[branch] = self._commit(repo, start).sha
            return self._json(200, {})
        if action == "preupload" and method == "POST":
            repo = self._repo(repo_id, write=True)
            self._commit(repo, rest[1])
            files = json.loads(body)["files"]
            modes = [
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if _is_lfs(item["path"], item["size"]) else "regular",
                    "shouldIgnore": False,
                    "oid": None,
                }
                for item in files
            ]
            return self._json(200, {"files": modes, "commitOid": repo.branches.get(rest[1])})
        if action == "commit" and method == "POST":
            return self._create_commit(self._repo(repo_id, write=True), rest[1], body)
        raise _HubError(404, None, f"emulator has no route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def _entry(self, path: str, stored: StoredFile) -> dict:
        entry = {"type": "file", "oid": stored.blob_id, "size": len(stored.content), "path": path}
        if stored.lfs:
            entry["lfs"] = {"oid": stored.sha256, "size": len(stored.content), "pointerSize": 134}
        return entry

    def _tree(self, commit: Commit, prefix: str, recursive: bool) -> list[dict]:
        prefix = prefix.strip("/")
        entries, folders = [], set()
        for path in sorted(commit.files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            relative = path[len(prefix) + 1 :] if prefix else path
            if "/" in relative and not recursive:
                folders.add((prefix + "/" if prefix else "") + relative.split("/")[0])
                continue
            if recursive:
                parts = path.split("/")
                for depth in range(1, len(parts)):
                    folder = "/".join(parts[:depth])
                    if not prefix or folder.startswith(prefix + "/"):
                        folders.add(folder)
            entries.append(self._entry(path, commit.files[path]))
        return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)] + entries

    def _model_info(self, repo: Repo, commit: Commit) -> dict:
        return {
            "_id": repo.repo_id,
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "transformers",
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.date)),
            "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.date)),
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }

    def _create_commit(self, repo: Repo, revision: str, body: bytes) -> None:
        if revision not in repo.branches:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision} (commits go to a branch)")
        head = repo.commits[repo.branches[revision]]
        files = dict(head.files)
        message = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != head.sha:
                    raise _HubError(412, None, f"parentCommit {parent} is not the head of {revision}")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, None, f"unsupported encoding {value.get('encoding')!r}")
                content = base64.b64decode(value["content"])
                files[value["path"]] = StoredFile(content, False)
            elif key == "lfsFile":
                oid = value["oid"]
                if oid not in self.hub.lfs_store:
                    raise _HubError(422, None, f"LFS object {oid} of {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(self.hub.lfs_store[oid], True)
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _HubError(404, "EntryNotFound", "A file with this name doesn't exist")
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {path: stored for path, stored in files.items() if not path.startswith(folder)}
            else:
                raise _HubError(400, None, f"unknown commit operation {key!r}")
        commit = self.hub._new_commit(repo, head.sha, message, files)
        repo.branches[revision] = commit.sha
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{commit.sha}",
                "pullRequestUrl": None,
                "commitMessage": message,
            },
        )

    def _lfs_batch(self, repo_id: str, body: bytes) -> None:
        self._repo(repo_id, write=True)
        payload = json.loads(body)
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.hub.lfs_store:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{item['oid']}"},
                    "verify": {"href": f"{self.hub.url}/lfs-verify"},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_upload(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, None, f"uploaded content does not hash to {oid}")
        self.hub.lfs_store[oid] = body
        self._send(200)

    def _lfs_verify(self, body: bytes) -> None:
        payload = json.loads(body)
        stored = self.hub.lfs_store.get(payload["oid"])
        if stored is None or len(stored) != payload["size"]:
            raise _HubError(404, None, f"LFS object {payload['oid']} not found")
        self._json(200, {"success": True})

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision)
        stored = commit.files.get(path)
        if stored is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist at {revision}")
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{stored.etag}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        if stored.lfs:
            headers["X-Linked-Etag"] = f'"{stored.sha256}"'
            headers["X-Linked-Size"] = str(len(stored.content))
        content = stored.content
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and method == "GET":
            start_text, _, end_text = range_header[len("bytes=") :].partition("-")
            start = int(start_text or 0)
            end = int(end_text) if end_text else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            return self._send(206, content[start : end + 1], headers)
        self._send(200, content, headers, head_only=method == "HEAD")


def resolve_url(hub: HubEmulator, repo_id: str, revision: str, path: str) -> str:
    return f"{hub.url}/{repo_id}/resolve/{quote(revision, safe='')}/{path}"
