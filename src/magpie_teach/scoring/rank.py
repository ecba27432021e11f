"""`magpie-teach rank`: rank teachers per base model by CAR, with every baseline of the paper beside it."""

import dataclasses
import gc
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach.errors import ConfigError, DataError
from magpie_teach.scoring.metrics import add_sums, short_name, sum_scores
from magpie_teach.settings import (
    CARSettings,
    ClusterSettings,
    ConfidenceSettings,
    ModelRunSettings,
    PerformanceSettings,
    ScoreCacheSettings,
)

logger = logging.getLogger(__name__)


@dataclass
class RankConfig(
    CARSettings, ConfidenceSettings, ModelRunSettings, ClusterSettings, ScoreCacheSettings, PerformanceSettings
):
    """`rank`'s settings; CAR's (``beta``, ``reward_shift``), the bootstrap's (``bootstrap``, ``confidence``,
    ``bootstrap_seed``) and the model run's (``max_length``, ``batch_tokens``, ``dtype``, ``device``) are
    inherited from :mod:`magpie_teach.settings`."""

    data: str = field(
        metadata={
            "help": "Responses: a jsonl/parquet/csv file, a folder of parquet shards, a saved datasets folder, or a Hub id org/name (long or Generator-Zoo wide format); read in record batches."
        }
    )
    output_dir: str = field(
        metadata={"help": "Where ranking.csv, scores.parquet and correlations.csv are written.", "flag": "--output"}
    )
    base_models: list[str] = field(
        default_factory=list,
        metadata={"help": "Base model (Hub id or folder); repeat the flag for several.", "flag": "--base-model"},
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "Reward model (AutoModelForSequenceClassification with one output)."}
    )
    reward_column: str | None = field(
        default=None,
        metadata={
            "help": "Use this precomputed reward column instead of a reward model (e.g. ArmoRM-Llama3-8B-v0.1)."
        },
    )
    reference_model: str | None = field(
        default=None, metadata={"help": "Reference LM for perplexity/IFD baselines (GPT-2 in the paper)."}
    )
    sample: int | None = field(
        default=None, metadata={"help": "Score only N instructions, the same ones for every teacher."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of --sample."})
    performance: str | None = field(
        default=None, metadata={"help": "CSV of teacher, base_model and benchmark columns: writes correlations.csv."}
    )
    aliases: str | None = field(
        default=None,
        metadata={
            "help": "YAML of 'name: name in the performance table' for spellings the matching rules miss (added to "
            "the shipped aliases of the paper's models; rules: Hub organisation, case, 'Meta-' and '-Base' aside)."
        },
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
        if not self.base_models:
            raise ConfigError("give at least one --base-model")
        if (self.reward_model is None) == (self.reward_column is None):
            raise ConfigError("give exactly one of --reward-model and --reward-column")
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


def _score_caches(config: RankConfig, kinds: list[str], model: str, tokenizer: Any) -> list:
    """The score cache of each of ``kinds``' scorers of ``model`` (:mod:`magpie_teach.scoring.cache`; the model
    named once for all of them), or Nones with ``--no-cache`` or when the model cannot be named (a Hub id whose
    commit is unknown)."""
    from magpie_teach.scoring.cache import ScoreCache, default_cache_dir, model_identity, scorer_identity

    if not config.cache:
        return [None] * len(kinds)
    root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    model_id = model_identity(model, root)
    if model_id is None:
        return [None] * len(kinds)
    from magpie_teach.modeling import attention_for, dtype_for

    attention, dtype = attention_for(model), dtype_for(config.dtype, _scoring_device(config))
    return [ScoreCache(root, scorer_identity(kind, model, model_id, tokenizer, config.max_length, dtype,
                                             attention)) for kind in kinds]  # fmt: skip


def _scoring_device(config: RankConfig) -> str:
    """Where the scores are computed: on a Ray cluster the actors' (a GPU each with ``--gpus-per-worker``), else
    ``--device`` as this machine resolves it."""
    from magpie_teach.modeling import resolve_device

    if config.ray_address:
        return "cuda" if config.gpus_per_worker > 0 else "cpu"
    return resolve_device(config.device)


def _free(*objects: Any) -> None:
    del objects
    gc.collect()
    try:
        import torch

        from magpie_teach.modeling import cuda_visible

        if cuda_visible():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _contexts(rows: pd.DataFrame) -> list | None:
    """The earlier turns of multi-turn rows (a ``context`` column), else None."""
    return rows["context"].tolist() if "context" in rows.columns else None


@dataclass
class _Stage:
    """One scoring stage of one model: its ``kind`` (see :data:`magpie_teach.scoring.scorers.OUTPUTS`), the
    rows' texts, their score-cache keys, and the name its progress and ``work`` entry carry."""

    kind: str
    frame: pd.DataFrame
    keys: np.ndarray
    desc: str


class ScoringSession:
    """What scoring keeps across the windows of one `rank` run: each model's tokenizer and score caches (named
    once), and the model being scored (loaded at its first miss, kept until :meth:`release`)."""

    def __init__(self) -> None:
        self.caches: dict[tuple, tuple[Any, list]] = {}
        self.scorer: tuple[str, Any, Any] | None = None  # (model, scorer, tokenizer)
        self.quiet = False  # no "from the score cache" line per window

    def caches_of(self, config: RankConfig, model: str, kinds: list[str]) -> tuple[Any, list]:
        from magpie_teach.modeling import load_tokenizer

        if (model, *kinds) not in self.caches:
            tokenizer = load_tokenizer(model) if config.cache else None
            self.caches[(model, *kinds)] = (tokenizer, _score_caches(config, kinds, model, tokenizer))
        return self.caches[(model, *kinds)]

    def release(self) -> None:
        if self.scorer is not None:
            _free(self.scorer)
            self.scorer = None

    def forget(self, model: str) -> None:
        """Drops ``model``'s tokenizer and score caches (whose entries a lookup reads into memory): a pass that is
        done with a model keeps none of its scores."""
        for key in [k for k in self.caches if k[0] == model]:
            del self.caches[key]


def _tally(work: dict | None, desc: str, scored: int, from_cache: int, say: bool = True, repeated: int = 0) -> None:
    """Counts a stage's examples scored and read from the score cache in ``work[desc]``, and (``repeated_in_run``,
    only when there are any) those that repeat an example this run scores once already (on Ray, an instruction
    whose answers fall in several windows: its L(x) is staged once); says how many came from the cache when any
    did."""
    if work is not None:
        done = work.setdefault(desc, {"scored": 0, "from_cache": 0})
        done["scored"] += scored
        done["from_cache"] += from_cache
        if repeated:
            done["repeated_in_run"] = done.get("repeated_in_run", 0) + repeated
    if from_cache and say:
        print(f"{desc}: {from_cache} of {scored + from_cache} from the score cache"
              f"{f', {scored} to score' if scored else ''}", file=sys.stderr, flush=True)  # fmt: skip


def _cached(config: RankConfig, model: str, stages: list[_Stage], work: dict | None,
            session: ScoringSession | None = None) -> list[pd.DataFrame]:  # fmt: skip
    """Each stage's scores of every row of its frame, in order: those in the score cache read from it, the others
    scored (here, or on the Ray cluster with ``--ray-address``) and stored in the cache as each window ends;
    ``work[desc]`` counts both. The stages share ``model``: it is loaded once (once per Ray actor), and only
    when something is left to score; with a ``session`` (`rank`'s windows) it stays loaded for the next call."""
    from magpie_teach.scoring.scorers import OUTPUTS

    tokenizer, caches = (session or ScoringSession()).caches_of(config, model, [stage.kind for stage in stages])
    results, todo = [], []
    for stage, cache in zip(stages, caches):
        found, values = cache.lookup(stage.keys) if cache is not None else (np.zeros(len(stage.keys), bool), None)
        missing = np.flatnonzero(~found)
        # `rank`'s last pass reads every score back: no news
        _tally(work, stage.desc, len(missing), int(found.sum()), say=not (session is not None and session.quiet))
        results.append((found, None if values is None else values.astype(OUTPUTS[stage.kind])))
        todo.append(missing)
    pending = [i for i, missing in enumerate(todo) if len(missing)]
    computed: dict[int, pd.DataFrame] = {}
    if pending and config.ray_address:
        from magpie_teach.scoring.compatibility import DEFAULT_WINDOW
        from magpie_teach.scoring.on_ray import Staging, shard_rows

        parts: list[list[pd.DataFrame]] = [[] for _ in pending]
        rows = shard_rows(sum(len(todo[i]) for i in pending), config.num_workers, DEFAULT_WINDOW)
        with Staging(_staging_folder(config), rows) as staging:
            for n, i in enumerate(pending):
                staging.add(n, stages[i].frame.iloc[todo[i]], stages[i].keys[todo[i]])
            _run_on_ray(config, model, [stages[i] for i in pending], [caches[i] for i in pending], staging,
                        lambda n, positions, scores: parts[n].append(scores.assign(_position=positions)))  # fmt: skip
        for n, i in enumerate(pending):
            frame = pd.concat(parts[n], ignore_index=True).sort_values("_position", kind="stable")
            computed[i] = frame.drop(columns="_position").reset_index(drop=True)
    elif pending:
        from magpie_teach.scoring.scorers import load_scorer, load_scorer_model, score_frame

        if session is not None and session.scorer is not None and session.scorer[0] == model:
            _, scorer, tokenizer = session.scorer
        elif tokenizer is None:
            scorer, tokenizer = load_scorer(stages[pending[0]].kind, model, config.dtype, config.device)
        else:  # the one the cache identity was read from
            scorer = load_scorer_model(stages[pending[0]].kind, model, config.dtype, config.device)
        for i in pending:
            stage, keys, cache = stages[i], stages[i].keys[todo[i]], caches[i]

            def on_window(start: int, rows: pd.DataFrame, keys: np.ndarray = keys, cache: Any = cache) -> None:
                if cache is not None:
                    cache.add(keys[start : start + len(rows)], rows)

            computed[i] = score_frame(stage.kind, scorer, tokenizer, stage.frame.iloc[todo[i]], config.max_length,
                                      config.batch_tokens, on_window=on_window, desc=stage.desc)  # fmt: skip
            if "padding_fraction" in computed[i].attrs:
                logger.info("%s: padding was %.1f%% of computed tokens", stage.desc,
                            100 * computed[i].attrs["padding_fraction"])  # fmt: skip
        if session is None:
            _free(scorer)
        elif session.scorer is None or session.scorer[0] != model:
            session.release()
            session.scorer = (model, scorer, tokenizer)
    out = []
    for i, (found, values) in enumerate(results):
        if i not in computed:
            out.append(values)
            continue
        scores = computed[i].reset_index(drop=True)
        if values is not None:
            order = np.argsort(np.concatenate([np.flatnonzero(found), todo[i]]), kind="stable")
            scores = pd.concat([values, scores], ignore_index=True).iloc[order].reset_index(drop=True)
        out.append(scores)
    return out


def _stages(model: str, kinds: list[str], rows: pd.DataFrame, keys: np.ndarray) -> list[_Stage]:
    """The scoring stages of ``model`` over a frame of validated rows (whose score-cache keys are ``keys``): the
    reward model's one, or a causal LM's compatibility losses and L(x) (one row per instruction, with its ``id``)."""
    from magpie_teach.scoring.cache import example_keys

    texts = rows[["instruction", "response", *(["context"] if "context" in rows.columns else [])]]
    if kinds == ["reward"]:
        return [_Stage("reward", texts, keys, "reward")]
    short = short_name(model)
    instructions = rows.drop_duplicates("id")[["id", "instruction"]].reset_index(drop=True)
    return [_Stage("compat", texts, keys, f"compat {short}"),
            _Stage("instruction-loss", instructions, example_keys(instructions["instruction"].tolist()),
                   f"L(x) {short}")]  # fmt: skip


def _staging_folder(config: RankConfig) -> Path:
    """Where the rows left to score under one model are staged for Ray Data (in the output folder: every node
    reads it)."""
    return Path(config.output_dir).resolve() / ".ray-staging"


def _run_on_ray(config: RankConfig, model: str, stages: list[_Stage], caches: list, staging: Any,
                on_scores: Any = None) -> None:  # fmt: skip
    """Scores the rows ``staging`` holds (stage ``n`` of them one of ``stages``) on the Ray cluster, stores each
    block in its stage's cache (when there is one) as it arrives, and passes it to ``on_scores(n, positions,
    scores)``."""
    from magpie_teach.progress import Progress
    from magpie_teach.scoring.on_ray import connect, score_on_ray

    connect(config.ray_address)
    bars = {n: Progress(count, stages[n].desc, position=p) for p, (n, count) in enumerate(sorted(staging.counts.items()))}  # fmt: skip

    def on_block(n: int, positions: np.ndarray, keys: np.ndarray, rows: pd.DataFrame) -> None:
        if caches[n] is not None:
            caches[n].add(keys, rows)
        bars[n].update(len(positions))
        if on_scores is not None:
            on_scores(n, positions, rows)

    score_on_ray(model, [stage.kind for stage in stages], staging, num_workers=config.num_workers,
                 gpus_per_worker=config.gpus_per_worker, max_length=config.max_length,
                 batch_tokens=config.batch_tokens, dtype=config.dtype, on_block=on_block)  # fmt: skip
    for bar in bars.values():
        bar.close()


def _lm_scores(config: RankConfig, model_name: str, rows: pd.DataFrame, keys: np.ndarray,
               work: dict | None = None, session: ScoringSession | None = None) -> pd.DataFrame:  # fmt: skip
    """Per-example losses of one causal LM: compat_loss, uncond_loss, instruction loss, token counts."""
    stages = _stages(model_name, ["compat", "instruction-loss"], rows, keys)
    scores, text = _cached(config, model_name, stages, work, session)
    instructions = stages[1].frame
    empty = scores["n_tokens"].to_numpy() == 0
    if empty.any():  # the prompt alone filled max_length: no response token left to score
        bad = rows.loc[empty, ["id", "teacher"]].head(3).to_dict("records")
        raise DataError(
            f"{model_name}: {int(empty.sum())} conversation(s) keep no response token within --max-length "
            f"{config.max_length} (e.g. {bad}); raise --max-length or drop those instructions."
        )
    scores["instr_loss"] = rows["id"].map(dict(zip(instructions["id"], text["loss"]))).to_numpy()
    return scores


def _rewards(config: RankConfig, rows: pd.DataFrame, keys: np.ndarray, work: dict | None = None,
             session: ScoringSession | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(rewards, truncated): a precomputed column, or the reward model's scores."""
    if config.reward_column is not None:
        return rows[config.reward_column].to_numpy(dtype=np.float64), np.zeros(len(rows), dtype=bool)
    (scores,) = _cached(
        config, config.reward_model, _stages(config.reward_model, ["reward"], rows, keys), work, session
    )
    return scores["reward"].to_numpy(dtype=np.float64), scores["truncated"].to_numpy(dtype=bool)


LM_COLUMNS = ("compat_loss", "n_tokens", "n_tokens_full", "truncated", "uncond_loss", "instr_loss")
"""What one base model contributes per example (`score_compatibility` plus the instruction loss L(x))."""


def example_scores(rows: pd.DataFrame, lm: pd.DataFrame, base_model: str) -> pd.DataFrame:
    """The rows of ``scores.parquet`` for one base model: ``rows`` (key, texts, ``reward``,
    ``reward_truncated``) with that model's :data:`LM_COLUMNS` (aligned row by row) and the per-example
    baselines derived from them. `rank` and the scoring stage of `generate` both build their scores here."""
    from magpie_teach.scoring.metrics import ic_ifd, ifd

    frame = rows.assign(base_model=base_model)
    for column in LM_COLUMNS:
        frame[column] = lm[column].to_numpy()
    frame["logprob_norm"] = -frame["compat_loss"]
    frame["ppl_self"] = np.exp(frame["compat_loss"])
    frame["ifd_self"] = ifd(frame["compat_loss"], frame["uncond_loss"])
    frame["ic_ifd_self"] = ic_ifd(frame["compat_loss"], frame["instr_loss"], frame["uncond_loss"])
    return frame


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
    from magpie_teach import artefacts
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
    for model, kinds in _models(config):
        _, caches = session.caches_of(config, model, kinds)
        stages: dict[str, dict] = {}
        seen: set = set()  # an instruction's L(x) is one example, whichever windows its responses fall in
        for rows in stream.windows(data.WINDOW_ROWS if data.WINDOW_ROWS > 0 else stream.n_rows):
            keys = example_keys(rows["instruction"].tolist(), rows["response"].tolist(), _contexts(rows))
            for stage, cache in zip(_stages(model, kinds, rows, keys), caches):
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
    counts = dict(stream.counts)
    work: dict = {}
    session = ScoringSession()
    window = _window_rows(config, stream.n_rows, session)
    if window >= stream.n_rows:  # one window: scored and aggregated in memory
        (rows,) = stream.windows(stream.n_rows)
        scores = score_rows(config, rows, work)
        counts.update(truncation_counts(config, scores))
        return write_rank_outputs(config, scores, stream, counts, performance, work)
    # several windows: each model scores every window into the score cache (loaded once), then the scores are read
    # back from the cache a window at a time and written, base model by base model; what the ranking reads of each
    # row stays in memory, and of the caches only those of the base model being written, the reward and reference
    for model, kinds in _models(config):
        print(f"{short_name(model)}: scoring {stream.n_rows} responses in windows of {window}", file=sys.stderr)
        if config.ray_address:
            _fill_on_ray(config, model, kinds, stream, window, work, session)
        else:
            for rows in stream.windows(window):
                _fill(config, model, kinds, rows, work, session)
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


def _window_rows(config: RankConfig, n_rows: int, session: ScoringSession) -> int:
    """Rows scored per window: :data:`magpie_teach.data.WINDOW_ROWS`, or all of them where the score cache cannot
    carry scores from one pass to the next (``--no-cache``, a model whose identity is unknown)."""
    from magpie_teach import data

    if not config.cache or data.WINDOW_ROWS <= 0 or n_rows <= data.WINDOW_ROWS:
        return n_rows
    for model, kinds in _models(config):
        _, caches = session.caches_of(config, model, kinds)
        if any(cache is None for cache in caches):
            logger.warning("%s: no score-cache identity; every response is scored in memory at once", model)
            return n_rows
    return data.WINDOW_ROWS


def _models(config: RankConfig) -> list[tuple[str, list[str]]]:
    """Each model `rank` runs with the kinds of its scorers, in the order they run."""
    models = [(config.reward_model, ["reward"])] if config.reward_model else []
    models += [
        (m, ["compat", "instruction-loss"]) for m in filter(None, [config.reference_model, *config.base_models])
    ]
    return models


def _fill(config: RankConfig, model: str, kinds: list[str], rows: pd.DataFrame, work: dict,
          session: ScoringSession) -> None:  # fmt: skip
    """Scores into the score cache what it lacks of one window under ``model``, through the stages
    :func:`score_rows` reads them back with."""
    from magpie_teach.scoring.cache import example_keys

    keys = example_keys(rows["instruction"].tolist(), rows["response"].tolist(), _contexts(rows))
    if kinds == ["reward"]:
        _rewards(config, rows, keys, work, session)
    else:
        _lm_scores(config, model, rows, keys, work, session)


def _fill_on_ray(config: RankConfig, model: str, kinds: list[str], stream: Any, window: int, work: dict,
                 session: ScoringSession) -> None:  # fmt: skip
    """Scores into the score cache what it lacks of every window under ``model``, on the Ray cluster: a window at a
    time, the rows the cache lacks are staged (an instruction once, though its answers fall in several windows),
    then one Ray Data pipeline scores them all, so that each actor loads the model once."""
    from magpie_teach.scoring.cache import example_keys
    from magpie_teach.scoring.compatibility import DEFAULT_WINDOW
    from magpie_teach.scoring.on_ray import Staging, shard_rows

    _, caches = session.caches_of(config, model, kinds)
    staged: set = set()  # L(x) keys staged already
    stages: list[_Stage] = []
    seen: dict[str, list[int]] = {}
    rows_per_shard = shard_rows(stream.n_rows * len(kinds), config.num_workers, DEFAULT_WINDOW)
    with Staging(_staging_folder(config), rows_per_shard) as staging:
        for rows in stream.windows(window):
            keys = example_keys(rows["instruction"].tolist(), rows["response"].tolist(), _contexts(rows))
            stages = _stages(model, kinds, rows, keys)
            for n, (stage, cache) in enumerate(zip(stages, caches)):
                found, _ = cache.lookup(stage.keys)
                repeat = np.zeros(len(stage.keys), bool)
                if stage.kind == "instruction-loss":  # staged by an earlier window: scored once, not read back
                    repeat = ~found & np.fromiter((key in staged for key in stage.keys), bool, len(stage.keys))
                    staged.update(stage.keys[~found & ~repeat])
                todo = ~found & ~repeat
                staging.add(n, stage.frame.iloc[np.flatnonzero(todo)], stage.keys[todo])
                counted = seen.setdefault(stage.desc, [0, 0, 0])
                counted[0] += int(todo.sum())
                counted[1] += int(found.sum())
                counted[2] += int(repeat.sum())
        for desc, (scored, from_cache, repeated) in seen.items():
            _tally(work, desc, scored, from_cache, repeated=repeated)
        _run_on_ray(config, model, stages, caches, staging)


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


def truncation_counts(config: RankConfig, scores: pd.DataFrame) -> dict[str, int]:
    """How many examples the reward model, and each base model, saw cut at ``max_length`` (summary.json's counts)."""
    first = scores[scores["base_model"] == config.base_models[0]]
    counts = {"reward_truncated": int(first["reward_truncated"].sum())}
    for base in config.base_models:
        counts[f"truncated[{base}]"] = int(scores.loc[scores["base_model"] == base, "truncated"].sum())
    return counts


def score_rows(
    config: RankConfig, rows: pd.DataFrame, work: dict | None = None, session: ScoringSession | None = None
) -> pd.DataFrame:
    """Per-example scores of validated long-format ``rows`` under every base model of ``config`` (the rows of
    ``scores.parquet``): the reward (model or column), each base model's losses, the reference model's
    baselines. `rank` scores its data here, and `probe` each round's new responses. Every score is read from
    the score cache when it holds it; ``work`` gets, per stage, how many examples were scored and read."""
    from magpie_teach.data import carried_columns, text_columns
    from magpie_teach.scoring.cache import example_keys
    from magpie_teach.scoring.metrics import ic_ifd, ifd

    keys = example_keys(rows["instruction"].tolist(), rows["response"].tolist(), _contexts(rows))

    base_rows = rows[text_columns(rows) + carried_columns(rows)].copy()
    base_rows["reward"], base_rows["reward_truncated"] = _rewards(config, rows, keys, work, session)
    reference = None
    if config.reference_model:
        ref = _lm_scores(config, config.reference_model, rows, keys, work, session)
        reference = pd.DataFrame(
            {
                "loss_ref": ref["compat_loss"],
                "ppl_ref": np.exp(ref["compat_loss"]),
                "ifd_ref": ifd(ref["compat_loss"], ref["uncond_loss"]),
                "ic_ifd_ref": ic_ifd(ref["compat_loss"], ref["instr_loss"], ref["uncond_loss"]),
            }
        )
    frames = []
    for base in config.base_models:
        frame = example_scores(base_rows, _lm_scores(config, base, rows, keys, work, session), base)
        if reference is not None:
            frame = pd.concat([frame.reset_index(drop=True), reference], axis=1)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
