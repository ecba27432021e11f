"""`magpie-teach rank`: rank teachers per base model by CAR, with every baseline of the paper beside it."""

import dataclasses
import gc
import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach.errors import ConfigError, DataError
from magpie_teach.scoring.metrics import short_name
from magpie_teach.settings import CARSettings, ConfidenceSettings, ModelRunSettings

logger = logging.getLogger(__name__)


@dataclass
class RankConfig(CARSettings, ConfidenceSettings, ModelRunSettings):
    """`rank`'s settings; CAR's (``beta``, ``reward_shift``), the bootstrap's (``bootstrap``, ``confidence``,
    ``bootstrap_seed``) and the model run's (``max_length``, ``batch_tokens``, ``dtype``, ``device``) are
    inherited from :mod:`magpie_teach.settings`."""

    data: str = field(
        metadata={
            "help": "Responses: a jsonl/parquet/csv file, a saved datasets folder, or a Hub id org/name (long or Generator-Zoo wide format)."
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
    performance_columns: list[str] = field(
        default_factory=lambda: ["AE2_LC_WR", "ArenaHard_WR"],
        metadata={"help": "Benchmark columns averaged into AP; repeat the flag.", "flag": "--performance-column"},
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
    cache: bool = field(default=True, metadata={"help": "Keep finished work under OUTPUT/.cache so a rerun resumes."})

    def __post_init__(self) -> None:
        if not self.base_models:
            raise ConfigError("give at least one --base-model")
        if (self.reward_model is None) == (self.reward_column is None):
            raise ConfigError("give exactly one of --reward-model and --reward-column")
        self.check_car()
        self.check_confidence()
        self.check_run()


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


def _cache_dir(config: RankConfig, stage: str, model: str, fingerprint: str) -> Path | None:
    if not config.cache:
        return None
    stamp = [model, config.dtype, str(config.max_length), fingerprint]
    path = Path(model)
    if path.is_dir():  # a rebuilt local model must not reuse old scores
        stamp += [f"{p.name}:{p.stat().st_mtime_ns}" for p in sorted(path.glob("*.safetensors"))]
    key = hashlib.sha1("|".join(stamp).encode()).hexdigest()[:12]
    from magpie_teach.artefacts import slug

    name = slug(short_name(model))
    return Path(config.output_dir) / ".cache" / stage / f"{name}-{key}"


def _free(*objects: Any) -> None:
    del objects
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _contexts(rows: pd.DataFrame) -> list | None:
    """The earlier turns of multi-turn rows (a ``context`` column), else None."""
    return rows["context"].tolist() if "context" in rows.columns else None


def _lm_scores(config: RankConfig, model_name: str, rows: pd.DataFrame, fingerprint: str) -> pd.DataFrame:
    """Per-example losses of one causal LM: compat_loss, uncond_loss, instruction loss, token counts."""
    from magpie_teach.modeling import load_model, load_tokenizer
    from magpie_teach.scoring.compatibility import score_compatibility, score_text_loss

    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, "causal-lm", config.dtype, config.device)
    short = short_name(model_name)
    scores = score_compatibility(
        model,
        tokenizer,
        rows["instruction"].tolist(),
        rows["response"].tolist(),
        max_length=config.max_length,
        batch_tokens=config.batch_tokens,
        cache_dir=_cache_dir(config, "compat", model_name, fingerprint),
        desc=f"compat {short}",
        contexts=_contexts(rows),
    )
    instructions = rows.drop_duplicates("id")[["id", "instruction"]]
    text = score_text_loss(
        model,
        tokenizer,
        instructions["instruction"].tolist(),
        max_length=config.max_length,
        batch_tokens=config.batch_tokens,
        cache_dir=_cache_dir(config, "instruction", model_name, fingerprint),
        desc=f"L(x) {short}",
    )
    empty = scores["n_tokens"].to_numpy() == 0
    if empty.any():  # the prompt alone filled max_length: no response token left to score
        bad = rows.loc[empty, ["id", "teacher"]].head(3).to_dict("records")
        raise DataError(
            f"{model_name}: {int(empty.sum())} conversation(s) keep no response token within --max-length "
            f"{config.max_length} (e.g. {bad}); raise --max-length or drop those instructions."
        )
    scores["instr_loss"] = rows["id"].map(dict(zip(instructions["id"], text["loss"]))).to_numpy()
    logger.info("%s: padding was %.1f%% of computed tokens", model_name, 100 * scores.attrs["padding_fraction"])
    _free(model)
    return scores


def _rewards(config: RankConfig, rows: pd.DataFrame, fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
    """(rewards, truncated): a precomputed column, or the reward model's scores (cached for reruns)."""
    if config.reward_column is not None:
        return rows[config.reward_column].to_numpy(dtype=np.float64), np.zeros(len(rows), dtype=bool)
    from magpie_teach.artefacts import write_atomic
    from magpie_teach.modeling import load_model, load_tokenizer
    from magpie_teach.scoring.reward import score_reward

    cache = _cache_dir(config, "reward", config.reward_model, fingerprint)
    if cache is not None and (cache / "rewards.npz").exists():
        saved = np.load(cache / "rewards.npz")
        return saved["rewards"], saved["truncated"]
    tokenizer = load_tokenizer(config.reward_model)
    model = load_model(config.reward_model, "reward", config.dtype, config.device)
    rewards, truncated = score_reward(
        model,
        tokenizer,
        rows["instruction"].tolist(),
        rows["response"].tolist(),
        max_length=config.max_length,
        batch_tokens=config.batch_tokens,
        contexts=_contexts(rows),
    )
    _free(model)
    if cache is not None:

        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
                np.savez(f, rewards=rewards, truncated=truncated)

        write_atomic(cache / "rewards.npz", save)
    return rewards, truncated


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
    config: RankConfig, scores: pd.DataFrame, loaded: Any, counts: dict, performance: pd.DataFrame | None = None
) -> RankResult:
    """Aggregates per-example ``scores`` and writes a `rank` output folder (shared with `generate`'s scoring)."""
    from magpie_teach import artefacts
    from magpie_teach.config import dump_config
    from magpie_teach.scoring.metrics import aggregate, correlations

    out = Path(config.output_dir)
    files = artefacts.RunOutputs(out, "rank")
    ranking = aggregate(scores, beta=config.beta, reward_shift=config.reward_shift)
    corr = correlations(ranking, performance) if performance is not None else None
    verdicts: list = []
    if config.bootstrap:
        from magpie_teach.scoring.confidence import add_rho_intervals, bootstrap_ranking, spearman_intervals

        settings = {"n_replicates": config.bootstrap, "confidence": config.confidence, "seed": config.bootstrap_seed}
        ranking, verdicts = bootstrap_ranking(scores, ranking, **settings)
        if corr is not None:
            metrics = [m for m in corr.index if m != "n_teachers"]
            corr = add_rho_intervals(corr, spearman_intervals(ranking, performance, metrics, **settings))
    files.write(artefacts.SCORES, lambda tmp: scores.to_parquet(tmp, index=False))
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


def _rank(config: RankConfig) -> RankResult:
    from magpie_teach.data import load_responses, sample_instructions
    from magpie_teach.modeling import check_model_source
    from magpie_teach.scoring.metrics import load_performance

    for flag, models in (("--base-model", config.base_models), ("--reward-model", [config.reward_model]),
                         ("--reference-model", [config.reference_model])):  # fmt: skip
        for model in filter(None, models):
            check_model_source(model, flag)  # a mistyped path fails now, not after the data is read

    performance = None
    if config.performance:
        performance = load_performance(config.performance, config.performance_columns, config.aliases)
    loaded = load_responses(
        config.data,
        revision=config.revision,
        split=config.split,
        reward_column=config.reward_column,
        drop_invalid=config.drop_invalid,
        teachers=config.teachers or None,
    )
    rows = loaded.rows
    counts = dict(loaded.counts)
    if performance is not None:  # names are matched now, before any model loads
        from magpie_teach.scoring.names import match_names

        teachers = sorted(rows["teacher"].unique())
        for match in match_names(teachers, config.base_models, performance, f"--performance {config.performance}"):
            print(f"performance: {match.line()}", file=sys.stderr, flush=True)
    if config.sample is not None:
        rows = sample_instructions(rows, config.sample, config.seed)
        counts["rows_sampled"] = len(rows)
    fingerprint = hashlib.sha1(
        (loaded.fingerprint + json.dumps([config.sample, config.seed, config.teachers])).encode()
    ).hexdigest()[:16]
    scores = score_rows(config, rows, fingerprint)
    first = scores[scores["base_model"] == config.base_models[0]]
    counts["reward_truncated"] = int(first["reward_truncated"].sum())
    for base in config.base_models:
        counts[f"truncated[{base}]"] = int(scores.loc[scores["base_model"] == base, "truncated"].sum())
    return write_rank_outputs(config, scores, loaded, counts, performance)


def score_rows(config: RankConfig, rows: pd.DataFrame, fingerprint: str = "") -> pd.DataFrame:
    """Per-example scores of validated long-format ``rows`` under every base model of ``config`` (the rows of
    ``scores.parquet``): the reward (model or column), each base model's losses, the reference model's
    baselines. `rank` scores its data here, and `probe` each round's new responses."""
    from magpie_teach.data import carried_columns, text_columns
    from magpie_teach.scoring.metrics import ic_ifd, ifd

    base_rows = rows[text_columns(rows) + carried_columns(rows)].copy()
    base_rows["reward"], base_rows["reward_truncated"] = _rewards(config, rows, fingerprint)
    reference = None
    if config.reference_model:
        ref = _lm_scores(config, config.reference_model, rows, fingerprint)
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
        frame = example_scores(base_rows, _lm_scores(config, base, rows, fingerprint), base)
        if reference is not None:
            frame = pd.concat([frame.reset_index(drop=True), reference], axis=1)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
