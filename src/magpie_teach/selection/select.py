"""`magpie-teach select`: build an SFT data set (a `messages` column, TRL's conversational format) from scores.

Strategies (one row per instruction in the output):

* ``teacher``: every response of one teacher: ``--teacher NAME``, or the best teacher for the base
  model by ``--metric`` (default ``car``) as ``rank`` computes it;
* ``best-of-n``: per instruction, the response with the highest reward (the paper's rejection sampling);
* ``grape``: per instruction, the highest length-normalised log-probability under the student
  (``logprob_norm`` = -compat_loss; Zhang et al., "The Best Instruction-Tuning Data are Those That Fit");
* ``mix``: per instruction, the highest (1 - a) * r_norm + a * logprob_norm, where r_norm is the
  reward min-max normalised over the candidate responses (a = ``--alpha``, 0.4 by default; PerSyn);
* ``routed``: per instruction, the response of the teacher it was routed to (``--routing``: a `route` folder, a
  routed `generate` folder or an assignment file; without it, scores that hold one teacher per instruction, a
  routed `generate`'s, are taken as they are); several generations of that teacher: the highest reward.

Filters, applied first, each counted and kept with its reason: failed responses (a ``status``
column other than ``ok``), responses that stopped at `generate`'s ``max_new_tokens`` (``hit_max_new_tokens``,
likely cut off mid-answer; ``--keep-capped`` keeps them), conversations cut at the scoring ``max_length``
(``truncated``; ``--keep-truncated`` keeps them), ``--min-reward``,
``--max-tokens`` (response tokens under the base model).
"""

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach import artefacts
from magpie_teach.artefacts import SFT_DATA as DATA_FILE
from magpie_teach.errors import ConfigError, DataError
from magpie_teach.settings import DEFAULT_BOOTSTRAP, CARChoice, ConfidenceSettings, RecordedCARSettings

logger = logging.getLogger(__name__)

STRATEGIES = ("teacher", "best-of-n", "grape", "mix", "routed")


@dataclass
class SelectConfig(RecordedCARSettings):
    """`select`'s settings; CAR's ``beta`` and ``reward_shift`` default to the ones `rank` recorded with the scores
    (:class:`magpie_teach.settings.RecordedCARSettings`)."""

    scores: str = field(
        metadata={
            "help": "A `rank` output folder, its scores.parquet, or a Hub data set ORG/NAME pushed with --kind scores."
        }
    )
    output_dir: str = field(
        metadata={
            "help": "Where the SFT data set is written (loadable with datasets.load_dataset).",
            "flag": "--output",
        }
    )
    strategy: str = field(
        default="teacher", metadata={"help": "teacher, best-of-n, grape, mix or routed.", "choices": list(STRATEGIES)}
    )
    revision: str | None = field(default=None, metadata={"help": "Revision (branch, tag, commit) of a Hub --scores."})
    base_model: str | None = field(
        default=None, metadata={"help": "Base model whose scores are used (needed when the scores hold several)."}
    )
    teacher: str | None = field(
        default=None, metadata={"help": "With --strategy teacher: this teacher instead of the best by --metric."}
    )
    metric: str = field(
        default="car", metadata={"help": "With --strategy teacher: the metric that picks the best teacher."}
    )
    alpha: float = field(default=0.4, metadata={"help": "With --strategy mix: weight of the student log-likelihood."})
    routing: str | None = field(
        default=None,
        metadata={"help": "With --strategy routed: a `route` output folder or a router pushed to the Hub "
                  "(ORG/NAME), a routed `generate` folder or an assignment file (id, teacher); default: the scores' "
                  "own teacher of each instruction."},
    )  # fmt: skip
    routing_revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag, commit) of a --routing router on the Hub."}
    )
    rerank_after_filters: bool = field(
        default=False,
        metadata={
            "help": "With --strategy teacher: pick the best teacher on the rows the filters keep (default: on all "
            "scored rows, as `rank` ranked them)."
        },
    )
    require_decided: bool = field(
        default=False,
        metadata={
            "help": "With --strategy teacher and --metric car: stop unless the best teacher is ahead of every other "
            "at rank's bootstrap confidence (its summary.json 'separated'); without it, an undecided choice is a warning."
        },
    )
    keep_capped: bool = field(
        default=False,
        metadata={
            "help": "Keep responses that stopped at generate's max_new_tokens (column hit_max_new_tokens: likely cut "
            "off mid-answer); they are dropped as 'hit_max_new_tokens' by default."
        },
    )
    keep_truncated: bool = field(
        default=False,
        metadata={
            "help": "Keep conversations cut at the scoring --max-length (column truncated); dropped as 'truncated' "
            "by default."
        },
    )
    min_reward: float | None = field(default=None, metadata={"help": "Drop responses with a lower reward."})
    max_tokens: int | None = field(
        default=None, metadata={"help": "Drop responses longer than this many base-model tokens."}
    )
    exclude_ids: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Instruction ids to leave out (e.g. held out for evaluation); repeat.",
            "flag": "--exclude-id",
        },
    )

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.require_decided and (self.strategy != "teacher" or self.teacher is not None or self.metric != "car"):
            raise ConfigError(
                "--require-decided applies to --strategy teacher choosing by --metric car (no --teacher)"
            )
        if self.routing is not None and self.strategy != "routed":
            raise ConfigError("--routing applies to --strategy routed")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"--alpha must be in [0, 1], got {self.alpha}")
        self.check_car()


@dataclass
class SelectResult:
    dataset: pd.DataFrame
    """The selected rows' provenance columns, by id (the texts and ``messages`` are in the written file only)."""
    dropped: pd.DataFrame
    summary: dict
    output_dir: Path


def _filter(scores: pd.DataFrame, config: SelectConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    reasons = pd.Series(None, index=scores.index, dtype=object)
    checks = []
    if "status" in scores.columns:
        checks.append(("failed", scores["status"].fillna("failed") != "ok"))
    if not config.keep_capped and "hit_max_new_tokens" in scores.columns:
        checks.append(("hit_max_new_tokens", scores["hit_max_new_tokens"].fillna(False).astype(bool)))
    if not config.keep_truncated and "truncated" in scores.columns:
        checks.append(("truncated", scores["truncated"].astype(bool)))
    if config.min_reward is not None:
        checks.append(("reward_below_min", scores["reward"] < config.min_reward))
    if config.max_tokens is not None and "n_tokens_full" in scores.columns:
        checks.append(("too_long", scores["n_tokens_full"] > config.max_tokens))
    if config.exclude_ids:
        checks.append(("excluded_id", scores["id"].isin(config.exclude_ids)))
    for reason, mask in checks:
        reasons[mask & reasons.isna()] = reason
    dropped = scores[reasons.notna()].assign(reason=reasons[reasons.notna()])
    return scores[reasons.isna()], dropped


def _best_teacher(scores: pd.DataFrame, config: SelectConfig, car: CARChoice) -> tuple[str, float]:
    from magpie_teach.scoring.metrics import METRIC_DIRECTIONS, aggregate

    if config.metric not in METRIC_DIRECTIONS:
        raise ConfigError(f"--metric {config.metric!r} is not one of {', '.join(METRIC_DIRECTIONS)}")
    ranking = aggregate(scores, beta=car.beta, reward_shift=car.reward_shift)
    if config.metric not in ranking.columns:
        raise ConfigError(f"--metric {config.metric!r} is not in these scores (columns: {list(ranking.columns)})")
    best = ranking.sort_values(f"rank_{config.metric}").iloc[0]
    return str(best["teacher"]), float(best[config.metric])


def _decision(scores: pd.DataFrame, car: CARChoice, bootstrap: ConfidenceSettings, require: bool) -> dict:
    """The bootstrap's verdict on the best teacher by CAR (see :mod:`magpie_teach.scoring.confidence`)."""
    from magpie_teach.scoring.confidence import bootstrap_ranking
    from magpie_teach.scoring.metrics import aggregate

    replicates = bootstrap.bootstrap or DEFAULT_BOOTSTRAP  # rank ran without one: the decision still needs one
    _, (verdict,) = bootstrap_ranking(
        scores, aggregate(scores, beta=car.beta, reward_shift=car.reward_shift), replicates, bootstrap.confidence,
        bootstrap.bootstrap_seed,
    )  # fmt: skip
    sentence = verdict.sentence(bootstrap.confidence)
    if not verdict.separated:
        if require:
            raise DataError(f"--require-decided: {sentence}")
        logger.warning("%s", sentence)
    return {**verdict.to_json(), "confidence": bootstrap.confidence, "replicates": replicates}


def _routed(kept: pd.DataFrame, scores: pd.DataFrame, routing: pd.DataFrame | None) -> pd.DataFrame:
    """Per instruction, the kept rows of the teacher ROUTING (id, teacher) sends it to; without a routing, the scores
    must hold one teacher per instruction (a routed `generate`'s); several generations: the highest reward."""
    if routing is None:
        teachers = scores.groupby("id")["teacher"].nunique()
        if (teachers > 1).any():
            raise ConfigError(f"instruction {teachers.index[teachers > 1][0]!r} has responses of several teachers: "
                              "give --routing (a `route` folder, a routed `generate` folder or an assignment file)")  # fmt: skip
        routing = scores.drop_duplicates("id")[["id", "teacher"]]
    routed = routing.assign(id=routing["id"].astype(str)).set_index("id")["teacher"]
    mine = kept["teacher"].to_numpy() == kept["id"].astype(str).map(routed).to_numpy()
    chosen = kept[mine].assign(selection_metric="routed", selection_score=np.nan)
    order = ["id", *(c for c in ("reward", "generation_index") if c in chosen.columns)]  # unscored: the first
    ascending = [True] + [c != "reward" for c in order[1:]]
    chosen = chosen.sort_values(order, ascending=ascending).drop_duplicates("id")
    if chosen.empty:
        raise DataError("no kept response is of the teacher its instruction was routed to: nothing to select")
    return chosen


def select_responses(
    scores: pd.DataFrame,
    config: SelectConfig,
    car: CARChoice | None = None,
    bootstrap: ConfidenceSettings | None = None,
    routing: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Applies the filters then the strategy to one base model's scores; returns (selected, dropped).

    With ``--strategy teacher`` and no ``--teacher``, the best teacher by ``--metric`` is decided on all the scored
    rows, as `rank` ranked them (CAR with the settings CAR gives, by default `rank`'s own), so the filters change
    which rows are kept, not which teacher is best; ``rerank_after_filters`` decides it on the kept rows instead.
    Choosing by CAR, the paired bootstrap of `rank` (``bootstrap``: rank's recorded settings) says whether the
    choice is decided; it goes in ``selected.attrs["decision"]``, and an undecided one stops the run only with
    ``require_decided``.
    """
    car = car or config.car(None)
    decision = None
    kept, dropped = _filter(scores, config)
    if kept.empty:
        raise DataError(f"every response was filtered out ({dropped['reason'].value_counts().to_dict()})")
    if config.strategy == "teacher":
        if config.teacher is not None:
            if config.teacher not in set(scores["teacher"]):
                raise ConfigError(
                    f"--teacher {config.teacher!r} is not in the scores: {sorted(scores['teacher'].unique())}"
                )
            teacher, metric, value = config.teacher, "teacher", np.nan
        else:
            ranked_on = kept if config.rerank_after_filters else scores
            teacher, value = _best_teacher(ranked_on, config, car)
            metric = config.metric
            if metric == "car":
                decision = _decision(ranked_on, car, bootstrap or ConfidenceSettings(), config.require_decided)
        chosen = kept[kept["teacher"] == teacher].assign(selection_metric=metric, selection_score=value)
        if chosen.empty:
            reasons = dropped.loc[dropped["teacher"] == teacher, "reason"].value_counts().to_dict()
            raise DataError(f"every response of teacher {teacher!r} was filtered out ({reasons}): nothing to select")
        if (
            chosen["id"].duplicated().any()
        ):  # best-of-N output: the teacher's highest-reward generation per instruction
            order = ["id", "reward", "generation_index"] if "generation_index" in chosen.columns else ["id", "reward"]
            ascending = [True, False, True][: len(order)]
            chosen = chosen.sort_values(order, ascending=ascending).drop_duplicates("id", keep="first")
    elif config.strategy == "routed":
        chosen = _routed(kept, scores, routing)
    else:
        if config.strategy == "best-of-n":
            metric, score = "reward", kept["reward"]
        elif config.strategy == "grape":
            metric, score = "logprob_norm", -kept["compat_loss"]
        else:
            low, high = kept["reward"].min(), kept["reward"].max()
            normalised = (kept["reward"] - low) / (high - low) if high > low else kept["reward"] * 0.0
            metric, score = (
                f"mix(alpha={config.alpha:g})",
                (1 - config.alpha) * normalised + config.alpha * -kept["compat_loss"],
            )
        ranked = kept.assign(selection_metric=metric, selection_score=score.to_numpy())
        # highest score per instruction; ties go to the teacher name that sorts first, so reruns agree
        ranked = ranked.sort_values(["id", "selection_score", "teacher"], ascending=[True, False, True])
        chosen = ranked.drop_duplicates("id", keep="first")
    chosen = chosen.sort_values("id").reset_index(drop=True)
    if decision is not None:
        chosen.attrs["decision"] = decision
    return chosen, dropped


def select(config: SelectConfig) -> SelectResult:
    """Selects responses and writes ``OUTPUT/data/train-00000-of-00001.parquet`` (rows in the scores' order) with a
    ``messages`` column, provenance columns (teacher, selection_metric, selection_score, reward, compat_loss), a
    README.md whose front matter declares the data files, ``selection_summary.json``, the rows dropped
    by filters (``dropped.parquet``) and the resolved ``select_config.yaml``."""
    from magpie_teach.artefacts import locked

    with locked(config.output_dir):
        return _select(config)


def _select(config: SelectConfig) -> SelectResult:
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    from magpie_teach.config import dump_config

    source = artefacts.open_routed_responses(config.scores) if config.strategy == "routed" else None
    if source is not None:
        unscored = [flag for flag, on in (("--min-reward", config.min_reward is not None),
                                          ("--max-tokens", config.max_tokens is not None)) if on]  # fmt: skip
        if unscored:
            raise ConfigError(f"{config.scores}: a routed `generate` folder's responses are not scored (no two "
                              f"teachers answered the same instruction, so `rank` cannot compare them), so "
                              f"{', '.join(unscored)} cannot apply; drop the flag")  # fmt: skip
    else:
        source = artefacts.open_scores(config.scores, config.base_model, config.revision)
    scores = source.keys()  # the numbers of every scored row; the texts are read below for the chosen rows only
    recorded = artefacts.recorded_rank_config(config.scores, source.revision)
    car = config.car(*recorded)
    logger.info("select: %s", car.describe())
    names = [f.name for f in dataclasses.fields(ConfidenceSettings)]
    bootstrap = ConfidenceSettings(**{k: v for k, v in (recorded[0] or {}).items() if k in names})
    routing, routed_by = _routing(config, source, scores)
    chosen, dropped = select_responses(scores, config, car, bootstrap, routing)
    keep = ["id", "teacher", "base_model", "selection_metric", "selection_score", "reward", "compat_loss"]
    keep = [c for c in keep if c in chosen.columns] + [c for c in ("generation_index",) if c in chosen.columns]
    dataset = chosen[keep].copy()
    summary = {
        "strategy": config.strategy,
        "base_model": str(scores["base_model"].iloc[0]) if "base_model" in scores.columns else None,
        "instructions_in": int(scores["id"].nunique()),
        "responses_in": len(scores),
        "rows_out": len(dataset),
        "rows_per_teacher": {str(k): int(v) for k, v in dataset["teacher"].value_counts().sort_index().items()},
        "dropped_by_reason": {str(k): int(v) for k, v in dropped["reason"].value_counts().items()},
        "scores_revision": source.revision,
        "car": dataclasses.asdict(car),
    }
    if "decision" in chosen.attrs:
        summary["decision"] = chosen.attrs["decision"]
    if config.strategy == "routed":
        summary["base_model"] = summary["base_model"] or routed_by.get("base_model")
        routed = int(scores["id"].nunique())  # every scored instruction is routed once; the data has one row per id
        summary["routing"] = {**routed_by, "instructions_routed": routed,
                              "routed_instructions_without_a_kept_response": routed - len(dataset)}  # fmt: skip
    out = Path(config.output_dir)
    files = artefacts.RunOutputs(out, "select")
    files.write(DATA_FILE, lambda tmp: _write_sft_data(tmp, source, chosen.set_index("_pos")[keep]))
    readme = (
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "tags:\n- magpie-teach\n- synthetic\n---\n\n"
        f"SFT data selected by magpie-teach (`{config.strategy}`) for base model `{summary['base_model']}`.\n"
    )
    files.write(artefacts.SFT_README, lambda tmp: Path(tmp).write_text(readme))
    files.write(artefacts.SELECT_SUMMARY, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    if len(dropped):
        columns = [c for c in ("id", "teacher", "reason", "reward", "compat_loss") if c in dropped.columns]
        files.write(artefacts.SELECT_DROPPED, lambda tmp: dropped[columns].to_parquet(tmp, index=False))
    # Hub scores are recorded by the commit read, so that rerunning this config reads the same bytes
    dump_config(
        dataclasses.replace(config, revision=source.revision or config.revision),
        out / artefacts.SELECT_CONFIG,
    )
    files.written.add(artefacts.SELECT_CONFIG)
    files.finish()
    return SelectResult(dataset, dropped, summary, out)


def _routing(config: SelectConfig, source: Any, keys: pd.DataFrame) -> tuple[pd.DataFrame | None, dict]:
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    """With --strategy routed and --routing: the teacher of each scored instruction (KEYS: the scores' rows, from
    ``source.keys()``), and where it came from."""
    if config.strategy != "routed":
        return None, {}
    from magpie_teach.scoring.routing import assignments, read_assignment_file, routing_source

    if config.routing is None:
        if isinstance(source, artefacts.RoutedResponses):  # the routing the generate run recorded, and why
            folder = Path(config.scores)
            about = json.loads((folder / artefacts.GENERATE_SUMMARY).read_text()).get("routing") or {}
            return read_assignment_file(str(folder / artefacts.ROUTING)), {
                **about,
                "source": str(folder / artefacts.ROUTING),
            }
        return None, {"source": "the scores' own teacher of each instruction"}

    settings = routing_source(config.routing, config.routing_revision)
    if settings.router is not None:
        settings.base_model = source.base_model or None  # a routed generate's responses name none
    return assignments(settings, source.instructions(keys), sorted(keys["teacher"].astype(str).unique()))


def _write_sft_data(path: str, source: Any, chosen: pd.DataFrame) -> None:
    """Writes the chosen rows (``chosen``: indexed by ``_pos``) with their ``messages``, in the scores' order, reading
    the texts a batch at a time: memory holds one batch of texts, whatever the size of the scores."""
    import pyarrow.parquet as pq

    from magpie_teach.artefacts import TEXT_COLUMNS

    columns = [c for c in TEXT_COLUMNS if c in source.table.columns]
    tables = (_sft_table(batch, chosen) for batch in source.rows(chosen.index.to_numpy(), columns))
    first = next(tables)  # select_responses never chooses nothing
    with pq.ParquetWriter(path, first.schema) as writer:
        writer.write_table(first)
        for table in tables:
            writer.write_table(table.cast(writer.schema))


def _sft_table(batch: pd.DataFrame, chosen: pd.DataFrame) -> Any:
    """One batch of the SFT file: the chosen rows of ``batch`` with their ``messages`` first."""
    import pyarrow as pa

    from magpie_teach.chat import build_messages

    contexts = batch["context"] if "context" in batch.columns else [None] * len(batch)
    rows = chosen.loc[batch["_pos"].to_numpy()].reset_index(drop=True)
    rows.insert(0, "messages", [build_messages(x, y, context=c)
                                for x, y, c in zip(batch["instruction"], batch["response"], contexts)])  # fmt: skip
    return pa.Table.from_pandas(rows, preserve_index=False)
