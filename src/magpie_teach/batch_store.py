"""The batch store: the resume point of every resumable stage (a teacher's responses, a scoring stage's scores).

Each finished batch is one atomically written parquet file under ``ROOT/<stage>/batch-<uuid>.parquet``,
so a run killed at any moment (SIGKILL included) leaves only whole files; a rerun skips every row
whose key is already stored, and a read keeps one row per key. The key of a row is :data:`BATCH_KEY`.
distilabel's own cache is not used: it was seen to hang on a rerun after an interruption.
"""

import uuid
from pathlib import Path

import pandas as pd

from magpie_teach.artefacts import slug, write_atomic

BATCH_KEY = ["teacher", "id", "generation_index"]
"""One stored row: a teacher's generation for an instruction (and, in a scoring stage, its scores)."""
EMPTY_COLUMNS = [
    *BATCH_KEY,
    "instruction",
    "response",
    "n_tokens",
    "hit_max_new_tokens",
    "status",
    "reason",
    "settings",
]
"""The columns of an empty read of responses (a store with no batch yet)."""


class BatchStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, stage: str) -> Path:
        return self.root / slug(stage)

    def write(self, stage: str, rows: pd.DataFrame) -> Path:
        path = self._dir(stage) / f"batch-{uuid.uuid4().hex}.parquet"
        write_atomic(path, lambda tmp: rows.to_parquet(tmp, index=False))
        return path

    def read(self, stage: str | None = None) -> pd.DataFrame:
        """Every row stored for STAGE (all stages when None), one per :data:`BATCH_KEY`."""
        if stage:
            folders = [self._dir(stage)]
        else:
            folders = [p for p in self.root.iterdir() if p.is_dir()] if self.root.exists() else []
        files = sorted(f for folder in folders for f in folder.glob("batch-*.parquet"))
        if not files:
            return pd.DataFrame(columns=EMPTY_COLUMNS)
        frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        return frame.drop_duplicates(BATCH_KEY, keep="first").reset_index(drop=True)

    def count(self, stage: str, seen: dict[Path, int]) -> int:
        """Rows stored for ``stage``, reading only the footers of files not in ``seen`` (a cache it fills)."""
        import pyarrow.parquet as pq

        for path in self._dir(stage).glob("batch-*.parquet"):
            if path not in seen:
                seen[path] = pq.read_metadata(path).num_rows
        return sum(seen.values())

    def done_ids(self, stage: str) -> set[str]:
        return set(self.read(stage)["id"].astype(str))
