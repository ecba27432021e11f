"""Tabular sources read in record batches: local files, folders of parquet shards, saved data sets, Hub repos.

:func:`open_table` decides what a source is and checks what can be checked without reading rows (the file
exists, has a known type, is not empty; every parquet shard's footer reads and all shards share one schema);
:meth:`Table.frames` then yields pandas frames of at most about :data:`BATCH_BYTES` of data each, reading only
the columns asked for, so that memory depends on the batch, not on the data's size:

* ``.parquet`` file, or a folder of ``.parquet`` shards (the Hub layout ``data/train-00000-of-00010.parquet``:
  the shards whose name starts with the split are read when there are any): record batches, column projection;
* ``.jsonl`` / ``.jsonl.gz`` and ``.csv``: read in chunks of :data:`TEXT_CHUNK_ROWS` lines;
* ``.json`` (one list of records): a single JSON document, read whole;
* a folder saved with ``Dataset.save_to_disk`` (or a ``DatasetDict``'s split), and a Hub data set ``org/name``
  at a revision (resolved to its commit, recorded in :attr:`Table.revision`): the memory-mapped Arrow data that
  ``datasets`` keeps on disk, read a batch at a time.
"""

import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from magpie_teach.errors import DataError, network_errors

BATCH_BYTES = 16 << 20
"""About how much decoded data one batch holds (parquet and Arrow sources; rows per batch follow from it)."""
TEXT_CHUNK_ROWS = 20_000
"""Lines per chunk of a jsonl or csv file."""
_MAX_BATCH_ROWS = 65_536


@dataclass
class Table:
    """An opened tabular source: its column names and a way to read it in batches (see the module docstring)."""

    source: str
    columns: list[str]
    read: Callable[[list[str] | None, bool], Iterator[pd.DataFrame]]
    revision: str | None = None
    wide_columns: list[str] | None = None
    """Struct columns with a ``content`` field, when the schema says so without reading rows (Arrow sources)."""
    files: list[Path] = field(default_factory=list)
    struct_fields: dict[str, list[str]] = field(default_factory=dict)
    """The fields of each struct column (Arrow sources)."""

    def frames(self, columns: list[str] | None = None, flatten: bool = False) -> Iterator[pd.DataFrame]:
        """The rows in order, a batch at a time, with only ``columns`` (all when None) that the source has. With
        ``flatten``, an Arrow source's struct column ``s`` comes as one column ``s.FIELD`` per field (:attr:`struct_fields`)
        instead of a dict per row: far less memory for the Zoo's responses."""
        wanted = None if columns is None else [c for c in self.columns if c in set(columns)]
        yield from self.read(wanted, flatten)

    def to_pandas(self, columns: list[str] | None = None) -> pd.DataFrame:
        parts = list(self.frames(columns))
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=self.columns)
        frame.attrs["revision"] = self.revision
        return frame


def hub_commit(source: str, revision: str | None) -> str:
    """The commit id that REVISION (branch, tag, commit; default main) of Hub data set SOURCE points at."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().dataset_info(source, revision=revision).sha
    except RevisionNotFoundError:
        raise DataError(f"{source}: no revision {revision!r} (a branch, tag or commit id) on the Hub.") from None
    except RepositoryNotFoundError:
        raise DataError(f"{source}: no such data set on the Hub (or it is private and no token was given).") from None
    except network_errors() as err:  # the HTTP client's transport errors too (httpx's are no OSError)
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        raise DataError(f"{source}@{revision or 'main'}: the Hub ({endpoint}) could not be reached: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None  # fmt: skip


def open_table(source: str, revision: str | None = None, split: str = "train") -> Table:
    """Opens SOURCE for reading in batches (see the module docstring); a DataError names what is wrong with it."""
    path = Path(source)
    if path.is_file():
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        openers = {".parquet": _parquet, ".jsonl": _jsonl, ".jsonl.gz": _jsonl, ".csv": _csv, ".json": _json}
        if suffix not in openers:
            raise DataError(f"{source}: unsupported file type {suffix!r}; use one of {', '.join(openers)}.")
        if path.stat().st_size == 0:
            raise DataError(f"{source}: the file is empty (no rows).")
        if suffix == ".parquet":
            return _parquet(source, [path])
        return openers[suffix](source, path)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _saved_dataset(source, path, split)
        shards = sorted(p for p in path.rglob("*.parquet") if not any(s.startswith(".") for s in p.parts))
        in_split = [p for p in shards if p.name.startswith(f"{split}-") or p.parent.name == split]
        if shards:
            check_shard_set(in_split or shards)
            return _parquet(source, in_split or shards)
        return _saved_dataset(source, path, split)
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return _hub(source, revision, split)
    raise DataError(f"{source}: no such file or folder, and not a Hub data set id of the form org/name.")


_SHARD_NAME = re.compile(r"(?P<stem>.+)-(?P<index>\d+)-of-(?P<total>\d+)\.parquet\Z")


def check_shard_set(files: list[Path]) -> None:
    """Shards named as the Hub names them (``train-00003-of-00010.parquet``) must all be there: a set missing one
    is an error naming the missing file(s) (the name says how many there are), as is a set whose names disagree
    on that count."""
    sets: dict[tuple[Path, str], dict[int, set[int]]] = {}
    for file in files:
        match = _SHARD_NAME.match(file.name)
        if match:
            counts = sets.setdefault((file.parent, match["stem"]), {})
            counts.setdefault(int(match["total"]), set()).add(int(match["index"]))
    for (folder, stem), counts in sets.items():
        if len(counts) > 1:
            raise DataError(f"{folder}: the shards of {stem!r} disagree on how many there are "
                            f"({', '.join(f'-of-{t:05d}' for t in sorted(counts))}): they come from different runs.")  # fmt: skip
        ((total, present),) = counts.items()
        missing = [i for i in range(total) if i not in present]
        if missing:
            names = [f"{stem}-{i:05d}-of-{total:05d}.parquet" for i in missing]
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise DataError(f"{folder}: {len(missing)} of the {total} shards of {stem!r} are missing ({shown}); "
                            "a partial set would be ranked as if it were the whole data: fetch the missing shards.")  # fmt: skip


def _rows_per_batch(bytes_per_row: float) -> int:
    return max(1, min(_MAX_BATCH_ROWS, int(BATCH_BYTES / max(bytes_per_row, 1.0))))


def _to_pandas(table: Any, flatten: bool) -> pd.DataFrame:
    return (table.flatten() if flatten else table).to_pandas()


def _struct_fields(schema: Any) -> dict[str, list[str]]:
    import pyarrow as pa

    return {f.name: [sub.name for sub in f.type] for f in schema if pa.types.is_struct(f.type)}


def _wide_columns(schema: Any) -> list[str]:
    import pyarrow as pa

    return [f.name for f in schema if pa.types.is_struct(f.type) and f.type.get_field_index("content") >= 0]


def _parquet(source: str, files: list[Path]) -> Table:
    """Parquet file(s): every footer is read now, so that a corrupt shard or a schema that differs from the first
    shard's is an error naming that file before any row is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    opened = []
    for file in files:
        try:
            opened.append(pq.ParquetFile(file))
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{file}: not a readable parquet file ({str(err).splitlines()[0]}).") from None
    first = opened[0].schema_arrow
    for file, handle in zip(files[1:], opened[1:]):
        if not handle.schema_arrow.remove_metadata().equals(first.remove_metadata()):
            ours, theirs = set(map(str, first)), set(map(str, handle.schema_arrow))
            raise DataError(
                f"{file}: its schema differs from {files[0].name}'s (only in {file.name}: "
                f"{sorted(theirs - ours) or 'none'}; only in {files[0].name}: {sorted(ours - theirs) or 'none'})."
            )
    rows = sum(h.metadata.num_rows for h in opened)
    size = sum(h.metadata.row_group(i).total_byte_size for h in opened for i in range(h.metadata.num_row_groups))
    batch_rows = _rows_per_batch(size / max(rows, 1))
    del opened  # footers read: the handles go (see read)

    def read(columns: list[str] | None, flatten: bool) -> Iterator[pd.DataFrame]:
        for file in files:  # a handle per pass, let go after it: a handle keeps what it has read buffered
            try:
                handle = pq.ParquetFile(file, pre_buffer=False)
                for batch in handle.iter_batches(batch_size=batch_rows, columns=columns):
                    yield _to_pandas(pa.Table.from_batches([batch]), flatten)
            except (pa.ArrowException, OSError) as err:
                raise DataError(f"{file}: could not be read: {str(err).splitlines()[0]}") from None
            finally:
                handle = None

    if rows == 0:
        raise DataError(f"{source}: the parquet data holds no rows.")
    return Table(source, first.names, read, wide_columns=_wide_columns(first), files=files,
                 struct_fields=_struct_fields(first))  # fmt: skip


def _text_reader(source: str, path: Path, chunks: Callable[[], Iterator[pd.DataFrame]], kind: str) -> Table:
    """A jsonl or csv file read in chunks; its columns come from the first chunk."""

    def read(columns: list[str] | None, flatten: bool = False) -> Iterator[pd.DataFrame]:
        try:
            for chunk in chunks():
                yield chunk if columns is None else chunk[[c for c in columns if c in chunk.columns]]
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
            _check_utf8(path, source)
            raise DataError(f"{source}: could not be read as {kind}: {str(err).splitlines()[0]}") from err

    first = next(read(None, False), None)
    if first is None or (first.empty and not len(first.columns)):
        raise DataError(f"{source}: the file holds no rows.")
    return Table(source, list(first.columns), read, files=[path])


def _jsonl(source: str, path: Path) -> Table:
    def chunks() -> Iterator[pd.DataFrame]:
        with pd.read_json(path, lines=True, dtype=False, chunksize=TEXT_CHUNK_ROWS) as reader:
            yield from reader

    return _text_reader(source, path, chunks, ".jsonl")


def _csv(source: str, path: Path) -> Table:
    def chunks() -> Iterator[pd.DataFrame]:
        with pd.read_csv(path, keep_default_na=False, na_values=[""], chunksize=TEXT_CHUNK_ROWS) as reader:
            yield from reader

    return _text_reader(source, path, chunks, ".csv")


def _json(source: str, path: Path) -> Table:
    """A .json file holding a list of records (objects); anything else is a DataError saying what it holds."""
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}, column {err.colno}: invalid JSON ({err.msg}).") from None
        except UnicodeDecodeError:
            _check_utf8(path, source)
            raise
    if isinstance(data, dict):
        raise DataError(
            f"{path}: the top level is an object (keys: {list(data)[:5]}); expected a list of records "
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
    frame = pd.DataFrame.from_records(data)
    del data
    return Table(source, list(frame.columns), lambda columns, flatten=False: iter([frame if columns is None else frame[columns]]),
                 files=[path])  # fmt: skip


def _check_utf8(path: Path, source: str) -> None:
    """DataError naming the first line that is not UTF-8 text, if there is one."""
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


def _arrow_dataset(source: str, dataset: Any, revision: str | None = None) -> Table:
    """A ``datasets.Dataset`` (memory-mapped Arrow on disk) read a batch at a time."""
    table = dataset.data
    rows = max(dataset.num_rows, 1)
    batch_rows = _rows_per_batch(table.nbytes / rows)

    def read(columns: list[str] | None, flatten: bool) -> Iterator[pd.DataFrame]:
        selected = table if columns is None else table.select(columns)
        for start in range(0, dataset.num_rows, batch_rows):
            yield _to_pandas(selected.slice(start, batch_rows), flatten)

    if dataset.num_rows == 0:
        raise DataError(f"{source}: the data set holds no rows.")
    return Table(source, list(dataset.column_names), read, revision, _wide_columns(table.schema),
                 struct_fields=_struct_fields(table.schema))  # fmt: skip


def _saved_dataset(source: str, path: Path, split: str) -> Table:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(
            f"{source}: a folder, but neither parquet shards nor one saved with Dataset.save_to_disk ({err})."
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{source}: no split {split!r}; it has {', '.join(loaded)}.")
        loaded = loaded[split]
    return _arrow_dataset(source, loaded)


def _hub(source: str, revision: str | None, split: str) -> Table:
    import datasets

    commit = hub_commit(source, revision)
    try:
        loaded = datasets.load_dataset(source, revision=commit, split=split)
    except Exception as err:  # the datasets library raises many types; name the source either way
        raise DataError(f"{source}@{revision or 'main'}: could not be loaded from the Hub: {err}") from err
    return _arrow_dataset(source, loaded, commit)  # the commit read, so that a rerun reads the same bytes


def load_table(source: str, revision: str | None = None, split: str = "train") -> pd.DataFrame:
    """The whole of SOURCE as one frame (``attrs["revision"]``: the Hub commit read, if any); for small tables."""
    return open_table(source, revision, split).to_pandas()
