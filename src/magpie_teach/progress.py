"""Progress of long work, as a user of a terminal or of a cluster job's log expects it.

On a terminal: a tqdm bar (count, rate, ETA). Not on a terminal (a log file, a pipe, the demo's stage
runner): a plain line ``name: done/total unit (pct), rate unit/s, ETA h:mm:ss`` when the stage starts,
every :func:`log_every` seconds while it runs (``MAGPIE_TEACH_PROGRESS_EVERY``, default 60), and when
it ends, on stderr. ``show=True``/``False`` forces the bar on or everything off.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

PROGRESS_EVERY_ENV = "MAGPIE_TEACH_PROGRESS_EVERY"
DEFAULT_EVERY = 60.0


def log_every() -> float:
    """Seconds between progress lines in a log (``MAGPIE_TEACH_PROGRESS_EVERY``, default 60)."""
    raw = os.environ.get(PROGRESS_EVERY_ENV, "")
    try:
        return max(float(raw), 0.0) if raw else DEFAULT_EVERY
    except ValueError:
        return DEFAULT_EVERY


def progress_line(name: str, done: int, total: int, elapsed: float, unit: str = "rows") -> str:
    """``name: done/total unit (pct), rate unit/s, ETA h:mm:ss`` for logs that are not a terminal."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = datetime.timedelta(seconds=round((total - done) / rate)) if rate > 0 else "unknown"
    return f"{name}: {done}/{total} {unit} ({100 * done / max(total, 1):.0f}%), {rate:.2f} {unit}/s, ETA {eta}"


def logs_lines(show: bool | None) -> bool:
    """Whether progress goes out as periodic lines: when not forced and stderr is not a terminal."""
    return show is None and not sys.stderr.isatty()


class Progress:
    """A progress bar on a terminal, periodic :func:`progress_line` lines in a log; ``update`` as with tqdm."""

    def __init__(self, total: int, desc: str, unit: str = "ex", show: bool | None = None, position: int | None = None):
        from tqdm.auto import tqdm

        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.bar = tqdm(
            total=total, desc=desc, unit=unit, disable=None if show is None else not show, position=position
        )  # several bars at once (stages that advance together) on their own lines
        self.lines = logs_lines(show)
        self.every = log_every()
        self.started = self.last = time.monotonic()
        if self.lines:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self.last = now
        print(progress_line(self.desc, self.done, self.total, now - self.started, self.unit), file=sys.stderr, flush=True)  # fmt: skip

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        if self.lines and self.done < self.total and time.monotonic() - self.last >= self.every:
            self._line()

    def set_postfix(self, **values: str) -> None:
        self.bar.set_postfix(**values)

    def close(self) -> None:
        self.bar.close()
        if self.lines:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
