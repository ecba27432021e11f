"""distilabel plumbing shared by the project's pipelines (``generate``, its scoring stage, ``probe``).

* :func:`scratch_cache` and :func:`without_distilabel_cache`: distilabel's own cache is per-run scratch; the
  :class:`~magpie_teach.batch_store.BatchStore` is the resume point;
* :func:`import_before_fork`: the step processes of a local run inherit torch and transformers;
* :func:`steps_start_fresh`: they start as new processes instead when this one has initialised CUDA;
* :class:`StoreProgress`: progress bars (on a terminal) or periodic lines with rate and ETA (in a log), fed by
  polling the batch store while distilabel runs the steps in their own processes.
"""

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from magpie_teach.batch_store import BatchStore
from magpie_teach.progress import log_every, logs_lines, progress_line

logger = logging.getLogger(__name__)


def scratch_cache(output_dir: str | Path, name: str) -> str:
    """A fresh distilabel cache folder for one run, under OUTPUT_DIR/.distilabel-cache/NAME.

    The response store is what makes runs resumable; distilabel's own cache is scratch. It is wiped
    before every run because distilabel re-reads its cached ``pipeline.yaml`` even with
    ``use_cache=False``, and a run killed while writing that file leaves it empty and unreadable.
    """
    import shutil

    path = Path(output_dir) / ".distilabel-cache" / name
    shutil.rmtree(path, ignore_errors=True)
    return str(path)


def without_distilabel_cache(pipeline: Any) -> Any:
    """Switches off distilabel's per-batch cache writes on ``pipeline`` and returns it.

    After every batch it routes, distilabel saves the whole pipeline (the rows a ``LoadDataFromDicts``
    step holds included) and its batch manager to its cache folder: work that grows with the data
    set, paid on every batch (it was the pipeline's main overhead against calling the backend
    directly). The response store is this project's resume point and distilabel's cache is wiped
    before each run (see :func:`scratch_cache`), so nothing reads what those writes would keep.
    """
    pipeline._cache = lambda: None
    return pipeline


def import_before_fork() -> None:
    """Imports torch and transformers' auto classes in this process before a local pipeline starts its steps.

    distilabel runs each step in a process of its own; where processes start by ``fork`` (Linux's default) they
    inherit what the parent imported, instead of each importing torch and transformers again when it loads its
    model (~9 s of CPU apiece, paid by every step at once on the same cores). Importing initialises no device and
    starts no thread pool, so the forked steps are as safe as before. Elsewhere (``spawn``) this does nothing.
    """
    import multiprocessing

    if multiprocessing.get_start_method(allow_none=False) != "fork":
        return
    try:
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401
    except ImportError:  # the step that needs them says so
        pass


def cuda_initialised() -> bool:
    """Whether this process has initialised CUDA (it has loaded a model on a GPU), asked without importing torch."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


@contextlib.contextmanager
def steps_start_fresh() -> Iterator[None]:
    """Inside, a local pipeline's steps start as new processes (``spawn``) if this process has initialised CUDA:
    a forked child cannot use CUDA once its parent has ("Cannot re-initialize CUDA in forked subprocess"). That
    is ``probe``'s case on a GPU: it scores each round in this process, then forks the next round's teachers.
    distilabel 1.5.3 (pinned: its last release) builds its queues in the default context and its pool in a context
    class it derives from the default one when it is imported: both are switched to spawn for the duration (each
    step then imports torch again, seconds a step, paid only here)."""
    import multiprocessing

    from distilabel.pipeline import local

    if not cuda_initialised():
        yield
        return

    class SpawnedSteps(type(multiprocessing.get_context("spawn"))):  # distilabel's non-daemon steps, spawned
        Process = local._NoDaemonProcess

    before = multiprocessing.get_start_method(allow_none=True), local._NoDaemonContext
    logger.info("CUDA is initialised in this process: the pipeline's steps start as new processes (spawn)")
    multiprocessing.set_start_method("spawn", force=True)
    local._NoDaemonContext = SpawnedSteps
    try:
        yield
    finally:
        multiprocessing.set_start_method(before[0], force=True)
        local._NoDaemonContext = before[1]


class StoreProgress:
    """One progress bar per store folder (a teacher, or a scoring stage): rows stored, rate, ETA, fed by
    polling the store while distilabel runs the pipeline in its own processes. Like every bar here it
    shows only on a terminal."""

    def __init__(self, store: BatchStore, totals: dict[str, int], interval: float = 1.0, show: bool | None = None):
        import threading

        self.store = store
        self.totals = totals
        self.seen: dict[str, dict] = {name: {} for name in totals}
        self.start = {name: self.store.count(name, self.seen[name]) for name in totals}
        self.done = {name: 0 for name in totals}
        self.interval = interval
        self.log_every = log_every()
        self.show = show
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import sys
        import time

        from tqdm.auto import tqdm

        bars = {
            name: tqdm(total=total, desc=name, unit="row", disable=None if self.show is None else not self.show)
            for name, total in self.totals.items()
        }
        # not on a terminal (a cluster job's log): a line per store folder every `log_every` seconds instead
        lines = logs_lines(self.show)
        started, last_line = time.monotonic(), time.monotonic()
        while True:
            done = self.stop.wait(self.interval)
            for name, bar in bars.items():
                self.done[name] = self.store.count(name, self.seen[name]) - self.start[name]
                bar.update(self.done[name] - bar.n)  # a disabled bar keeps n at 0: its count is in self.done
            if lines and (done or time.monotonic() - last_line >= self.log_every):
                last_line = time.monotonic()
                for name in bars:
                    print(progress_line(name, self.done[name], self.totals[name], last_line - started), file=sys.stderr,
                          flush=True)  # fmt: skip
            if done:
                break
        for bar in bars.values():
            bar.close()

    def __enter__(self) -> "StoreProgress":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
