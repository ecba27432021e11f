"""Which rows people should look at: a stratified, seeded sample per teacher plus every flagged row.

Strata: each metric in ``strata`` (default reward and per-example CAR) is cut into ``bands``
quantile bands over the base model's rows (band 0 = lowest). A teacher's ``per_teacher`` rows are
drawn round-robin over the non-empty combinations of bands, so the top and the bottom of each
range are represented. Flagged rows are always added: truncated responses, failed responses
(``status`` other than ``ok``), and rows where reward and compatibility disagree (reward in the top
band while the compatibility loss is in the worst band, or reward in the bottom band while the
loss is in the best band).
"""

import numpy as np
import pandas as pd

from magpie_teach.errors import ConfigError, DataError
from magpie_teach.scoring.metrics import car
from magpie_teach.settings import DEFAULT_BETA

SAMPLING_COLUMNS = ("id", "teacher", "base_model", "reward", "compat_loss")
"""What the sampling reads: it needs no text, so `review push` samples the scores' numbers and reads the texts of the
sampled rows only."""


def _bands(values: pd.Series, bands: int) -> pd.Series:
    ranks = values.rank(method="first", pct=True)
    return np.minimum((ranks * bands).apply(np.ceil).astype(int) - 1, bands - 1).clip(lower=0)


def sample_for_review(
    scores: pd.DataFrame,
    per_teacher: int = 5,
    strata: list[str] | tuple[str, ...] = ("reward", "car"),
    bands: int = 3,
    seed: int = 0,
    beta: float = DEFAULT_BETA,
) -> pd.DataFrame:
    """Returns the rows to review with ``car``, ``<metric>_band`` columns, ``stratum`` and ``flags`` (comma-separated)."""
    missing = [c for c in SAMPLING_COLUMNS if c not in scores.columns]
    if missing:
        raise DataError(f"the scores lack column(s) {missing} (found {list(scores.columns)})")
    if bands < 2:
        raise ConfigError(f"--bands must be >= 2, got {bands}")
    frame = scores.copy().reset_index(drop=True)
    frame["car"] = car(frame["reward"], frame["compat_loss"], beta)
    for metric in strata:
        if metric not in frame.columns:
            raise ConfigError(f"--strata {metric!r}: no such column (choose from reward, car, compat_loss, ...)")
        frame[f"{metric}_band"] = _bands(frame[metric], bands)
    reward_band = _bands(frame["reward"], bands)
    loss_band = _bands(frame["compat_loss"], bands)  # band bands-1 = highest loss = worst compatibility
    flags = pd.Series([[] for _ in range(len(frame))], index=frame.index)
    if "truncated" in frame.columns:
        for i in frame.index[frame["truncated"].fillna(False).astype(bool)]:
            flags[i].append("truncated")
    if "status" in frame.columns:
        for i in frame.index[frame["status"].fillna("failed") != "ok"]:
            flags[i].append("failed")
    disagree = ((reward_band == bands - 1) & (loss_band == bands - 1)) | ((reward_band == 0) & (loss_band == 0))
    for i in frame.index[disagree]:
        flags[i].append("disagree")
    frame["flags"] = flags.map(",".join)
    frame["stratum"] = frame[[f"{m}_band" for m in strata]].astype(str).agg("|".join, axis=1) if strata else "all"

    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for _, group in frame.groupby("teacher", sort=True):
        cells = [list(rng.permutation(cell.index)) for _, cell in group.groupby("stratum", sort=True)]
        picked: list[int] = []
        while len(picked) < min(per_teacher, len(group)):
            for cell in cells:
                if cell and len(picked) < per_teacher:
                    picked.append(int(cell.pop()))
        chosen += picked
    flagged = frame.index[frame["flags"] != ""].tolist()
    keep = sorted(set(chosen) | set(flagged))
    return frame.loc[keep].reset_index(drop=True)
