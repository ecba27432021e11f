"""Teacher-response data: the long and wide (Generator-Zoo) formats, validation, streaming loading, sampling.

Long format: one row per instruction x teacher with ``instruction``, ``response``, ``teacher``, an
optional ``id`` (derived from the instruction text where absent) and any reward columns; with an
optional ``generation_index``, several responses of one teacher to one instruction (best-of-N).

Wide format (``Magpie-Align/Magpie-100K-Generator-Zoo``): one row per instruction with ``uuid``
(or ``id``) and ``instruction``, and one struct column per teacher holding ``content`` and reward
fields such as ``ArmoRM-Llama3-8B-v0.1``. :func:`to_long` turns it into the long format, the
reward fields becoming reward columns of the same names.

Loading streams (:mod:`magpie_teach.tables`): a first pass reads the source a batch at a time and keeps, per
response, only its keys (row, id, teacher, generation index), whether its texts are present, their hashes and
its reward; validation runs on those keys; ``sample`` draws instruction ids from them; a second pass reads the
texts of the rows kept (and of the rows dropped, for ``dropped.csv``) and nothing else. Memory follows the
number of responses kept, not the size of the texts read.

Validation never drops silently: a problem is an error naming the source, row and field, unless
``drop_invalid`` is set, in which case every dropped row is returned with its ``reason`` so that
callers can count and keep it.
"""

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach.errors import DataError

logger = logging.getLogger(__name__)

REQUIRED_LONG = ("instruction", "response", "teacher")
ID_COLUMNS = ("id", "uuid")
OPTIONAL_LONG = ("generation_index", "context", "status")
"""Long-format columns read when present, beside the required ones, the id, the reward column and the flags."""
_MAX_NAMED = 5
_OK, _EMPTY, _NOT_TEXT = 0, 1, 2


@dataclass
class LoadedResponses:
    """Validated long-format rows and what was dropped (with a ``reason`` column) on the way."""

    rows: pd.DataFrame
    dropped: pd.DataFrame
    source: str
    revision: str | None = None
    fingerprint: str = ""
    counts: dict[str, int] = field(default_factory=dict)


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


def to_long(frame: pd.DataFrame, source: str = "data", teachers: list[str] | None = None,
            fields: dict[str, list[str]] | None = None) -> pd.DataFrame:  # fmt: skip
    """Turns the wide Generator-Zoo format into the long format (one row per instruction x teacher), for the
    struct columns ``teachers`` (default: all); ``_row`` is the wide row, counted from ``frame.attrs["offset"]``.
    A teacher whose struct comes flattened (a column ``TEACHER.FIELD`` per field of ``fields[TEACHER]``) is read
    from those columns, else from a dict per row."""
    teachers = _struct_columns(frame) if teachers is None else teachers
    if "instruction" not in frame.columns:
        raise DataError(f"{source}: wide format without an 'instruction' column (columns: {list(frame.columns)}).")
    id_column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    offset = frame.attrs.get("offset", 0)
    parts = []
    for teacher in teachers:
        flat = (fields or {}).get(teacher)
        if flat is not None and f"{teacher}.content" in frame.columns:
            columns = {  # Series as they are (Arrow-backed text stays so: no Python string per row)
                "id": frame[id_column] if id_column else None,
                "instruction": frame["instruction"],
                "teacher": teacher,
                "response": frame[f"{teacher}.content"],
                "_row": np.arange(offset, offset + len(frame)),
            }
            columns.update({name: frame[f"{teacher}.{name}"] for name in flat if name != "content"})
            part = pd.DataFrame({k: v.reset_index(drop=True) if isinstance(v, pd.Series) else v
                                 for k, v in columns.items()})  # fmt: skip
            parts.append(part)
            continue
        structs = frame[teacher]
        names = sorted({k for value in structs.dropna() for k in value})
        part = pd.DataFrame(
            {
                "id": frame[id_column].to_numpy() if id_column else None,
                "instruction": frame["instruction"].to_numpy(),
                "teacher": teacher,
                "response": [v.get("content") if isinstance(v, dict) else None for v in structs],
                "_row": np.arange(offset, offset + len(frame)),
            }
        )
        for name in names:
            if name != "content":
                part[name] = [v.get(name) if isinstance(v, dict) else None for v in structs]
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=["id", "instruction", "teacher", "response", "_row"])
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
    hits = list(frame.index[np.asarray(mask, dtype=bool)])
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


# -- one batch of long-format rows, and its keys ------------------------------------------------------------------


def _long_batch(frame: pd.DataFrame, wide: list[str] | None, source: str, offset: int,
                fields: dict[str, list[str]] | None = None) -> pd.DataFrame:  # fmt: skip
    """A batch of the source as long-format rows: ``_row`` (the source row), ``id`` (derived from the instruction
    where absent) and ``teacher`` as text."""
    if wide is not None:
        frame.attrs["offset"] = offset
        frame = to_long(frame, source, wide, fields)
    else:
        frame = frame.reset_index(drop=True)
        if "_row" not in frame.columns:
            frame["_row"] = np.arange(offset, offset + len(frame))
        if "id" not in frame.columns and "uuid" in frame.columns and "teacher" in frame.columns:
            frame = frame.rename(columns={"uuid": "id"})
    if "teacher" in frame.columns:
        ids = frame["id"] if "id" in frame.columns else pd.Series(None, index=frame.index, dtype=object)
        missing = ids.isna().to_numpy()
        if missing.any():
            derived = [instruction_id(x) if isinstance(x, str) else None for x in frame.loc[missing, "instruction"]]
            ids = ids.astype(object)
            ids[missing] = derived
        frame["id"] = ids.astype(str)
        frame["teacher"] = frame["teacher"].astype(str)
    return frame


def _text_state(values: pd.Series, first_bad: dict, column: str) -> np.ndarray:
    """Per value: 0 non-empty text, 1 null or blank, 2 not text (the first such value is kept in ``first_bad``)."""
    state = np.zeros(len(values), dtype=np.int8)
    if isinstance(values.dtype, pd.StringDtype):  # pandas' text dtypes ("str", "string"): null or blank, at once
        blank = values.isna().to_numpy() | (values.str.strip().str.len() == 0).fillna(True).to_numpy()
        state[blank] = _EMPTY
        return state
    for i, value in enumerate(values):
        if isinstance(value, str):
            state[i] = _OK if value.strip() else _EMPTY
        elif value is None or _is_null(value):
            state[i] = _EMPTY
        else:
            state[i] = _NOT_TEXT
            first_bad.setdefault(column, value.item() if isinstance(value, np.generic) else value)
    return state


def _hash(values: pd.Series) -> np.ndarray:
    """A 64-bit hash per value (texts; anything else by its text form)."""
    if values.dtype == object:
        values = values.map(lambda v: v if isinstance(v, str) or v is None else str(v))
    return pd.util.hash_pandas_object(values, index=False).to_numpy()


def _keys(frame: pd.DataFrame, reward_column: str | None, first_bad: dict) -> pd.DataFrame:
    """What validation needs of a long-format batch, without its texts (ids and teachers as categories)."""
    keys = frame[["_row", "_pos", *response_key(frame)]].copy()
    keys["id"] = keys["id"].astype("category")
    keys["teacher"] = keys["teacher"].astype("category")
    keys["instruction_hash"] = _hash(frame["instruction"])
    keys["instruction_state"] = _text_state(frame["instruction"], first_bad, "instruction")
    keys["response_state"] = _text_state(frame["response"], first_bad, "response")
    texts = [keys["instruction_hash"].to_numpy(), *(_hash(frame[c]) for c in text_columns(frame)
                                                    if c not in ("id", "teacher", "generation_index", "instruction"))]  # fmt: skip
    keys["text_hash"] = pd.util.hash_pandas_object(pd.DataFrame(texts).T, index=False).to_numpy()
    if reward_column is not None and reward_column in frame.columns:
        keys["reward"] = pd.to_numeric(frame[reward_column], errors="coerce").to_numpy(dtype=float)
    if "status" in frame.columns:
        keys["failed"] = (frame["status"].fillna("ok").astype(str) != "ok").to_numpy()
    return keys


def _concat_keys(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The batches' keys as one frame; ids and teachers stay categories (their categories sorted), so that 1.9M
    responses' keys take tens of megabytes, not hundreds."""
    from pandas.api.types import union_categoricals

    if not parts:
        return pd.DataFrame()
    columns = {name: union_categoricals([p[name] for p in parts], sort_categories=True) for name in ("id", "teacher")}
    keys = pd.concat([p.drop(columns=list(columns)) for p in parts], ignore_index=True)
    for name, values in columns.items():
        keys[name] = values
    return keys


def _check_columns(columns: list[str], source: str, reward_column: str | None) -> None:
    found = [c for c in columns if c not in ("_row", "_pos")]
    missing = [c for c in REQUIRED_LONG if c not in columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; found {found}.")
    if reward_column is not None and reward_column not in columns:
        numeric = [c for c in found if c not in (*REQUIRED_LONG, "id")]
        raise DataError(f"{source}: no reward column {reward_column!r}; other columns: {numeric}.")


def _validate_keys(
    keys: pd.DataFrame, source: str, reward_column: str | None, drop_invalid: bool, first_bad: dict
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept keys, dropped keys with ``reason``): the checks of :func:`validate_long`, on keys alone."""
    for column in ("instruction", "response"):
        not_text = keys[f"{column}_state"].to_numpy() == _NOT_TEXT
        if not_text.any():
            first = first_bad.get(column)
            raise DataError(
                f"{source}: {column!r} must be text, but {int(not_text.sum())} row(s) hold other values (first: "
                f"{first!r}, a {type(first).__name__}): {_named(keys, not_text)}."
            )
    key = response_key(keys)
    if "generation_index" in key:  # best-of-N output of `generate`: several responses per (id, teacher)
        index = pd.to_numeric(keys["generation_index"], errors="coerce")
        bad = index.isna() | (index < 0) | (index % 1 != 0)
        if bad.any():
            raise DataError(f"{source}: 'generation_index' must be a whole number >= 0: {_named(keys, bad)}.")
        keys["generation_index"] = index.astype(int)
    duplicated = keys.duplicated(key, keep=False)
    if duplicated.any():
        raise DataError(f"{source}: duplicate ({', '.join(key)}) rows: {_named(keys, duplicated)}.")
    present = keys["instruction_state"] != _EMPTY
    texts = keys.loc[present].groupby("id", observed=True)["instruction_hash"].nunique()
    if (texts > 1).any():
        bad = keys["id"].isin(texts.index[texts > 1])
        raise DataError(f"{source}: one id with different instruction texts: {_named(keys, bad)}.")

    reasons = pd.Series(None, index=keys.index, dtype=object)
    checks = [
        ("empty_instruction", "instruction", keys["instruction_state"] == _EMPTY),
        ("empty_response", "response", keys["response_state"] == _EMPTY),
    ]
    if reward_column is not None:
        # `_check_columns` refused data without the column, and `_keys` read it as floats (NaN where not a number)
        checks.append(("missing_reward", reward_column, ~np.isfinite(keys["reward"].to_numpy())))
    if "failed" in keys.columns:  # `generate` output: a failed row is never scored as if it were a response
        failed = keys["failed"]
        if failed.any() and not drop_invalid:
            raise DataError(
                f"{source}: failed generations (status other than 'ok') in {_named(keys, failed)} "
                "(pass --drop-invalid to drop these instructions, counted in the output)."
            )
        reasons[failed] = "failed_generation"
    for reason, column, mask in checks:
        if mask.any():
            if not drop_invalid:
                raise DataError(
                    f"{source}: null or empty {column!r} in {_named(keys, mask)} "
                    "(pass --drop-invalid to drop these instructions, counted in the output)."
                )
            reasons[mask & reasons.isna()] = reason

    teachers = sorted(keys["teacher"].unique())
    per_id = keys.groupby("id", observed=True)["teacher"].nunique()
    incomplete_ids = per_id.index[per_id < len(teachers)]
    if len(incomplete_ids) and not drop_invalid:
        answered = keys.groupby("teacher", observed=True)["id"].apply(set)
        all_ids = set(keys["id"])
        details = []
        for teacher in teachers:
            lacking = sorted(all_ids - answered[teacher])
            if lacking:
                details.append(f"teacher {teacher!r} lacks {len(lacking)} (e.g. id={lacking[0]!r})")
        raise DataError(
            f"{source}: teachers answered different instruction sets: {'; '.join(details)} "
            "(pass --drop-invalid to keep only instructions every teacher answered)."
        )
    bad_ids = set(keys.loc[reasons.notna(), "id"]) | set(incomplete_ids)
    sibling = keys["id"].isin(bad_ids) & reasons.isna()
    reasons[sibling] = np.where(
        keys.loc[sibling, "id"].isin(incomplete_ids), "incomplete_instruction", "sibling_dropped"
    )
    dropped = keys[reasons.notna()].assign(reason=reasons[reasons.notna()])
    kept = keys[reasons.isna()]
    if kept.empty:
        raise DataError(f"{source}: every row was dropped ({dropped['reason'].value_counts().to_dict()}).")
    return kept, dropped


def _finish_rows(rows: pd.DataFrame, reward_column: str | None) -> pd.DataFrame:
    """Kept rows with their final types: whole-number generation indices, numeric rewards."""
    if "generation_index" in rows.columns:
        rows["generation_index"] = pd.to_numeric(rows["generation_index"]).astype(int)
    if reward_column is not None:
        rows[reward_column] = pd.to_numeric(rows[reward_column])
    return rows


def _fingerprint(kept: pd.DataFrame) -> str:
    """Hash of the kept responses' keys and texts, in key order (from their keys: no text is read again)."""
    digest = hashlib.sha1()
    kept = kept.sort_values(response_key(kept))
    for column in [*response_key(kept), "text_hash"]:
        digest.update(pd.util.hash_pandas_object(kept[column], index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def _counts(n_in: int, kept: pd.DataFrame, dropped: pd.DataFrame) -> dict[str, int]:
    return {"rows_in": n_in, "rows_kept": len(kept), **dropped["reason"].value_counts().to_dict()}


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
    kept, dropped, rows, _ = _validate_frame(frame, source, reward_column, drop_invalid)
    return rows, dropped


def _validate_frame(
    frame: pd.DataFrame, source: str, reward_column: str | None, drop_invalid: bool
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(kept keys, dropped rows with reason, kept rows, keys) of an in-memory long-format frame."""
    _check_columns(list(frame.columns), source, reward_column)
    if frame.empty:
        raise DataError(f"{source}: no rows (columns: {list(frame.columns)}).")
    rows = _long_batch(frame.copy(), None, source, 0)
    rows["_pos"] = np.arange(len(rows))
    first_bad: dict = {}
    keys = _keys(rows, reward_column, first_bad)
    kept, dropped_keys = _validate_keys(keys, source, reward_column, drop_invalid, first_bad)
    dropped = rows.iloc[dropped_keys["_pos"].to_numpy()].assign(reason=dropped_keys["reason"].to_numpy())
    kept_rows = _finish_rows(rows.iloc[kept["_pos"].to_numpy()].drop(columns="_pos"), reward_column)
    return kept, dropped.drop(columns="_pos").reset_index(drop=True), kept_rows.reset_index(drop=True), keys


def validated_responses(
    frame: pd.DataFrame,
    source: str,
    revision: str | None = None,
    *,
    reward_column: str | None = None,
    drop_invalid: bool = False,
) -> LoadedResponses:
    """Long-format ``frame`` (in memory) validated (:func:`validate_long`), with its fingerprint and row counts."""
    kept, dropped, rows, _ = _validate_frame(frame, source, reward_column, drop_invalid)
    return LoadedResponses(rows, dropped, source, revision, _fingerprint(kept), _counts(len(frame), kept, dropped))


# -- streaming load -----------------------------------------------------------------------------------------------


def _long_batches(table: Any, wide: list[str] | None, columns: list[str] | None,
                  teachers: list[str] | None, seen: set) -> Iterator[pd.DataFrame]:  # fmt: skip
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    """The source's long-format rows a batch at a time, each with ``_pos`` (its place in this stream)."""
    offset = position = 0
    for frame in table.frames(columns, flatten=wide is not None):
        n = len(frame)
        batch = _long_batch(frame, wide, table.source, offset, table.struct_fields)
        offset += n
        if "teacher" in batch.columns:
            seen.update(batch["teacher"].unique())
            if teachers and wide is None:
                batch = batch[batch["teacher"].isin(teachers)].reset_index(drop=True)
        batch["_pos"] = np.arange(position, position + len(batch))
        position += len(batch)
        yield batch


def sample_ids(ids: Any, n: int, seed: int) -> set[str] | None:
    """``n`` instruction ids drawn at random (seeded) from the distinct ``ids``; None when ``n`` covers them all."""
    if n <= 0:
        raise DataError(f"--sample must be positive, got {n}.")
    distinct = np.array(sorted(set(ids)))
    if n >= len(distinct):
        return None
    return set(np.random.default_rng(seed).choice(distinct, size=n, replace=False))


WINDOW_ROWS = int(os.environ.get("MAGPIE_TEACH_WINDOW_ROWS") or 20_000)
"""Responses `rank` scores and writes per window (:meth:`ResponseStream.windows`): ``$MAGPIE_TEACH_WINDOW_ROWS``,
default 20,000; 0 scores everything in one window (in memory, as `generate`'s scoring stage does)."""


@dataclass
class ResponseStream:
    """A validated source (:func:`open_responses`): its counts and fingerprint now, its kept rows a window at a
    time (:meth:`windows`, in source order); the rows dropped (with ``reason``) are read by the same pass, and
    are in :attr:`dropped` once a pass has ended."""

    source: str
    revision: str | None
    fingerprint: str
    counts: dict[str, int]
    n_rows: int
    """How many rows the windows yield (the kept rows, or those of the sampled instructions)."""
    teachers: list[str] = field(default_factory=list)
    """The teachers of those rows, sorted."""
    dropped: pd.DataFrame | None = None
    _read: Any = None  # () -> iterator of long-format batches with `_pos`, each read from the source anew
    _wanted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # positions of the kept rows
    _dropped_keys: pd.DataFrame | None = None
    _reward_column: str | None = None

    def windows(self, rows: int = WINDOW_ROWS) -> Iterator[pd.DataFrame]:
        """The kept rows, ``rows`` at a time (the last window shorter), each with its final types."""
        if rows <= 0:
            raise ValueError(f"a window holds at least one row, got {rows}")
        dropped_positions = self._dropped_keys["_pos"].to_numpy()
        buffered: list[pd.DataFrame] = []
        n_buffered = 0
        found_dropped = []
        for batch in self._read():
            mine = batch["_pos"].to_numpy()
            hit = np.isin(mine, dropped_positions)
            if hit.any() or not found_dropped:  # the first batch's, even empty: the columns of `dropped`
                found_dropped.append(batch[hit])
            hit = np.isin(mine, self._wanted)
            if hit.any():
                buffered.append(batch[hit])
                n_buffered += int(hit.sum())
            while n_buffered >= rows:
                frame = pd.concat(buffered)
                yield self._finish(frame.iloc[:rows])
                buffered, n_buffered = [frame.iloc[rows:]], len(frame) - rows
        if n_buffered:
            yield self._finish(pd.concat(buffered))
        # in the order validation dropped them, without `_pos` (the source's columns, even when none was dropped)
        dropped = pd.concat(found_dropped).set_index("_pos").loc[self._dropped_keys["_pos"].to_numpy()]
        self.dropped = dropped.reset_index(drop=True).assign(reason=self._dropped_keys["reason"].to_numpy())

    def _finish(self, frame: pd.DataFrame) -> pd.DataFrame:
        return _finish_rows(frame.drop(columns="_pos").reset_index(drop=True), self._reward_column)


def open_responses(
    source: str,
    *,
    revision: str | None = None,
    split: str = "train",
    reward_column: str | None = None,
    drop_invalid: bool = False,
    teachers: list[str] | None = None,
    sample: int | None = None,
    seed: int = 42,
) -> ResponseStream:
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    """Validates teacher responses in either format, streaming (see the module docstring), and returns them as a
    :class:`ResponseStream`: counts and fingerprint from the keys, the texts read only by its windows. With
    ``sample``, the windows hold only the responses to ``sample`` instructions drawn at random (``seed``; the
    same instructions for every teacher); validation and the fingerprint cover every row."""
    from magpie_teach.tables import open_table

    table = open_table(source, revision=revision, split=split)
    wide = _wide_layout(table)
    if wide is not None:
        if teachers:
            unknown = sorted(set(teachers) - set(wide))
            if unknown:
                raise DataError(f"{source}: unknown teacher(s) {unknown}; it has {wide}.")
            wide = [t for t in wide if t in teachers]
        columns = [*ID_COLUMNS, "instruction", *wide]
    else:
        _check_columns(table.columns, source, reward_column)
        columns = [*ID_COLUMNS, *REQUIRED_LONG, *OPTIONAL_LONG, *GENERATION_FLAGS, *filter(None, [reward_column])]

    first_bad: dict = {}
    seen: set = set()
    parts = []
    checked = False
    for batch in _long_batches(table, wide, columns, teachers, seen):
        if not checked:
            _check_columns(list(batch.columns), source, reward_column)
            checked = True
        parts.append(_keys(batch, reward_column, first_bad))
    keys = _concat_keys(parts)
    del parts
    if teachers and wide is None:
        unknown = sorted(set(teachers) - seen)
        if unknown:
            raise DataError(f"{source}: unknown teacher(s) {unknown}.")
    if keys.empty:
        raise DataError(f"{source}: no rows (columns: {table.columns}).")
    kept, dropped_keys = _validate_keys(keys, source, reward_column, drop_invalid, first_bad)
    counts = _counts(len(keys), kept, dropped_keys)
    fingerprint = _fingerprint(kept)
    del keys
    wanted = kept
    if sample is not None:
        chosen = sample_ids(kept["id"], sample, seed)
        if chosen is not None:
            wanted = kept[kept["id"].isin(chosen)]
        counts["rows_sampled"] = len(wanted)
    return ResponseStream(
        source, table.revision, fingerprint, counts, len(wanted), sorted(map(str, wanted["teacher"].unique())),
        _read=lambda: _long_batches(table, wide, columns, teachers, set()),
        _wanted=wanted["_pos"].to_numpy(), _dropped_keys=dropped_keys[["_pos", "reason"]],
        _reward_column=reward_column,
    )  # fmt: skip


def load_responses(source: str, **options: Any) -> LoadedResponses:
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    """Loads teacher responses in either format, validated, as long-format rows held in memory: the windows of
    :func:`open_responses` (``options`` are its keyword arguments, with its defaults) put together."""
    stream = open_responses(source, **options)
    windows = list(stream.windows(max(stream.n_rows, 1)))
    rows = windows[0] if len(windows) == 1 else pd.concat(windows, ignore_index=True)
    return LoadedResponses(rows, stream.dropped, source, stream.revision, stream.fingerprint, stream.counts)


def _wide_layout(table: Any) -> list[str] | None:
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    """The teacher (struct) columns of a wide-format source, or None for the long format."""
    if "teacher" in table.columns:
        return None
    if table.wide_columns is not None:
        return table.wide_columns or None
    first = next(table.frames(), None)
    return _struct_columns(first) if first is not None and is_wide(first) else None


def sample_instructions(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Keeps the same ``n`` randomly drawn instructions (by id, seeded) for every teacher."""
    chosen = sample_ids(rows["id"], n, seed)
    return rows if chosen is None else rows[rows["id"].isin(chosen)].reset_index(drop=True)
