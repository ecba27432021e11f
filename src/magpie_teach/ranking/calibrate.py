"""`magpie-teach calibrate`: the verb (reads `rank` folders and a performance table, writes calibration.json,
correlations.csv, beta_curve.csv and the figure under the folder lock). The fit itself, which metric and which
CAR beta predict the students' performance, is the engine's: :mod:`magpie_teach.scoring.calibrate`."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from magpie_teach.artefacts import BETA_CURVE as CURVE  # the file names live in artefacts.py
from magpie_teach.artefacts import CALIBRATION, CORRELATIONS
from magpie_teach.artefacts import CALIBRATION_FIGURE as FIGURE
from magpie_teach.errors import ConfigError, DataError
from magpie_teach.scoring.calibrate import (
    Base,
    Candidate,
    _choice_rho,
    _finite,
    _nanmean,
    beta_curve,
    car_rho,
    check_performance,
    choice_bootstrap,
    choose,
    correlation_table,
    crossings,
    logger,
)
from magpie_teach.scoring.metrics import METRIC_DIRECTIONS
from magpie_teach.settings import DEFAULT_BETA, AliasSettings, PerformanceSettings


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
