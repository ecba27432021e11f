"""Benchmark of per-instruction routing (not a test): `route`'s replay on synthetic pools with a known structure.

    python benchmarks/bench_route.py [--datasets 50] [--instructions 2000] [--seed-share 0.1]

Pools (each data set drawn afresh, seeded): "categories": 6 teachers, 4 instruction categories each with its own
best teacher (+0.2 on a per-example score of about 0.5 +- 0.05 noise), features a category centre plus noise;
"weak categories": the same with a bonus of one noise sd (0.05) and centres a quarter as far apart;
"no structure": the same teachers, features unrelated to the scores; "zoo": the Generator-Zoo's layout, 19
teachers and 8 categories. Per pool: the share of the single-to-oracle gap that routing closes on the held-out
instructions (mean and range over data sets), the generations spent against the full grid's, how often routing
fell back to the single teacher, and how often the routed choice was worse than the single teacher beyond its
95% paired bootstrap interval on the held-out instructions. Targets (issue 32): with per-category best teachers,
at least half the gap closed at no more than half the grid; without structure, never worse beyond the interval.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_route import pool  # noqa: E402 - the tests' generator of pools, one definition

from magpie_teach.scoring.route import fit_router, replay  # noqa: E402

POOLS = {  # teachers, categories, structured, bonus, separation
    "categories": (6, 4, True, 0.2, 2.0),
    "weak categories": (6, 4, True, 0.05, 0.5),
    "no structure": (6, 4, False, 0.2, 2.0),
    "zoo": (19, 8, True, 0.2, 2.0),
}


def worse_beyond_interval(features, targets, result, n_seed: int, seed: int) -> bool:
    """The routed choice's held-out per-instruction differences from the single teacher: their mean's 95% paired
    bootstrap interval lies wholly below zero."""
    values = targets.to_numpy()
    order = np.random.default_rng(seed).permutation(len(values))
    seed_rows, held = order[:n_seed], order[n_seed:]
    single = list(targets.columns).index(result.single_teacher)
    if result.decision.routed:
        chosen = fit_router(features[seed_rows], values[seed_rows], list(targets.columns), seed).choose(features[held])
    else:
        chosen = np.full(len(held), single)
    diff = values[held, chosen] - values[held, single]
    draws = np.random.default_rng(seed + 1).integers(0, len(diff), (2000, len(diff)))
    return bool(np.quantile(diff[draws].mean(axis=1), 0.975) < 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=int, default=50)
    parser.add_argument("--instructions", type=int, default=2000)
    parser.add_argument("--seed-share", type=float, default=0.1, help="share of instructions in the seed")
    args = parser.parse_args()
    n_seed = int(args.instructions * args.seed_share)
    print(f"{args.datasets} data sets per pool, {args.instructions} instructions, seed {n_seed}")
    for name, (teachers, categories, structured, bonus, separation) in POOLS.items():
        start = time.perf_counter()
        closed, spent, fell_back, worse = [], [], 0, 0
        for k in range(args.datasets):
            features, targets = pool(args.instructions, teachers, categories, structured, seed=1000 * k + 7,
                                     bonus=bonus, separation=separation)  # fmt: skip
            result = replay(features, targets, n_seed=n_seed, seed=k)
            closed.append(result.gap_closed())
            spent.append(result.spend)
            fell_back += not result.decision.routed
            worse += worse_beyond_interval(features, targets, result, n_seed, k)
        closed = np.asarray(closed)
        print(f"{name:>15}: {teachers} teachers; gap closed {np.nanmean(closed):.2f} (range {np.nanmin(closed):.2f} to "
              f"{np.nanmax(closed):.2f}); spend {np.mean(spent):.3f} of the grid; fell back {fell_back}/{args.datasets}; "
              f"worse than the single teacher beyond its 95% interval {worse}/{args.datasets} "
              f"({time.perf_counter() - start:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
