"""Students' win rates against a baseline from pairwise judgements: raw, length-controlled, Bradley-Terry.

A judgement is one instruction ``x`` answered by a student ``m`` and by the baseline, and a preference ``p`` in
[0, 1] that the student's answer is the better one: 1 a win, 0 a loss, 0.5 a tie, a probability where the judge's
log-probabilities give one, the mean of both orders when the judge is asked twice (to cancel its position bias).
With each judgement come the two answers' lengths.

* **Win rate**: 100 x the mean preference, with a percentile bootstrap interval over instructions (seeded).
* **Length-controlled win rate** (AlpacaEval 2; Dubois et al., 2024, "Length-Controlled AlpacaEval"): a
  logistic model of the preference,

      logit P(m beats the baseline on x) = theta_m + phi_m * tanh(d_x / s) + psi_m * gamma_x,

  with d_x the length difference (student minus baseline), s its standard deviation over the student's
  judgements, and gamma_x the instruction's difficulty, read off the joint fit logit P = theta_m + phi_m *
  tanh(d_x / s_m) + gamma_x over every student (a length slope per student, as AlpacaEval fits its difficulties;
  penalised by a standard-normal prior on gamma, then centred on 0). Fitted by maximum
  likelihood on the (soft) preferences; the
  length-controlled win rate is the model's prediction at zero length difference, 100 x mean_x
  sigmoid(theta_m + psi_m * gamma_x). With one student, gamma is 0 and the model is theta + phi tanh(d/s).
* **Bradley-Terry score** (Arena-Hard style): the students' strengths beta_m against the baseline's 0, fitted by
  maximum likelihood over every judgement, reported as 100 x sigmoid(beta_m), with a bootstrap interval.

Every fit is Newton's method on a concave log-likelihood (a small ridge keeps it finite when a student wins or
loses everything).
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from magpie_teach.settings import DEFAULT_BOOTSTRAP, DEFAULT_BOOTSTRAP_SEED, DEFAULT_CONFIDENCE

RIDGE = 1e-6
"""L2 penalty on every logistic fit's coefficients: negligible, but finite coefficients for a perfect record."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def fit_logistic(features: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None, ridge: float = RIDGE,
                 tol: float = 1e-12) -> np.ndarray:  # fmt: skip
    """Coefficients maximising sum_i w_i [t_i log s_i + (1 - t_i) log(1 - s_i)] - ridge/2 |c|^2, s = sigmoid(X c),
    for soft targets t in [0, 1] and row weights w (default 1; Newton's method)."""
    features = np.asarray(features, dtype=float)
    target = np.asarray(target, dtype=float)
    w = np.ones(len(target)) if weights is None else np.asarray(weights, dtype=float)
    coef = np.zeros(features.shape[1])
    for _ in range(100):
        prob = _sigmoid(features @ coef)
        gradient = features.T @ (w * (target - prob)) - ridge * coef
        hessian = (features * (w * prob * (1 - prob))[:, None]).T @ features + ridge * np.eye(len(coef))
        step = np.linalg.solve(hessian, gradient)
        coef += step
        if np.max(np.abs(step)) < tol:
            break
    return coef


DIFFICULTY_PENALTY = 1.0
"""L2 penalty on the instruction difficulties gamma (a standard-normal prior on them): an instruction that every
student wins, or loses, gets a finite difficulty."""


def instruction_difficulty(judgements: pd.DataFrame, tol: float = 1e-12) -> pd.Series:
    """gamma_x per instruction: the joint fit logit P = theta_m + phi_m * tanh(d / s_m) + gamma_x over every student
    (each student's own length slope, as AlpacaEval fits its difficulties; penalised by :data:`DIFFICULTY_PENALTY`
    on gamma, :data:`RIDGE` on theta and phi), centred on 0. With one student it is 0: the student's own verdicts
    cannot tell an instruction's difficulty from the student's answer to it.

    The length term is what keeps a student's length-driven verdicts out of gamma: fitted as theta_m + gamma_x
    alone, an instruction where a verbose student wrote long answers looks easy, and the student's own model then
    reads half its length bias back through gamma at zero length difference.

    Newton's method on the block structure: the students' (theta, phi) block of the Hessian is block-diagonal and
    the gamma block diagonal, so each step solves a system twice the number of students (a Schur complement). The
    Hessian sets only how fast the steps reach the fit (any step that vanishes where the gradient does ends at the
    same gamma), so `make mutation` leaves its lines alone."""
    ids = pd.Index(sorted(judgements["id"].unique()))
    students = pd.Index(sorted(judgements["student"].unique()))
    if len(students) < 2:
        return pd.Series(0.0, index=ids, name="gamma")
    m = students.get_indexer(judgements["student"])
    x = ids.get_indexer(judgements["id"])
    target = judgements["preference"].to_numpy(dtype=float)
    features = np.zeros((len(judgements), 2))
    for rows in judgements.groupby("student", sort=False).indices.values():
        features[rows] = length_features(judgements.iloc[rows], None)
    k = features.shape[1]
    n_theta = k * len(students)
    columns = m[:, None] * k + np.arange(k)  # each row's student parameters: theta_m, phi_m
    coef, gamma = np.zeros(n_theta), np.zeros(len(ids))
    for _ in range(100):
        prob = _sigmoid(np.sum(coef[columns] * features, axis=1) + gamma[x])
        residual, curvature = target - prob, prob * (1 - prob)
        g_coef = np.bincount(columns.ravel(), (residual[:, None] * features).ravel(), n_theta) - RIDGE * coef
        g_gamma = np.bincount(x, residual, len(ids)) - DIFFICULTY_PENALTY * gamma
        a = np.zeros((n_theta, n_theta))  # pragma: no mutate (the Hessian sets only the speed)
        np.add.at(a, (columns[:, :, None], columns[:, None, :]),
                  curvature[:, None, None] * features[:, :, None] * features[:, None, :])  # fmt: skip # pragma: no mutate
        a += RIDGE * np.eye(n_theta)  # pragma: no mutate
        d = np.bincount(x, curvature, len(ids)) + DIFFICULTY_PENALTY  # pragma: no mutate
        b = np.zeros((n_theta, len(ids)))  # pragma: no mutate
        np.add.at(b, (columns, x[:, None]), curvature[:, None] * features)  # pragma: no mutate
        schur = a - (b / d) @ b.T  # pragma: no mutate
        step_coef = np.linalg.solve(schur, g_coef - b @ (g_gamma / d))
        step_gamma = (g_gamma - b.T @ step_coef) / d
        coef += step_coef
        gamma += step_gamma
        if max(np.max(np.abs(step_coef)), np.max(np.abs(step_gamma))) < tol:
            break
    return pd.Series(gamma - gamma.mean(), index=ids, name="gamma")


@dataclass
class LengthControlled:
    theta: float
    phi: float
    psi: float
    win_rate: float
    """100 x the (weighted) mean over instructions of the model's preference at zero length difference."""


def length_features(judgements: pd.DataFrame, gamma: pd.Series | None) -> np.ndarray:
    """The columns of one student's length-controlled model: 1, tanh(d / s), gamma_x (s: the standard deviation of
    d over the student's judgements; a constant d gives a zero column; without ``gamma``, the first two)."""
    diff = judgements["length_diff"].to_numpy(dtype=float)
    scale = float(diff.std())
    length = np.tanh(diff / scale) if scale > 0 else np.zeros_like(diff)
    if gamma is None:
        return np.column_stack([np.ones_like(diff), length])
    return np.column_stack([np.ones_like(diff), length, gamma.reindex(judgements["id"]).to_numpy()])


def length_controlled(
    features: np.ndarray, preference: np.ndarray, weights: np.ndarray | None = None
) -> LengthControlled:
    """One student's length-controlled win rate from its :func:`length_features` and preferences."""
    theta, phi, psi = fit_logistic(features, preference, weights)
    at_zero = _sigmoid(theta + psi * features[:, 2])
    rate = 100.0 * float(np.average(at_zero, weights=weights))
    return LengthControlled(float(theta), float(phi), float(psi), rate)


def win_rates(
    judgements: pd.DataFrame,
    n_replicates: int = DEFAULT_BOOTSTRAP,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """Per student: ``win_rate``, ``lc_win_rate`` (length-controlled), ``bt_score`` (Bradley-Terry against the
    baseline), each with ``_low``/``_high`` bounds of a seeded percentile bootstrap over instructions, and ``n``.

    ``judgements``: one row per (id, student) with ``preference`` in [0, 1] and ``length_diff``. The bootstrap
    draws instructions with replacement (all students' judgements of one together) and refits every model with
    the draw's counts as weights; the instruction difficulties and the length scale stay those of the whole data,
    as AlpacaEval holds its difficulties fixed."""
    gamma = instruction_difficulty(judgements)
    ids = gamma.index
    students = {}
    for student, group in judgements.groupby("student", sort=True):
        students[student] = (ids.get_indexer(group["id"]), length_features(group, gamma),
                             group["preference"].to_numpy(dtype=float))  # fmt: skip

    def statistic(counts: np.ndarray | None) -> dict:
        values = {}
        for student, (position, features, preference) in students.items():
            weights = None if counts is None else counts[position].astype(float)
            values[("win_rate", student)] = 100.0 * float(np.average(preference, weights=weights))
            values[("lc_win_rate", student)] = length_controlled(features, preference, weights).win_rate
            (beta,) = fit_logistic(features[:, :1], preference, weights)
            values[("bt_score", student)] = 100.0 * float(_sigmoid(beta))
        return values

    point = statistic(None)
    if n_replicates:
        rng = np.random.default_rng(seed)
        draws = pd.DataFrame([statistic(rng.multinomial(len(ids), np.full(len(ids), 1 / len(ids))))
                              for _ in range(n_replicates)])  # fmt: skip
        alpha = (1 - confidence) / 2
        low, high = draws.quantile(alpha), draws.quantile(1 - alpha)
    rows = []
    for student, (position, _, _) in students.items():
        row = {"student": student, "n": len(position)}
        for name in ("win_rate", "lc_win_rate", "bt_score"):
            row[name] = point[(name, student)]
            if n_replicates:
                row[f"{name}_low"], row[f"{name}_high"] = float(low[(name, student)]), float(high[(name, student)])
        rows.append(row)
    return pd.DataFrame(rows)


def comparison(low: float, high: float, even: float = 50.0) -> str:
    """What an interval lets a sentence say of a student against its baseline: ``"beats"`` when the whole
    interval is above ``even`` (a win rate of 50%: as good as the baseline), ``"loses to"`` when it is below,
    ``"cannot be told apart from"`` when it holds ``even`` (or is missing)."""
    if low > even:
        return "beats"
    if high < even:
        return "loses to"
    return "cannot be told apart from"


def verdict_sentence(student: str, baseline: str, rate: float, low: float, high: float, confidence: float) -> str:
    """One sentence of a win rate and its interval: the student beats, loses to, or cannot be told apart from the
    baseline, as the interval says."""
    return (f"{student} {comparison(low, high)} {baseline}: win rate {rate:.1f}% "
            f"[{low:.1f}, {high:.1f}] ({confidence:.0%} interval)")  # fmt: skip


FIRST_POSITION_TOLERANCE = 0.1
"""How far from one half a judge's preference for the answer shown first may be before `evaluate` warns."""


def first_position_preference(p_student_first: np.ndarray, p_baseline_first: np.ndarray) -> float:
    """The judge's mean probability of preferring the answer shown first, over both orders of every pair: 0.5 for
    a judge with no position bias (asking both orders cancels it in the preference, but a strong bias leaves
    little signal)."""
    both = np.concatenate([np.asarray(p_student_first, float), np.asarray(p_baseline_first, float)])
    both = both[np.isfinite(both)]
    return float(both.mean()) if len(both) else float("nan")
