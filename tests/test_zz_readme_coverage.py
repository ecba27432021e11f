"""Every `magpie-teach` command of the README was run, as written, by a test of this test run.

The record is what :func:`tests.readme_commands.run_readme_command` ran (every xdist worker's), not the tests'
text. The README's GPU-scale commands (training the paper's recipes under accelerate) are the only ones left out,
and only `train`, `validate` and `evaluate` may be marked so; a GPU-cluster `rank` is run on this machine's CPU Ray head
(``tests.readme_commands.on_cpu``: no GPU per actor, one actor per pool) and counts as run. Needs the slow tests that run the README (the walkthrough, the
Ray test, the generate commands), so it is slow itself: `make test` runs it after all the others, in a session of
its own; a plain `pytest` collects it last (by name).
"""

import pytest

from tests.readme_commands import recorded
from tests.test_readme import commented_commands


def gpu_only(comment: str) -> bool:
    return "GPU" in comment and "CPU" not in comment


@pytest.mark.slow
def test_every_readme_command_was_run_by_this_test_run():
    missing = []
    ran = recorded()
    for argv, comment in commented_commands():
        if gpu_only(comment) and argv[0] != "rank":  # the README's Zoo-on-Ray command runs on a CPU Ray head
            # only training and judging at scale (fine-tuned 70B students, a 70B judge) are left to GPU machines;
            # their CPU try-outs above them in the README are run
            assert argv[0] in ("train", "validate", "evaluate"), argv
        elif argv not in ran:
            missing.append(" ".join(argv))
    assert not missing, f"README commands no test ran (run the whole suite): {missing}"
