"""The Larger Models' Paradox report: within a family, the larger teacher that is the worse teacher."""

import re
from collections.abc import Sequence

import pandas as pd

from magpie_teach.errors import DataError
from magpie_teach.scoring.metrics import DEFAULT_PERFORMANCE_COLUMNS, load_performance

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmbt]?)\s*$", re.IGNORECASE)
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_size(value: object) -> float | None:
    """Parameter count from ``'3.8B'``, ``'2b'``, ``'135M'`` or a number; ``None`` when unknown (``'-'``)."""
    if isinstance(value, (int, float)) and not pd.isna(value):
        return float(value)
    match = _SIZE_RE.match(str(value))
    if not match:
        return None
    return float(match.group(1)) * _SCALE[match.group(2).lower()]


def find_paradox_pairs(
    performance: pd.DataFrame, families: pd.DataFrame | None = None, source: str = "performance"
) -> pd.DataFrame:
    """Lists, per base model, every within-family pair where the larger teacher has the lower AP.

    Args:
        performance: rows of ``teacher``, ``base_model``, ``ap`` (see
            :func:`magpie_teach.scoring.metrics.load_performance`), and ``family`` and ``size``
            columns unless ``families`` gives them (``generator_family``/``generator_size`` accepted).
        families: optional table of ``teacher``, ``family``, ``size`` overriding the above.

    Returns:
        Columns ``base_model``, ``family``, ``smaller``, ``larger``, their sizes, ``ap_smaller``,
        ``ap_larger`` and ``gap`` (= ap_smaller - ap_larger > 0).
    """
    frame = performance.rename(columns={"generator_family": "family", "generator_size": "size"})
    if families is not None:
        fam = families.rename(columns={"generator": "teacher", "model_id": "teacher", "model_family": "family"})
        frame = frame.drop(columns=[c for c in ("family", "size") if c in frame.columns]).merge(
            fam[["teacher", "family", "size"]], on="teacher", how="left"
        )
    missing = [c for c in ("teacher", "base_model", "ap", "family", "size") if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: the paradox report needs column(s) {missing}; give a families table.")
    frame = frame.assign(params=frame["size"].map(parse_size)).dropna(subset=["family", "params"])
    rows = []
    for (base, family), group in frame.groupby(["base_model", "family"], sort=False):
        members = group.sort_values("params").to_dict("records")
        for i, small in enumerate(members):
            for large in members[i + 1 :]:
                if large["params"] > small["params"] and small["ap"] > large["ap"]:
                    rows.append(
                        {
                            "base_model": base,
                            "family": family,
                            "smaller": small["teacher"],
                            "smaller_size": small["size"],
                            "larger": large["teacher"],
                            "larger_size": large["size"],
                            "ap_smaller": small["ap"],
                            "ap_larger": large["ap"],
                            "gap": small["ap"] - large["ap"],
                        }
                    )
    columns = [
        "base_model",
        "family",
        "smaller",
        "smaller_size",
        "larger",
        "larger_size",
        "ap_smaller",
        "ap_larger",
        "gap",
    ]
    return pd.DataFrame(rows, columns=columns)


def paradox_report(
    performance_path: str,
    families_path: str | None = None,
    columns: Sequence[str] = DEFAULT_PERFORMANCE_COLUMNS,
) -> pd.DataFrame:
    """:func:`find_paradox_pairs` on files: a performance CSV and an optional families CSV."""
    performance = load_performance(performance_path, columns)
    families = None
    if families_path is not None:
        try:
            families = pd.read_csv(families_path, comment="#")
        except (OSError, ValueError) as err:
            raise DataError(f"{families_path}: could not be read as CSV: {err}") from err
    return find_paradox_pairs(performance, families, source=performance_path)
