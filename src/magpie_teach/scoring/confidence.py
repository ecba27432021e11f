"""How sure a ranking is: a paired bootstrap over instructions, p(best), and the beta range of the top teacher.

The bootstrap is *paired*: each replicate draws one multiset of instructions (with replacement) and every
teacher is measured on exactly that multiset, so a difference between two teachers is not blurred by which
instructions each happened to get. The protocol, which a reference can reproduce with numpy alone:

* per base model, the instructions are the distinct ``id`` values in order of first appearance;
* ``rng = numpy.random.default_rng(seed)``, and replicate ``b`` is ``rng.integers(0, n, size=n)`` (drawn in
  blocks of replicates, which gives the same numbers as one draw);
* a teacher's replicate mean is the mean of its per-example values over the drawn instructions (an instruction
  drawn twice counts twice; with best-of-N, each of its responses counts, as in the point estimate; an
  instruction the teacher has no response for is left out of its mean);
* CAR of a replicate is ``(mean reward + shift) / (1 + beta * mean compat_loss)`` with the ranking's shift
  (``car_reward_shift``), so the interval is about the data, not about the shift rule;
* intervals are percentile intervals (``numpy.quantile``, linear) at ``(1 - confidence) / 2`` and
  ``(1 + confidence) / 2``.

``p_best`` is the probability that a teacher's true CAR is the highest (:func:`posterior_p_best`): a
hierarchical normal model of the teachers' CARs, with the bootstrap's covariance as the noise, that shrinks a
lead no larger than the noise instead of taking the luckiest teacher's lead at face value. The share of
replicates a teacher leads (:func:`share_of_firsts`, the p_best of earlier versions) overstates in close races:
there a leader shown 0.9 was truly best about 8 times in 10. ``benchmarks/sim_statistics.py p_best`` measures
both against planted truths. Sums to 1 per base model.

No teacher is called *separated* (nor a choice *decided* by ``select --require-decided`` or ``probe``) on fewer
than :data:`MIN_DECISION_INSTRUCTIONS` instructions or :data:`MIN_DISTINCT_SCORES` distinct scores per teacher.

Every base model uses the same seed, so the same instructions are drawn for every base model too.
"""

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from magpie_teach.errors import ConfigError
from magpie_teach.scoring.metrics import METRIC_DIRECTIONS, car, short_name
from magpie_teach.settings import DEFAULT_BOOTSTRAP, DEFAULT_BOOTSTRAP_SEED, DEFAULT_CONFIDENCE, ConfidenceSettings

INTERVAL_METRICS = ("car", "reward", "compat_loss")
"""Metrics that get a bootstrap interval (``<metric>_ci_low``, ``<metric>_ci_high`` in ``ranking.csv``)."""

MIN_DECISION_INSTRUCTIONS = 20
"""The fewest instructions on which a teacher is called separated or decided (by `rank`, `select
--require-decided` and `probe`): a bootstrap of one or a handful of instructions has almost no variance, so
its intervals and its p_best would speak for evidence that is not there."""

MIN_DISTINCT_SCORES = 5
"""The fewest distinct per-response scores (reward, compatibility loss) each compared teacher needs for the same
verdicts: a teacher whose scores are all equal gives the bootstrap nothing to vary."""

_BLOCK_CELLS = 4_000_000  # replicates x instructions drawn at once: bounds memory on a 100K-instruction grid


def draw_counts(n_items: int, n_replicates: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Blocks of a (replicates x items) matrix: how often each item is drawn in each replicate."""
    block = max(1, _BLOCK_CELLS // max(n_items, 1))
    for start in range(0, n_replicates, block):
        rows = min(block, n_replicates - start)
        idx = rng.integers(0, n_items, size=(rows, n_items))
        flat = idx + n_items * np.arange(rows)[:, None]
        yield np.bincount(flat.ravel(), minlength=rows * n_items).reshape(rows, n_items).astype(np.float64)


def replicate_means(
    sums: dict[str, np.ndarray], counts: np.ndarray, n_replicates: int, seed: int
) -> dict[str, np.ndarray]:
    """Paired bootstrap means. ``sums[name]`` is (teachers x items): the sum of a teacher's values on an item (its
    responses to one instruction, several with best-of-N), ``counts`` how many values that is (0: none). Returns,
    per name, a (replicates x teachers) matrix of each teacher's mean over the values of each replicate's items."""
    rng = np.random.default_rng(seed)
    weights = counts.astype(np.float64).T  # items x teachers
    tables = {name: np.nan_to_num(value).T for name, value in sums.items()}
    out: dict[str, list[np.ndarray]] = {name: [] for name in sums}
    for drawn in draw_counts(counts.shape[1], n_replicates, rng):
        denominator = drawn @ weights
        with np.errstate(invalid="ignore", divide="ignore"):
            for name, table in tables.items():
                out[name].append((drawn @ table) / denominator)
    return {name: np.vstack(blocks) for name, blocks in out.items()}


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1.0 - confidence) / 2.0
    return np.nanquantile(samples, alpha, axis=0), np.nanquantile(samples, 1.0 - alpha, axis=0)


def share_of_firsts(values: np.ndarray) -> np.ndarray:
    """(replicates x teachers) -> per teacher, the share of replicates in which it is highest; ties share."""
    best = values == np.nanmax(values, axis=1, keepdims=True)
    return (best / best.sum(axis=1, keepdims=True)).mean(axis=0)


P_BEST_DRAWS = 4000
"""Monte Carlo draws of the teachers' true CARs behind each ``p_best`` (a seeded, reproducible estimate)."""

_TAU_GRID = 48  # points of the grid over the spread of the teachers' true values (tau)


def posterior_p_best(point: np.ndarray, samples: np.ndarray, seed: int = DEFAULT_BOOTSTRAP_SEED,
                     n_draws: int = P_BEST_DRAWS) -> np.ndarray:  # fmt: skip
    """The probability that each teacher's *true* value is the highest, corrected for picking the leader.

    The share of bootstrap replicates a teacher leads (:func:`share_of_firsts`) is centred on the observed values,
    so the teacher that looks best because it was lucky gets the luck back as confidence: in close races a
    leader shown 0.95 was truly best 84% of the time at 200 instructions and 59% at 50. Here the observed values
    ``point`` (one per teacher) are read as noisy measurements of the true ones, ``point ~ N(mu, S)`` with ``S``
    the covariance of the paired bootstrap ``samples`` (replicates x teachers), and the true values as
    exchangeable, ``mu_i ~ N(m, tau^2)``, with a flat prior on ``m`` and a half-Cauchy prior on ``tau`` whose
    scale is the measurement's own standard error (of a teacher against the others: what an instruction adds to
    every teacher cancels). ``tau`` is integrated over a grid by its marginal likelihood: when the
    teachers' spread is no larger than the noise, the posterior shrinks the leader towards the others and
    ``p_best`` falls towards 1 / T; when the spread is many standard errors it tends to the bootstrap's share.
    Each grid point's posterior is normal, and ``p_best`` is the weighted share of ``n_draws`` seeded draws in
    which a teacher is highest. Sums to 1."""
    point = np.asarray(point, dtype=np.float64)
    k = len(point)
    if k == 1:
        return np.ones(1)
    # teachers in order of their values, so that the seeded draws fall on the same teacher whatever the rows' order
    order = np.argsort(-point, kind="stable")
    point, samples = point[order], np.asarray(samples, dtype=np.float64)[:, order]
    finite = np.all(np.isfinite(samples), axis=1)
    cov = np.cov(samples[finite], rowvar=False) if finite.sum() > 1 else np.zeros((k, k))
    centring = np.eye(k) - np.ones((k, k)) / k
    # the noise of a teacher's value against the others': what every instruction adds to all teachers alike
    # (paired) cancels from it, as it does from the question of which teacher is highest
    scale = float(np.sqrt(max(np.trace(centring @ cov @ centring), 0.0) / (k - 1)))
    # no variance in the data (one instruction; rounding's noise is no noise): nothing tells a lead from noise
    if not scale > 1e-9 * max(float(np.max(np.abs(point))), 1e-300):
        return np.full(k, 1.0 / k)  # pragma: no mutate (the same for every order)
    cov = cov + 1e-9 * scale**2 * np.eye(k)
    spread = float(np.sqrt(np.mean((point - point.mean()) ** 2)))
    taus = np.geomspace(1e-3 * scale, 20.0 * max(scale, spread), _TAU_GRID)
    ones = np.ones(k)
    log_weight = np.empty(_TAU_GRID)
    for g, tau in enumerate(taus):
        v = cov + tau**2 * np.eye(k)
        vi1, vic = np.linalg.solve(v, np.column_stack([ones, point])).T
        a = float(ones @ vi1)
        m = float(ones @ vic) / a  # the mean's estimate under this tau
        quad = float((point - m) @ (vic - m * vi1))  # (point - m)' V^-1 (point - m), from the same solve
        log_lik = -0.5 * np.linalg.slogdet(v)[1] - 0.5 * math.log(a) - 0.5 * quad
        prior = -math.log1p((tau / scale) ** 2)
        log_weight[g] = log_lik + prior + math.log(tau)  # d tau = tau d log tau on the geometric grid
    weight = np.exp(log_weight - log_weight.max())
    weight /= weight.sum()
    z = np.random.default_rng(seed).standard_normal((n_draws, k))
    precision = np.linalg.inv(cov)
    result = np.zeros(k)
    for g in np.flatnonzero(weight > 1e-5):
        posterior_cov = np.linalg.inv(precision + centring / taus[g] ** 2)
        posterior_cov = (posterior_cov + posterior_cov.T) / 2
        mean = posterior_cov @ (precision @ point)
        draws = mean + z @ np.linalg.cholesky(posterior_cov).T
        result += weight[g] * share_of_firsts(draws)
    out = np.empty(k)
    out[order] = result / result.sum()
    return out


def evidence_shortfall(n_instructions: int, n_distinct: int) -> str | None:
    """Why ``n_instructions`` instructions whose least varied teacher has ``n_distinct`` distinct scores are too
    few to decide on, with how many more to score; ``None`` when they are enough (see
    :data:`MIN_DECISION_INSTRUCTIONS` and :data:`MIN_DISTINCT_SCORES`)."""
    if n_instructions < MIN_DECISION_INSTRUCTIONS:
        more = MIN_DECISION_INSTRUCTIONS - n_instructions
        return (f"{n_instructions} instruction(s) are too few to decide on (a decision needs at least "
                f"{MIN_DECISION_INSTRUCTIONS}): score at least {more} more")  # fmt: skip
    if n_distinct < MIN_DISTINCT_SCORES:
        return (f"a teacher's scores take only {n_distinct} distinct value(s) on these {n_instructions} instructions "
                f"(a decision needs at least {MIN_DISTINCT_SCORES}): score more instructions")  # fmt: skip
    return None


def distinct_scores(scores: pd.DataFrame) -> int:
    """The number of distinct (reward, compat_loss) pairs of the teacher that has the fewest."""
    pairs = scores[["teacher", "reward", "compat_loss"]].drop_duplicates()
    return int(pairs.groupby("teacher").size().min()) if len(pairs) else 0


def top_beta_range(reward: np.ndarray, compat_loss: np.ndarray, leader: int) -> tuple[float, float]:
    """The betas (>= 0) over which teacher ``leader`` keeps the highest CAR, computed exactly.

    ``reward`` is the shifted mean reward R and ``compat_loss`` the mean loss L of each teacher. Multiplied by
    the positive denominators, CAR_i(b) > CAR_j(b) is ``(R_i - R_j) + b * (R_i * L_j - R_j * L_i) > 0``, linear
    in b, so the set of betas where the leader beats every other teacher is an interval whose ends are crossing
    points ``b = (R_j - R_i) / (R_i * L_j - R_j * L_i)``. Returns (low, high); ``high`` is ``inf`` when no
    teacher ever overtakes the leader at larger betas. Ties count as not overtaken.
    """
    low, high = 0.0, math.inf
    r_i, l_i = float(reward[leader]), float(compat_loss[leader])
    for j in range(len(reward)):
        if j == leader:
            continue
        constant = r_i - float(reward[j])
        slope = r_i * float(compat_loss[j]) - float(reward[j]) * l_i
        if slope == 0:
            continue  # the gap has one sign for every beta: the leader at `beta` stays ahead of j
        crossing = -constant / slope
        if slope > 0:  # ahead of j for b > crossing
            low = max(low, crossing)
        else:  # ahead of j for b < crossing
            high = min(high, crossing)
    return max(low, 0.0), high


@dataclass
class BaseModelConfidence:
    """What the bootstrap says about one base model's ranking (one entry of ``summary.json``'s ``confidence``)."""

    base_model: str
    n_instructions: int
    leader: str
    runner_up: str | None
    p_best: float
    separated: bool
    """The leader's CAR is above every other teacher's in the paired interval of their difference, on at least
    :data:`MIN_DECISION_INSTRUCTIONS` instructions (see :func:`evidence_shortfall`)."""
    difference_ci: tuple[float, float] | None
    """The paired interval of CAR(leader) - CAR(runner-up)."""
    beta_range: tuple[float, float]
    too_few: str | None = None
    """Why the data are too few to decide on (:func:`evidence_shortfall`); ``None`` when they are enough."""

    def to_json(self) -> dict:
        high = self.beta_range[1]
        return {
            "base_model": self.base_model,
            "n_instructions": self.n_instructions,
            "leader": self.leader,
            "runner_up": self.runner_up,
            "p_best": self.p_best,
            "separated": self.separated,
            "difference_ci": list(self.difference_ci) if self.difference_ci else None,
            "beta_range": [self.beta_range[0], None if math.isinf(high) else high],
            "too_few": self.too_few,
        }

    def sentence(self, confidence: float) -> str:
        """One sentence a reader can act on (models by their last path component)."""
        low, high = self.beta_range
        betas = f"beta >= {low:.3g}" if math.isinf(high) else f"beta in [{low:.3g}, {high:.3g}]"
        leader, base = short_name(self.leader), short_name(self.base_model)
        if self.runner_up is None:
            return f"{leader} is the only teacher scored for {base}."
        if self.too_few:
            return f"{leader} leads for {base}, but nothing is decided: {self.too_few}."
        if self.separated:
            return (
                f"{leader} is the best teacher for {base} with probability {self.p_best:.2f} on "
                f"{self.n_instructions} instructions (ahead of every other teacher at {confidence:.0%} confidence); "
                f"the top stays the same for {betas}."
            )
        return (
            f"{leader} leads for {base} with probability {self.p_best:.2f} on {self.n_instructions} instructions, "
            f"but {short_name(self.runner_up)} is not separated from it at {confidence:.0%} confidence: score more "
            f"instructions to decide (the top stays the same for {betas})."
        )


def paired_samples(scores: pd.DataFrame, rows: pd.DataFrame, n_replicates: int, seed: int) -> dict[str, np.ndarray]:
    """Bootstrap replicates of one base model's teachers: ``scores`` are its per-example scores, ``rows`` its
    ranking rows (their order is the column order; ``car_beta`` and ``car_reward_shift`` give CAR). Returns, for
    each of :data:`INTERVAL_METRICS`, a (replicates x teachers) matrix."""
    beta = float(rows["car_beta"].iloc[0])
    shift = float(rows["car_reward_shift"].iloc[0])
    teachers = rows["teacher"].tolist()
    ids = pd.unique(scores["id"])
    cells = scores.groupby(["teacher", "id"], sort=False)[["reward", "compat_loss"]]
    totals = cells.sum()
    sums = {
        metric: totals[metric].unstack().reindex(index=teachers, columns=ids).to_numpy(dtype=np.float64)
        for metric in ("reward", "compat_loss")
    }
    counts = cells.size().unstack().reindex(index=teachers, columns=ids).fillna(0).to_numpy(dtype=np.float64)
    means = replicate_means(sums, counts, n_replicates, seed)
    return {**means, "car": car(means["reward"] + shift, means["compat_loss"], beta)}


def bootstrap_ranking(
    scores: pd.DataFrame,
    ranking: pd.DataFrame,
    n_replicates: int = DEFAULT_BOOTSTRAP,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_BOOTSTRAP_SEED,
) -> tuple[pd.DataFrame, list[BaseModelConfidence]]:
    """Adds ``<metric>_ci_low``/``_ci_high`` (for :data:`INTERVAL_METRICS`) and ``p_best`` to ``ranking`` (from
    :func:`magpie_teach.scoring.metrics.aggregate`), and returns the per-base-model verdicts."""
    ConfidenceSettings(bootstrap=n_replicates, confidence=confidence).check_confidence()
    if n_replicates < 1:
        raise ConfigError("the bootstrap needs at least one replicate (--bootstrap 0 turns it off instead)")
    ranking = ranking.copy()
    verdicts = []
    for base, rows in ranking.groupby("base_model", sort=False):
        subset = scores[scores["base_model"] == base]
        ids = pd.unique(subset["id"])
        samples = paired_samples(subset, rows, n_replicates, seed)
        for metric in INTERVAL_METRICS:
            low, high = percentile_interval(samples[metric], confidence)
            ranking.loc[rows.index, f"{metric}_ci_low"] = low
            ranking.loc[rows.index, f"{metric}_ci_high"] = high
        p_best = posterior_p_best(rows["car"].to_numpy(dtype=np.float64), samples["car"], seed)
        ranking.loc[rows.index, "p_best"] = p_best
        too_few = evidence_shortfall(len(ids), distinct_scores(subset))
        verdicts.append(_verdict(str(base), rows, samples["car"], p_best, len(ids), confidence, too_few))
    return ranking, verdicts


def _verdict(
    base: str,
    rows: pd.DataFrame,
    car_samples: np.ndarray,
    p_best: np.ndarray,
    n: int,
    confidence: float,
    too_few: str | None,
) -> BaseModelConfidence:
    point = rows["car"].to_numpy(dtype=np.float64)
    order = np.argsort(-point, kind="stable")
    leader = int(order[0])
    teachers = rows["teacher"].tolist()
    shifted = rows["reward"].to_numpy(dtype=np.float64) + float(rows["car_reward_shift"].iloc[0])
    beta_range = top_beta_range(shifted, rows["compat_loss"].to_numpy(dtype=np.float64), leader)
    if len(order) < 2:
        return BaseModelConfidence(base, n, teachers[leader], None, float(p_best[leader]), True, None, beta_range)
    differences = car_samples[:, [leader]] - car_samples  # replicates x teachers
    low, high = percentile_interval(differences, confidence)
    others = [j for j in range(len(teachers)) if j != leader]
    separated = bool(all(low[j] > 0 for j in others)) and too_few is None
    runner_up = int(order[1])
    interval = (float(low[runner_up]), float(high[runner_up]))
    return BaseModelConfidence(
        base,
        n,
        teachers[leader],
        teachers[runner_up],
        float(p_best[leader]),
        separated,
        interval,
        beta_range,
        too_few,
    )


def spearman_intervals(
    ranking: pd.DataFrame,
    performance: pd.DataFrame,
    metrics: Sequence[str],
    n_replicates: int = DEFAULT_BOOTSTRAP,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_BOOTSTRAP_SEED,
) -> dict[str, dict[str, tuple[float, float]]]:
    """Per base model and metric, a percentile interval of Spearman rho with AP over teachers drawn with
    replacement (replicates in which a side is constant have no rho and are left out)."""
    from scipy.stats import rankdata

    from magpie_teach.scoring.metrics import match_performance

    result: dict[str, dict[str, tuple[float, float]]] = {}
    for base, group in ranking.groupby("base_model", sort=False):
        merged = match_performance(group, performance, str(base))
        n = len(merged)
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_replicates, n))
        ap = merged["ap"].to_numpy(dtype=np.float64)[idx]
        column = {}
        for metric in metrics:
            sign = 1.0 if METRIC_DIRECTIONS[metric] else -1.0
            values = sign * merged[metric].to_numpy(dtype=np.float64)[idx]
            rho = _row_spearman(rankdata(values, axis=1), rankdata(ap, axis=1))
            low, high = percentile_interval(rho[:, None], confidence)
            column[metric] = (float(low[0]), float(high[0]))
        result[str(base)] = column
    return result


def _row_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of ranks, row by row; NaN where a row is constant."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (x * y).sum(axis=1) / denominator, np.nan)


CI_SUFFIXES = (" ci_low", " ci_high")
"""``correlations.csv`` columns ``<base model> ci_low`` / ``<base model> ci_high`` hold the interval of each rho."""


def add_rho_intervals(table: pd.DataFrame, intervals: dict[str, dict[str, tuple[float, float]]]) -> pd.DataFrame:
    """``correlations.csv`` with, after each base model's column, its rho intervals."""
    columns: dict[str, pd.Series] = {}
    for column in table.columns:
        columns[column] = table[column]
        if column in intervals:
            for k, suffix in enumerate(CI_SUFFIXES):
                columns[column + suffix] = pd.Series(
                    {metric: bounds[k] for metric, bounds in intervals[column].items()}, dtype=float
                ).reindex(table.index)
    return pd.DataFrame(columns, index=table.index)


def rho_columns(table: pd.DataFrame) -> list[str]:
    """The point-estimate columns of ``correlations.csv`` (base models and ``mean``), without the intervals."""
    return [c for c in table.columns if not str(c).endswith(CI_SUFFIXES)]
