"""The one way tests run a README command: it records the argv it ran, and the coverage test reads that record.

``tests/test_zz_readme_coverage.py`` checks that every `magpie-teach` command of the README was run through
:func:`run_readme_command` by this test run, or is marked GPU-scale in its README comment. The record is a file
(:data:`RECORD`, one JSON line per command), so that the commands run by every pytest-xdist worker count; a
session starts it afresh (``tests/conftest.py``), except the one `make test` runs the coverage test in after the
others (``MAGPIE_TEACH_KEEP_README_RECORD=1``).
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

RECORD = Path(__file__).resolve().parents[1] / ".pytest-readme-record.jsonl"
RAN: list[list[str]] = []


def recorded() -> list[list[str]]:
    """Every argv run through :func:`run_readme_command` by this test run (all workers)."""
    if not RECORD.exists():
        return list(RAN)
    return [json.loads(line) for line in RECORD.read_text().splitlines() if line.strip()]


ON_CPU = {"--gpus-per-worker": "0", "--num-workers": "1"}
"""What a README command for a GPU cluster (``rank --ray-address ... --gpus-per-worker G``) changes when a test
runs it on this machine's 2-core CPU Ray head: no GPU per actor, one actor per pool. Nothing else."""


def on_cpu(argv: list[str]) -> list[str]:
    """ARGV with the values of the :data:`ON_CPU` flags replaced."""
    return [ON_CPU[argv[i - 1]] if i and argv[i - 1] in ON_CPU else arg for i, arg in enumerate(argv)]


def run_readme_command(argv: list[str], *, background: bool = False, cpu: bool = False, **kwargs: Any) -> Any:
    """Runs ``magpie-teach ARGV`` (a command the README spells exactly so) as ``subprocess.run`` would, or in the
    background (``subprocess.Popen``); records ARGV. With ``cpu``, a GPU-cluster command runs as :func:`on_cpu`
    makes it."""
    from tests.test_readme import commands

    assert list(argv) in commands(), f"not a README command as written: magpie-teach {' '.join(argv)}"
    RAN.append(list(argv))
    with open(RECORD, "a") as record:  # one short line per write: appends from two workers do not interleave
        record.write(json.dumps(list(argv)) + "\n")
    command = [sys.executable, "-m", "magpie_teach.cli", *(on_cpu(argv) if cpu else argv)]
    return subprocess.Popen(command, **kwargs) if background else subprocess.run(command, **kwargs)
