"""Each score computed once: per-example scores cached by content, shared by every run that points at the cache.

An entry is one example's scores under one *scorer*. The example is named by a 16-byte BLAKE2b of its texts
(:func:`example_keys`: earlier turns, instruction, response; for L(x) the instruction alone), so the same
response scored again, in another data set, order or output folder, is found. The scorer is named by a hash of
what can change its numbers (:func:`scorer_identity`): the kind of score and the engine's rule for it (the mask
rule of :mod:`magpie_teach.chat` included), the model (its Hub commit, or a hash over a local folder's files),
the chat template in use, ``max_length`` and ``dtype``. Batch size, batch order and the rest of the data do
not change a score (the engine's masking guarantees it), so they are not part of it.

Layout: ``CACHE/<kind>/<model name>-<scorer hash>/`` holds ``scorer.json`` (the identity in words) and
``part-*.parquet`` files, one per scored window, each written atomically (a killed run leaves whole parts
only, so a rerun resumes from the last finished window). A part's schema metadata holds a SHA-256 over its keys
and values; a part that does not read back or fails that check is logged, removed and its examples scored
again: nothing corrupt is ever read as a score. Several runs may share a cache: each writes its own parts,
and an example found twice is read once.

The default location is ``$MAGPIE_TEACH_CACHE`` or ``~/.cache/magpie-teach/scores`` (``--cache-dir``).
"""

import functools
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

KEY_BYTES = 16
_CHECKSUM = b"magpie_teach.sha256"


def default_cache_dir() -> Path:
    """``$MAGPIE_TEACH_CACHE``, else ``~/.cache/magpie-teach/scores`` (``$XDG_CACHE_HOME`` respected)."""
    if os.environ.get("MAGPIE_TEACH_CACHE"):
        return Path(os.environ["MAGPIE_TEACH_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "magpie-teach" / "scores"


def example_keys(instructions: Sequence[Any], responses: Sequence[Any] | None = None,
                 contexts: Sequence[Any] | None = None) -> np.ndarray:  # fmt: skip
    """One 16-byte key per example (a numpy ``S16`` array) from its texts; earlier turns are read as messages,
    so a context given as JSON text and as a list of the same messages get the same key."""
    from magpie_teach.chat import parse_context

    keys = np.empty(len(instructions), dtype=f"S{KEY_BYTES}")
    for i, instruction in enumerate(instructions):
        digest = hashlib.blake2b(digest_size=KEY_BYTES)
        if contexts is not None:
            digest.update(json.dumps(parse_context(contexts[i]), sort_keys=True).encode())
        digest.update(b"\x00" + str(instruction).encode("utf-8", "surrogatepass"))
        if responses is not None:
            digest.update(b"\x00" + str(responses[i]).encode("utf-8", "surrogatepass"))
        keys[i] = digest.digest()
    return keys


def model_identity(name_or_path: str, cache_dir: Path) -> str | None:
    """What names a model's weights: ``sha256:...`` over a local folder's files (remembered in
    ``CACHE/identities.json`` by each file's path, size, mtime, inode and ctime, so a folder is hashed once: tools
    that keep mtimes when they replace weights, ``cp -p``, ``rsync -a`` or an archive, still change the inode or
    the ctime, and the folder is hashed again), or ``HUB_ID@COMMIT`` from the
    Hub or the Hugging Face cache; None when it cannot be known (then nothing is cached for that model)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        from magpie_teach.artefacts import content_digest, write_atomic

        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))  # fmt: skip
        stamp = [[str(p.relative_to(path)), *_stamp(p.stat())] for p in files]
        memo_file = cache_dir / "identities.json"
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
        entry = memo.get(str(path.resolve()))
        if entry and entry.get("files") == stamp:
            return entry["identity"]
        identity = f"sha256:{content_digest(path)}"
        memo[str(path.resolve())] = {"files": stamp, "identity": identity}
        write_atomic(memo_file, lambda tmp: Path(tmp).write_text(json.dumps(memo)))
        return identity
    return _hub_commit(name_or_path)


def _stamp(stat: os.stat_result) -> list[int]:
    """What of a file's metadata says it may have changed: size, mtime, inode and ctime (the last two cannot be
    set by the tools that keep an mtime)."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]


@functools.cache
def _hub_commit(repo_id: str) -> str | None:
    """Asked once per process: a run that names a Hub model in several stages (or under several scorers) asks the Hub
    for its commit once."""
    try:
        from huggingface_hub import try_to_load_from_cache

        from magpie_teach.modeling import _offline, hub_endpoint, hub_model_commit, hub_reachable

        if not _offline() and hub_reachable(hub_endpoint()):
            return f"{repo_id}@{hub_model_commit(repo_id)}"
        cached = try_to_load_from_cache(repo_id, "config.json")
        if isinstance(cached, str):  # .../snapshots/<commit>/config.json
            return f"{repo_id}@{Path(cached).parent.name}"
    except Exception as err:  # any failure to name the model only turns its caching off
        logger.warning("%s: could not resolve its commit (%s); its scores are not cached", repo_id, err)
    return None


def scorer_identity(kind: str, model: str, model_id: str, tokenizer: Any, max_length: int, dtype: str,
                    attention: str | None = None) -> dict:  # fmt: skip
    """What a scorer's numbers depend on (see the module docstring), as a JSON-able dict; ``attention``, the
    attention implementation when it is not transformers' default (:func:`magpie_teach.modeling.attention_for`),
    is part of it then."""
    from magpie_teach.chat import MASK_RULE

    template = getattr(tokenizer, "chat_template", None) or ""
    extra = {"attention": attention} if attention else {}
    pad = getattr(tokenizer, "pad_token_id", None)
    if kind == "reward" and (pad is None or pad == getattr(tokenizer, "eos_token_id", None)):
        # rewards of a model whose pad is its EOS were read one token early before this rule: not reused
        extra["pooling"] = "last-real-token/1"
    if kind == "instruction-features":
        from magpie_teach.scoring.features import RULE

        extra["features"] = RULE
    return {
        **extra,
        "kind": kind,
        "rule": MASK_RULE,
        "model": model,
        "model_id": model_id,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "max_length": int(max_length),
        "dtype": dtype,
    }


class ScoreCache:
    """The entries of one scorer (see the module docstring): :meth:`lookup` and :meth:`add`."""

    def __init__(self, root: str | os.PathLike, identity: dict):
        from magpie_teach.artefacts import slug
        from magpie_teach.scoring.metrics import short_name

        stable = {k: v for k, v in identity.items() if k != "model"}  # the model counts by its weights, not its path
        digest = hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / identity["kind"] / f"{slug(short_name(identity['model']))}-{digest}"
        self.identity = identity
        self._keys = np.empty(0, dtype=f"S{KEY_BYTES}")
        self._values: pd.DataFrame | None = None
        self._loaded = False
        self._added: list[tuple[np.ndarray, pd.DataFrame]] = []  # merged into the sorted arrays at the next lookup

    def _load(self) -> None:
        keys, values = [], []
        for part in sorted(self.folder.glob("part-*.parquet")):
            try:
                part_keys, frame = _read_part(part)
            except Exception as err:  # noqa: BLE001 - a part that does not read back is corrupt, whatever the error
                logger.warning("score cache: %s is corrupt or incomplete (%s); removed, its examples are scored again",
                               part, str(err).splitlines()[0] if str(err) else type(err).__name__)  # fmt: skip
                part.unlink(missing_ok=True)
                continue
            keys.append(part_keys)
            values.append(frame)
        if keys:
            all_keys = np.concatenate(keys)
            all_values = pd.concat(values, ignore_index=True)
            first = ~pd.Series(all_keys).duplicated().to_numpy()  # two runs may have scored the same example
            order = np.argsort(all_keys[first], kind="stable")
            self._keys = all_keys[first][order]
            self._values = all_values[first].iloc[order].reset_index(drop=True)
        self._loaded = True

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, pd.DataFrame | None]:
        """(found: a bool per key, the found entries' values in key order)."""
        if not self._loaded:
            self._load()
        if self._added:
            self._merge()
        if not len(self._keys):
            return np.zeros(len(keys), dtype=bool), None
        at = np.searchsorted(self._keys, keys)
        at_clipped = np.minimum(at, len(self._keys) - 1)
        found = (at < len(self._keys)) & (self._keys[at_clipped] == keys)
        return found, self._values.iloc[at_clipped[found]].reset_index(drop=True)

    def add(self, keys: np.ndarray, values: pd.DataFrame) -> None:
        """Stores VALUES (one row per key) as one new part, written atomically."""
        from magpie_teach.artefacts import write_atomic

        if not len(keys):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        described = self.folder / "scorer.json"
        if not described.exists():
            write_atomic(described, lambda tmp: Path(tmp).write_text(json.dumps(self.identity, indent=2)))
        keys = np.asarray(keys, dtype=f"S{KEY_BYTES}")
        values = values.reset_index(drop=True)
        write_atomic(self.folder / f"part-{uuid.uuid4().hex}.parquet", lambda tmp: _write_part(keys, values, tmp))
        if self._loaded:  # kept for a later lookup; sorted in then, once, not at every window
            self._added.append((keys, values))

    def _merge(self) -> None:
        keys = np.concatenate([self._keys, *(k for k, _ in self._added)])
        frames = ([] if self._values is None else [self._values]) + [v for _, v in self._added]
        values = pd.concat(frames, ignore_index=True)
        order = np.argsort(keys, kind="stable")
        self._keys, self._values = keys[order], values.iloc[order].reset_index(drop=True)
        self._added = []


def _checksum(keys: np.ndarray, values: pd.DataFrame) -> str:
    """SHA-256 over a part's keys, then its columns (name and values), in name order."""
    digest = hashlib.sha256(np.ascontiguousarray(keys).tobytes())
    for column in sorted(values.columns):
        digest.update(column.encode() + b"\x00")
        digest.update(np.ascontiguousarray(values[column].to_numpy()).tobytes())
    return digest.hexdigest()


def _write_part(keys: np.ndarray, values: pd.DataFrame, path: str) -> None:
    """Keys as a fixed-size binary column (their raw bytes: a key may hold zero bytes), then the values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(values, preserve_index=False).append_column("key", key_array(keys))
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), _CHECKSUM: _checksum(keys, values).encode()}
    )
    pq.write_table(table, path)


def key_array(keys: np.ndarray) -> Any:
    """Keys (``S16``) as an Arrow fixed-size binary array of their raw bytes (a key may end in zero bytes, which
    a numpy ``S16`` value drops)."""
    import pyarrow as pa

    keys = np.ascontiguousarray(keys, dtype=f"S{KEY_BYTES}")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(KEY_BYTES), len(keys), [None, pa.py_buffer(keys.tobytes())])


def _read_part(path: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """A part's keys and values; ValueError when its checksum is missing or does not match."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    column = table.column("key").combine_chunks()
    if column.type.byte_width != KEY_BYTES or column.null_count:
        raise ValueError("bad key column")
    raw = np.frombuffer(column.buffers()[1], dtype=np.uint8)[
        column.offset * KEY_BYTES : (column.offset + len(column)) * KEY_BYTES
    ]
    keys = raw.view(f"S{KEY_BYTES}").copy()
    values = table.drop_columns(["key"]).to_pandas()
    expected = (table.schema.metadata or {}).get(_CHECKSUM)
    if expected is None or expected.decode() != _checksum(keys, values):
        raise ValueError("checksum mismatch")
    return keys, values
