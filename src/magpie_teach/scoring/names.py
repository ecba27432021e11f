"""How teacher and base-model names meet a performance table, whatever their spelling.

Users name models as the Hub does (``google/gemma-2-2b``, ``nvidia/Llama-3.1-Minitron-4B-Width-Base``,
``Meta-Llama-3.1-70B-Instruct`` as a Generator-Zoo column), tables as papers do (``Gemma-2-2B``,
``Llama-3.1-Minitron-4B``, ``Llama-3.1-70B-Instruct``). Both sides are reduced to one key before they are
compared (:func:`normalise`):

1. the Hub organisation or folder is dropped (everything up to the last ``/``);
2. case is ignored, and ``_`` and spaces count as ``-``;
3. a leading ``Meta-`` is dropped (``Meta-Llama-3-8B-Instruct`` is ``Llama-3-8B-Instruct``);
4. one trailing ``-Width-Base``, ``-Base``, ``-FP8`` or ``-AWQ`` is dropped (a base model's or a quantised
   release's suffix).

What normalisation cannot know comes from aliases (``alias: name in the table``, both sides normalised):
the package ships :data:`SHIPPED_ALIASES` for the paper's teachers and base models, and ``--aliases FILE``
adds the user's (theirs win).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from magpie_teach.errors import ConfigError

SUFFIXES = ("-width-base", "-base", "-fp8", "-awq")
SHIPPED_ALIASES = "name_aliases.yaml"
"""The package's aliases file (in ``magpie_teach/resources``)."""
MIN_TEACHERS = 3
"""Fewer matched teachers give no usable Spearman correlation."""


def normalise(name: Any) -> str:
    """The key a name is compared by (see the module docstring)."""
    text = str(name).strip().rstrip("/").split("/")[-1].split("@sha256:")[0]  # a published local model's name
    text = text.lower().replace("_", "-").replace(" ", "-")
    if text.startswith("meta-"):
        text = text[len("meta-") :]
    for suffix in SUFFIXES:
        if text.endswith(suffix) and len(text) > len(suffix):
            return text[: -len(suffix)]
    return text


def _read_aliases(text: str, where: str) -> dict[str, str]:
    from magpie_teach.artefacts import parse_yaml_mapping

    loaded = parse_yaml_mapping(text, where)
    aliases = {}
    for alias, name in loaded.items():
        if not isinstance(name, (str, int, float)) or isinstance(name, bool) or name in ("", None):
            raise ConfigError(f"{where}: alias {alias!r} maps to {name!r}; expected the name of a model in the table.")
        aliases[normalise(alias)] = normalise(name)
    return aliases


def load_aliases(path: str | Path | None = None) -> dict[str, str]:
    """The shipped aliases, then the ones in PATH (a YAML mapping ``alias: name in the table``) over them."""
    shipped = resources.files("magpie_teach") / "resources" / SHIPPED_ALIASES
    aliases = _read_aliases(shipped.read_text(), f"magpie_teach/resources/{SHIPPED_ALIASES}")
    if path:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"--aliases {path}: could not be read: {err.strerror or err}") from None
        aliases.update(_read_aliases(text, str(path)))
    return aliases


def key(name: Any, aliases: dict[str, str]) -> str:
    """NAME's key: normalised, then through the aliases."""
    normal = normalise(name)
    return aliases.get(normal, normal)


@dataclass
class BaseMatch:
    """How one base model met the table: its row name there, and which teachers have numbers."""

    base_model: str
    table_name: str | None
    matched: dict[str, str] = field(default_factory=dict)  # teacher -> its name in the table
    unmatched: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.table_name is None:
            return f"{self.base_model}: no base model of the table matches"
        text = f"{self.base_model} = {self.table_name!r} in the table: {len(self.matched)} teacher(s) matched"
        return text + (f"; no numbers for {self.unmatched}" if self.unmatched else "")


def match_names(teachers: list[str], base_models: list[str], performance: Any, source: str = "--performance") -> list[BaseMatch]:  # fmt: skip
    """Matches each base model and each teacher to a performance table (``load_performance``'s frame, whose
    ``attrs['aliases']`` holds the aliases), before anything is scored. ConfigError, naming the keys on both
    sides, when a base model matches no base model of the table or fewer than :data:`MIN_TEACHERS` teachers
    have numbers for it."""
    aliases = performance.attrs.get("aliases") or load_aliases()
    table_bases = {key(b, aliases): str(b) for b in performance["base_model"].unique()}
    results = []
    for base in base_models:
        table_base = table_bases.get(key(base, aliases))
        if table_base is None:
            raise ConfigError(
                f"{source}: base model {base!r} (key {key(base, aliases)!r}) matches no base model of the table "
                f"(keys: {sorted(table_bases)}); name it as the table does, or map it in an aliases file (--aliases)."
            )
        rows = performance[performance["base_model"].astype(str) == table_base]
        table_teachers = {key(t, aliases): str(t) for t in rows["teacher"]}
        match = BaseMatch(base, table_base)
        for teacher in teachers:
            found = table_teachers.get(key(teacher, aliases))
            if found is None:
                match.unmatched.append(teacher)
            else:
                match.matched[teacher] = found
        if len(match.matched) < MIN_TEACHERS:
            raise ConfigError(
                f"{source}: base model {base!r}: only {len(match.matched)} teacher(s) have performance numbers; at "
                f"least {MIN_TEACHERS} are needed (unmatched teacher keys: {sorted(key(t, aliases) for t in match.unmatched)}; "
                f"the table's: {sorted(table_teachers)}). Map the spellings in an aliases file (--aliases)."
            )
        results.append(match)
    return results
