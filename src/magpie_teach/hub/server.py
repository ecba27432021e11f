"""A small Hugging Face Hub-compatible server for local publishing, the demo and the tests.

Every repository is a real bare git repository (real commit ids; branches and tags are git refs),
large and binary files go through the Git LFS basic transfer and live in a content-addressed
store, and the endpoints answer what the unmodified ``huggingface_hub`` and ``datasets`` clients
ask for when ``HF_ENDPOINT`` points here (with ``HF_HUB_DISABLE_XET=1``; both are read when
huggingface_hub is imported). Standard library plus the ``git`` binary; one process, threads.

Not reproduced (see the README): Xet storage, pull requests and discussions, access control (any
token or none is accepted and private repos are readable by all), rate and size limits, the
dataset viewer and its ``refs/convert/parquet`` branch, and the web pages.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\n"
# Extensions the Hub's default .gitattributes sends to LFS; anything binary or over 10 MB goes there too.
LFS_SUFFIXES = (
    ".parquet", ".arrow", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npy",
    ".npz", ".pkl", ".pickle", ".gz", ".zip", ".tar", ".zst", ".xz", ".7z", ".tflite", ".gguf", ".model", ".png",
    ".jpg", ".jpeg", ".wav", ".mp3", ".flac", ".mp4", ".db", ".joblib",
)  # fmt: skip
LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


class HubError(Exception):
    """An error answered to the client: status, message and (for 404s) the ``X-Error-Code`` it maps to."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


def _date(unix: str) -> str:
    """A git timestamp in the Hub's date format (what huggingface_hub's parse_datetime accepts)."""
    return datetime.fromtimestamp(int(unix), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class Store:
    """Bare git repositories under ROOT/repos/TYPEs/ORG/NAME.git and LFS objects under ROOT/lfs."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        (self.root / "lfs" / "tmp").mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    # ---- git plumbing -------------------------------------------------------------------------
    def git(self, repo: Path, *args: str, input: bytes | None = None, env: dict | None = None) -> bytes:
        base = {
            **os.environ,
            "GIT_DIR": str(repo),
            "GIT_AUTHOR_NAME": "magpie-teach local hub",
            "GIT_AUTHOR_EMAIL": "hub@127.0.0.1",
            "GIT_COMMITTER_NAME": "magpie-teach local hub",
            "GIT_COMMITTER_EMAIL": "hub@127.0.0.1",
        }
        result = subprocess.run(["git", *args], input=input, capture_output=True, env={**base, **(env or {})})
        if result.returncode:
            raise RuntimeError(f"git {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout

    def repo_path(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / f"{repo_id}.git"

    def existing(self, repo_type: str, repo_id: str) -> Path:
        path = self.repo_path(repo_type, repo_id)
        if not (path / "HEAD").exists():
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return path

    def resolve(self, repo: Path, revision: str) -> str:
        """Branch, tag or (full or abbreviated) commit id -> commit id; 404 RevisionNotFound otherwise."""
        for ref in (f"refs/heads/{revision}", f"refs/tags/{revision}", f"refs/{revision}", revision):
            if ref == revision and not re.fullmatch(r"[0-9a-f]{7,40}", revision):
                continue
            try:
                return self.git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").decode().strip()
            except RuntimeError:
                continue
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Creates the repo with a first commit holding .gitattributes, as the Hub does; False if it exists."""
        path = self.repo_path(repo_type, repo_id)
        with self.lock:
            if (path / "HEAD").exists():
                return False
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}-{threading.get_ident()}")
            shutil.rmtree(tmp, ignore_errors=True)
            subprocess.run(["git", "init", "--bare", "--quiet", "--initial-branch=main", str(tmp)], check=True)
            self.git(tmp, "config", "magpie.private", "true" if private else "false")
            blob = self.git(tmp, "hash-object", "-w", "--stdin", input=GITATTRIBUTES.encode()).decode().strip()
            tree = self.git(tmp, "mktree", input=f"100644 blob {blob}\t.gitattributes\n".encode()).decode().strip()
            commit = self.git(tmp, "commit-tree", tree, "-m", "initial commit").decode().strip()
            self.git(tmp, "update-ref", "refs/heads/main", commit)
            os.rename(tmp, path)  # the repo appears whole or not at all
            return True

    def entries(self, repo: Path, commit: str, path: str = "", recursive: bool = False) -> list[dict]:
        """ls-tree of PATH (a folder, or '' for the root) at COMMIT; [] if PATH is not a folder."""
        spec = f"{commit}:{path}" if path else commit
        try:
            out = self.git(repo, "ls-tree", "-l", "-z", *(["-r", "-t"] if recursive else []), spec)
        except RuntimeError:
            return []
        items = []
        for line in out.decode().split("\0"):
            if not line:
                continue
            meta, name = line.split("\t", 1)
            mode, kind, oid, size = meta.split()
            full = f"{path}/{name}" if path else name
            items.append(
                {"mode": mode, "kind": kind, "oid": oid, "size": 0 if size == "-" else int(size), "path": full}
            )
        return items

    def entry(self, repo: Path, commit: str, path: str) -> dict | None:
        parent, _, name = path.strip("/").rpartition("/")
        for item in self.entries(repo, commit, parent):
            if item["path"] == path.strip("/"):
                return item
        return None

    def blob(self, repo: Path, oid: str) -> bytes:
        return self.git(repo, "cat-file", "blob", oid)

    @staticmethod
    def parse_pointer(data: bytes) -> dict | None:
        if not data.startswith(LFS_POINTER) or len(data) > 1024:
            return None
        fields = dict(line.split(" ", 1) for line in data.decode().splitlines() if " " in line)
        return {"oid": fields["oid"].removeprefix("sha256:"), "size": int(fields["size"]), "pointerSize": len(data)}

    def describe(self, repo: Path, item: dict, expand: bool = False, commit: str | None = None) -> dict:
        """An entry as the Hub's tree / paths-info answer it."""
        if item["kind"] == "tree":
            out: dict[str, Any] = {"type": "directory", "oid": item["oid"], "size": 0, "path": item["path"]}
        else:
            out = {"type": "file", "oid": item["oid"], "size": item["size"], "path": item["path"]}
            if item["size"] <= 1024:
                pointer = self.parse_pointer(self.blob(repo, item["oid"]))
                if pointer:
                    out["size"], out["lfs"] = pointer["size"], pointer
        if expand and commit:
            log = self.git(repo, "log", "-1", "--format=%H%x00%s%x00%ct", commit, "--", item["path"]).decode()
            if log.strip():
                sha, title, date = log.strip().split("\0")
                out["lastCommit"] = {"id": sha, "title": title, "date": _date(date)}
        return out

    def lfs_path(self, oid: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            raise HubError(400, f"invalid LFS oid {oid!r}")
        return self.root / "lfs" / oid[:2] / oid[2:4] / oid

    # ---- commits ---------------------------------------------------------------------------
    def commit(self, repo: Path, branch: str, header: dict, ops: list[dict]) -> str:
        """Applies one commit's operations to BRANCH atomically; 412 when parentCommit is not the head."""
        with self.lock:
            head = self.resolve(repo, branch)
            if f"refs/heads/{branch}" not in self.git(repo, "for-each-ref", "--format=%(refname)").decode().split():
                raise HubError(400, f"Cannot commit to {branch}: not a branch")
            parent = header.get("parentCommit")
            if parent and parent != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            index = tempfile.NamedTemporaryFile(prefix="index-", dir=repo, delete=False)
            index.close()
            env = {"GIT_INDEX_FILE": index.name}
            try:
                self.git(repo, "read-tree", head, env=env)
                for op in ops:
                    key, value = op["key"], op["value"]
                    path = value["path"].strip("/")
                    if key == "file":
                        data = (
                            base64.b64decode(value["content"])
                            if value.get("encoding") == "base64"
                            else value["content"].encode()
                        )
                        self._add(repo, path, data, env)
                    elif key == "lfsFile":
                        oid = value["oid"]
                        if not self.lfs_path(oid).exists():
                            raise HubError(400, f"LFS object {oid} of {path} was never uploaded")
                        size = value.get("size") or self.lfs_path(oid).stat().st_size
                        pointer = LFS_POINTER + f"oid sha256:{oid}\nsize {size}\n".encode()
                        self._add(repo, path, pointer, env)
                    elif key == "deletedFile":
                        self.git(repo, "update-index", "--force-remove", "--", path, env=env)
                    elif key == "deletedFolder":
                        listed = self.git(repo, "ls-files", "-z", "--", f"{path}/", env=env).decode().split("\0")
                        for name in filter(None, listed):
                            self.git(repo, "update-index", "--force-remove", "--", name, env=env)
                    else:
                        raise HubError(400, f"unsupported commit operation {key!r}")
                tree = self.git(repo, "write-tree", env=env).decode().strip()
            finally:
                os.unlink(index.name)
            message = header.get("summary") or "Upload"
            if header.get("description"):
                message += "\n\n" + header["description"]
            new = self.git(repo, "commit-tree", tree, "-p", head, "-m", message).decode().strip()
            self.git(repo, "update-ref", f"refs/heads/{branch}", new, head)  # compare-and-swap
            return new

    def _add(self, repo: Path, path: str, data: bytes, env: dict) -> None:
        if not path or ".." in path.split("/") or path.startswith(".git/"):
            raise HubError(400, f"invalid path in repo: {path!r}")
        blob = self.git(repo, "hash-object", "-w", "--stdin", input=data).decode().strip()
        self.git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)


class Faults:
    """Test hooks (POST /_local/faults): answer the next N requests matching a regex with a status, or stall them."""

    def __init__(self):
        self.rules: list[dict] = []
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def take(self, method: str, path: str) -> dict | None:
        with self.lock:
            key = f"{method} {path}"
            for rule in self.rules:
                if rule["times"] > 0 and re.search(rule["match"], key):
                    rule["times"] -= 1
                    return rule
        return None


class Handler(BaseHTTPRequestHandler):
    server: LocalHubServer
    protocol_version = "HTTP/1.1"

    # ---- plumbing ----------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        if self.server.verbose:  # the request line only: tokens travel in headers, never logged
            super().log_message(format, *args)

    def _send(
        self, status: int, body: Any = None, headers: dict | None = None, content_type: str | None = None
    ) -> None:
        if isinstance(body, (dict, list)):
            data, content_type = json.dumps(body).encode(), "application/json"
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body or b""
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(length) if length else b""

    def _json(self) -> Any:
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"invalid JSON body: {err}") from err

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        raw_parts = url.path.strip("/").split("/")
        fault = self.server.faults.take(self.command, url.path)
        try:
            if fault:
                if fault.get("delay"):
                    time.sleep(fault["delay"])
                if fault.get("status"):
                    self._body()
                    raise HubError(fault["status"], fault.get("message", "injected fault"))
            self.route(raw_parts)
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, {"error": err.message, **err.extra}, headers)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as err:  # noqa: BLE001 - a server answers 500 and goes on
            self._send(500, {"error": f"{type(err).__name__}: {err}"}, {"X-Error-Message": str(err)[:200]})

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch  # noqa: N815 - BaseHTTPRequestHandler's names

    # ---- routing -----------------------------------------------------------------------------
    def route(self, parts: list[str]) -> None:
        store, method = self.server.store, self.command
        if parts[:1] == ["_local"]:
            return self.local_admin(parts[1:])
        if parts[:1] == ["lfs-upload"] and method == "PUT":
            return self.lfs_put(parts[1])
        if parts[:1] == ["lfs-verify"] and method == "POST":
            body = self._json()
            if not store.lfs_path(body["oid"]).exists():
                raise HubError(404, f"LFS object {body['oid']} not found")
            return self._send(200, {})
        if parts[:1] == ["api"]:
            return self.api(parts[1:])
        # /{prefix}{org}/{name}.git/info/lfs/objects/batch and /{prefix}{org}/{name}/resolve/{rev}/{path}
        repo_type = "model"
        if parts and parts[0] in ("datasets", "spaces"):
            repo_type, parts = REPO_TYPES[parts[0]], parts[1:]
        if len(parts) >= 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self.lfs_batch(repo_type, f"{parts[0]}/{parts[1][:-4]}")
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self.resolve_file(
                repo_type, f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
            )
        raise HubError(404, f"no route for {method} /{'/'.join(parts)}")

    def api(self, parts: list[str]) -> None:
        store, method = self.server.store, self.command
        if parts == ["whoami-v2"]:
            return self._send(200, {"type": "user", "name": "local", "fullname": "local hub user", "orgs": [],
                                    "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}}})  # fmt: skip
        if parts == ["repos", "create"] and method == "POST":
            return self.create_repo(self._json())
        if parts == ["repos", "delete"] and method == "DELETE":
            body = self._json()
            repo_id = f"{body.get('organization')}/{body['name']}" if body.get("organization") else body["name"]
            path = store.existing(body.get("type") or "model", repo_id)
            shutil.rmtree(path)
            return self._send(200, {})
        if parts == ["validate-yaml"] and method == "POST":
            return self.validate_yaml(self._json())
        if len(parts) < 3 or parts[0] not in REPO_TYPES:
            raise HubError(404, f"no route for {method} /api/{'/'.join(parts)}")
        repo_type, repo_id, rest = REPO_TYPES[parts[0]], f"{parts[1]}/{parts[2]}", parts[3:]
        repo = store.existing(repo_type, repo_id)
        action = rest[0] if rest else None
        if action is None and method == "GET":
            return self.repo_info(repo_type, repo_id, repo, "main")
        if action == "revision" and method == "GET":
            return self.repo_info(repo_type, repo_id, repo, unquote("/".join(rest[1:])))
        if action == "refs" and method == "GET":
            return self.refs(repo)
        if action == "preupload" and method == "POST":
            return self.preupload(repo, unquote("/".join(rest[1:])))
        if action == "commit" and method == "POST":
            return self.commit(repo_type, repo_id, repo, unquote("/".join(rest[1:])))
        if action == "tag" and method == "POST":
            return self.create_tag(repo, unquote("/".join(rest[1:])))
        if action == "tag" and method == "DELETE":
            return self.delete_ref(repo, "tags", unquote("/".join(rest[1:])))
        if action == "branch" and method == "POST":
            return self.create_branch(repo, unquote("/".join(rest[1:])))
        if action == "branch" and method == "DELETE":
            return self.delete_ref(repo, "heads", unquote("/".join(rest[1:])))
        if action == "tree" and method == "GET":
            return self.tree(repo, unquote(rest[1]), unquote("/".join(rest[2:])))
        if action == "paths-info" and method == "POST":
            return self.paths_info(repo, unquote("/".join(rest[1:])))
        if action == "commits" and method == "GET":
            return self.commits(repo, unquote("/".join(rest[1:])))
        raise HubError(404, f"no route for {method} /api/{'/'.join(parts)}")

    # ---- endpoints ---------------------------------------------------------------------------
    def local_admin(self, parts: list[str]) -> None:
        if parts == ["faults"] and self.command == "POST":
            rule = self._json()
            with self.server.faults.lock:
                self.server.faults.rules.append({"times": 1, **rule})
            return self._send(200, {"ok": True})
        if parts == ["faults"] and self.command == "DELETE":
            self.server.faults.rules.clear()
            return self._send(200, {"ok": True})
        if parts == ["stats"]:
            return self._send(200, {**self.server.stats, "root": str(self.server.store.root.resolve())})
        raise HubError(404, "unknown admin route")

    def create_repo(self, body: dict) -> None:
        name, org = body.get("name") or "", body.get("organization")
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        for part in filter(None, (org, name)):
            if not NAME_RE.match(part) or "--" in part or ".." in part:
                raise HubError(400, f"Invalid repo name {part!r}")
        repo_id = f"{org}/{name}" if org else f"local/{name}"
        private = body.get("private") or body.get("visibility") == "private"
        created = self.server.store.create_repo(repo_type, repo_id, bool(private))
        url = f"{self.server.base_url}/{URL_PREFIX[repo_type]}{repo_id}"
        reply = {"url": url, "name": repo_id, "id": repo_id}
        if not created:
            return self._send(
                409,
                {**reply, "error": "You already created this repo"},
                {"X-Error-Message": "You already created this repo"},
            )
        self._send(200, reply)

    def validate_yaml(self, body: dict) -> None:
        import yaml

        content = body.get("content") or ""
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as err:
            return self._send(400, {"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []})
        if metadata is not None and not isinstance(metadata, dict):
            return self._send(400, {"errors": [{"message": "The metadata must be a mapping"}], "warnings": []})
        warnings = [] if metadata else [{"message": "Empty metadata"}]
        self._send(200, {"errors": [], "warnings": warnings})

    def repo_info(self, repo_type: str, repo_id: str, repo: Path, revision: str) -> None:
        import yaml

        store = self.server.store
        sha = store.resolve(repo, revision)
        files = [e for e in store.entries(repo, sha, recursive=True) if e["kind"] == "blob"]
        card = None
        readme = next((e for e in files if e["path"] == "README.md"), None)
        if readme:
            text = store.blob(repo, readme["oid"]).decode(errors="replace")
            match = re.match(r"^---\n(.*?)\n---", text, re.S)
            if match:
                try:
                    card = yaml.safe_load(match.group(1))
                except yaml.YAMLError:
                    card = None
        date = _date(store.git(repo, "log", "-1", "--format=%ct", sha).decode().strip())
        private = store.git(repo, "config", "--default", "false", "magpie.private").decode().strip() == "true"
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "lastModified": date,
            "createdAt": date,
            "private": private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list((card or {}).get("tags") or []),
            "siblings": [{"rfilename": e["path"]} for e in files],
            "cardData": card,
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        self._send(200, info)

    def refs(self, repo: Path) -> None:
        out = self.server.store.git(repo, "for-each-ref", "--format=%(refname)%00%(objectname)%00%(*objectname)")
        refs: dict[str, list] = {"branches": [], "tags": [], "converts": [], "pullRequests": []}
        for line in out.decode().splitlines():
            ref, target, peeled = line.split("\0")
            kind = "branches" if ref.startswith("refs/heads/") else "tags" if ref.startswith("refs/tags/") else None
            if kind:
                name = ref.split("/", 2)[2]
                refs[kind].append({"name": name, "ref": ref, "targetCommit": peeled or target})
        self._send(200, refs)

    def preupload(self, repo: Path, revision: str) -> None:
        store = self.server.store
        body = self._json()
        try:
            sha = store.resolve(repo, revision)
        except HubError:
            sha = None  # a new branch: nothing to compare with
        files = []
        for item in body.get("files", []):
            sample = base64.b64decode(item.get("sample") or "")
            path = item["path"]
            lfs = path.lower().endswith(LFS_SUFFIXES) or item.get("size", 0) > LFS_THRESHOLD or b"\0" in sample
            answer = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            existing = store.entry(repo, sha, path) if sha else None
            if existing and existing["kind"] == "blob":
                pointer = store.parse_pointer(store.blob(repo, existing["oid"])) if existing["size"] <= 1024 else None
                answer["oid"] = pointer["oid"] if pointer else existing["oid"]
            files.append(answer)
        self._send(200, {"files": files, "commitOid": sha})

    def lfs_batch(self, repo_type: str, repo_id: str) -> None:
        store = self.server.store
        store.existing(repo_type, repo_id)
        body = self._json()
        if body.get("operation") != "upload":
            raise HubError(400, "only the upload operation is served; downloads go through /resolve")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            path = store.lfs_path(oid)
            if path.exists() and path.stat().st_size == size:
                objects.append({"oid": oid, "size": size})  # already stored: no actions, the client skips it
            else:
                objects.append({
                    "oid": oid, "size": size, "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{self.server.base_url}/lfs-upload/{oid}", "header": {}},
                        "verify": {"href": f"{self.server.base_url}/lfs-verify", "header": {}},
                    },
                })  # fmt: skip
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")  # fmt: skip

    def lfs_put(self, oid: str) -> None:
        store = self.server.store
        path = store.lfs_path(oid)
        remaining = int(self.headers.get("Content-Length") or 0)
        digest = hashlib.sha256()
        tmp = store.root / "lfs" / "tmp" / f"{oid}.{threading.get_ident()}"
        with open(tmp, "wb") as handle:
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                handle.write(chunk)
                digest.update(chunk)
                remaining -= len(chunk)
        if remaining or digest.hexdigest() != oid:
            tmp.unlink(missing_ok=True)
            raise HubError(400, f"LFS object {oid}: body does not match its sha256")
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)  # visible only once complete
        with self.server.stats_lock:
            self.server.stats["lfs_uploads"] += 1
        self._send(200, {})

    def commit(self, repo_type: str, repo_id: str, repo: Path, revision: str) -> None:
        if self.query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by the local hub")
        lines = [json.loads(line) for line in self._body().decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), {})
        ops = [line for line in lines if line.get("key") != "header"]
        sha = self.server.store.commit(repo, revision, header, ops)
        with self.server.stats_lock:
            self.server.stats["commits"] += 1
        url = f"{self.server.base_url}/{URL_PREFIX[repo_type]}{repo_id}/commit/{sha}"
        self._send(200, {"commitUrl": url, "commitOid": sha, "success": True})

    def create_tag(self, repo: Path, revision: str) -> None:
        store = self.server.store
        body = self._json()
        tag = body.get("tag") or ""
        with store.lock:
            sha = store.resolve(repo, revision)
            if not tag or not re.fullmatch(r"[A-Za-z0-9._/-]+", tag):
                raise HubError(400, f"Invalid tag name {tag!r}")
            existing = store.git(repo, "for-each-ref", f"refs/tags/{tag}").strip()
            if existing:
                raise HubError(409, f"Tag {tag} already exists")
            if body.get("message"):
                store.git(repo, "tag", "-a", tag, sha, "-m", body["message"])
            else:
                store.git(repo, "update-ref", f"refs/tags/{tag}", sha, "0" * 40)
        self._send(200, {})

    def create_branch(self, repo: Path, branch: str) -> None:
        store = self.server.store
        body = self._json()
        with store.lock:
            if store.git(repo, "for-each-ref", f"refs/heads/{branch}").strip():
                raise HubError(409, f"Branch {branch} already exists")
            sha = store.resolve(repo, body.get("startingPoint") or "main")
            store.git(repo, "update-ref", f"refs/heads/{branch}", sha, "0" * 40)
        self._send(200, {})

    def delete_ref(self, repo: Path, kind: str, name: str) -> None:
        store = self.server.store
        with store.lock:
            if not store.git(repo, "for-each-ref", f"refs/{kind}/{name}").strip():
                raise HubError(404, f"{name} not found", "RevisionNotFound")
            if kind == "heads" and name == "main":
                raise HubError(403, "Cannot delete the default branch")
            store.git(repo, "update-ref", "-d", f"refs/{kind}/{name}")
        self._send(200, {})

    def tree(self, repo: Path, revision: str, path: str) -> None:
        store = self.server.store
        sha = store.resolve(repo, revision)
        path = path.strip("/")
        if path and (store.entry(repo, sha, path) or {}).get("kind") != "tree":
            raise HubError(404, f"{path} not found at {revision}", "EntryNotFound")
        recursive = (self.query.get("recursive") or ["false"])[0].lower() == "true"
        expand = (self.query.get("expand") or ["false"])[0].lower() == "true"
        items = store.entries(repo, sha, path, recursive)
        self._send(200, [store.describe(repo, e, expand, sha) for e in items])

    def paths_info(self, repo: Path, revision: str) -> None:
        store = self.server.store
        sha = store.resolve(repo, revision)
        raw = self._body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            body = json.loads(raw or "{}")
            paths, expand = body.get("paths", []), bool(body.get("expand"))
        else:
            form = parse_qs(raw)
            paths, expand = form.get("paths", []), (form.get("expand") or ["False"])[0].lower() == "true"
        out = []
        for path in paths:
            item = store.entry(repo, sha, path.strip("/")) if path.strip("/") else None
            if item:
                out.append(store.describe(repo, item, expand, sha))
        self._send(200, out)

    def commits(self, repo: Path, revision: str) -> None:
        store = self.server.store
        sha = store.resolve(repo, revision)
        out = store.git(repo, "log", "--format=%H%x00%an%x00%ct%x00%s%x00%B%x1e", sha).decode()
        items = []
        for record in filter(str.strip, out.split("\x1e")):
            commit, author, date, title, message = record.strip("\n").split("\0", 4)
            items.append({"id": commit, "title": title, "message": message.strip(), "date": _date(date),
                          "authors": [{"user": "local"}]})  # fmt: skip
        self._send(200, items)

    def resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        store = self.server.store
        repo = store.existing(repo_type, repo_id)
        sha = store.resolve(repo, revision)
        item = store.entry(repo, sha, path)
        if not item or item["kind"] != "blob":
            raise HubError(
                404,
                f"{path} not found at {revision}",
                "EntryNotFound",
            )
        data = store.blob(repo, item["oid"])
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        pointer = store.parse_pointer(data) if item["size"] <= 1024 else None
        if pointer:
            lfs_file = store.lfs_path(pointer["oid"])
            headers.update({"ETag": f'"{pointer["oid"]}"', "X-Linked-Etag": f'"{pointer["oid"]}"',
                            "X-Linked-Size": str(pointer["size"])})  # fmt: skip
            size = pointer["size"]
        else:
            lfs_file = None
            headers["ETag"] = f'"{item["oid"]}"'
            size = len(data)
        start, end, status = 0, size - 1, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and size:
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            else:
                start, end = max(size - int(last or 0), 0), size - 1
            if start > end or start >= size:
                raise HubError(416, "Requested range not satisfiable", extra={})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        if lfs_file is None:
            self.wfile.write(data[start : end + 1])
            return
        with open(lfs_file, "rb") as handle:
            handle.seek(start)
            remaining = length
            while remaining:
                chunk = handle.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


class LocalHubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, verbose: bool = False):
        super().__init__((host, port), Handler)
        self.store = Store(root)
        self.faults = Faults()
        self.verbose = verbose
        self.stats = {"lfs_uploads": 0, "commits": 0}
        self.stats_lock = threading.Lock()
        self.base_url = f"http://{host}:{self.server_address[1]}"


def serve(
    root: str, host: str = "127.0.0.1", port: int = 8765, verbose: bool = True, ready_file: str | None = None
) -> None:
    """Serves ROOT until interrupted. With ``ready_file``, writes the base URL there once listening."""
    server = LocalHubServer(root, host, port, verbose)
    print(f"local hub serving {Path(root).resolve()} at {server.base_url}", flush=True)
    print(f"  export HF_ENDPOINT={server.base_url} HF_HUB_DISABLE_XET=1", flush=True)
    if ready_file:
        tmp = f"{ready_file}.tmp"
        Path(tmp).write_text(server.base_url)
        os.replace(tmp, ready_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def repo_url(base_url: str, repo_type: str, repo_id: str) -> str:
    return f"{base_url}/{URL_PREFIX[repo_type]}{quote(repo_id)}"
