"""Per-instruction teacher routing (the engine behind `magpie-teach route`): which teacher to send each instruction
to, learnt from seed instructions that every teacher answered, with an honest fall-back to the single best teacher.

The target is a per-example student-aware score, CAR per example:

    s(x, t) = (r(x, t) + shift) / (1 + beta * L(x, t))

with ``r`` the reward of teacher t's response to x, ``L`` the base model's compatibility loss on it, and ``beta``
and ``shift`` as `rank` records them. A teacher's mean of ``s`` is not its CAR (CAR is a ratio of means), but
per example it is the same trade of reward against learnability; the alternatives, the reward alone (blind to the
student) or the loss alone (blind to quality), are each one end of it.

The router sees only the instruction (features known before any teacher answers: the base model's own hidden
states over it, pooled, make it student-aware at no extra model cost) and predicts ``s`` for every teacher with
one ridge regression per teacher (a linear head; its penalty chosen by cross-validation on the seed), then sends
the instruction to the teacher predicted best.

Whether to route at all is decided on the seed alone, by cross-fitting: each fold of the seed is routed by a
router trained on the other folds and compared, instruction by instruction, with the single teacher whose mean
``s`` is best on those other folds. When the paired bootstrap interval of the mean gain does not lie above zero,
routing falls back to the single best teacher (on the whole seed) and says so.

:func:`replay` measures what routing would have given on data where every teacher answered every instruction:
the seed is drawn, the router trained and the decision made on it, and the rest (held out) scored under the
single teacher, the routed choice and the per-instruction oracle. A route-then-generate run makes every teacher
answer the seed and one teacher answer each other instruction: ``spend`` is that over the full grid.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from magpie_teach.errors import ConfigError
from magpie_teach.scoring.metrics import car

PENALTIES = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
"""Ridge penalties tried on standardised features (chosen by the seed's cross-validated squared error)."""

FOLDS = 5
"""Cross-fitting folds of the seed (for the penalty and for the fall-back decision)."""


def example_targets(scores: pd.DataFrame, beta: float, shift: float = 0.0) -> pd.DataFrame:
    """Per (instruction id, teacher): the mean over its generations of ``(reward + shift) / (1 + beta *
    compat_loss)``, as a table of instructions (rows, sorted by id) x teachers (columns). A cell missing (a teacher
    that did not answer an instruction) is a ConfigError naming it: the seed must be a full grid."""
    needed = {"id", "teacher", "reward", "compat_loss"}
    if not needed <= set(scores.columns):
        raise ConfigError(f"scores lack {sorted(needed - set(scores.columns))}: route needs per-example rewards and "
                          "compatibility losses (a `rank` scores.parquet)")  # fmt: skip
    values = car(scores["reward"].to_numpy(float) + shift, scores["compat_loss"].to_numpy(float), beta)
    table = scores.assign(_s=values).pivot_table(index="id", columns="teacher", values="_s", aggfunc="mean")
    missing = table.isna().stack()
    if missing.any():
        (first_id, teacher), *_ = missing[missing].index
        raise ConfigError(f"instruction {first_id!r} has no scored response of teacher {teacher!r} (and "
                          f"{int(missing.sum()) - 1} more cells): routing learns from instructions every teacher "
                          "answered")  # fmt: skip
    return table.sort_index()


@dataclass
class Router:
    """One ridge regression per teacher on standardised features: ``predict`` gives every teacher's predicted
    score for each instruction."""

    teachers: list[str]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray  # (features + 1) x teachers, intercept last
    penalty: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        return _design(features, self.mean, self.scale) @ self.weights

    def choose(self, features: np.ndarray) -> np.ndarray:
        """The index (into ``teachers``) of the teacher predicted best for each instruction."""
        return np.argmax(self.predict(features), axis=1)


def _design(features: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    standard = (np.asarray(features, float) - mean) / scale
    return np.hstack([standard, np.ones((len(standard), 1))])


def _solve(design: np.ndarray, targets: np.ndarray, penalty: float) -> np.ndarray:
    gram = design.T @ design
    ridge = penalty * np.eye(gram.shape[0])
    ridge[-1, -1] = 0.0  # the intercept is not shrunk
    return np.linalg.solve(gram + ridge, design.T @ targets)


def _folds(n: int, folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [part for part in np.array_split(rng.permutation(n), min(folds, n)) if len(part)]


def fit_router(features: np.ndarray, targets: np.ndarray, teachers: list[str], seed: int = 0,
               penalty: float | None = None) -> Router:  # fmt: skip
    """The router of FEATURES (instructions x features) onto TARGETS (instructions x teachers); the penalty, unless
    given, is the one of :data:`PENALTIES` with the least cross-validated squared error (seeded folds)."""
    features, targets = np.asarray(features, float), np.asarray(targets, float)
    if len(features) != len(targets):
        raise ValueError(f"{len(features)} feature rows for {len(targets)} target rows")
    mean, scale = features.mean(axis=0), features.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    design = _design(features, mean, scale)
    if penalty is None:
        parts = _folds(len(features), FOLDS, np.random.default_rng(seed))
        errors = []
        for candidate in PENALTIES:
            error = 0.0
            for part in parts:
                train = np.setdiff1d(np.arange(len(features)), part)
                weights = _solve(design[train], targets[train], candidate)
                error += float(((design[part] @ weights - targets[part]) ** 2).sum())
            errors.append(error)
        penalty = PENALTIES[int(np.argmin(errors))]
    return Router(list(teachers), mean, scale, _solve(design, targets, penalty), float(penalty))


@dataclass
class RoutingDecision:
    """Whether routing beats the single best teacher on the seed (cross-fitted), with the interval of the gain."""

    single_teacher: str
    gain: float  # mean per-instruction gain of the routed choice over the single teacher, cross-fitted
    gain_interval: tuple[float, float]
    confidence: float
    routed: bool  # False: fall back to the single teacher

    def sentence(self) -> str:
        low, high = self.gain_interval
        interval = f"{self.gain:+.4g} [{low:+.4g}, {high:+.4g}] ({self.confidence:.0%} interval)"
        if self.routed:
            return f"routing beats the single best teacher ({self.single_teacher}) on the seed: gain {interval}"
        return (f"routing does not beat the single best teacher on the seed beyond noise (gain {interval}): every "
                f"instruction goes to {self.single_teacher}")  # fmt: skip


def cross_fitted_gains(features: np.ndarray, targets: np.ndarray, teachers: list[str], seed: int = 0) -> np.ndarray:
    """Per seed instruction, what the routed choice gains over the single teacher: each of :data:`FOLDS` seeded
    folds routed by a router trained on the other folds, against the single teacher best on them."""
    features, targets = np.asarray(features, float), np.asarray(targets, float)
    gains = np.empty(len(features))
    for part in _folds(len(features), FOLDS, np.random.default_rng(seed)):
        train = np.setdiff1d(np.arange(len(features)), part)
        router = fit_router(features[train], targets[train], teachers, seed)
        single = int(np.argmax(targets[train].mean(axis=0)))
        gains[part] = targets[part, router.choose(features[part])] - targets[part, single]
    return gains


def decide(features: np.ndarray, targets: np.ndarray, teachers: list[str], seed: int = 0, confidence: float = 0.95,
           replicates: int = 2000) -> RoutingDecision:  # fmt: skip
    """Routes only when the percentile interval (paired bootstrap over instructions, seeded) of the mean of the
    :func:`cross_fitted_gains` lies above 0; else falls back to the teacher best on the whole seed."""
    gains = cross_fitted_gains(features, targets, teachers, seed)
    draws = np.random.default_rng([seed, 1]).integers(0, len(gains), (replicates, len(gains)))
    means = gains[draws].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = (float(v) for v in np.quantile(means, [tail, 1 - tail]))
    single = teachers[int(np.argmax(np.asarray(targets, float).mean(axis=0)))]
    return RoutingDecision(single, float(gains.mean()), (low, high), confidence, low > 0)


@dataclass
class ReplayResult:
    """What routing would have given on the held-out instructions: the mean target of the single teacher (best on
    the seed), of the routed choice (the single teacher again when routing fell back), and of the per-instruction
    oracle; the generations spent against the full grid's; the decision; how many instructions each teacher got."""

    single_teacher: str
    score_single: float
    score_routed: float
    score_oracle: float
    spend: float
    decision: RoutingDecision
    assigned: dict[str, int]
    n_seed: int
    n_held_out: int
    router: Router  # fitted on the seed (used only when the decision routes)
    seed_positions: np.ndarray  # the seed's row positions in the targets

    def gap_closed(self) -> float:
        """The share of the single-to-oracle gap the routed choice closes (NaN when there is no gap)."""
        gap = self.score_oracle - self.score_single
        return (self.score_routed - self.score_single) / gap if gap > 0 else float("nan")


def spend(n_instructions: int, n_seed: int, n_teachers: int) -> float:
    """Generations of route-then-generate (every teacher on the seed, one teacher on each other instruction) over
    the full grid's (every teacher on every instruction)."""
    return (n_seed * n_teachers + (n_instructions - n_seed)) / (n_instructions * n_teachers)


def check_seed(n_seed: int, n: int) -> None:
    """ConfigError unless N_SEED of N instructions can train a router and leave some held out."""
    if not 2 * FOLDS <= n_seed < n:
        raise ConfigError(f"--seed-instructions {n_seed}: needs at least {2 * FOLDS} (the seed is cross-fitted in "
                          f"{FOLDS} folds) and fewer than the {n} instructions there are")  # fmt: skip


def seed_rows(n: int, n_seed: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(seed, held out): the positions of N_SEED of N instructions drawn with SEED, and of the others."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:n_seed], order[n_seed:]


def replay(features: np.ndarray, targets: pd.DataFrame, n_seed: int, seed: int = 0,
           confidence: float = 0.95) -> ReplayResult:  # fmt: skip
    """Routing replayed on TARGETS (instructions x teachers, :func:`example_targets`) with FEATURES aligned to its
    rows: N_SEED instructions drawn (seeded) train the router and make the decision; the others are scored."""
    n, teachers = len(targets), list(targets.columns)
    check_seed(n_seed, n)
    values = targets.to_numpy(float)
    features = np.asarray(features, float)
    seeded, held = seed_rows(n, n_seed, seed)
    decision = decide(features[seeded], values[seeded], teachers, seed, confidence)
    single = teachers.index(decision.single_teacher)
    router = fit_router(features[seeded], values[seeded], teachers, seed)
    if decision.routed:
        chosen = router.choose(features[held])
    else:
        chosen = np.full(len(held), single)
    routed = values[held, chosen]
    counts = pd.Series(np.asarray(teachers)[chosen]).value_counts()
    return ReplayResult(
        decision.single_teacher, float(values[held, single].mean()), float(routed.mean()),
        float(values[held].max(axis=1).mean()), spend(n, n_seed, len(teachers)), decision,
        {t: int(counts.get(t, 0)) for t in teachers}, n_seed, len(held), router, seeded,
    )  # fmt: skip
