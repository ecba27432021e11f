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
import binascii
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}\Z")  # \Z: "$" would let a trailing newline through
SHA_RE = re.compile(r"[0-9a-f]{40}\Z")
SECRET_FILE = ".hub-secret"
"""In the root, mode 0600: what proves a server serves that root (:func:`proof`), and the write token of
``hub serve --require-token``."""
BODY_TYPES = ("application/json", "application/x-ndjson", "application/vnd.git-lfs+json")
"""What a POST that writes must declare: the Hub API's types. A web page can send only a "simple" request without
asking first (text/plain, a form), so a cross-origin page cannot write whatever else it does."""
READING_POSTS = ("paths-info",)  # POSTs that only read (huggingface_hub sends paths-info as a form)
# Request bodies are read in pieces and never whole: a JSON body up to MAX_JSON_BODY; an NDJSON commit a line at a
# time (each line up to MAX_COMMIT_LINE: an inline file is at most LFS_THRESHOLD, base64-encoded, and the client
# sends anything larger through LFS), its files written to git as they arrive, up to MAX_BODY in all; LFS uploads
# stream to disk up to the Hub's per-file limit. At most MAX_BODIES_AT_ONCE requests read a JSON or NDJSON body at
# once (the others wait, then get 503), so memory stays bounded whatever the number of clients.
MAX_BODY = 256 * 1024 * 1024
MAX_JSON_BODY = 16 * 1024 * 1024
MAX_COMMIT_LINE = LFS_THRESHOLD * 4 // 3 + 64 * 1024
MAX_BODIES_AT_ONCE = 2
BODY_WAIT_S = 300.0
MAX_LFS_OBJECT = 50 * 1024**3


class HubError(Exception):
    """An error answered to the client: status, message and (for 404s) the ``X-Error-Code`` it maps to."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


def check_repo_id(repo_type: str, repo_id: str) -> None:
    """400 unless REPO_ID is ORG/NAME with Hub-valid parts (no '..', '--' or '.git' ending) of a known type.

    Every request field that becomes a path goes through here first, so no request can name a folder
    outside the store's root.
    """
    if repo_type not in URL_PREFIX:
        raise HubError(400, f"Invalid repo type {repo_type!r}")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(
        NAME_RE.match(part) and ".." not in part and "--" not in part and not part.endswith(".git") for part in parts
    ):
        raise HubError(400, f"Invalid repo id {repo_id!r}: expected ORG/NAME of letters, digits, '-', '_' and '.'")


def check_repo_path(path: str) -> str:
    """A file path inside a repo as the Hub accepts it (no '..', no .git/, no control characters), normalised."""
    clean = path.strip("/")
    if (
        not clean
        or any(part in ("", ".", "..") for part in clean.split("/"))
        or ".git" in clean.split("/")
        or any(ord(char) < 32 or ord(char) == 127 for char in clean)
    ):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return clean


def check_ref_name(kind: str, name: str) -> None:
    """400 unless NAME is a branch or tag name git accepts and the Hub would: not HEAD, not a full ref, no '-' start."""
    if (
        not name
        or len(name) > 200  # git's ref is a file: a longer name fails on the file system
        or name.startswith(("-", "refs/"))
        or name == "HEAD"
        or subprocess.run(["git", "check-ref-format", f"refs/{kind}/{name}"], capture_output=True).returncode
    ):
        raise HubError(400, f"Invalid {'branch' if kind == 'heads' else 'tag'} name {name!r}")


def root_secret(root: str | os.PathLike) -> str:
    """ROOT's secret (created, mode 0600, on first use): only this user and a server serving ROOT know it."""
    import secrets

    path = Path(root) / SECRET_FILE
    if not path.exists():
        Path(root).mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        os.replace(path.with_suffix(".tmp"), path)
    return path.read_text().strip()


def proof(secret: str, nonce: str) -> str:
    """What a server serving a root answers to NONCE: HMAC-SHA256 of it under the root's secret."""
    import hmac

    return hmac.new(secret.encode(), nonce.encode(), hashlib.sha256).hexdigest()


def header_safe(text: str, limit: int = 400) -> str:
    """TEXT for an HTTP header value: ASCII without control characters (the JSON body keeps the full text)."""
    safe = "".join(c if 32 <= ord(c) < 127 else "?" for c in str(text))
    return safe[:limit]


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
        # what a killed server left: a commit's temporary git index, an upload that never finished
        for stale in [*(self.root / "repos").glob("*/*/*.git/index-*"), *(self.root / "lfs" / "tmp").iterdir()]:
            stale.unlink(missing_ok=True)

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
        """ROOT/repos/TYPEs/ORG/NAME.git for a valid repo id; 400 for anything that could leave the root."""
        check_repo_id(repo_type, repo_id)
        repos = (self.root / "repos").resolve()
        path = (repos / f"{repo_type}s" / f"{repo_id}.git").resolve()
        if repos not in path.parents:
            raise HubError(400, f"Invalid repo id {repo_id!r}")
        return path

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
    def commit(self, repo: Path, branch: str, header: dict, ops: list[tuple[str, str, dict]]) -> str:
        """Applies one commit's operations, (key, checked path, value) as ``parse_commit`` gives them, to BRANCH
        atomically; 412 when parentCommit is not the head."""
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
                for key, path, value in ops:
                    if key == "file":
                        self._add(repo, path, value["blob"], env)
                    elif key == "lfsFile":
                        oid = value["oid"]
                        if not self.lfs_path(oid).exists():
                            raise HubError(400, f"LFS object {oid} of {path} was never uploaded")
                        size = self.lfs_path(oid).stat().st_size  # stored objects are verified by sha256
                        declared = value.get("size")
                        if declared is not None and declared != size:  # a pointer that lies truncates downloads
                            raise HubError(400, f"{path}: lfsFile declares {declared} bytes, but LFS object {oid} "
                                                f"holds {size}")  # fmt: skip
                        pointer = LFS_POINTER + f"oid sha256:{oid}\nsize {size}\n".encode()
                        self._add(repo, path, self.write_blob(repo, pointer), env)
                    else:  # deletedFile / deletedFolder
                        prefix = [path] if key == "deletedFile" else [f"{path}/"]
                        listed = self.git(repo, "ls-files", "-z", "--", *prefix, env=env).decode().split("\0")
                        names = [name for name in listed if name and (key == "deletedFolder" or name == path)]
                        if not names:
                            raise HubError(404, f"{path} not found in {branch}", "EntryNotFound")
                        # mode 0 removes the entry; unlike --force-remove this needs no work tree (a bare repo)
                        removal = "".join(f"0 {'0' * 40}\t{name}\n" for name in names)
                        self.git(repo, "update-index", "--index-info", input=removal.encode(), env=env)
                tree = self.git(repo, "write-tree", env=env).decode().strip()
            finally:
                os.unlink(index.name)
            message = header.get("summary") or "Upload"
            if header.get("description"):
                message += "\n\n" + header["description"]
            new = self.git(repo, "commit-tree", tree, "-p", head, "-m", message).decode().strip()
            self.git(repo, "update-ref", f"refs/heads/{branch}", new, head)  # compare-and-swap
            return new

    def write_blob(self, repo: Path, data: bytes) -> str:
        """Writes DATA to REPO's objects; its blob id. A blob no commit names is harmless (git gc prunes it)."""
        return self.git(repo, "hash-object", "-w", "--stdin", input=data).decode().strip()

    def _add(self, repo: Path, path: str, blob: str, env: dict) -> None:
        try:
            self.git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
        except RuntimeError as err:  # git refuses the path: a file where a folder is (or the other way round)
            detail = str(err).split(": error: ")[-1].split("\n")[0]
            raise HubError(400, f"{path}: cannot be added to the commit: {detail}") from None


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
        if self.close_connection:  # a body left unread: the client must not send its next request on this one
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _length(self, limit: int = MAX_BODY) -> int:
        """The request's Content-Length: 400 when it is not a non-negative integer, 413 over LIMIT."""
        raw = self.headers.get("Content-Length") or "0"
        if not raw.strip().isdigit():
            self.close_connection = True  # the body's end is unknown: this connection cannot be reused
            raise HubError(400, f"Invalid Content-Length {raw!r}")
        if int(raw) > limit:
            self.close_connection = True
            raise HubError(413, f"Request body of {int(raw)} bytes is over the limit of {limit} bytes")
        return int(raw)

    def _pieces(self, limit: int) -> Iterator[bytes]:
        """The request body in pieces of at most 1 MiB, whether chunked or sized by Content-Length; 413 past LIMIT.
        Until the body has been read to its end, the connection is marked to close (an error midway leaves bytes
        that are not a request)."""
        close, self.close_connection = self.close_connection, True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            total = 0
            while True:
                line = self.rfile.readline(1024).split(b";")[0].strip()
                if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", line):
                    raise HubError(400, f"Invalid chunk size {line[:40]!r}")
                size = int(line, 16)
                total += size
                if total > limit:
                    raise HubError(413, f"Request body over the limit of {limit} bytes")
                if size == 0:
                    self.rfile.readline(1024)
                    break
                yield from self._read_exactly(size)
                self.rfile.readline(1024)
        else:
            yield from self._read_exactly(self._length(limit))
        self.close_connection = close

    def _read_exactly(self, size: int) -> Iterator[bytes]:
        while size:
            piece = self.rfile.read(min(size, 1 << 20))
            if not piece:
                raise HubError(400, f"Request body ended {size} bytes short")
            size -= len(piece)
            yield piece

    def _body(self, limit: int = MAX_JSON_BODY) -> bytes:
        with self._body_slot():
            return b"".join(self._pieces(limit))

    @contextmanager
    def _body_slot(self) -> Iterator[None]:
        """One of the MAX_BODIES_AT_ONCE slots for reading a body; 503 when none frees up in BODY_WAIT_S."""
        if not self.server.bodies.acquire(timeout=BODY_WAIT_S):
            self.close_connection = True
            raise HubError(503, f"the local hub is busy reading {MAX_BODIES_AT_ONCE} other uploads; try again")
        try:
            yield
        finally:
            self.server.bodies.release()

    def _lines(self) -> Iterator[bytes]:
        """The body's lines, read a piece at a time; 413 for a line over MAX_COMMIT_LINE bytes."""
        pending, number = bytearray(), 1
        for piece in self._pieces(MAX_BODY):
            start = len(pending)
            pending += piece
            while (end := pending.find(b"\n", start)) >= 0:
                line = bytes(pending[:end])
                del pending[: end + 1]
                yield line
                del line
                number, start = number + 1, 0
            if len(pending) > MAX_COMMIT_LINE:
                raise HubError(413, f"commit payload line {number} is over {MAX_COMMIT_LINE} bytes: a file over "
                                    f"{LFS_THRESHOLD // 2**20} MiB goes through LFS (preupload says so)")  # fmt: skip
        if pending:
            yield bytes(pending)

    def _json(self) -> dict:
        raw = self._body()
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise HubError(400, f"invalid JSON body: {str(err)[:200]}") from None
        if not isinstance(body, dict):
            raise HubError(400, f"invalid JSON body: expected an object, got {type(body).__name__}")
        return body

    def before_route(self, path: str) -> bool:
        """Called before each request is routed; True when it answered the request itself. Test peers override
        it (e.g. to inject faults)."""
        return False

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        raw_parts = url.path.strip("/").split("/")
        try:
            self.check_caller(raw_parts)
            if not self.before_route(url.path):
                self.route(raw_parts)
        except HubError as err:
            headers = {"X-Error-Message": header_safe(err.message)}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, {"error": err.message, **err.extra}, headers)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as err:  # noqa: BLE001 - a server answers 500 and goes on
            self._send(500, {"error": f"{type(err).__name__}: {err}"}, {"X-Error-Message": header_safe(err, 200)})

    def check_caller(self, parts: list[str]) -> None:
        """403 unless the request could come from a client on this machine and not from a web page: the ``Host``
        is this server's address (an IP literal or localhost, with its port: a DNS-rebound name is refused), an
        ``Origin`` (which browsers send and the Hub clients do not) is this server's own, and a POST that writes
        declares one of :data:`BODY_TYPES`. With a write token (``hub serve --require-token``), every write
        presents it."""
        host = self.headers.get("Host") or ""
        name, _, port = host.rpartition(":")
        name = name.strip("[]")
        if port != str(self.server.server_address[1]) or not (name == "localhost" or _ip_literal(name)):
            raise HubError(403, f"Host {header_safe(host, 100)!r} is not this server's address")
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{host}":
            raise HubError(403, f"requests from web pages ({header_safe(origin, 100)}) are refused")
        writes = self.command in ("POST", "PUT", "DELETE") and not (len(parts) > 4 and parts[4] in READING_POSTS)
        if self.command == "POST" and writes and parts[:1] != ["lfs-verify"]:
            kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind not in BODY_TYPES:
                raise HubError(
                    415, f"Content-Type {header_safe(kind, 100)!r}: a write is one of {', '.join(BODY_TYPES)}"
                )
        if writes and self.server.token is not None:
            import hmac

            given = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.server.token.encode()):
                raise HubError(401, "this hub takes writes with its token only (the root's .hub-secret)")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch  # noqa: N815 - BaseHTTPRequestHandler's names

    # ---- routing -----------------------------------------------------------------------------
    def route(self, parts: list[str]) -> None:
        store, method = self.server.store, self.command
        if parts[:1] == ["_local"]:
            return self.local_admin(parts[1:])
        if parts[:1] == ["lfs-upload"] and len(parts) == 2 and method == "PUT":
            return self.lfs_put(parts[1])
        if parts[:1] == ["lfs-verify"] and method == "POST":
            oid = _field(self._json(), "oid", str)
            if not store.lfs_path(oid).exists():
                raise HubError(404, f"LFS object {oid} not found")
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
            name, org = _field(body, "name", str), body.get("organization")
            repo_id = f"{org}/{name}" if org else name
            path = store.existing(body.get("type") or "model", repo_id)  # checked: inside the root, or 400
            with store.lock:
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
        if action == "tree" and len(rest) >= 2 and method == "GET":
            return self.tree(repo, unquote(rest[1]), unquote("/".join(rest[2:])))
        if action == "paths-info" and method == "POST":
            return self.paths_info(repo, unquote("/".join(rest[1:])))
        if action == "commits" and method == "GET":
            return self.commits(repo, unquote("/".join(rest[1:])))
        raise HubError(404, f"no route for {method} /api/{'/'.join(parts)}")

    # ---- endpoints ---------------------------------------------------------------------------
    def local_admin(self, parts: list[str]) -> None:
        if parts == ["stats"]:
            body = {**self.server.stats, "root": str(self.server.store.root.resolve())}
            nonce = (self.query.get("nonce") or [""])[0]
            if nonce:  # proves the root: only a server that can read its secret answers this
                body["proof"] = proof(self.server.secret, nonce)
            return self._send(200, body)
        raise HubError(404, "unknown admin route")

    def create_repo(self, body: dict) -> None:
        name, org = _field(body, "name", str), body.get("organization")
        repo_type = body.get("type") or "model"
        repo_id = f"{org}/{name}" if org else name if "/" in name else f"local/{name}"
        check_repo_id(repo_type, repo_id)
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
        for item in _field(body, "files", list):
            sample = _b64(_field(item, "sample", str, default=""), "sample")
            path = check_repo_path(_field(item, "path", str))
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
        for obj in _field(body, "objects", list):
            oid, size = _field(obj, "oid", str), _field(obj, "size", int)
            if not 0 <= size <= MAX_LFS_OBJECT:
                raise HubError(413 if size > 0 else 400, f"LFS object {oid}: invalid size {size}")
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
        remaining = self._length(MAX_LFS_OBJECT)
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
        store = self.server.store
        with self._body_slot():  # each inline file goes to git as its line is read: memory holds one line
            header, ops = parse_commit(self._lines(), keep=lambda data: store.write_blob(repo, data))
        sha = store.commit(repo, revision, header, ops)
        with self.server.stats_lock:
            self.server.stats["commits"] += 1
        url = f"{self.server.base_url}/{URL_PREFIX[repo_type]}{repo_id}/commit/{sha}"
        self._send(200, {"commitUrl": url, "commitOid": sha, "success": True})

    def create_tag(self, repo: Path, revision: str) -> None:
        store = self.server.store
        body = self._json()
        tag = _field(body, "tag", str)
        check_ref_name("tags", tag)
        with store.lock:
            sha = store.resolve(repo, revision)
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
        check_ref_name("heads", branch)
        with store.lock:
            if store.git(repo, "for-each-ref", f"refs/heads/{branch}").strip():
                raise HubError(409, f"Branch {branch} already exists")
            sha = store.resolve(repo, body.get("startingPoint") or "main")
            store.git(repo, "update-ref", f"refs/heads/{branch}", sha, "0" * 40)
        self._send(200, {})

    def delete_ref(self, repo: Path, kind: str, name: str) -> None:
        store = self.server.store
        check_ref_name(kind, name)
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
        raw = self._body().decode(errors="replace")
        if self.headers.get("Content-Type", "").startswith("application/json"):
            try:
                body = json.loads(raw or "{}")
            except (json.JSONDecodeError, RecursionError) as err:
                raise HubError(400, f"invalid JSON body: {str(err)[:200]}") from None
            if not isinstance(body, dict):
                raise HubError(400, "invalid JSON body: expected an object")
            paths, expand = _field(body, "paths", list, default=[]), bool(body.get("expand"))
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


def _field(body: Any, key: str, kind: type, default: Any = ...) -> Any:
    """BODY[KEY] checked to be a KIND; 400 naming the field when it is missing (and has no default) or mistyped."""
    if not isinstance(body, dict):
        raise HubError(400, f"expected an object holding {key!r}, got {type(body).__name__}")
    if key not in body or body[key] is None:
        if default is ...:
            raise HubError(400, f"missing field {key!r}")
        return default
    value = body[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HubError(400, f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise HubError(400, f"invalid base64 in {what}: {err}") from err


def parse_commit(lines: Iterable[bytes], keep: Callable[[bytes], str]) -> tuple[dict, list[tuple[str, str, dict]]]:
    """An NDJSON commit payload, line by line -> (header, [(key, checked path, value)]); 400 naming the line on any
    error.

    A "file" value's content is decoded and handed to KEEP as soon as its line is read, and replaced by what KEEP
    returns, ``value["blob"]`` (so the payload is never held whole).
    """
    header: dict = {}
    ops: list[tuple[str, str, dict]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise HubError(400, f"commit payload line {number}: invalid JSON ({str(err)[:200]})") from None
        try:
            key, value = _field(item, "key", str), _field(item, "value", dict)
            if key == "header":
                header = value
                continue
            if key not in ("file", "lfsFile", "deletedFile", "deletedFolder"):
                raise HubError(400, f"unsupported commit operation {key!r}")
            path = check_repo_path(_field(value, "path", str))
            if key == "file":
                content = _field(value, "content", str)
                data = _b64(content, path) if value.get("encoding") == "base64" else content.encode()
                value = {**{k: v for k, v in value.items() if k != "content"}, "blob": keep(data)}
            elif key == "lfsFile":
                _field(value, "oid", str)
            ops.append((key, path, value))
        except HubError as err:
            raise HubError(400, f"commit payload line {number}: {err.message}") from err
    return header, ops


class LocalHubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        root: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
        handler: type[Handler] = Handler,
        require_token: bool = False,
    ):
        super().__init__((host, port), handler)
        self.store = Store(root)
        self.secret = root_secret(root)
        self.token = self.secret if require_token else None
        self.verbose = verbose
        self.stats = {"lfs_uploads": 0, "commits": 0}
        self.stats_lock = threading.Lock()
        self.bodies = threading.BoundedSemaphore(MAX_BODIES_AT_ONCE)
        self.base_url = f"http://{host}:{self.server_address[1]}"


def serve(
    root: str,
    host: str = "127.0.0.1",
    port: int = 8765,
    verbose: bool = True,
    ready_file: str | None = None,
    handler: type[Handler] = Handler,
    require_token: bool = False,
) -> None:
    """Serves ROOT until interrupted. With ``ready_file``, writes the base URL there once listening."""
    _give_back_large_buffers()
    server = LocalHubServer(root, host, port, verbose, handler, require_token)
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


def _give_back_large_buffers() -> None:
    """Makes glibc map every allocation over 1 MiB on its own, so a commit line's buffers go back to the system when
    freed. By default glibc raises that threshold to the largest block freed so far, after which a long-running
    server keeps every large body's memory in its threads' heaps: growth without bound (measured: 4 concurrent
    64 MiB commits grew the server by 273 MiB, 8 by 402 MiB; with this, 121 and 141). Nothing elsewhere."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; setting it also turns the raising off
    except (AttributeError, OSError):
        pass


def _ip_literal(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def repo_url(base_url: str, repo_type: str, repo_id: str) -> str:
    return f"{base_url}/{URL_PREFIX[repo_type]}{quote(repo_id)}"
