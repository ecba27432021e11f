"""Helpers for the real servers the tests start: free ports, and stopping a process group by PID."""

import os
import signal
import socket
import subprocess


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
