"""The local Hub server under hostile and malformed requests: nothing outside its root is touched, client
errors are 4xx with an ``X-Error-Message`` (never a 500), and commits that delete files work on its bare repos."""

import http.client
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tests.hub.local import cli, python

REPO = "lab/victim"


def request(hub, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
    """One raw HTTP request (http.client sends the path as given, '..' and all); returns (status, headers, body)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=20)
    try:
        headers = dict(headers or {})
        connection.putrequest(method, path, skip_accept_encoding=True, skip_host="Host" in headers)
        if method == "POST":  # what the Hub client declares (a POST without it is refused: a web page's kind)
            headers.setdefault("Content-Type", "application/json")
        if body is not None and "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            headers["Content-Length"] = str(len(body))
        for key, value in headers.items():
            connection.putheader(key, value)
        connection.endheaders()
        if body:
            connection.send(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def hub_with_decoys(tmp_path_factory):
    """A hub (one for this module's tests) holding one dataset repo, and decoys outside its root: a folder with a
    .git, and a bare repo. Each test leaves the repo as it found it (it asserts so)."""
    from tests.hub.local import LocalHub

    tmp_path = tmp_path_factory.mktemp("decoys")
    hub = LocalHub(tmp_path / "hub").start()
    code = f"from huggingface_hub import HfApi; HfApi().create_repo({REPO!r}, repo_type='dataset')"
    python(code, hub.env())
    decoy = tmp_path / "victim"
    (decoy / ".git").mkdir(parents=True)
    (decoy / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    bare = tmp_path / "elsewhere" / "repo.git"
    subprocess.run(["git", "init", "--bare", "--quiet", str(bare)], check=True)
    yield hub, tmp_path, [decoy / ".git" / "HEAD", bare / "HEAD"]
    hub.stop()


def _inside_root(hub, tmp_path) -> list[Path]:
    return sorted(p for p in tmp_path.rglob("*") if hub.root not in p.parents and p != hub.root)


def test_no_request_field_reaches_outside_the_root(hub_with_decoys):
    hub, tmp_path, decoys = hub_with_decoys
    root = hub.root
    depth = len(root.relative_to(tmp_path).parts) + 2  # repos/datasets/ below the root
    up = "/".join([".."] * depth)
    outside_before = _inside_root(hub, tmp_path)
    absolute = str(tmp_path / "elsewhere" / "repo")
    attempts = [
        ("DELETE", "/api/repos/delete", {"name": f"{up}/victim/", "type": "dataset"}),
        ("DELETE", "/api/repos/delete", {"name": f"{up}/victim/.git/..", "type": "dataset"}),
        ("DELETE", "/api/repos/delete", {"name": absolute, "type": "dataset"}),
        ("DELETE", "/api/repos/delete", {"name": "victim", "organization": up, "type": "dataset"}),
        ("DELETE", "/api/repos/delete", {"name": "victim", "organization": "lab", "type": f"{up}/x"}),
        ("POST", "/api/repos/create", {"name": f"{up}/created", "type": "dataset"}),
        ("POST", "/api/repos/create", {"name": "created", "organization": up, "type": "dataset"}),
        ("POST", "/api/repos/create", {"name": "ok.git", "organization": "lab", "type": "dataset"}),
        ("GET", f"/api/datasets/{up}/victim", None),
        ("GET", "/api/datasets/..%2F..%2F../victim/refs", None),
        ("POST", f"/datasets/{up}/victim.git/info/lfs/objects/batch", {"operation": "upload", "objects": []}),
        ("GET", f"/datasets/{up}/victim/resolve/main/HEAD", None),
        ("PUT", f"/lfs-upload/{'..%2F' * depth}victim", b"x"),
        ("POST", "/lfs-verify", {"oid": "../../../victim/.git/HEAD"}),
        ("POST", f"/api/datasets/{REPO}/commit/main",
         b'{"key":"header","value":{"summary":"x"}}\n{"key":"file","value":{"path":"../../escape","content":"eA==","encoding":"base64"}}\n'),
        ("POST", f"/api/datasets/{REPO}/commit/main",
         b'{"key":"deletedFolder","value":{"path":"../.."}}\n'),
    ]  # fmt: skip
    for method, path, body in attempts:
        status, headers, _ = request(hub, method, path, body)
        assert 400 <= status < 500, (method, path, body, status)
        assert status != 404 or "X-Error-Code" in headers or "X-Error-Message" in headers
        assert headers.get("X-Error-Message"), (method, path)
    for decoy in decoys:
        assert decoy.exists(), decoy
    assert _inside_root(hub, tmp_path) == outside_before  # nothing created or removed outside the root
    assert (root / "repos" / "datasets" / f"{REPO}.git" / "HEAD").exists()
    assert not list(root.rglob("*ok.git.git"))


@pytest.mark.parametrize(
    "method, path, body, headers, status",
    [
        ("POST", f"/api/datasets/{REPO}/commit/main", b"{not json\n", None, 400),
        ("POST", f"/api/datasets/{REPO}/commit/main", b'{"key":"file"}\n', None, 400),
        ("POST", f"/api/datasets/{REPO}/commit/main", b'{"key":"file","value":{"path":"a.txt","content":"@@@","encoding":"base64"}}\n', None, 400),
        ("POST", f"/api/datasets/{REPO}/commit/main", b'{"key":"file","value":{"path":"a\\nb.txt","content":"eA==","encoding":"base64"}}\n', None, 400),
        ("POST", f"/api/datasets/{REPO}/commit/main", b'{"key":"rename","value":{"path":"a.txt"}}\n', None, 400),
        ("POST", f"/api/datasets/{REPO}/commit/main", b'["a list"]\n', None, 400),
        ("POST", f"/api/datasets/{REPO}/commit/main", b"", {"Content-Length": "-5"}, 400),
        ("POST", f"/api/datasets/{REPO}/commit/main", b"", {"Content-Length": str(10**12)}, 413),
        ("POST", f"/api/datasets/{REPO}/commit/main", b"zz\r\nabc\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"}, 400),
        ("POST", f"/api/datasets/{REPO}/preupload/main", {"files": [{"path": "a", "sample": "!!"}]}, None, 400),
        ("POST", f"/api/datasets/{REPO}/preupload/main", {"files": "nope"}, None, 400),
        ("POST", f"/datasets/{REPO}.git/info/lfs/objects/batch", {"operation": "upload", "objects": [{"oid": "a" * 64, "size": -1}]}, None, 400),
        ("POST", f"/datasets/{REPO}.git/info/lfs/objects/batch", {"operation": "upload", "objects": [{"oid": "a" * 64}]}, None, 400),
        ("PUT", f"/lfs-upload/{'a' * 64}", b"", {"Content-Length": "lots"}, 400),
        ("POST", f"/api/datasets/{REPO}/tag/main", {"tag": "-x"}, None, 400),
        ("POST", f"/api/datasets/{REPO}/tag/main", {"tag": "refs/heads/main"}, None, 400),
        ("POST", f"/api/datasets/{REPO}/tag/main", {"tag": "a..b"}, None, 400),
        ("POST", f"/api/datasets/{REPO}/tag/main", {"tag": "v1.lock"}, None, 400),
        ("POST", f"/api/datasets/{REPO}/tag/main", {}, None, 400),
        ("POST", f"/api/datasets/{REPO}/branch/HEAD", {}, None, 400),
        ("POST", f"/api/datasets/{REPO}/branch/-b", {}, None, 400),
        ("POST", f"/api/datasets/{REPO}/branch/x~1", {}, None, 400),
        ("POST", "/api/repos/create", b"[1]", None, 400),
        ("POST", "/api/repos/create", {"organization": "lab"}, None, 400),
    ],
)  # fmt: skip
def test_malformed_requests_get_a_client_error_with_a_message(hub_with_decoys, method, path, body, headers, status):
    hub, _, _ = hub_with_decoys
    head = hub.git(REPO, "rev-parse", "main")
    got, answer_headers, payload = request(hub, method, path, body, headers)
    assert got == status, payload
    assert answer_headers.get("X-Error-Message")
    assert hub.git(REPO, "rev-parse", "main") == head  # nothing committed
    assert hub.git(REPO, "tag") == ""
    assert hub.git(REPO, "for-each-ref", "--format=%(refname)", "refs/heads") == "refs/heads/main"
    # the server is still serving
    assert request(hub, "GET", f"/api/datasets/{REPO}")[0] == 200


def test_a_version_with_fewer_files_publishes_and_loads_by_tag(local_hub, ranked_sample, tmp_path):
    env = local_hub.env()
    with_dropped = tmp_path / "with-dropped"
    shutil.copytree(ranked_sample, with_dropped)
    first_row = pd.read_csv(ranked_sample / "ranking.csv").head(1)
    pd.DataFrame({"id": ["x"], "reason": ["empty_response"]}).to_csv(with_dropped / "dropped.csv", index=False)
    (with_dropped / "manifest.json").unlink()  # edited by hand: no longer the run its manifest describes
    first = cli("push", str(with_dropped), "--repo-id", "lab/shrink", env=env)
    assert first.returncode == 0, first.stderr
    assert "magpie_teach/dropped.csv" in local_hub.git("lab/shrink", "ls-tree", "-r", "--name-only", "v1.0.0")

    plain = tmp_path / "plain"
    shutil.copytree(ranked_sample, plain)
    (plain / "dropped.csv").unlink(missing_ok=True)
    first_row.to_csv(plain / "ranking.csv", index=False)
    (plain / "manifest.json").unlink()  # edited by hand: no longer the run its manifest describes
    second = cli("push", str(plain), "--repo-id", "lab/shrink", env=env)
    assert second.returncode == 0 and "tag v1.1.0" in second.stdout, second.stderr
    files = local_hub.git("lab/shrink", "ls-tree", "-r", "--name-only", "v1.1.0").split()
    assert "magpie_teach/dropped.csv" not in files and "magpie_teach/summary.json" in files
    code = (
        "import datasets; "
        "print(len(datasets.load_dataset('lab/shrink', revision='v1.1.0', split='train')), "
        "len(datasets.load_dataset('lab/shrink', revision='v1.0.0', split='train')))"
    )
    new, old = python(code, env).stdout.split()[-2:]
    assert int(new) == 1 and int(old) == len(pd.read_csv(ranked_sample / "ranking.csv"))


def test_delete_file_and_folder_through_huggingface_hub(local_hub):
    code = """
from huggingface_hub import HfApi, CommitOperationAdd
api = HfApi()
api.create_repo("lab/d", repo_type="dataset")
api.create_commit("lab/d", [CommitOperationAdd("keep.txt", b"k"), CommitOperationAdd("gone.txt", b"g"),
                            CommitOperationAdd("dir/a.txt", b"a"), CommitOperationAdd("dir/b.txt", b"b")],
                  commit_message="add", repo_type="dataset")
api.delete_file("gone.txt", "lab/d", repo_type="dataset")
api.delete_folder("dir", "lab/d", repo_type="dataset")
print(sorted(api.list_repo_files("lab/d", repo_type="dataset")))
"""
    out = python(code, local_hub.env()).stdout.strip().splitlines()[-1]
    assert out == "['.gitattributes', 'keep.txt']"
    assert local_hub.git("lab/d", "rev-list", "--count", "main") == "4"


def test_a_push_whose_client_times_out_publishes_no_tag_and_a_rerun_finishes(local_hub, ranked_sample):
    import time

    env = local_hub.env()
    local_hub.fault(r"^POST /api/datasets/lab/slow/commit/", delay=6)  # the server holds the commit past the client
    started = time.monotonic()
    failed = cli("push", str(ranked_sample), "--repo-id", "lab/slow", "--timeout", "2", env=env)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "Rerun the same command" in failed.stderr and "Traceback" not in failed.stderr
    assert time.monotonic() - started < 30
    assert local_hub.git("lab/slow", "tag") == ""  # nothing was published as a version
    deadline = time.monotonic() + 20  # the held commit goes through once the server wakes up
    while local_hub.git("lab/slow", "rev-list", "--count", "main") != "2" and time.monotonic() < deadline:
        time.sleep(0.2)
    landed = local_hub.git("lab/slow", "rev-parse", "main")
    rerun = cli("push", str(ranked_sample), "--repo-id", "lab/slow", env=env)
    assert rerun.returncode == 0 and "tag v1.0.0" in rerun.stdout, rerun.stderr
    # the rerun tagged the commit the first attempt made, instead of committing the same files again
    assert local_hub.git("lab/slow", "rev-list", "--count", "main") == "2"
    assert local_hub.git("lab/slow", "rev-parse", "v1.0.0^{commit}") == landed


def _head(hub):
    return json.loads(request(hub, "GET", f"/api/datasets/{REPO}/refs")[2])


def test_a_web_page_and_a_rebound_name_are_refused_and_writes_need_the_hub_api_types(hub_with_decoys):
    """The cross-origin attacks, as a browser would send them: a simple POST (text/plain, no preflight) with an
    Origin to commit, create a tag or a repo; a DNS-rebound Host to read. Each is refused and changes nothing; the
    same requests as the Hub client sends them (no Origin, the server's Host, its content types) still work."""
    hub, _, _ = hub_with_decoys
    before = _head(hub)
    commit = (json.dumps({"key": "header", "value": {"summary": "evil", "description": ""}}) + "\n"
              + json.dumps({"key": "file", "value": {"content": "ZXZpbA==", "path": "evil.txt", "encoding": "base64"}})).encode()  # fmt: skip
    page = {"Origin": "http://attacker.example", "Content-Type": "text/plain"}
    for method, path, body in (("POST", f"/api/datasets/{REPO}/commit/main", commit),
                               ("POST", f"/api/datasets/{REPO}/tag/main", {"tag": "v9.0.0"}),
                               ("POST", "/api/repos/create", {"name": "planted", "organization": "lab", "type": "dataset"})):  # fmt: skip
        status, headers, _ = request(hub, method, path, body, page)
        assert status == 403 and "web pages" in headers["X-Error-Message"], (path, status)
        status, headers, _ = request(
            hub, method, path, body, {"Content-Type": "text/plain"}
        )  # no Origin, still simple
        assert status == 415 and "Content-Type 'text/plain'" in headers["X-Error-Message"], (path, status)
    assert _head(hub) == before
    assert request(hub, "GET", "/api/datasets/lab/planted")[0] == 404
    status, headers, _ = request(hub, "GET", f"/api/datasets/{REPO}", headers={"Host": "attacker.example:80"})
    assert status == 403 and "is not this server's address" in headers["X-Error-Message"]
    status, _, _ = request(hub, "GET", f"/api/datasets/{REPO}", headers={"Host": f"attacker.example:{hub.port}"})
    assert status == 403
    assert request(hub, "GET", f"/api/datasets/{REPO}", headers={"Host": f"localhost:{hub.port}"})[0] == 200
    own = {"Origin": f"http://127.0.0.1:{hub.port}", "Content-Type": "application/json"}
    status, _, _ = request(hub, "POST", f"/api/datasets/{REPO}/tag/main", {"tag": "v0.0.1"}, own)
    assert status == 200
    assert (
        request(hub, "DELETE", f"/api/datasets/{REPO}/tag/v0.0.1", headers={"Content-Type": "application/json"})[0]
        == 200
    )
    assert _head(hub) == before


def test_a_repo_name_with_a_newline_and_a_non_latin_file_name_get_4xx_with_a_safe_header(hub_with_decoys):
    hub, _, _ = hub_with_decoys
    status, headers, body = request(hub, "POST", "/api/repos/create",
                                    {"name": "name\n", "organization": "lab", "type": "dataset"},
                                    {"Content-Type": "application/json"})  # fmt: skip
    assert status == 400 and "\n" not in headers["X-Error-Message"] and "name\\n" in json.loads(body)["error"]
    status, headers, body = request(hub, "GET", f"/datasets/{REPO}/resolve/main/%E6%95%B0%E6%8D%AE.csv")
    assert status == 404 and headers["X-Error-Message"].isascii()
    assert "数据.csv" in json.loads(body)["error"]


def test_an_impostor_that_claims_the_root_does_not_get_the_push(tmp_path):
    """A server on the local hub's port that answers /_local/stats with the victim's root: it cannot answer the
    nonce with the root's secret, so `start_local_hub` serves the root itself on another port."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from magpie_teach.hub.target import serves_root, start_local_hub

    root = (tmp_path / "hub").resolve()
    received = []

    class Impostor(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            received.append(self.path)
            body = json.dumps({"root": str(root), "lfs_uploads": 0, "commits": 0}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    impostor = ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    try:
        port = impostor.server_address[1]
        assert not serves_root(f"http://127.0.0.1:{port}", root)
        url = start_local_hub(root, port=port)
        assert url != f"http://127.0.0.1:{port}" and serves_root(url, root)
        assert all(path.startswith("/_local/stats") for path in received)  # nothing but the probes reached it
        assert oct((root / ".hub-secret").stat().st_mode & 0o777) == "0o600"
    finally:
        impostor.shutdown()
        impostor.server_close()


@pytest.mark.parametrize(
    "argv",
    [["select", "--scores", "org/scores", "--output", "{out}"],
     ["evaluate", "--prompts", "org/prompts", "--student", "s=org/student", "--baseline", "org/base",
      "--judge", "org/judge", "--output", "{out}"]],
)  # fmt: skip
def test_a_hub_data_set_id_with_the_hub_unreachable_is_one_line(tmp_path, argv):
    import os
    import sys

    from tests.processes import free_port

    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    args = [a.format(out=tmp_path / "out") for a in argv]
    result = subprocess.run([sys.executable, "-m", "magpie_teach.cli", *args], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "could not be reached" in result.stderr or "cannot be reached" in result.stderr


def test_an_lfs_pointer_that_misstates_the_objects_size_is_refused(hub_with_decoys):
    """A commit whose lfsFile declares fewer bytes than the stored object made the server serve a truncated file
    that hf_hub_download accepted (more bytes: a client waiting for ever). The size is checked against the object."""
    import hashlib

    hub, _, _ = hub_with_decoys
    data = b"parquet bytes, say" * 100
    oid = hashlib.sha256(data).hexdigest()
    status, _, _ = request(hub, "PUT", f"/lfs-upload/{oid}", data, {"Content-Type": "application/octet-stream"})
    assert status == 200
    before = _head(hub)
    for size in (len(data) - 10, len(data) + 10):
        body = (json.dumps({"key": "header", "value": {"summary": "lie", "description": ""}}) + "\n"
                + json.dumps({"key": "lfsFile", "value": {"path": "data.bin", "algo": "sha256", "oid": oid,
                                                          "size": size}})).encode()  # fmt: skip
        status, headers, _ = request(hub, "POST", f"/api/datasets/{REPO}/commit/main", body,
                                     {"Content-Type": "application/x-ndjson"})  # fmt: skip
        assert status == 400 and f"declares {size} bytes, but LFS object {oid} holds {len(data)}" in \
            headers["X-Error-Message"]  # fmt: skip
    assert _head(hub) == before


def _ndjson_commit(*paths: str) -> bytes:
    lines = [{"key": "header", "value": {"summary": "s", "description": ""}}]
    lines += [{"key": "file", "value": {"path": p, "content": "eA==", "encoding": "base64"}} for p in paths]
    return "\n".join(json.dumps(line) for line in lines).encode()


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "message"),
    [
        ("POST", f"/api/datasets/{REPO}/commit/main", _ndjson_commit("a/.git/config"), "application/x-ndjson",
         "Invalid path in repo: 'a/.git/config'"),
        ("POST", f"/api/datasets/{REPO}/commit/main", _ndjson_commit("x", "x/y"), "application/x-ndjson",
         "x/y: cannot be added to the commit: 'x/y' appears as both a file and as a directory"),
        ("POST", f"/api/datasets/{REPO}/tag/main", json.dumps({"tag": "v" * 300}).encode(), "application/json",
         "Invalid tag name"),
        ("POST", f"/api/datasets/{REPO}/tag/main", b"[" * 100_000 + b"]" * 100_000, "application/json",
         "invalid JSON body: maximum recursion depth"),
    ],
)  # fmt: skip
def test_client_mistakes_that_answered_500_answer_400(hub_with_decoys, method, path, body, content_type, message):
    hub, _, _ = hub_with_decoys
    before = _head(hub)
    status, headers, _ = request(hub, method, path, body, {"Content-Type": content_type})
    assert status == 400 and message in headers["X-Error-Message"], (status, headers.get("X-Error-Message"))
    assert _head(hub) == before


def test_what_a_killed_server_left_is_removed_when_a_server_starts_on_the_root(tmp_path):
    from magpie_teach.hub.server import Store

    Store(tmp_path).create_repo("dataset", "lab/r", False)
    index = tmp_path / "repos" / "datasets" / "lab" / "r.git" / "index-x1y2"  # a commit's temporary git index
    index.write_bytes(b"DIRC")
    upload = tmp_path / "lfs" / "tmp" / ("a" * 64 + ".1234")  # an upload cut short
    upload.write_bytes(b"part")
    Store(tmp_path)
    assert not index.exists() and not upload.exists()
    assert (tmp_path / "repos" / "datasets" / "lab" / "r.git" / "HEAD").exists()


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def test_concurrent_large_commits_keep_the_server_in_bounded_memory_and_all_land(tmp_path):
    """Four commits of 64 MiB each at once (inline files just under the 10 MiB LFS threshold): the old server held
    each body whole, several times over (it grew by 915 MiB); a body read a line at a time, at most two at once,
    holds a few copies of a 12 MiB line per body (and glibc must give large buffers back, or the server still grew by
    273 MiB and more with every further body). The bound: two bodies' lines, 8 copies each, about 200 MiB."""
    import base64
    import os
    import threading

    from tests.hub.local import LocalHub

    hub = LocalHub(tmp_path / "hub").start()
    try:
        python(f"from huggingface_hub import HfApi; HfApi().create_repo({REPO!r}, repo_type='dataset')", hub.env())
        content = base64.b64encode(os.urandom(9 * 2**20)).decode()  # 12 MiB per line as base64
        bodies = [
            "\n".join(
                json.dumps(line)
                for line in [
                    {"key": "header", "value": {"summary": f"big {n}"}},
                    *({"key": "file", "value": {"path": f"big/{n}-{i}.txt", "content": content,
                                                "encoding": "base64"}} for i in range(5)),
                ]
            ).encode()
            for n in range(4)
        ]  # fmt: skip
        before = _peak_rss_mb(hub.process.pid)
        results: list = []

        def send(body: bytes) -> None:
            results.append(request(hub, "POST", f"/api/datasets/{REPO}/commit/main", body,
                                   {"Content-Type": "application/x-ndjson"})[0])  # fmt: skip

        threads = [threading.Thread(target=send, args=(body,)) for body in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        grown = _peak_rss_mb(hub.process.pid) - before
        assert results == [200] * 4
        listed = hub.git(REPO, "ls-tree", "-r", "--name-only", "main", "big").split()
        assert sorted(listed) == sorted(f"big/{n}-{i}.txt" for n in range(4) for i in range(5))
        assert grown < 2 * 8 * 12.5, f"server peak RSS grew {grown:.0f} MiB for 4 bodies of 64 MiB"
    finally:
        hub.stop()


def test_an_inline_file_over_the_lfs_threshold_is_refused_with_a_message_and_the_connection_closed(hub_with_decoys):
    hub, _, _ = hub_with_decoys
    before = _head(hub)
    line = json.dumps({"key": "file", "value": {"path": "huge.txt", "content": "eA" * (8 * 2**20),
                                                "encoding": "base64"}})  # fmt: skip
    status, headers, _ = request(hub, "POST", f"/api/datasets/{REPO}/commit/main", line.encode(),
                                 {"Content-Type": "application/x-ndjson"})  # fmt: skip
    assert status == 413 and "goes through LFS" in headers["X-Error-Message"]
    assert headers.get("Connection") == "close"
    assert _head(hub) == before


def test_a_page_from_another_origin_in_headless_chromium_cannot_commit_tag_or_create_a_repo(hub_with_decoys, tmp_path):
    """The attack as it happens: the user's browser opens a page served from another origin (here another port on
    127.0.0.1), whose script sends the "simple" requests a page may send without asking first. Chromium delivers
    them (the page sees an answer to each, opaque as no-cors answers are), and the hub refuses them all: main's
    head, its tags and its repos are as before."""
    import http.server
    import threading

    from tests.e2e.test_report import chromium

    hub, _, _ = hub_with_decoys
    before = _head(hub)
    commit = (json.dumps({"key": "header", "value": {"summary": "evil", "description": ""}}) + "\n"
              + json.dumps({"key": "file", "value": {"content": "ZXZpbA==", "path": "evil.txt", "encoding": "base64"}}))  # fmt: skip
    attacks = [
        (f"/api/datasets/{REPO}/commit/main", commit),
        (f"/api/datasets/{REPO}/tag/main", json.dumps({"tag": "v9.0.0"})),
        ("/api/repos/create", json.dumps({"name": "planted", "organization": "lab", "type": "dataset"})),
    ]
    calls = ", ".join(
        f"fetch(hub + {json.dumps(path)}, {{method: 'POST', mode: 'no-cors', "
        f"headers: {{'Content-Type': 'text/plain'}}, body: {json.dumps(body)}}})"
        for path, body in attacks
    )
    page = f"""<!doctype html><html><body><script>
const hub = "http://127.0.0.1:{hub.port}";
Promise.allSettled([{calls}]).then(results => {{
  document.body.setAttribute("data-answers", results.map(r => r.status === "fulfilled" ? r.value.type : "failed").join(","));
}});
</script></body></html>""".encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        result = chromium(tmp_path, "--virtual-time-budget=15000", "--dump-dom",
                          f"http://127.0.0.1:{site.server_address[1]}/")  # fmt: skip
    finally:
        site.shutdown()
        site.server_close()
    assert 'data-answers="opaque,opaque,opaque"' in result.stdout, (result.stdout[-2000:], result.stderr[-2000:])
    assert _head(hub) == before
    assert request(hub, "GET", f"/api/datasets/{REPO}/tree/main")[0] == 200
    assert "evil.txt" not in hub.git(REPO, "ls-tree", "-r", "--name-only", "main")
    assert request(hub, "GET", "/api/datasets/lab/planted")[0] == 404
