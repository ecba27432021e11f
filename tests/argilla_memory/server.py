"""Starts a real Argilla 2.8 server (its own venv), a real Redis and the in-memory search engine on 127.0.0.1.

Used by the tests' session fixture; stopped by PID. The server venv is made by `make argilla-server`
(argilla-server==2.8.0 with click<8.2 and huggingface_hub<1, which conflict with the client stack).
"""

import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SERVER_PYTHON = REPO / ".argilla-server-venv" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ArgillaServer:
    url: str
    api_key: str
    workspace: str
    home: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Argilla server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"Argilla server did not answer {url} in {timeout}s:\n{log.read_text()[-3000:]}")


def start_argilla_server(home: Path) -> ArgillaServer:
    if not SERVER_PYTHON.exists():
        raise RuntimeError(f"{SERVER_PYTHON} is missing: run `make argilla-server` first.")
    redis = shutil.which("redis-server")
    if redis is None:
        raise RuntimeError("redis-server is not installed: run `make argilla-server` (apt-get install redis-server).")
    home.mkdir(parents=True, exist_ok=True)
    redis_port, port = free_port(), free_port()
    api_key = secrets.token_hex(16)
    env = {
        **_env(home),
        "ARGILLA_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "ARGILLA_SEARCH_ENGINE": "memory",
        "ARGILLA_ENABLE_TELEMETRY": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "1",
    }
    server = ArgillaServer(f"http://127.0.0.1:{port}", api_key, "review", home)
    try:
        server.processes.append(
            subprocess.Popen(
                [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=open(home / "redis.log", "w"), stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        _server_cli(env, "database", "migrate")
        _server_cli(env, "database", "users", "create", "--first-name", "Owner", "--username", "owner", "--role",
                    "owner", "--password", "owner-password", "--api-key", api_key, "--workspace", "review")  # fmt: skip
        log = home / "server.log"
        process = subprocess.Popen(
            [str(SERVER_PYTHON), str(HERE / "serve.py"), "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        server.processes.append(process)
        _wait_http(f"{server.url}/api/v1/status", process, log)
    except BaseException:
        server.stop()
        raise
    return server


def _server_cli(env: dict, *args: str) -> None:
    subprocess.run([str(SERVER_PYTHON), "-m", "argilla_server", *args], env=env, check=True, capture_output=True,
                   text=True, timeout=120)  # fmt: skip


def _env(home: Path) -> dict:
    return {
        **os.environ,
        "ARGILLA_HOME_PATH": str(home),
        "ARGILLA_DATABASE_URL": f"sqlite+aiosqlite:///{home}/argilla.db",
    }


def add_annotator(server: ArgillaServer, username: str) -> str:
    """Creates an annotator in the review workspace; returns the user's API key."""
    key = secrets.token_hex(16)
    _server_cli(_env(server.home), "database", "users", "create", "--first-name", username, "--username", username,
                "--role", "annotator", "--password", f"{username}-password", "--api-key", key,
                "--workspace", server.workspace)  # fmt: skip
    return key
