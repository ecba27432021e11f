"""Dataset cards for published artefacts, rendered from the templates in ``dataset_cards/``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from magpie_teach.errors import DataError

TEMPLATES = Path(__file__).resolve().parents[1] / "dataset_cards"
CITATION = """```bibtex
@inproceedings{xu2025stronger,
  title={Stronger Models are Not Always Stronger Teachers for Instruction Tuning},
  author={Xu, Zhangchen and Jiang, Fengqing and Niu, Luyao and Lin, Bill Yuchen and Poovendran, Radha},
  booktitle={NAACL},
  year={2025}
}
```"""


def size_category(n: int) -> str:
    """The Hub's size_categories bucket for N rows."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M" if n < 10_000_000 else "n>10M"


def template(kind: str) -> tuple[str, list[str]]:
    """The template text (without its first line) and the fields that first line says it needs."""
    path = TEMPLATES / f"{kind}.md"
    text = path.read_text(encoding="utf-8")
    first, _, body = text.partition("\n")
    match = re.fullmatch(r"\{#\s*required:\s*(.*?)\s*#\}", first.strip())
    if not match:
        raise RuntimeError(f"{path}: the first line must be '{{# required: field, ... #}}'")
    return body, [name.strip() for name in match.group(1).split(",") if name.strip()]


def markdown_table(frame: Any, digits: int = 4) -> str:
    """A DataFrame as a Markdown table, floats to ``digits`` significant digits (cards and reports)."""
    columns = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in frame.itertuples(index=False):
        cells = [f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ranking_markdown(ranking: Any) -> str:
    """One short table per base model, best teacher first: CAR and the baselines beside it."""
    keep = [
        c for c in ("teacher", "car", "reward", "compat_loss", "length", "ppl_self", "ifd_self", "n") if c in ranking
    ]
    parts = []
    for base, group in ranking.groupby("base_model", sort=False):
        group = group.sort_values("car", ascending=False)
        parts.append(f"**Base model `{base}`**\n\n{markdown_table(group[keep])}")
    return "\n\n".join(parts)


def render(kind: str, context: dict, card_data: dict, source: str) -> str:
    """Renders the card; a field the template needs that the artefact lacks is a DataError naming it."""
    from huggingface_hub import DatasetCard, DatasetCardData

    body, required = template(kind)
    missing = [name for name in required if context.get(name) in (None, "", [], {})]
    if missing:
        raise DataError(
            f"{source}: cannot write the {kind} dataset card: missing {', '.join(missing)} "
            "(these come from the artefact's config and summary files; was it produced by an older or interrupted run?)"
        )
    data = DatasetCardData(**card_data)
    return str(DatasetCard.from_template(data, template_str=body, **context))


def yaml_or_json(path: Path) -> dict:
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    try:
        loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise DataError(f"{path}: unreadable: {err}") from err
    return loaded or {}
