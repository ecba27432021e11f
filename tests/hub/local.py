"""The project's local Hub-compatible server as a test peer: a real process on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@dataclass
class LocalHub:
    root: Path
    port: int = 0
    url: str = ""
    process: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self):
        self.log = self.root.parent / f"{self.root.name}-server.log"

    def start(self) -> LocalHub:
        ready = self.root.parent / f"{self.root.name}-ready"
        ready.unlink(missing_ok=True)
        # the shipped server plus the test-only fault hooks (tests/hub/faulty_hub.py)
        command = [sys.executable, "-m", "tests.hub.faulty_hub", "--root", str(self.root),
                   "--port", str(self.port), "--ready-file", str(ready)]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2]
        )
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"local hub did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.url = ready.read_text()
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def env(self, **extra: str) -> dict:
        """A client environment pointed at this hub: no token, online, its own cache."""
        env = {k: v for k, v in os.environ.items() if k not in OFFLINE_FLAGS}
        env.update(HF_ENDPOINT=self.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(self.root.parent / "client-hf-home"))
        env.update(extra)
        return env

    def admin(self, path: str, body: dict | None = None, method: str | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}/_local/{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict:
        return self.admin("stats")

    def fault(self, match: str, **rule) -> None:
        """The next `times` (default 1) requests whose 'METHOD /path' matches the regex get `status` / `delay`."""
        self.admin("faults", {"match": match, **rule})

    def git(self, repo_id: str, *args: str) -> str:
        repo = self.root / "repos" / "datasets" / f"{repo_id}.git"
        return subprocess.run(
            ["git", f"--git-dir={repo}", *args], capture_output=True, text=True, check=True
        ).stdout.strip()


def cli(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magpie_teach.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def python(code: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs CODE in a fresh interpreter (huggingface_hub reads HF_ENDPOINT at import)."""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
