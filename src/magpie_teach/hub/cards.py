"""Dataset cards for published artefacts, rendered from the templates in ``dataset_cards/``."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from magpie_teach.artefacts import COMMAND_FILE, KINDS, RANKING, WIN_RATES, Kind, read_yaml_mapping
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
    columns = ("teacher", "car", "car_ci_low", "car_ci_high", "p_best", "reward", "compat_loss", "length", "ppl_self",
               "ifd_self", "n")  # fmt: skip
    keep = [c for c in columns if c in ranking]
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
    if path.suffix != ".json":
        return read_yaml_mapping(path, DataError)
    try:
        return json.loads(path.read_text(encoding="utf-8")) or {}
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: unreadable: {err}") from err


# ---- what each kind's card says ------------------------------------------------------------------------
def _command(source: Path) -> str:
    record = yaml_or_json(source / COMMAND_FILE)
    argv = record.get("argv")
    return shlex.join(["magpie-teach", *argv]) if argv else "Python API (no command recorded)"


def _read_data(source: Path, spec: Kind):  # noqa: ANN202 - pandas stays a lazy import
    import pandas as pd

    path = source / spec.data
    try:
        return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - any reader error names the file
        raise DataError(f"{path}: unreadable: {err}") from err


def build_context(source: Path, kind: str, repo_id: str, tag: str) -> tuple[dict, dict, Any]:
    """(template context, DatasetCardData fields, data frame) for one artefact."""
    from magpie_teach import __version__

    spec = KINDS[kind]
    config = yaml_or_json(source / spec.config)
    summary = yaml_or_json(source / spec.summary) if spec.summary else {}
    frame = _read_data(source, spec)
    context: dict[str, Any] = {
        "kind": kind,
        "repo_id": repo_id,
        "tag": tag,
        "n_rows": len(frame),
        "columns": list(frame.columns),
        "version": __version__,
        "command": _command(source),
        "citation": CITATION,
        "summary": summary,
    }
    tags = ["magpie-teach", "synthetic", kind]
    if kind in ("instructions", "responses"):
        instructions = config.get("instructions") or {}
        magpie = instructions.get("magpie")
        if kind == "instructions":
            context["magpie"] = magpie
            context["pretty_name"] = "Magpie instructions"
        if magpie:
            text = (
                f"Generated Magpie-style by `{magpie.get('model')}` (pre-query template `{magpie.get('template')}`)."
            )
        elif instructions.get("path"):
            rev = summary.get("instructions_revision") or instructions.get("revision")
            text = f"Loaded from `{instructions['path']}`" + (f" at revision `{rev}`" if rev else "") + "."
        else:
            text = ""
        context["instructions_source"] = text
        context["filters"] = summary.get("counts") or {}
        teachers = []
        for t in config.get("teachers") or []:
            sampling = t.get("sampling") or {}
            teachers.append({
                "name": t.get("name"), "model": t.get("model"), "backend": t.get("backend", "transformers"),
                "temperature": sampling.get("temperature"), "top_p": sampling.get("top_p"),
                "max_new_tokens": sampling.get("max_new_tokens"), "num_generations": t.get("num_generations", 1),
            })  # fmt: skip
        context["teachers"] = teachers
        context["teacher_counts"] = summary.get("teachers") or {}
        context["routing"] = summary.get("routing")
        context["n_instructions"] = int(frame["id"].nunique()) if "id" in frame else len(frame)
        context.setdefault("pretty_name", "Multi-teacher responses")
        if magpie:
            tags.append("magpie")
    elif kind in ("scores", "ranking"):
        ranking = frame if kind == "ranking" else _read_csv_if(source / RANKING)
        context.update(
            data_source=config.get("data"),
            data_revision=summary.get("resolved_revision") or config.get("revision"),
            base_models=config.get("base_models") or [],
            reward=f"`{config['reward_model']}`" if config.get("reward_model") else
                   (f"precomputed column `{config['reward_column']}`" if config.get("reward_column") else None),
            reference_model=config.get("reference_model"),
            beta=config.get("beta"),
            counts=summary.get("counts") or {},
            dropped={k: v for k, v in (summary.get("counts") or {}).items() if not k.startswith(("rows_", "truncated[", "reward_truncated"))},
            ranking=ranking_markdown(ranking) if ranking is not None and len(ranking) else None,
            confidence=summary.get("confidence") or {},
            pretty_name="Teacher ranking (CAR)" if kind == "ranking" else "Scored multi-teacher responses",
        )  # fmt: skip
    elif kind == "sft":
        context.update(
            strategy=config.get("strategy") or summary.get("strategy"),
            base_model=summary.get("base_model"),
            scores_source=config.get("scores"),
            rows_per_teacher=summary.get("rows_per_teacher") or {},
            dropped=summary.get("dropped_by_reason") or {},
            routing=summary.get("routing"),
            pretty_name="SFT data selected by magpie-teach",
        )
        tags.append("sft")
    elif kind == "evaluation":
        rates = _read_csv_if(source / WIN_RATES)
        order = ["student", "n", "n_unparseable"] + [f"{r}{end}" for r in ("win_rate", "lc_win_rate", "bt_score")
                                                    for end in ("", "_low", "_high")]  # fmt: skip
        keep = [c for c in order if rates is not None and c in rates.columns]
        if config.get("judge_reward_model"):
            judge = f"reward model `{config['judge_reward_model']}` (sigmoid of the reward difference)"
        else:
            judge = f"`{config.get('judge')}` ({config.get('judge_backend')})"
        context.update(
            judge=judge,
            baseline=config.get("baseline") or config.get("baseline_answers"),
            prompts=config.get("prompts") or "the prompts shipped with magpie-teach",
            prompts_revision=config.get("prompts_revision"),
            n_prompts=int(frame["id"].nunique()) if "id" in frame else len(frame),
            students=list(dict.fromkeys(frame["student"])) if "student" in frame else [],
            n_unparseable=int((~frame["parsed"]).sum()) if "parsed" in frame else 0,
            win_rates=markdown_table(rates[keep]) if rates is not None else None,
            pretty_name="Students judged against a baseline",
        )
        tags.append("evaluation")
    elif kind == "router":
        entries = summary.get("base_models") or []
        context.update(
            source=summary.get("source") or {},
            base_models=entries,
            features=summary.get("features") or {},
            target=summary.get("target"),
            teachers=sorted({t for e in entries for t in e.get("teachers", [])}),
            pretty_name="Per-instruction teacher router",
        )
        tags.append("routing")
    card_data = {
        "license": None,  # set by the caller
        "task_categories": ["text-generation"],
        "size_categories": [size_category(len(frame))],
        "pretty_name": context["pretty_name"],
        "tags": tags,
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
    }
    return context, card_data, frame


def _read_csv_if(path: Path):  # noqa: ANN202
    import pandas as pd

    return pd.read_csv(path) if path.exists() else None
