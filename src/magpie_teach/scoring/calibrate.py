"""`magpie-teach calibrate`: which metric, and which CAR beta, predict the students' performance on your setup.

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

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from magpie_teach.artefacts import BETA_CURVE as CURVE  # the file names live in artefacts.py
from magpie_teach.artefacts import CALIBRATION, CORRELATIONS
from magpie_teach.artefacts import CALIBRATION_FIGURE as FIGURE
from magpie_teach.errors import ConfigError, DataError
from magpie_teach.scoring.metrics import METRIC_DIRECTIONS
from magpie_teach.settings import DEFAULT_BETA, AliasSettings, PerformanceSettings

logger = logging.getLogger(__name__)

MIN_DISTINCT_AP = 3
"""The fewest distinct AP values a base model needs: with fewer, every ranking's rho is one of a handful of values."""

CHOICE_REPLICATES = 200
"""Bootstrap replicates (teachers drawn with replacement) behind ``choice_bootstrap``."""


@dataclass
class CalibrateConfig(PerformanceSettings, AliasSettings):
    scores: list[str] = field(
        metadata={
            "help": "A `rank` output folder (ranking.csv); repeat to compare reward models or runs. The first is "
            "the default's.",
            "flag": "--scores",
        }
    )
    performance: str = field(
        metadata={"help": "CSV with teacher, base_model and the benchmark columns (the layout of rank --performance)."}
    )
    output_dir: str = field(metadata={"help": "Folder for calibration.json, correlations.csv, beta_curve.csv and the figure.", "flag": "--output"})  # fmt: skip
    reward_shifts: list[str] = field(
        default_factory=list,
        metadata={
            "help": "CAR reward shift to try besides each run's recorded one: none, auto or a number; repeat.",
            "flag": "--reward-shift",
        },
    )

    def check(self) -> None:
        from magpie_teach.settings import check_car

        if not self.scores:
            raise ConfigError("give at least one --scores folder")
        for shift in self.reward_shifts:
            check_car(DEFAULT_BETA, shift)


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


def _load_candidates(config: CalibrateConfig, performance: pd.DataFrame) -> list[Candidate]:
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    from magpie_teach.artefacts import read_rank_folder
    from magpie_teach.scoring.metrics import match_performance, resolve_reward_shift

    candidates = []
    for folder in config.scores:
        ranking, _, _ = read_rank_folder(folder)
        recorded = ranking["car_reward_shift"].iloc[0] if "car_reward_shift" in ranking.columns else 0.0
        teacher_rewards = ranking.groupby("teacher")["reward"].first()
        shifts = [float(recorded)]
        for shift in config.reward_shifts:
            value = resolve_reward_shift(teacher_rewards, shift)
            if value not in shifts:
                shifts.append(value)
        for shift in shifts:
            bases = {}
            for base, group in ranking.groupby("base_model", sort=False):
                try:
                    merged = match_performance(group, performance, str(base))
                except ConfigError as err:
                    raise ConfigError(f"{folder}: {err}") from None
                metrics = {
                    m: (1.0 if METRIC_DIRECTIONS[m] else -1.0) * merged[m].to_numpy(dtype=float)
                    for m in METRIC_DIRECTIONS
                    if m in merged.columns and m != "car"
                }
                bases[str(base)] = Base(
                    name=str(base),
                    teachers=merged["teacher"].astype(str).tolist(),
                    reward=merged["reward"].to_numpy(dtype=float) + shift,
                    loss=merged["compat_loss"].to_numpy(dtype=float),
                    ap=merged["ap"].to_numpy(dtype=float),
                    metrics=metrics,
                )
            candidates.append(Candidate(scores=str(folder), reward_shift=shift, bases=bases))
    names = [set(c.bases) for c in candidates]
    if any(n != names[0] for n in names):
        raise DataError(
            f"the --scores folders rank different base models: {[sorted(n) for n in names]}; calibrate compares "
            "them on the same ones"
        )
    return candidates


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


def calibrate(config: CalibrateConfig) -> dict:
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    """Fits and writes the calibration (see the module docstring); returns what calibration.json holds."""
    from magpie_teach.artefacts import RunOutputs, locked
    from magpie_teach.scoring.metrics import load_performance

    config.check()
    performance = load_performance(config.performance, config.performance_columns, config.aliases)
    candidates = _load_candidates(config, performance)
    check_performance(candidates[0])
    names = list(candidates[0].bases)
    default = candidates[0]
    best = choose(candidates, names)

    held_out = []
    if len(names) > 1:
        for name in names:
            fitted = choose(candidates, [n for n in names if n != name])
            held_out.append({"base_model": name, "metric": fitted.metric, "scores": fitted.scores,
                             "reward_shift": fitted.reward_shift, "beta": fitted.beta,
                             "rho": _choice_rho(candidates, fitted, name),
                             "rho_default": car_rho(default.bases[name], DEFAULT_BETA)})  # fmt: skip
    else:
        logger.warning("one base model: no base model to hold out, so the held-out rho is not reported")
    car = best if best.metric == "car" else choose(candidates, names, car_only=True)
    chosen = next(c for c in candidates if c.scores == car.scores and c.reward_shift == car.reward_shift)
    uncertainty = choice_bootstrap(candidates, names, best)
    result = {
        "best_metric": best.metric,
        "best_beta": car.beta,
        "stable_beta_range": list(car.interval),
        "best_scores": car.scores,
        "best_reward_shift": car.reward_shift,
        "default_beta": DEFAULT_BETA,
        "mean_rho": {
            "default": _nanmean([car_rho(default.bases[n], DEFAULT_BETA) for n in names]),
            "best": best.mean_rho,
            "car_best_beta": car.mean_rho,
        },
        "held_out_mean_rho": {
            "default": _nanmean([h["rho_default"] for h in held_out]) if held_out else None,
            "fitted": _nanmean([h["rho"] for h in held_out]) if held_out else None,
        },
        "held_out": held_out,
        "base_models": names,
        "n_teachers": {n: len(default.bases[n].teachers) for n in names},
        "crossings": np.unique(
            np.concatenate([crossings(default.bases[n].reward, default.bases[n].loss) for n in names])
        ).tolist(),  # fmt: skip
        "choice_bootstrap": uncertainty,
        "scores": config.scores,
        "performance": config.performance,
    }
    if best.metric != "car":
        result["best_metric_scores"] = best.scores
        result["note"] = (f"{best.metric} predicts AP better than CAR at any beta here; best_beta is CAR's best, "
                          "which rank --beta-from uses")  # fmt: skip

    table = correlation_table(candidates, names)
    curve = beta_curve(chosen, names, result["crossings"])
    finite = _finite(result)  # the figure reads the NaNs as NaNs; the JSON holds None for them
    text = json.dumps(finite, indent=2, allow_nan=False) + "\n"  # valid JSON: no NaN or Infinity
    with locked(config.output_dir):  # one run per folder; its manifest says which files are this run's
        files = RunOutputs(config.output_dir, "calibrate")
        files.write(CORRELATIONS, lambda tmp: table.to_csv(tmp))
        files.write(CURVE, lambda tmp: curve.to_csv(tmp, index=False))
        files.write(FIGURE, lambda tmp: _figure(curve, result, tmp))
        files.write(CALIBRATION, lambda tmp: Path(tmp).write_text(text))
        files.finish()
    return finite


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


def _figure(curve: pd.DataFrame, result: dict, path: str) -> None:
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.13, top=0.97)  # fixed margins: tight_layout costs 0.6 s
    shown = curve[curve["beta"] > 0]
    ax.step(shown["beta"], shown["mean_rho"], where="post", color="black", label="mean over base models")
    for name in result["base_models"]:
        ax.step(shown["beta"], shown[name], where="post", alpha=0.35, linewidth=1)
    lo, hi = result["stable_beta_range"]
    ax.axvspan(max(lo, shown["beta"].min()), min(hi, shown["beta"].max()), color="tab:green", alpha=0.15,
               label=f"stable range of the best beta ({result['best_beta']:.3g})")  # fmt: skip
    ax.axvline(DEFAULT_BETA, color="tab:blue", linestyle="--", label=f"default beta {DEFAULT_BETA:g}")
    ax.set_xscale("log")
    ax.set_xlabel("CAR beta")
    ax.set_ylabel("Spearman rho with AP")
    ax.legend(loc="lower left", fontsize=8)
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
