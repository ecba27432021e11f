"""`magpie-teach rank`: rank teachers per base model by CAR, with every baseline of the paper beside it."""

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach import artefacts
from magpie_teach.scoring.executor import (
    ScoringSession,
    contexts_of,
    fill_cache,
    fill_cache_on_ray,
    score_rows,
    scoring_models,
    stages_of,
    truncation_counts,
    window_rows,
)
from magpie_teach.scoring.metrics import add_sums, short_name, sum_scores
from magpie_teach.settings import (
    AliasSettings,
    CARSettings,
    ConfidenceSettings,
    PerformanceSettings,
    ScoringRunSettings,
)

logger = logging.getLogger(__name__)


@dataclass
class RankConfig(CARSettings, ConfidenceSettings, ScoringRunSettings, PerformanceSettings, AliasSettings):
    """`rank`'s settings; CAR's (``beta``, ``reward_shift``), the bootstrap's (``bootstrap``, ``confidence``,
    ``bootstrap_seed``), the scoring run's (the models, ``max_length``, ``batch_tokens``, ``dtype``, ``device``,
    the cluster and the score cache) and the performance table's columns are inherited from
    :mod:`magpie_teach.settings`."""

    data: str = field(
        metadata={
            "help": "Responses: a jsonl/parquet/csv file, a folder of parquet shards, a saved datasets folder, or a Hub id org/name (long or Generator-Zoo wide format); read in record batches."
        }
    )
    output_dir: str = field(
        metadata={"help": "Where ranking.csv, scores.parquet and correlations.csv are written.", "flag": "--output"}
    )
    sample: int | None = field(
        default=None, metadata={"help": "Score only N instructions, the same ones for every teacher."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of --sample."})
    performance: str | None = field(
        default=None, metadata={"help": "CSV of teacher, base_model and benchmark columns: writes correlations.csv."}
    )
    revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag or commit) of a Hub data set."}
    )
    split: str = field(default="train", metadata={"help": "Split of a Hub data set or saved DatasetDict."})
    teachers: list[str] = field(
        default_factory=list,
        metadata={"help": "Only these teachers; repeat the flag (default: all).", "flag": "--teacher"},
    )
    drop_invalid: bool = field(
        default=False,
        metadata={
            "help": "Drop (and count) instructions with empty responses, missing rewards or missing teachers instead of failing."
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Check the data and every model (where each would load from), print how many examples each "
            "model would score and how many the score cache holds already, and stop: no model loads, nothing is "
            "written."
        },
    )

    def __post_init__(self) -> None:
        self.check_models()
        self.check_car()
        self.check_confidence()
        self.check_run()
        self.check_cluster()


@dataclass
class RankResult:
    ranking: pd.DataFrame
    scores: pd.DataFrame
    correlations: pd.DataFrame | None
    dropped: pd.DataFrame
    counts: dict[str, int]
    output_dir: Path
    summary: dict = field(default_factory=dict)
    """``summary.json``: with the bootstrap on, its ``confidence`` holds the verdict per base model."""


def write_rank_outputs(
    config: RankConfig,
    scores: pd.DataFrame,
    loaded: Any,
    counts: dict,
    performance: pd.DataFrame | None = None,
    work: dict | None = None,
    write_scores: Any = None,
    sums: pd.DataFrame | None = None,
) -> RankResult:
    """Aggregates per-example ``scores`` and writes a `rank` output folder (shared with `generate`'s scoring).
    `rank`'s windows give ``scores`` as :data:`RANKED_COLUMNS` only, with ``write_scores(tmp)`` to write
    ``scores.parquet`` and ``sums`` (:func:`magpie_teach.scoring.metrics.sum_scores`) to aggregate from."""
    from magpie_teach.config import dump_config
    from magpie_teach.scoring.metrics import aggregate_sums, correlations

    out = Path(config.output_dir)
    files = artefacts.RunOutputs(out, "rank")
    sums = sum_scores(scores) if sums is None else sums
    ranking = aggregate_sums(sums, beta=config.beta, reward_shift=config.reward_shift)
    corr = correlations(ranking, performance) if performance is not None else None
    verdicts: list = []
    if config.bootstrap:
        from magpie_teach.scoring.confidence import add_rho_intervals, bootstrap_ranking, spearman_intervals

        settings = {"n_replicates": config.bootstrap, "confidence": config.confidence, "seed": config.bootstrap_seed}
        ranking, verdicts = bootstrap_ranking(scores, ranking, **settings)
        if corr is not None:
            metrics = [m for m in corr.index if m != "n_teachers"]
            corr = add_rho_intervals(corr, spearman_intervals(ranking, performance, metrics, **settings))
    files.write(artefacts.SCORES, write_scores or (lambda tmp: scores.to_parquet(tmp, index=False)))
    files.write(artefacts.RANKING, lambda tmp: ranking.to_csv(tmp, index=False))
    if corr is not None:
        files.write(artefacts.CORRELATIONS, lambda tmp: corr.to_csv(tmp))
    if len(loaded.dropped):
        files.write(
            artefacts.RANK_DROPPED,
            lambda tmp: loaded.dropped.drop(columns=["_row"], errors="ignore").to_csv(tmp, index=False),
        )
    summary = {
        "source": config.data,
        "revision": config.revision,
        "resolved_revision": loaded.revision if loaded.revision != config.revision else None,
        "fingerprint": loaded.fingerprint,
        "counts": counts,
    }
    if work:
        summary["work"] = work  # per scoring stage: examples scored by a model, and read from the score cache
    if verdicts:
        summary["confidence"] = {
            "level": config.confidence,
            "replicates": config.bootstrap,
            "seed": config.bootstrap_seed,
            "base_models": [verdict.to_json() for verdict in verdicts],
            "sentences": [verdict.sentence(config.confidence) for verdict in verdicts],
        }
    files.write(artefacts.RANK_SUMMARY, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    # a Hub source is recorded by the commit that was read, so that rerunning this config reads the same bytes
    dump_config(dataclasses.replace(config, revision=loaded.revision), out / artefacts.RANK_CONFIG)
    files.written.add(artefacts.RANK_CONFIG)
    files.finish()  # an earlier run's files this run did not write (dropped.csv, correlations.csv) go
    return RankResult(ranking, scores, corr, loaded.dropped, counts, out, summary)


def rank(config: RankConfig) -> RankResult:
    """Scores every teacher's responses under every base model and ranks the teachers.

    Writes ``ranking.csv`` (one row per teacher x base model), ``scores.parquet`` (per example),
    ``correlations.csv`` (with a performance file), ``dropped.csv`` (rows dropped by
    ``drop_invalid``, with their reason), ``summary.json`` and the resolved ``rank_config.yaml``.
    """

    from magpie_teach.artefacts import locked

    with locked(config.output_dir):
        return _rank(config)


def _model_flags(config: RankConfig) -> dict[str, str]:
    """Each model the run names, with the flag that names it."""
    flags = {config.reward_model: "--reward-model", config.reference_model: "--reference-model"}
    flags.update({model: "--base-model" for model in config.base_models})
    return {model: flag for model, flag in flags.items() if model}


def locate_models(config: RankConfig) -> dict[str, str]:
    """Where each model the run names would load from (:func:`magpie_teach.modeling.locate_model`), found before
    any loads: a mistyped or unreachable one fails now, not after the others have scored."""
    from magpie_teach.modeling import locate_model

    return {model: locate_model(model, flag) for model, flag in _model_flags(config).items()}


def _prepare(config: RankConfig) -> tuple[Any, Any, dict[str, str]]:
    """What `rank` checks before any model loads: the models' names, the cache and the cluster, the performance
    table, the data (opened and validated), the names matched, and where each model would be loaded from (a
    mistyped or unreachable one fails now, not after the others have scored). (performance, stream, sources)."""
    from magpie_teach.data import open_responses
    from magpie_teach.modeling import check_model_source
    from magpie_teach.scoring.metrics import load_performance

    for model, flag in _model_flags(config).items():
        check_model_source(model, flag)  # a mistyped path fails now, not after the data is read
    if config.cache:  # the driver writes every score (Ray's actors only return theirs): its cache, checked now
        from magpie_teach.artefacts import check_writable
        from magpie_teach.scoring.cache import default_cache_dir

        check_writable(Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir(), "--cache-dir")
    if config.ray_address:
        from magpie_teach.scoring.on_ray import check_cluster

        # unreachable, no ray extra, or an output folder a node cannot read (the rows are staged there): one line, now
        config.ray_address = check_cluster(
            config.ray_address, config.output_dir, config.gpus_per_worker, config.num_workers
        )

    performance = None
    if config.performance:
        performance = load_performance(config.performance, config.performance_columns, config.aliases)
    stream = open_responses(
        config.data,
        revision=config.revision,
        split=config.split,
        reward_column=config.reward_column,
        drop_invalid=config.drop_invalid,
        teachers=config.teachers or None,
        sample=config.sample,
        seed=config.seed,
    )
    if performance is not None:  # names are matched now, before any model loads
        from magpie_teach.scoring.names import match_names

        for match in match_names(
            stream.teachers, config.base_models, performance, f"--performance {config.performance}"
        ):
            print(f"performance: {match.line()}", file=sys.stderr, flush=True)
    return performance, stream, locate_models(config)


def plan(config: RankConfig) -> dict:
    """What `rank` would do (``--dry-run``), having checked all it checks before a model loads: the rows, and per
    model where it would load from and, per stage, how many examples it would score and how many the score cache
    holds already. Loads tokenizers only (the cache's keys name them); writes nothing."""
    from magpie_teach import data
    from magpie_teach.scoring.cache import example_keys

    _, stream, sources = _prepare(config)
    session, models = ScoringSession(), []
    for model, kinds in scoring_models(config):
        _, caches = session.caches_of(config, model, kinds)
        stages: dict[str, dict] = {}
        seen: set = set()  # an instruction's L(x) is one example, whichever windows its responses fall in
        for rows in stream.windows(data.WINDOW_ROWS if data.WINDOW_ROWS > 0 else stream.n_rows):
            keys = example_keys(rows["instruction"].tolist(), rows["response"].tolist(), contexts_of(rows))
            for stage, cache in zip(stages_of(model, kinds, rows, keys), caches):
                keys = stage.keys
                if stage.kind == "instruction-loss":
                    keys = np.array([key for key in keys if key not in seen])
                    seen.update(keys)
                found = cache.lookup(keys)[0] if cache is not None and len(keys) else np.zeros(len(keys), bool)
                count = stages.setdefault(stage.desc, {"stage": stage.desc, "examples": 0, "in_cache": 0})
                count["examples"] += len(keys)
                count["in_cache"] += int(found.sum())
        for count in stages.values():
            count["to_score"] = count["examples"] - count["in_cache"]
        models.append({"model": model, "source": sources[model], "stages": list(stages.values()),
                       "cached": all(cache is not None for cache in caches)})  # fmt: skip
        session.forget(model)
    return {"counts": dict(stream.counts), "teachers": list(stream.teachers), "models": models}


def _rank(config: RankConfig) -> RankResult:
    performance, stream, _ = _prepare(config)
    with ScoringSession(config.output_dir) as session:
        return _score_and_write(config, performance, stream, session)


def _score_and_write(config: RankConfig, performance: Any, stream: Any, session: ScoringSession) -> RankResult:
    counts = dict(stream.counts)
    work: dict = {}
    window = window_rows(config, stream.n_rows, session)
    if window >= stream.n_rows:  # one window: scored and aggregated in memory
        (rows,) = stream.windows(stream.n_rows)
        scores = score_rows(config, rows, work, session)
        counts.update(truncation_counts(config, scores))
        return write_rank_outputs(config, scores, stream, counts, performance, work)
    # several windows: each model scores every window into the score cache (loaded once), then the scores are read
    # back from the cache a window at a time and written, base model by base model; what the ranking reads of each
    # row stays in memory, and of the caches only those of the base model being written, the reward and reference
    for model, kinds in scoring_models(config):
        print(f"{short_name(model)}: scoring {stream.n_rows} responses in windows of {window}", file=sys.stderr)
        if config.ray_address:
            fill_cache_on_ray(config, model, kinds, stream, window, work, session)
        else:
            for rows in stream.windows(window):
                fill_cache(config, model, kinds, rows, work, session)
        session.release()
        session.forget(model)
    session.quiet = True
    with _ScoresFile(Path(config.output_dir)) as file:
        for base in config.base_models:
            one = dataclasses.replace(config, base_models=[base])
            for rows in stream.windows(window):
                file.add(score_rows(one, rows, None, session))
            session.forget(base)
        numbers = file.numbers()
        counts.update(truncation_counts(config, numbers))
        return write_rank_outputs(config, numbers, stream, counts, performance, work, file.write, file.sums)


RANKED_COLUMNS = ("id", "teacher", "base_model", "reward", "compat_loss", "truncated", "reward_truncated")
"""What `rank` keeps of each scored row when it scores in windows: what the bootstrap pairs and resamples, and the
truncation counts; the ranking is aggregated from each window's sums (:func:`magpie_teach.scoring.metrics.sum_scores`)."""


class _ScoresFile:
    """``scores.parquet`` written a window at a time, base model by base model (a base model's rows together, as
    the in-memory path writes them), into a temporary file in the output folder that :meth:`write` moves into
    place; of each row only :data:`RANKED_COLUMNS` is kept, its names as categories (each string held once), and
    of each window the sums the ranking is aggregated from (:attr:`sums`)."""

    NAMES = ("id", "teacher", "base_model")
    """The columns kept as categories."""

    def __init__(self, folder: Path):
        self.path = folder / ".scores-partial.parquet"
        self.writer: Any = None
        self.parts: list[pd.DataFrame] = []
        self.sum_parts: list[pd.DataFrame] = []
        self._numbers: pd.DataFrame | None = None

    def __enter__(self) -> "_ScoresFile":
        self.path.unlink(missing_ok=True)
        return self

    def add(self, scores: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(scores, preserve_index=False)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, _nullable(table.schema))
        self.writer.write_table(table.cast(self.writer.schema))
        kept = scores[[c for c in RANKED_COLUMNS if c in scores.columns]]
        self.parts.append(kept.astype(dict.fromkeys(self.NAMES, "category")))
        self.sum_parts.append(sum_scores(scores))

    @property
    def sums(self) -> pd.DataFrame:
        """:func:`magpie_teach.scoring.metrics.sum_scores` of every row added."""
        return add_sums(self.sum_parts)

    def numbers(self) -> pd.DataFrame:
        """:data:`RANKED_COLUMNS` of every row, in the file's order."""
        from pandas.api.types import union_categoricals

        if self._numbers is None:
            names = {c: union_categoricals([p[c] for p in self.parts]) for c in self.NAMES}
            numbers = pd.concat([p.drop(columns=list(names)) for p in self.parts], ignore_index=True)
            self.parts = []
            self._numbers = pd.concat([pd.DataFrame(names), numbers], axis=1)
        return self._numbers

    def write(self, tmp: str) -> None:
        import os

        self.writer.close()
        os.replace(self.path, tmp)

    def __exit__(self, *exc: Any) -> None:
        if self.writer is not None:
            self.writer.close()
        self.path.unlink(missing_ok=True)


def _nullable(schema: Any) -> Any:
    """A window whose texts are all null (no earlier turns in it) types them null: the file's schema holds text."""
    import pyarrow as pa

    return pa.schema([field.with_type(pa.string()) if pa.types.is_null(field.type) else field for field in schema])
