"""Simulations with a planted truth for the statistics `rank` and `evaluate` print (not timings).

    python benchmarks/sim_statistics.py lc [--seeds 20]
        The length-controlled win rate of three students (concise, even, verbose) against one baseline, judged by
        a judge that prefers longer answers; per student the mean error against the length-free truth
        100 x mean_x sigmoid(theta_m + gamma_x), for the raw win rate and the length-controlled one.

    python benchmarks/sim_statistics.py p_best [--datasets 1000] [--workers 2]
        The calibration of `rank`'s p_best: four teachers whose true CARs are planted, in a close race (every true
        CAR within one standard error of a teacher's CAR of the leader's), an intermediate one and a spread-out
        one, at 50 and 200 instructions. For q in 0.8, 0.9, 0.95: how many data sets show the leader with
        p_best >= q, and the share of those in which the leader is truly best (the goal: at least q - 0.05). The
        bootstrap's share of replicates led (the p_best of earlier versions) is shown beside it.

Each data set is seeded by its number, so a run repeats exactly.
"""

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from magpie_teach.scoring.confidence import paired_samples, posterior_p_best, share_of_firsts  # noqa: E402
from magpie_teach.scoring.metrics import aggregate  # noqa: E402
from magpie_teach.scoring.winrates import win_rates  # noqa: E402

QUANTILES = (0.8, 0.9, 0.95)
RACES = {
    "close": (0.0, -1 / 3, -2 / 3, -1.0),
    "intermediate": (0.0, -1.0, -2.0, -3.0),
    "spread": (0.0, -3.0, -6.0, -9.0),
}
"""Each teacher's true mean reward below the best one's, in standard errors of a teacher's mean reward (the
compatibility losses are equal in truth, so CAR orders the teachers as their rewards do)."""

INSTRUCTION_SD, NOISE_SD = 2.0, 1.0  # what an instruction adds to every teacher's reward, and each response's own


def lc_errors(seeds: int) -> None:
    students = {"concise": (0.3, -250.0), "even": (0.0, 0.0), "verbose": (-0.3, 250.0)}
    errors: dict[str, list[float]] = {}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        n = 800
        gamma, baseline = rng.normal(0, 1, n), rng.normal(0, 150, n)
        frames, truth = [], {}
        for student, (theta, shift) in students.items():
            d = shift + baseline + rng.normal(0, 150, n)
            verdict = rng.random(n) < 1 / (1 + np.exp(-(theta + gamma + np.tanh(d / 300))))
            truth[student] = 100 * np.mean(1 / (1 + np.exp(-(theta + gamma))))
            frames.append(pd.DataFrame({"id": np.arange(n), "student": student, "preference": verdict.astype(float),
                                        "length_diff": d}))  # fmt: skip
        result = win_rates(pd.concat(frames), n_replicates=0).set_index("student")
        for student, value in truth.items():
            errors.setdefault(("lc", student), []).append(result.loc[student, "lc_win_rate"] - value)
            errors.setdefault(("raw", student), []).append(result.loc[student, "win_rate"] - value)
    print(f"{seeds} seeds x 800 instructions, a judge with phi = 1 on tanh(d / 300)")
    print(f"{'student':10} {'LC mean err':>12} {'LC mean |err|':>14} {'raw mean err':>13}")
    for student in students:
        lc, raw = np.array(errors[("lc", student)]), np.array(errors[("raw", student)])
        print(f"{student:10} {lc.mean():+12.2f} {np.abs(lc).mean():14.2f} {raw.mean():+13.2f}")


def one_data_set(args: tuple[str, int, int]) -> tuple[float, float, bool]:
    race, n, seed = args
    rng = np.random.default_rng(seed)
    se = np.sqrt((INSTRUCTION_SD**2 + NOISE_SD**2) / n)
    shared = rng.normal(0, INSTRUCTION_SD, n)
    frames = []
    for i, offset in enumerate(RACES[race]):
        reward = 5 + offset * se + shared + rng.normal(0, NOISE_SD, n)
        loss = 1 + rng.normal(0, 0.1, n)
        frames.append(pd.DataFrame({"teacher": f"t{i}", "id": np.arange(n), "base_model": "b", "reward": reward,
                                    "compat_loss": loss, "n_tokens_full": 100, "truncated": False}))  # fmt: skip
    scores = pd.concat(frames, ignore_index=True)
    ranking = aggregate(scores, beta=1.0).reset_index(drop=True)
    samples = paired_samples(scores, ranking, 1000, seed)["car"]
    point = ranking["car"].to_numpy()
    lead = int(np.argmax(point))
    right = ranking["teacher"][lead] == "t0"
    return float(posterior_p_best(point, samples, seed)[lead]), float(share_of_firsts(samples)[lead]), bool(right)


def p_best_calibration(datasets: int, workers: int) -> None:
    print(f"{datasets} data sets per cell; 'shown': leaders with p_best >= q; 'right': the share truly best")
    header = "  ".join(f"{'q=' + str(q):>19}" for q in QUANTILES)
    print(f"{'race':13} {'n':>4} {'p_best':9} {header}")
    with ProcessPoolExecutor(workers) as pool:
        for race in RACES:
            for n in (50, 200):
                results = np.array(list(pool.map(one_data_set, [(race, n, s) for s in range(datasets)], chunksize=20)))
                for column, name in ((0, "posterior"), (1, "bootstrap")):
                    cells = []
                    for q in QUANTILES:
                        shown = results[:, column] >= q
                        share = results[shown, 2].mean() if shown.any() else float("nan")
                        cells.append(f"{int(shown.sum()):5d} shown, {share:.2f} right")
                    print(f"{race:13} {n:4d} {name:9} " + "  ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    lc = sub.add_parser("lc", help="length-controlled win rate against the planted length-free truth")
    lc.add_argument("--seeds", type=int, default=20)
    pb = sub.add_parser("p_best", help="calibration of p_best in close and spread-out races")
    pb.add_argument("--datasets", type=int, default=1000)
    pb.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.what == "lc":
        lc_errors(args.seeds)
    else:
        p_best_calibration(args.datasets, args.workers)


if __name__ == "__main__":
    main()
