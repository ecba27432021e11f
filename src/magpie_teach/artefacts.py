"""The output folders that flow between verbs: their file names, and how a run writes one.

A folder describes exactly one run. A run holds the folder's lock while it works (a second run into
the same folder stops at once with an error naming the folder and the process holding it), writes
each file atomically, and at the end removes the files of its kind that an earlier run left and this
run did not write (a ``dropped.csv`` from an earlier ``--drop-invalid`` run, say), so a push or a
report never mixes two runs.
"""

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from magpie_teach.errors import DataError

# ---- file names, per kind of folder --------------------------------------------------------------
RESPONSES = "responses.parquet"
SCORES = "scores.parquet"
RANKING = "ranking.csv"
CORRELATIONS = "correlations.csv"
RANK_DROPPED = "dropped.csv"
RANK_SUMMARY = "summary.json"
RANK_CONFIG = "rank_config.yaml"
SFT_DATA = "data/train-00000-of-00001.parquet"
SFT_README = "README.md"
SELECT_SUMMARY = "selection_summary.json"
SELECT_DROPPED = "dropped.parquet"
SELECT_CONFIG = "select_config.yaml"

# every file a run of each verb may write into its output folder (what another run of it may have left)
OUTPUTS: dict[str, tuple[str, ...]] = {
    "rank": (SCORES, RANKING, CORRELATIONS, RANK_DROPPED, RANK_SUMMARY, RANK_CONFIG),
    "select": (SFT_DATA, SFT_README, SELECT_SUMMARY, SELECT_DROPPED, SELECT_CONFIG),
}
LOCK = ".magpie-teach.lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Calls ``write(tmp_path)`` then renames onto ``path``: readers never see a half-written file. The file
    gets the mode the umask gives a new file (the temporary file starts private)."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def locked(folder: str | os.PathLike) -> Iterator[Path]:
    """Holds FOLDER's lock for the block (created if needed); DataError at once if another process holds it.

    The lock is an ``flock`` on ``FOLDER/.magpie-teach.lock``: the kernel releases it when its holder
    exits by any means, so a killed run never leaves the folder locked.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK, "a+")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise DataError(
                f"{folder} is in use by another run ({holder}); wait for it to finish, or give this run another "
                "output folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield folder
    finally:
        handle.close()


class RunOutputs:
    """The files one run writes into its folder; :meth:`finish` removes what an earlier run left."""

    def __init__(self, folder: str | os.PathLike, kind: str):
        self.folder, self.kind = Path(folder), kind
        self.written: set[str] = set()

    def write(self, name: str, write: Callable[[str], Any]) -> Path:
        path = self.folder / name
        write_atomic(path, write)
        self.written.add(name)
        return path

    def finish(self) -> list[str]:
        """Removes the kind's files this run did not write; returns their names."""
        stale = [name for name in OUTPUTS[self.kind] if name not in self.written and (self.folder / name).exists()]
        for name in stale:
            (self.folder / name).unlink()
        return stale


def recorded_rank_config(scores: str, commit: str | None = None) -> tuple[dict | None, str]:
    """The resolved config `rank` recorded beside SCORES (a rank folder, its scores.parquet, or a Hub data set
    pushed with ``--kind scores``, read at COMMIT): (the config, or None when there is none; where it was looked
    for)."""
    import yaml

    path = Path(scores)
    if path.exists():
        recorded = (path if path.is_dir() else path.parent) / RANK_CONFIG
        return (yaml.safe_load(recorded.read_text()) if recorded.exists() else None), str(recorded)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    where = f"{scores}@{commit or 'main'}:magpie_teach/{RANK_CONFIG}"
    try:
        local = hf_hub_download(scores, f"magpie_teach/{RANK_CONFIG}", repo_type="dataset", revision=commit)
    except EntryNotFoundError:
        return None, where
    return yaml.safe_load(Path(local).read_text()), where
