"""Teacher-response data: loading, the long and wide (Generator-Zoo) formats, validation, atomic writes.

Long format: one row per instruction x teacher with ``instruction``, ``response``, ``teacher``, an
optional ``id`` (derived from the instruction text when absent) and any reward columns; with an
optional ``generation_index``, several responses of one teacher to one instruction (best-of-N).

Wide format (``Magpie-Align/Magpie-100K-Generator-Zoo``): one row per instruction with ``uuid``
(or ``id``) and ``instruction``, and one struct column per teacher holding ``content`` and reward
fields such as ``ArmoRM-Llama3-8B-v0.1``. :func:`to_long` turns it into the long format, the
reward fields becoming reward columns of the same names.

Validation never drops silently: a problem is an error naming the source, row and field, unless
``drop_invalid`` is set, in which case every dropped row is returned with its ``reason`` so that
callers can count and keep it.
"""

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach.errors import DataError

logger = logging.getLogger(__name__)

REQUIRED_LONG = ("instruction", "response", "teacher")
ID_COLUMNS = ("id", "uuid")
_MAX_NAMED = 5


@dataclass
class LoadedResponses:
    """Validated long-format rows and what was dropped (with a ``reason`` column) on the way."""

    rows: pd.DataFrame
    dropped: pd.DataFrame
    source: str
    revision: str | None = None
    fingerprint: str = ""
    counts: dict[str, int] = field(default_factory=dict)


def hub_commit(source: str, revision: str | None) -> str:
    """The commit id that REVISION (branch, tag, commit; default main) of Hub data set SOURCE points at."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().dataset_info(source, revision=revision).sha
    except RevisionNotFoundError:
        raise DataError(f"{source}: no revision {revision!r} (a branch, tag or commit id) on the Hub.") from None
    except RepositoryNotFoundError:
        raise DataError(f"{source}: no such data set on the Hub (or it is private and no token was given).") from None
    except (HfHubHTTPError, OSError) as err:
        raise DataError(f"{source}@{revision or 'main'}: the Hub could not be reached: {err}") from None


def load_table(source: str, revision: str | None = None, split: str = "train") -> pd.DataFrame:
    """Reads a local jsonl/json/parquet/csv file, a folder saved with ``Dataset.save_to_disk``, or a Hub
    data set id (``org/name``) at ``revision``."""
    path = Path(source)
    if path.is_file():
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        readers: dict[str, Callable[[Path], pd.DataFrame]] = {
            ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
            ".jsonl.gz": lambda p: pd.read_json(p, lines=True, dtype=False),
            ".json": _read_json_records,
            ".parquet": pd.read_parquet,
            ".csv": lambda p: pd.read_csv(p, keep_default_na=False, na_values=[""]),
        }
        if suffix not in readers:
            raise DataError(f"{source}: unsupported file type {suffix!r}; use one of {', '.join(readers)}.")
        if path.stat().st_size == 0:
            raise DataError(f"{source}: the file is empty (no rows).")
        try:
            frame = readers[suffix](path)
        except (ValueError, pd.errors.ParserError) as err:
            if suffix != ".parquet":
                _check_utf8(path, source)
            raise DataError(f"{source}: could not be read as {suffix}: {str(err).splitlines()[0]}") from err
        if frame.empty and not len(frame.columns):
            raise DataError(f"{source}: the file holds no rows.")
        return frame
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DataError(f"{source}: a folder, but not one saved with Dataset.save_to_disk ({err}).") from err
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{source}: no split {split!r}; it has {', '.join(loaded)}.")
            loaded = loaded[split]
        return loaded.to_pandas()
    if source.count("/") == 1 and not source.startswith((".", "/")):
        import datasets

        commit = hub_commit(source, revision)
        try:
            frame = datasets.load_dataset(source, revision=commit, split=split).to_pandas()
        except Exception as err:  # the datasets library raises many types; name the source either way
            raise DataError(f"{source}@{revision or 'main'}: could not be loaded from the Hub: {err}") from err
        frame.attrs["revision"] = commit  # the commit read, so that a rerun reads the same bytes
        return frame
    raise DataError(f"{source}: no such file or folder, and not a Hub data set id of the form org/name.")


def _read_json_records(path: Path) -> pd.DataFrame:
    """A .json file holding a list of records (objects); anything else is a DataError saying what it holds."""
    import json

    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}, column {err.colno}: invalid JSON ({err.msg}).") from None
    if isinstance(data, dict):
        raise DataError(
            f"{path}: the top level is an object (keys: {list(data)[:_MAX_NAMED]}); expected a list of records "
            '([{"instruction": ..., "response": ..., "teacher": ...}, ...]) or a .jsonl file with one record a line.'
        )
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        bad = (
            next((i for i, row in enumerate(data) if not isinstance(row, dict)), 0) if isinstance(data, list) else None
        )
        where = (
            f"item {bad} is a {type(data[bad]).__name__}" if bad is not None else f"it holds a {type(data).__name__}"
        )
        raise DataError(f"{path}: expected a list of records (objects), but {where}.")
    if not data:
        raise DataError(f"{path}: the file holds no rows (an empty list).")
    return pd.DataFrame.from_records(data)


def _check_utf8(path: Path, source: str) -> None:
    """DataError naming the first line that is not UTF-8 text, if there is one."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{source}: line {number} is not UTF-8 text (column {err.start + 1}: byte "
                    f"{line[err.start : err.start + 1]!r}); save the file as UTF-8."
                ) from None


def is_wide(frame: pd.DataFrame) -> bool:
    """Whether ``frame`` is in the wide Generator-Zoo format (struct columns with a ``content`` field)."""
    return "teacher" not in frame.columns and bool(_struct_columns(frame))


def _struct_columns(frame: pd.DataFrame) -> list[str]:
    names = []
    for column in frame.columns:
        sample = frame[column].dropna()
        if len(sample) and isinstance(sample.iloc[0], dict) and "content" in sample.iloc[0]:
            names.append(column)
    return names


def to_long(frame: pd.DataFrame, source: str = "data") -> pd.DataFrame:
    """Turns the wide Generator-Zoo format into the long format (one row per instruction x teacher)."""
    teachers = _struct_columns(frame)
    if "instruction" not in frame.columns:
        raise DataError(f"{source}: wide format without an 'instruction' column (columns: {list(frame.columns)}).")
    id_column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    parts = []
    for teacher in teachers:
        structs = frame[teacher]
        fields = sorted({k for value in structs.dropna() for k in value})
        part = pd.DataFrame(
            {
                "id": frame[id_column] if id_column else None,
                "instruction": frame["instruction"],
                "teacher": teacher,
                "response": [v.get("content") if isinstance(v, dict) else None for v in structs],
                "_row": np.arange(len(frame)),
            }
        )
        for name in fields:
            if name != "content":
                part[name] = [v.get(name) if isinstance(v, dict) else None for v in structs]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _is_null(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists, arrays: not a scalar null
        return False


def instruction_id(instruction: str) -> str:
    """Stable id of an instruction text, used when the data has no id column."""
    return hashlib.sha1(instruction.encode("utf-8")).hexdigest()[:16]


def _describe(frame: pd.DataFrame, index: Any) -> str:
    row = frame.loc[index]
    return f"row {int(row['_row'])} (id={row['id']!r}, teacher={row['teacher']!r})"


def _named(frame: pd.DataFrame, mask: pd.Series) -> str:
    hits = list(frame.index[mask])
    text = "; ".join(_describe(frame, i) for i in hits[:_MAX_NAMED])
    return text + (f"; and {len(hits) - _MAX_NAMED} more" if len(hits) > _MAX_NAMED else "")


def response_key(frame: pd.DataFrame) -> list[str]:
    """The columns naming one response: (id, teacher), plus ``generation_index`` when the data holds
    several generations per teacher and instruction (best-of-N output of `generate`)."""
    return ["id", "teacher", "generation_index"] if "generation_index" in frame.columns else ["id", "teacher"]


GENERATION_FLAGS = ("hit_max_new_tokens",)
"""Per-response flags written by `generate` that scoring carries into ``scores.parquet`` (`select` filters on them)."""


def carried_columns(frame: pd.DataFrame) -> list[str]:
    """The :data:`GENERATION_FLAGS` ``frame`` has."""
    return [column for column in GENERATION_FLAGS if column in frame.columns]


def text_columns(frame: pd.DataFrame) -> list[str]:
    """The response key, then the texts a response is scored on: instruction, earlier turns (``context``,
    multi-turn rows only) and response."""
    return [*response_key(frame), "instruction", *(["context"] if "context" in frame.columns else []), "response"]


def validate_long(
    frame: pd.DataFrame,
    source: str = "data",
    *,
    reward_column: str | None = None,
    drop_invalid: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Checks long-format rows; returns (kept rows, dropped rows with ``reason``).

    Errors (always): missing columns, a duplicate (id, teacher[, generation_index]) row, one id with two instruction
    texts, a missing reward column. Errors unless ``drop_invalid``: empty or null responses or
    instructions, null rewards, teachers answering different instruction sets; with
    ``drop_invalid`` such rows are dropped, and so is every other teacher's response to the same
    instruction, so that all teachers are compared on the same instructions.
    """
    frame = frame.copy()
    if "_row" not in frame.columns:
        frame["_row"] = np.arange(len(frame))
    found = [c for c in frame.columns if c != "_row"]
    if frame.empty:
        raise DataError(f"{source}: no rows (columns: {found}).")
    missing = [c for c in REQUIRED_LONG if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; found {found}.")
    if reward_column is not None and reward_column not in frame.columns:
        numeric = [c for c in found if c not in (*REQUIRED_LONG, "id")]
        raise DataError(f"{source}: no reward column {reward_column!r}; other columns: {numeric}.")
    for column in ("instruction", "response"):
        not_text = frame[column].map(lambda v: v is not None and not isinstance(v, str) and not _is_null(v))
        if not_text.any():
            first = frame.loc[not_text, column].iloc[0]
            first = first.item() if isinstance(first, np.generic) else first
            raise DataError(
                f"{source}: {column!r} must be text, but {int(not_text.sum())} row(s) hold other values (first: "
                f"{first!r}, a {type(first).__name__}): {_named(frame.assign(id=frame.get('id')), not_text)}."
            )
    if "id" not in frame.columns or frame["id"].isna().all():
        frame["id"] = [instruction_id(x) if isinstance(x, str) else None for x in frame["instruction"]]
    frame["id"] = frame["id"].astype(str)
    frame["teacher"] = frame["teacher"].astype(str)

    key = response_key(frame)
    if "generation_index" in key:  # best-of-N output of `generate`: several responses per (id, teacher)
        index = pd.to_numeric(frame["generation_index"], errors="coerce")
        bad = index.isna() | (index < 0) | (index % 1 != 0)
        if bad.any():
            raise DataError(f"{source}: 'generation_index' must be a whole number >= 0: {_named(frame, bad)}.")
        frame["generation_index"] = index.astype(int)
    duplicated = frame.duplicated(key, keep=False)
    if duplicated.any():
        raise DataError(f"{source}: duplicate ({', '.join(key)}) rows: {_named(frame, duplicated)}.")
    texts = frame.dropna(subset=["instruction"]).groupby("id")["instruction"].nunique()
    if (texts > 1).any():
        bad = frame["id"].isin(texts.index[texts > 1])
        raise DataError(f"{source}: one id with different instruction texts: {_named(frame, bad)}.")

    reasons = pd.Series(None, index=frame.index, dtype=object)
    checks = [
        (
            "empty_instruction",
            "instruction",
            ~frame["instruction"].map(lambda v: isinstance(v, str) and bool(v.strip())),
        ),
        ("empty_response", "response", ~frame["response"].map(lambda v: isinstance(v, str) and bool(v.strip()))),
    ]
    if reward_column is not None:
        values = pd.to_numeric(frame[reward_column], errors="coerce")
        checks.append(("missing_reward", reward_column, values.isna() | ~np.isfinite(values.fillna(0))))
    if "status" in frame.columns:  # `generate` output: a failed row is never scored as if it were a response
        failed = frame["status"].fillna("ok").astype(str) != "ok"
        if failed.any() and not drop_invalid:
            raise DataError(
                f"{source}: failed generations (status other than 'ok') in {_named(frame, failed)} "
                "(pass --drop-invalid to drop these instructions, counted in the output)."
            )
        reasons[failed] = "failed_generation"
    for reason, column, mask in checks:
        if mask.any():
            if not drop_invalid:
                raise DataError(
                    f"{source}: null or empty {column!r} in {_named(frame, mask)} "
                    "(pass --drop-invalid to drop these instructions, counted in the output)."
                )
            reasons[mask & reasons.isna()] = reason

    teachers = sorted(frame["teacher"].unique())
    per_id = frame.groupby("id")["teacher"].nunique()
    incomplete_ids = per_id.index[per_id < len(teachers)]
    if len(incomplete_ids) and not drop_invalid:
        answered = frame.groupby("teacher")["id"].apply(set)
        all_ids = set(frame["id"])
        details = []
        for teacher in teachers:
            lacking = sorted(all_ids - answered[teacher])
            if lacking:
                details.append(f"teacher {teacher!r} lacks {len(lacking)} (e.g. id={lacking[0]!r})")
        raise DataError(
            f"{source}: teachers answered different instruction sets: {'; '.join(details)} "
            "(pass --drop-invalid to keep only instructions every teacher answered)."
        )
    bad_ids = set(frame.loc[reasons.notna(), "id"]) | set(incomplete_ids)
    sibling = frame["id"].isin(bad_ids) & reasons.isna()
    reasons[sibling] = np.where(
        frame.loc[sibling, "id"].isin(incomplete_ids), "incomplete_instruction", "sibling_dropped"
    )
    dropped = frame[reasons.notna()].assign(reason=reasons[reasons.notna()])
    kept = frame[reasons.isna()]
    if kept.empty:
        raise DataError(f"{source}: every row was dropped ({dropped['reason'].value_counts().to_dict()}).")
    if reward_column is not None:
        kept = kept.assign(**{reward_column: pd.to_numeric(kept[reward_column])})
    return kept.reset_index(drop=True), dropped.reset_index(drop=True)


def load_responses(
    source: str,
    *,
    revision: str | None = None,
    split: str = "train",
    reward_column: str | None = None,
    drop_invalid: bool = False,
    teachers: list[str] | None = None,
) -> LoadedResponses:
    """Loads teacher responses in either format, validated, as long-format rows."""
    frame = load_table(source, revision=revision, split=split)
    revision = frame.attrs.get("revision", revision)  # a Hub source: the commit actually read
    if is_wide(frame):
        frame = to_long(frame, source)
    if teachers:
        unknown = sorted(set(teachers) - set(frame.get("teacher", pd.Series(dtype=str)).astype(str)))
        if unknown:
            raise DataError(f"{source}: unknown teacher(s) {unknown}.")
        frame = frame[frame["teacher"].isin(teachers)]
    return validated_responses(frame, source, revision, reward_column=reward_column, drop_invalid=drop_invalid)


def validated_responses(
    frame: pd.DataFrame,
    source: str,
    revision: str | None = None,
    *,
    reward_column: str | None = None,
    drop_invalid: bool = False,
) -> LoadedResponses:
    """Long-format ``frame`` validated (:func:`validate_long`), with its fingerprint and row counts."""
    rows, dropped = validate_long(frame, source, reward_column=reward_column, drop_invalid=drop_invalid)
    digest = hashlib.sha1()
    for column in text_columns(rows):
        digest.update(pd.util.hash_pandas_object(rows[column], index=False).values.tobytes())
    counts = {"rows_in": len(frame), "rows_kept": len(rows), **dropped["reason"].value_counts().to_dict()}
    return LoadedResponses(rows, dropped, source, revision, digest.hexdigest()[:16], counts)


def sample_instructions(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Keeps the same ``n`` randomly drawn instructions (by id, seeded) for every teacher."""
    ids = np.array(sorted(rows["id"].unique()))
    if n <= 0:
        raise DataError(f"--sample must be positive, got {n}.")
    if n >= len(ids):
        return rows
    chosen = set(np.random.default_rng(seed).choice(ids, size=n, replace=False))
    return rows[rows["id"].isin(chosen)].reset_index(drop=True)
