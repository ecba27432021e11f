"""The one way tests run a README command: it records the argv it ran, and the coverage test reads that record.

``tests/test_zz_readme_coverage.py`` (collected last) checks that every `magpie-teach` command of the README was run
through :func:`run_readme_command` in this session, or is marked GPU-scale in its README comment.
"""

import subprocess
import sys
from typing import Any

RAN: list[list[str]] = []


def run_readme_command(argv: list[str], *, background: bool = False, **kwargs: Any) -> Any:
    """Runs ``magpie-teach ARGV`` (a command the README spells exactly so) as ``subprocess.run`` would, or in the
    background (``subprocess.Popen``); records ARGV."""
    from tests.test_readme import commands

    assert list(argv) in commands(), f"not a README command as written: magpie-teach {' '.join(argv)}"
    RAN.append(list(argv))
    command = [sys.executable, "-m", "magpie_teach.cli", *argv]
    return subprocess.Popen(command, **kwargs) if background else subprocess.run(command, **kwargs)
