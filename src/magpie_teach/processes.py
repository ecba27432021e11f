"""Nothing of a run outlives it: a watcher that stops a process's descendants once that process is gone.

distilabel runs each step in worker processes. When the main process of ``generate`` is killed with
SIGKILL (a user's ``kill -9``, a scheduler, the OOM killer) it cannot clean up, and the workers, each
holding a model, would run on. :func:`reap_descendants` starts a small watcher process in its own
session (so a Ctrl-C to the terminal's process group does not reach it) that records the caller's
descendants every ``interval`` seconds and, once the caller is gone (seen as a zombie or vanished) or
the block ends (a byte or EOF on its pipe), stops every recorded process that is still the same
process (pid and start time): SIGTERM, then SIGKILL after ``grace`` seconds.
"""

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

_WATCHER = r"""
import os, select, signal, sys, time
import psutil

main, interval, grace = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
seen = {}  # pid -> create_time of every descendant of MAIN observed
try:
    parent = psutil.Process(main)
except psutil.NoSuchProcess:
    parent = None
while parent is not None:
    try:
        if parent.status() == psutil.STATUS_ZOMBIE:
            break  # killed; its children now belong to init
        for child in parent.children(recursive=True):
            if child.pid != os.getpid():
                seen.setdefault(child.pid, child.create_time())
    except psutil.NoSuchProcess:
        break
    if select.select([sys.stdin], [], [], interval)[0]:
        break  # a byte (the block ended) or EOF (MAIN closed the pipe on its way out)
alive = []
for pid, created in seen.items():
    try:
        process = psutil.Process(pid)
        if process.create_time() == created:
            process.terminate()
            alive.append(process)
    except psutil.Error:
        pass
_, left = psutil.wait_procs(alive, timeout=grace)
for process in left:
    try:
        process.kill()
    except psutil.Error:
        pass
"""


@contextlib.contextmanager
def reap_descendants(interval: float = 0.5, grace: float = 5.0) -> Iterator[None]:
    """Within the block, a watcher stops this process's descendants if this process dies (SIGKILL included);
    on a normal exit from the block, it stops those still running and ends."""
    watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(os.getpid()), str(interval), str(grace)],
        stdin=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            watcher.stdin.write(b"x")
            watcher.stdin.close()
        try:
            watcher.wait(timeout=grace + 10)
        except subprocess.TimeoutExpired:
            watcher.kill()
