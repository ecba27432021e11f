"""The fit behind `magpie-teach calibrate` (the verb: :mod:`magpie_teach.ranking.calibrate`): which metric, and which
CAR beta, predict the students' performance on your setup.

Inputs are `rank` output folders (one per reward model, or per run to compare) and a performance table with the
students' AP per (teacher, base model), the layout `rank --performance` reads. Per base model, Spearman's rho of
each metric with AP, as `rank` computes it, and their mean over base models (the paper's summary figure).

CAR's beta is fitted exactly, not on a grid. With a fixed reward shift, teacher i's CAR is r_i / (1 + beta L_i),
so two teachers swap places only where their CARs are equal:

    beta_ij = (r_i - r_j) / (r_j L_i - r_i L_j)        (when it is positive)

Between two consecutive crossing points (over every base model) every base model's order of teachers, and so
its rho and the mean rho, is constant. The fit scores one beta inside each of these intervals, which finds every
interval however narrow, and reports the best one: ``best_beta`` is the default beta when that interval holds
it, else the interval's geometric middle (half its end for the first, twice its start for the last).
``stable_beta_range`` is the interval between crossing points that holds it: the betas that give the same orders
of teachers, so the same rho. It says where the fit is stable, **not** how sure it is: it is no confidence
interval. The uncertainty of the choice is ``choice_bootstrap``: the fit repeated on teachers drawn with
replacement within every base model (seeded), with the share of replicates that choose the same metric and a
percentile interval of CAR's fitted beta. Ties between intervals go to the one nearest the default beta (on a log
scale).

Performance that cannot rank teachers (all NaN, constant, or fewer than :data:`MIN_DISTINCT_AP` distinct values
for a base model) is a one-line error before anything is written.

The gain is reported without fitting on what it is scored on: leave one base model out, fit the metric (and the
reward model, reward shift and beta) on the others, score the choice on the one left out, and average over base
models (``held_out_mean_rho``). The default (CAR, beta 3, the first scores' reward model and recorded shift) is
scored on every base model the same way.
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from magpie_teach.errors import DataError
from magpie_teach.settings import DEFAULT_BETA

logger = logging.getLogger(__name__)

MIN_DISTINCT_AP = 3
"""The fewest distinct AP values a base model needs: with fewer, every ranking's rho is one of a handful of values."""

CHOICE_REPLICATES = 200
"""Bootstrap replicates (teachers drawn with replacement) behind ``choice_bootstrap``."""


@dataclass
class Base:
    """One base model's teachers, matched with their AP, for one candidate (scores folder, reward shift)."""

    name: str
    teachers: list[str]
    reward: np.ndarray  # shifted mean rewards
    loss: np.ndarray  # mean compatibility losses
    ap: np.ndarray
    metrics: dict[str, np.ndarray]  # the baselines, oriented so that higher is better


def _average_ranks(values: np.ndarray) -> np.ndarray | None:
    """Ranks from 1, ties sharing their mean rank (scipy's ``rankdata``); None when every value is the same."""
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    if len(counts) < 2:
        return None
    last = np.cumsum(counts)
    return ((last - counts + 1 + last) / 2)[group]


def _rho(values: np.ndarray, ap: np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks; NaN when a side is constant. (As scipy's
    `spearmanr`, at a twentieth of its cost: `fit_beta` calls this once per base model and interval between
    crossing points.)"""
    x, y = _average_ranks(values), _average_ranks(ap)
    if x is None or y is None:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def car_rho(base: Base, beta: float) -> float:
    return _rho(base.reward / (1.0 + beta * base.loss), base.ap)


def crossings(reward: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """The positive betas where two teachers' CAR are equal (sorted, distinct): CAR's order changes only there."""
    i, j = np.triu_indices(len(reward), k=1)
    numerator = reward[i] - reward[j]
    denominator = reward[j] * loss[i] - reward[i] * loss[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = numerator / denominator
    beta = beta[np.isfinite(beta) & (beta > 0)]
    return np.unique(beta)


@dataclass
class BetaFit:
    beta: float
    interval: tuple[float, float]
    mean_rho: float


def intervals(points: np.ndarray) -> list[tuple[float, float, float]]:
    """(start, end, a beta inside) for each interval between consecutive crossing points, from 0 to infinity. The
    beta inside is the default beta where the interval holds it (its start excluded: a crossing point is no beta
    to rank at), else the geometric midpoint; half the end of the first interval, twice the start of the last."""
    edges = [0.0, *points.tolist(), math.inf]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if lo <= DEFAULT_BETA < hi and DEFAULT_BETA != lo:
            inside = DEFAULT_BETA
        elif lo == 0.0:
            inside = hi / 2 if math.isfinite(hi) else DEFAULT_BETA
        elif not math.isfinite(hi):
            inside = 2 * lo
        else:
            inside = math.sqrt(lo * hi)
        out.append((lo, hi, inside))
    return out


def _log_distance(lo: float, hi: float) -> float:
    """How far the interval [lo, hi] lies from the default beta, on a log scale (0 when it holds it)."""
    if lo <= DEFAULT_BETA <= hi:
        return 0.0
    edge = hi if hi < DEFAULT_BETA else lo
    return abs(math.log(max(edge, 1e-12) / DEFAULT_BETA))


def fit_beta(bases: list[Base]) -> BetaFit:
    """The beta interval with the highest mean rho of CAR over ``bases`` (ties: the one nearest the default)."""
    points = np.unique(np.concatenate([crossings(b.reward, b.loss) for b in bases]))
    best: tuple | None = None
    for lo, hi, inside in intervals(points):
        rhos = [car_rho(b, inside) for b in bases]
        mean = float(np.nanmean(rhos)) if not all(math.isnan(r) for r in rhos) else -math.inf
        candidate = (mean, -_log_distance(lo, hi), lo, hi, inside)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    assert best is not None
    return BetaFit(beta=best[4], interval=(best[2], best[3]), mean_rho=best[0])


@dataclass
class Candidate:
    """A way to rank teachers: a metric of one scores folder (CAR with its reward shift)."""

    scores: str
    reward_shift: float
    bases: dict[str, Base]


@dataclass
class Choice:
    scores: str
    reward_shift: float
    metric: str
    beta: float | None
    interval: tuple[float, float] | None
    mean_rho: float


def choose(candidates: list[Candidate], base_names: list[str], car_only: bool = False) -> Choice:
    """The best (scores, reward shift, metric, beta) by mean rho over ``base_names`` (only CAR with
    ``car_only``); CAR first on ties, then the earlier scores folder and reward shift."""
    best: Choice | None = None
    for candidate in candidates:
        bases = [candidate.bases[n] for n in base_names]
        fit = fit_beta(bases)
        options = [("car", fit.beta, fit.interval, fit.mean_rho)]
        for metric in [] if car_only else bases[0].metrics:
            rhos = [_rho(b.metrics[metric], b.ap) for b in bases]
            if not all(math.isnan(r) for r in rhos):
                options.append((metric, None, None, float(np.nanmean(rhos))))
        for metric, beta, interval, mean in options:
            if best is None or mean > best.mean_rho + 1e-12:
                best = Choice(candidate.scores, candidate.reward_shift, metric, beta, interval, mean)
    assert best is not None
    return best


def _choice_rho(candidates: list[Candidate], choice: Choice, base: str) -> float:
    candidate = next(c for c in candidates if c.scores == choice.scores and c.reward_shift == choice.reward_shift)
    b = candidate.bases[base]
    if choice.metric == "car":
        return car_rho(b, choice.beta)
    return _rho(b.metrics[choice.metric], b.ap)


def _finite(value):
    """``value`` with every NaN or infinite number replaced by None (JSON has neither)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_performance(candidate: Candidate) -> None:
    """A one-line error naming the first base model whose AP cannot rank teachers (see the module docstring)."""
    for base in candidate.bases.values():
        finite = base.ap[np.isfinite(base.ap)]
        distinct = len(np.unique(finite))
        if distinct < MIN_DISTINCT_AP:
            what = "all NaN" if not len(finite) else "constant" if distinct == 1 else f"{distinct} distinct values"
            raise DataError(f"the performance of {base.name}'s teachers is {what}: calibrate needs at least "
                            f"{MIN_DISTINCT_AP} distinct AP values per base model to rank them; nothing was written")  # fmt: skip


def choice_bootstrap(candidates: list[Candidate], names: list[str], best: Choice, replicates: int = CHOICE_REPLICATES,
                     seed: int = 0, confidence: float = 0.95) -> dict:  # fmt: skip
    """How sure the choice is: the fit repeated on teachers drawn with replacement within every base model (the
    same draw for every candidate). Returns the share of replicates choosing ``best``'s metric, and a percentile
    interval of CAR's fitted beta (None where no replicate fits one)."""
    rng = np.random.default_rng(seed)
    same, betas = 0, []
    for _ in range(replicates):
        draw = {n: rng.integers(0, len(candidates[0].bases[n].teachers), len(candidates[0].bases[n].teachers))
                for n in names}  # fmt: skip
        drawn = [
            Candidate(c.scores, c.reward_shift, {n: _take(c.bases[n], draw[n]) for n in names}) for c in candidates
        ]
        choice = choose(drawn, names)
        car = choice if choice.metric == "car" else choose(drawn, names, car_only=True)
        same += choice.metric == best.metric
        if car.mean_rho > -math.inf:
            betas.append(car.beta)
    alpha = (1 - confidence) / 2
    interval = [float(np.quantile(betas, alpha)), float(np.quantile(betas, 1 - alpha))] if betas else None
    return {"replicates": replicates, "seed": seed, "confidence": confidence,
            "same_metric_share": same / replicates, "best_beta_ci": interval}  # fmt: skip


def stable_range_text(result: dict) -> str:
    """``stable_beta_range`` as ``[low, high]`` (its open end, null in JSON, as infinity)."""
    low, high = result["stable_beta_range"]
    return f"[{low:.4g}, {'infinity' if high is None else format(high, '.4g')}]"


def choice_sentence(result: dict) -> str:
    """The uncertainty of calibrate's choice in one sentence (from ``choice_bootstrap``)."""
    boot = result.get("choice_bootstrap") or {}
    if not boot:
        return ""
    share = boot["same_metric_share"]
    text = (f"Teachers drawn again ({boot['replicates']} bootstrap replicates) choose {result['best_metric']} "
            f"{100 * share:.0f}% of the time")  # fmt: skip
    text += ": the choice is firm." if share >= 0.9 else ": another metric could predict as well on other teachers."
    if boot.get("best_beta_ci"):
        low, high = boot["best_beta_ci"]
        text += f" CAR's fitted beta: {boot['confidence']:.0%} interval [{low:.3g}, {high:.3g}]."
    return text


def _take(base: Base, rows: np.ndarray) -> Base:
    return Base(base.name, [base.teachers[i] for i in rows], base.reward[rows], base.loss[rows], base.ap[rows],
                {m: v[rows] for m, v in base.metrics.items()})  # fmt: skip


def _nanmean(values: list[float]) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else None


def correlation_table(candidates: list[Candidate], names: list[str]) -> pd.DataFrame:
    """Rho of every metric per base model and their mean: CAR at the default and at the beta fitted for that
    candidate, the baselines; one row per (scores, reward shift, metric)."""
    rows = []
    several = len(candidates) > 1
    for candidate in candidates:
        label = f"{Path(candidate.scores).name} shift {candidate.reward_shift:g}: " if several else ""
        bases = [candidate.bases[n] for n in names]
        beta = fit_beta(bases).beta
        rows.append(
            {"metric": f"{label}car (beta {DEFAULT_BETA:g})", **{b.name: car_rho(b, DEFAULT_BETA) for b in bases}}
        )
        rows.append({"metric": f"{label}car (fitted beta {beta:.4g})", **{b.name: car_rho(b, beta) for b in bases}})
        for metric in bases[0].metrics:
            rows.append({"metric": f"{label}{metric}", **{b.name: _rho(b.metrics[metric], b.ap) for b in bases}})
    table = pd.DataFrame(rows).set_index("metric")
    table["mean"] = table[names].mean(axis=1)
    return table


def beta_curve(candidate: Candidate, names: list[str], points: list[float]) -> pd.DataFrame:
    """Mean rho (and each base model's) of CAR against beta: a log grid with every crossing point's neighbours."""
    top = max([*points, 100.0]) * 10
    low = min([*points, 0.01]) / 10
    grid = np.unique(np.concatenate([[0.0], np.geomspace(low, top, 200), np.asarray(points) * (1 - 1e-9),
                                     np.asarray(points) * (1 + 1e-9)]))  # fmt: skip
    rows = []
    for beta in grid:
        rhos = {n: car_rho(candidate.bases[n], float(beta)) for n in names}
        rows.append({"beta": float(beta), "mean_rho": _nanmean(list(rhos.values())), **rhos})
    return pd.DataFrame(rows)
