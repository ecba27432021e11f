"""benchmarks/gpu_check.py, the one script a GPU machine runs (`make test-gpu`; CI has no GPU), run here with the CPU
in the GPU's place: its own code is checked on every CI run, so the few minutes of a lent GPU are not spent on a
script that no longer runs."""

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_with_every_check_reported_and_none_failed(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-dry-run",
                             "--skip-throughput"], capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = [line.removeprefix("RESULT ").split(":")[0].split()[0] for line in lines]
    assert sorted(names) == sorted(["1", "2", "3", "5", "6", "7", "8", "9", "9b", "10"]), lines
    assert not [line for line in lines if ": FAIL" in line]
    ran = [line for line in lines if ": PASS" in line]  # what the CPU can stand in for: the script's own code ran
    assert {line.split()[1] for line in ran} >= {"2", "3", "5", "6", "9b"}, lines
    assert result.stdout.rstrip().endswith("10 checks: 0 failed")
