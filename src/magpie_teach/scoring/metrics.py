"""Teacher-quality metrics, per example and per (teacher, base model), and their rank correlation with performance."""

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from magpie_teach.artefacts import short_name  # noqa: F401 - re-exported: the engine's readers name models by it
from magpie_teach.errors import ConfigError
from magpie_teach.settings import DEFAULT_BETA, DEFAULT_PERFORMANCE_COLUMNS  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metric:
    """A teacher-level metric of ``ranking.csv``: its column, whether a higher value means a better teacher (the
    orientation of its rank and of its rho with performance), its label in tables and figures, and whether `rank`'s
    printout and `report` show it by default (when the ranking has it). A new metric is a row here and its
    teacher-level mean in :func:`aggregate_sums` (its per-example
    score, if new, in :func:`magpie_teach.scoring.executor.example_scores`)."""

    name: str
    higher_is_better: bool
    label: str
    shown: bool = True


METRICS = (
    Metric("car", True, "CAR"),
    Metric("reward", True, "reward"),
    Metric("compat_loss", False, "compat. loss"),
    Metric("length", True, "length"),  # longer responses score better on AlpacaEval 2 / Arena-Hard (paper's baseline)
    Metric("ppl_self", False, "PPL (base)"),
    Metric("ifd_self", True, "IFD (base)"),  # Li et al. (IFD): a higher IFD marks a more informative response
    Metric("ic_ifd_self", True, "IC-IFD (base)", shown=False),
    Metric("ppl_ref", False, "PPL (ref)"),
    Metric("ifd_ref", True, "IFD (ref)"),
    Metric("ic_ifd_ref", True, "IC-IFD (ref)", shown=False),
)
METRIC_DIRECTIONS = {m.name: m.higher_is_better for m in METRICS}
"""metric -> True when a higher value means a better teacher (the orientation used for ranks and rho)."""
METRIC_LABELS = {m.name: m.label for m in METRICS}
SHOWN_METRICS = [m.name for m in METRICS if m.shown]


def car(reward: float | np.ndarray, compat_loss: float | np.ndarray, beta: float = DEFAULT_BETA) -> float | np.ndarray:
    """Compatibility-Adjusted Reward: CAR = r / (1 + beta * L), higher is better.

    ``r`` is the teacher's mean reward and ``L`` the base model's mean compatibility loss on the
    teacher's responses. Only meaningful for positive rewards: see :func:`resolve_reward_shift`.
    """
    return reward / (1.0 + beta * compat_loss)


def perplexity(loss: float | np.ndarray) -> float | np.ndarray:
    """PPL = exp(L), with L a mean per-token negative log-likelihood."""
    return np.exp(loss)


def ifd(cond_loss: float | np.ndarray, uncond_loss: float | np.ndarray) -> float | np.ndarray:
    """Instruction-Following Difficulty: IFD = L(y | x) / L(y)."""
    return np.asarray(cond_loss) / np.asarray(uncond_loss)


def ic_ifd(
    cond_loss: float | np.ndarray, instruction_loss: float | np.ndarray, uncond_loss: float | np.ndarray
) -> float | np.ndarray:
    """Instruction-Conditioned IFD: IC-IFD = L(y | x) / (L(x) * L(y))."""
    return np.asarray(cond_loss) / (np.asarray(instruction_loss) * np.asarray(uncond_loss))


def resolve_reward_shift(teacher_rewards: pd.Series, reward_shift: str | float | None) -> float:
    """Decides the affine shift c in r' = r + c applied to rewards before CAR.

    CAR only orders teachers sensibly when every teacher's mean reward is positive: a negative
    reward divided by a larger denominator moves *closer to zero*, i.e. looks better. So:

    * ``None`` / ``"none"``: no shift; when any mean reward is <= 0 a warning names the teachers
      (and the ranking records ``car_reward_shift = 0``) - CAR is then not trustworthy;
    * ``"auto"``: c = -min + (max - min), putting the lowest teacher mean at the spread of the
      means (1 when all means are equal), so all are positive and their order is unchanged;
    * a number: that c.
    """
    if reward_shift in (None, "none"):
        bad = teacher_rewards[teacher_rewards <= 0]
        if len(bad):
            message = (
                f"CAR assumes positive rewards, but mean reward <= 0 for {', '.join(map(str, bad.index))} "
                f"(min {teacher_rewards.min():.4g}); CAR then prefers incompatible teachers. "
                "Use --reward-shift auto (or a number) to shift rewards affinely before CAR."
            )
            warnings.warn(message, stacklevel=3)  # the CLI shows it once, as a log line (logging.captureWarnings)
        return 0.0
    if reward_shift == "auto":
        low, high = float(teacher_rewards.min()), float(teacher_rewards.max())
        if low > 0:
            return 0.0
        spread = high - low
        return -low + (spread if spread > 0 else 1.0)
    try:
        return float(reward_shift)
    except (TypeError, ValueError):
        raise ConfigError(f"reward_shift={reward_shift!r}: expected 'none', 'auto' or a number.") from None


SUMMED_COLUMNS = ("reward", "compat_loss", "n_tokens_full", "truncated", "hit_max_new_tokens", "loss_ref", "ifd_self",
                  "ic_ifd_self", "ifd_ref", "ic_ifd_ref")  # fmt: skip
"""What :func:`sum_scores` sums per (teacher, base model): every aggregated figure is a sum or a mean of these."""


def sum_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Per (teacher, base_model), in the order the pairs first appear: ``n`` (rows), and for each of
    :data:`SUMMED_COLUMNS` present its sum and, as ``COLUMN:n``, how many of its values are not NaN. Sums of parts
    of the scores add up to the sums of the whole (:func:`add_sums`), so scores can be aggregated as they stream."""
    present = [c for c in SUMMED_COLUMNS if c in scores.columns]
    grouped = scores.groupby(["teacher", "base_model"], sort=False, observed=True)
    sums = grouped[present].sum()
    counts = grouped[present].count().add_suffix(":n")
    return pd.concat([grouped.size().rename("n"), sums, counts], axis=1).reset_index()


def add_sums(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The :func:`sum_scores` of scores given in parts (the pairs in the order they first appear)."""
    return pd.concat(parts, ignore_index=True).groupby(["teacher", "base_model"], sort=False).sum().reset_index()


def aggregate(
    scores: pd.DataFrame, beta: float = DEFAULT_BETA, reward_shift: str | float | None = None
) -> pd.DataFrame:
    """Per (teacher, base_model) metrics from per-example scores, with a rank per metric (1 = best); one row per
    pair, in the order the pairs first appear in ``scores``.

    ``reward`` is the mean per-example reward, ``compat_loss`` the mean per-example compatibility
    loss, ``car`` = :func:`car` of those two, ``length`` the mean response length in base-model
    tokens, ``n_truncated`` the conversations cut at the scoring ``max_length``, ``n_hit_max_new_tokens`` (when the
    data has `generate`'s flag) the responses that stopped at the teacher's generation cap, ``ppl_*`` = exp of the mean loss, ``ifd_*``/``ic_ifd_*`` means of the per-example values.
    """
    return aggregate_sums(sum_scores(scores), beta, reward_shift)


def aggregate_sums(
    sums: pd.DataFrame, beta: float = DEFAULT_BETA, reward_shift: str | float | None = None
) -> pd.DataFrame:
    """:func:`aggregate` from the :func:`sum_scores` of the per-example scores (means skip NaN, as pandas' do)."""

    def mean(column: str) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (sums[column] / sums[f"{column}:n"]).to_numpy(dtype=np.float64)

    table = sums[["teacher", "base_model", "n"]].copy()
    table["reward"] = mean("reward")
    table["compat_loss"] = mean("compat_loss")
    table["length"] = mean("n_tokens_full")
    table["n_truncated"] = sums["truncated"].astype(np.int64)
    if "hit_max_new_tokens" in sums.columns:
        table["n_hit_max_new_tokens"] = sums["hit_max_new_tokens"].astype(np.int64)
    for suffix in ("self", "ref"):
        if f"ifd_{suffix}" in sums.columns:
            table[f"ppl_{suffix}"] = perplexity(mean(f"loss_{suffix}" if suffix == "ref" else "compat_loss"))
            table[f"ifd_{suffix}"] = mean(f"ifd_{suffix}")
            table[f"ic_ifd_{suffix}"] = mean(f"ic_ifd_{suffix}")
    teacher_rewards = table.groupby("teacher")["reward"].first()
    shift = resolve_reward_shift(teacher_rewards, reward_shift)
    table["car"] = car(table["reward"] + shift, table["compat_loss"], beta)
    table["car_beta"] = beta
    table["car_reward_shift"] = shift
    for metric, higher in METRIC_DIRECTIONS.items():
        if metric in table.columns:
            table[f"rank_{metric}"] = (
                table.groupby("base_model")[metric].rank(ascending=not higher, method="min").astype("Int64")
            )
    first = ["teacher", "base_model", "n", "car", "reward", "compat_loss", "length"]
    return table[first + [c for c in table.columns if c not in first]]


def load_performance(
    path: str, columns: Sequence[str] = DEFAULT_PERFORMANCE_COLUMNS, aliases: str | None = None
) -> pd.DataFrame:
    """Reads a performance table (teacher, base_model and benchmark columns; ``#`` lines are comments)
    and adds ``ap``, the mean of ``columns``. A ``generator`` column is accepted for ``teacher``. The name
    aliases its rows are matched with (the shipped ones, then the file ``aliases``) ride along in
    ``attrs['aliases']`` (see :mod:`magpie_teach.scoring.names`)."""
    from magpie_teach.errors import DataError
    from magpie_teach.scoring.names import load_aliases

    alias_map = load_aliases(aliases)

    try:
        frame = pd.read_csv(path, comment="#")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: could not be read as CSV: {err}") from err
    if "teacher" not in frame.columns and "generator" in frame.columns:
        frame = frame.rename(columns={"generator": "teacher"})
    missing = [c for c in ("teacher", "base_model", *columns) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}.")
    values = frame[list(columns)].apply(pd.to_numeric, errors="coerce")
    if values.isna().any().any():
        row, column = next((r, c) for c in columns for r in frame.index if pd.isna(values.loc[r, c]))
        raise DataError(f"{path}: row {row + 1}, column {column!r}: not a number ({frame.loc[row, column]!r}).")
    frame["ap"] = values.mean(axis=1)
    duplicated = frame.duplicated(["teacher", "base_model"], keep=False)
    if duplicated.any():
        first = frame[duplicated].iloc[0]
        raise DataError(
            f"{path}: (teacher, base_model) = ({first['teacher']!r}, {first['base_model']!r}) appears twice."
        )
    frame.attrs["aliases"] = alias_map
    return frame


def match_performance(group: pd.DataFrame, performance: pd.DataFrame, base: str, warn: bool = False) -> pd.DataFrame:
    """One base model's ranking rows joined with their AP (column ``ap``), teachers and base models matched by
    their keys (:mod:`magpie_teach.scoring.names`: Hub organisation, case and the paper's spellings aside, then
    the aliases of ``performance.attrs``); ConfigError when fewer than 3 teachers match."""
    from magpie_teach.scoring.names import key, load_aliases

    aliases = performance.attrs.get("aliases") or load_aliases()
    perf = performance.assign(
        _t=performance["teacher"].map(lambda n: key(n, aliases)),
        _b=performance["base_model"].map(lambda n: key(n, aliases)),
    )
    merged = group.assign(_t=group["teacher"].map(lambda n: key(n, aliases)), _b=key(base, aliases)).merge(
        perf[["_t", "_b", "ap"]], on=["_t", "_b"], how="inner"
    )
    if len(merged) < 3:
        raise ConfigError(
            f"base model {base!r}: only {len(merged)} teacher(s) have performance numbers; at least 3 are needed "
            f"(teachers: {sorted(group['teacher'])}; performance base models: {sorted(perf['_b'].unique())})."
        )
    unmatched = sorted(set(group["teacher"]) - set(merged["teacher"]))
    if unmatched and warn:
        logger.warning("base model %s: no performance numbers for %s", base, unmatched)
    return merged


def correlations(
    ranking: pd.DataFrame, performance: pd.DataFrame, metrics: Sequence[str] | None = None
) -> pd.DataFrame:
    """Spearman rho between each metric (oriented so that higher is better) and AP, per base model, plus the mean.

    Teachers and base models match by their keys (:mod:`magpie_teach.scoring.names`: a local folder
    ``models/Qwen2-1.5B`` or the Hub id ``Qwen/Qwen2-1.5B`` matches ``Qwen2-1.5B`` in the performance table).

    Returns:
        The paper's Table 4 layout: one row per metric, one column per base model, and ``mean``.
    """
    from scipy.stats import spearmanr

    metrics = [m for m in (metrics or METRIC_DIRECTIONS) if m in ranking.columns]
    result: dict[str, dict[str, float]] = {}
    for base, group in ranking.groupby("base_model", sort=False):
        merged = match_performance(group, performance, str(base), warn=True)
        column = {}
        for metric in metrics:
            sign = 1.0 if METRIC_DIRECTIONS[metric] else -1.0
            values = sign * merged[metric].astype(float)
            if values.nunique() < 2 or merged["ap"].nunique() < 2:  # rho is undefined for a constant input
                column[metric] = float("nan")
                continue
            column[metric] = float(spearmanr(values, merged["ap"]).statistic)
        column["n_teachers"] = float(len(merged))
        result[str(base)] = column
    table = pd.DataFrame(result)
    table["mean"] = table.mean(axis=1)
    table.loc["n_teachers", "mean"] = float("nan")
    table.index.name = "metric"
    return table
