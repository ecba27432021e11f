"""Helpers for the real servers the tests start: free ports, and stopping a process group by PID."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_group(process: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM to the process group started with ``start_new_session=True``, SIGKILL after ``grace`` seconds."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def greedy_generate_config(out, sample_path, teachers: list[dict], max_new_tokens: int = 12) -> dict:
    """A `generate` config: 6 sampled instructions of the shipped sample, every teacher greedy."""
    greedy = {"temperature": 0.0, "max_new_tokens": max_new_tokens}
    return {
        "output_dir": str(out),
        "instructions": {"path": sample_path, "sample": 6, "seed": 1},
        "teachers": [{**teacher, "sampling": greedy} for teacher in teachers],
        "batch_size": 3,
    }


HEADS: dict[str, int] = {}
"""The PID of the `ray start` process of each head this test run started, by address."""


def ray_processes(address: str, title: str) -> list[int]:
    """PIDs of the processes under the Ray head this test run started at ADDRESS (its raylet's workers) whose
    command line holds TITLE (Ray names an actor's process ``ray::MapWorker...``): never another run's processes."""
    import psutil

    found = []
    for child in psutil.Process(HEADS[address]).children(recursive=True):
        try:
            if title in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:  # ended meanwhile
            continue
    return found


@contextlib.contextmanager
def ray_head(log_folder: Path, num_cpus: int = 2, env: dict | None = None) -> Iterator[str]:
    """A local Ray head on 127.0.0.1 (`ray start --head --block`) with NUM_CPUS CPUs and ENV (its workers' too;
    default this process's), stopped by PID; yields its address."""
    port = free_port()
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray, "ray is not installed (pip install 'magpie-teach[ray]'; make install does)"
    env = {**(env if env is not None else os.environ), "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's unix socket paths must stay under 107 characters
    log = Path(log_folder) / "ray.log"
    process = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                                f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
                                f"--temp-dir={temp}"],
                               env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():  # the head says when it is up
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        HEADS[f"127.0.0.1:{port}"] = process.pid
        yield f"127.0.0.1:{port}"
    finally:
        HEADS.pop(f"127.0.0.1:{port}", None)
        stop_group(
            process, grace=5
        )  # a head asked to stop takes ~30 s to say goodbye to its workers; the test is done
        shutil.rmtree(temp, ignore_errors=True)
