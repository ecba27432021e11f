"""The resume point of a generation run: every finished batch of responses is one atomically written parquet file.

A run killed at any moment (SIGKILL included) leaves only whole files; the rerun skips every
(teacher, instruction) already stored and the final table keeps one row per (teacher, id,
generation_index). distilabel's own cache is not used: it was seen to hang on a rerun after an
interruption.
"""

import uuid
from pathlib import Path

import pandas as pd

from magpie_teach.artefacts import write_atomic

EMPTY_COLUMNS = ["id", "instruction", "teacher", "response", "generation_index", "n_tokens", "truncated", "status",
                 "reason", "settings"]  # fmt: skip
"""The columns of an empty read (a store with no batch yet)."""


class ResponseStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, teacher: str) -> Path:
        return self.root / "".join(c if c.isalnum() or c in "-._" else "_" for c in teacher)

    def write(self, teacher: str, rows: pd.DataFrame) -> Path:
        path = self._dir(teacher) / f"batch-{uuid.uuid4().hex}.parquet"
        write_atomic(path, lambda tmp: rows.to_parquet(tmp, index=False))
        return path

    def read(self, teacher: str | None = None) -> pd.DataFrame:
        folders = (
            [self._dir(teacher)]
            if teacher
            else [p for p in self.root.iterdir() if p.is_dir()]
            if self.root.exists()
            else []
        )
        files = sorted(f for folder in folders for f in folder.glob("batch-*.parquet"))
        if not files:
            return pd.DataFrame(columns=EMPTY_COLUMNS)
        frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        return frame.drop_duplicates(["teacher", "id", "generation_index"], keep="first").reset_index(drop=True)

    def count(self, teacher: str, seen: dict[Path, int]) -> int:
        """Rows stored for ``teacher``, reading only the footers of files not in ``seen`` (a cache it fills)."""
        import pyarrow.parquet as pq

        for path in self._dir(teacher).glob("batch-*.parquet"):
            if path not in seen:
                seen[path] = pq.read_metadata(path).num_rows
        return sum(seen.values())

    def done_ids(self, teacher: str) -> set[str]:
        return set(self.read(teacher)["id"].astype(str))
