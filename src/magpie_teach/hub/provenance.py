"""What a published artefact says about where its models and files came from, without the publisher's disk.

Local output folders keep the paths a run was given (``/home/me/.cache/models/gemma-3-270m``): they are
what a rerun needs. A push rewrites every local path it finds in what it publishes (the data's model
columns, the config, summary and command files, the card) to a name a reader can use:

* a model folder (it has a ``config.json``) or any other local file -> ``NAME@sha256:DIGEST``, DIGEST the
  first 12 hex digits of a hash over the folder's files (relative path and content) or the file's content,
  so two publishers of the same weights name them alike and a changed folder gets another name;
* any other local folder (an output folder, say) -> its name.

A Hub id (``Qwen/Qwen2-1.5B``) is not a local path and stays as it is: the Hub records its commit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from magpie_teach.artefacts import public_name

MODEL_COLUMNS = ("base_model", "teacher", "model", "settings")
"""Data columns known to hold model names or settings (``settings`` as JSON). Every other column of strings is
searched too (``magpie_model``, ``baseline``, ...), but for the texts themselves (:data:`TEXT_COLUMNS`)."""

TEXT_COLUMNS = frozenset({"instruction", "response", "context", "answer", "baseline_answer", "messages", "prompt",
                          "text", "completion", "chosen", "rejected", "system_prompt"})  # fmt: skip
"""Columns of generated or given texts: what a model wrote is published as it was written."""


def is_local_path(value: str) -> bool:
    """A string naming something on this disk: absolute, or relative with a separator, and existing."""
    if not value or len(value) > 4096 or "\n" in value:
        return False
    if not (os.path.isabs(value) or value.startswith(("./", "../", "~")) or os.sep in value):
        return False
    try:
        return Path(value).expanduser().exists()
    except OSError:
        return False


def collect_strings(value: Any) -> Iterable[str]:
    """Every string inside a (nested) JSON/YAML value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from collect_strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from collect_strings(item)


class Publisher:
    """Collects the local paths of what is about to be published and rewrites them (one digest per path)."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def learn(self, values: Iterable[str]) -> None:
        for value in values:
            if "=" in value and value not in self.names:  # NAME=PATH (evaluate's --student): the path part
                self.learn([value.split("=", 1)[1]])
            if value not in self.names and is_local_path(value):
                self.names[value] = public_name(value)
                resolved = str(Path(value).expanduser().resolve())
                self.names.setdefault(resolved, self.names[value])

    def learn_json_strings(self, values: Iterable[str]) -> None:
        """Learns the paths inside JSON texts (a data column of settings, say)."""
        for text in values:
            try:
                self.learn(collect_strings(json.loads(text)))
            except (TypeError, ValueError):
                self.learn([text])

    def rewrite(self, text: str) -> str:
        """TEXT with every known local path replaced by its public name (longest first, so no prefix is cut)."""
        for local in sorted(self.names, key=len, reverse=True):
            if local in text:
                text = text.replace(local, self.names[local])
        return text

    def learn_frame(self, frame: Any) -> None:
        """Learns the paths in ``frame``'s columns of strings but the texts (JSON read inside, but for the plain
        model columns) and in its ``attrs`` (which parquet keeps in its metadata)."""
        self.learn(collect_strings(frame.attrs))
        for column, values in _string_columns(frame):
            if column in MODEL_COLUMNS and column != "settings":
                self.learn(values)
            else:
                self.learn_json_strings(values)

    def rewrite_frame(self, frame: Any) -> Any:
        """A copy of ``frame`` with every column of strings but the texts rewritten (each distinct value once), and
        its ``attrs`` too, after :meth:`learn_frame`; None if unchanged."""
        self.learn_frame(frame)
        changed = {}
        for column, values in _string_columns(frame):
            mapping = {v: self.rewrite(v) for v in values}
            if any(k != v for k, v in mapping.items()):
                changed[column] = frame[column].map(lambda v, m=mapping: m.get(v, v) if isinstance(v, str) else v)
        dumped = json.dumps(frame.attrs, default=str)
        attrs = self.rewrite(dumped)
        if not changed and attrs == dumped:
            return None
        public = frame.assign(**changed)
        public.attrs = json.loads(attrs) if attrs != dumped else dict(frame.attrs)
        return public


def _string_columns(frame: Any) -> Iterable[tuple[str, list[str]]]:
    """(column, its distinct strings) for every column of strings but the texts (:data:`TEXT_COLUMNS`)."""
    for column in frame.columns:
        if column not in TEXT_COLUMNS and frame[column].dtype.kind in "OT":  # object or pandas' str dtype
            strings = frame[column].dropna()
            strings = strings[strings.map(lambda v: isinstance(v, str))]  # a list column (weights) holds none
            yield column, list(strings.unique())
