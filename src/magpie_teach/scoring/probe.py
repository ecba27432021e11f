"""The probe's engine: an adaptive teacher search in rounds, which stops paying for teachers that have lost.

A probe reveals responses round by round: round k covers the first ``n_k`` instructions of one seeded
permutation (``n_1 = start``, ``n_(k+1) = ceil(n_k * growth)``, up to ``max_instructions``), for the teachers
still in the race only. After each round, per base model, the teachers still candidates for it are compared
with their leader (the highest point estimate of ``metric``) on the paired bootstrap of
:mod:`magpie_teach.scoring.confidence`:

* a candidate is **eliminated** for that base model when the leader is better at the chosen confidence:
  ``d - z * se > 0``, with ``d`` the leader's lead on the metric (oriented so that higher is better), ``se`` the
  standard deviation of that lead over the bootstrap replicates, and ``z`` the normal quantile at
  ``1 - (1 - confidence) / ((T - 1) * K)``: a Bonferroni correction over the ``T - 1`` comparisons with a leader
  in each of the ``K`` planned rounds. The truly best teacher for a base model is then eliminated with
  probability at most ``1 - confidence`` over the whole probe (up to the normal approximation of the paired
  bootstrap), whichever teacher leads in each round. A normal quantile is used because the corrected level is
  far in the tail, where a thousand bootstrap replicates cannot resolve a percentile;
* nothing is eliminated or decided while a teacher's scores take fewer than
  :data:`magpie_teach.scoring.confidence.MIN_DISTINCT_SCORES` distinct values (a bootstrap of a handful of values
  has almost no variance), and the candidates are not declared equivalent (``epsilon``) on a round of fewer than
  :data:`magpie_teach.scoring.confidence.MIN_DECISION_INSTRUCTIONS` instructions; a loser may go earlier, on
  the corrected lead below (a Bonferroni-corrected z of about 3, not a 95% bootstrap interval);
* the base model is **decided** when one candidate is left, or when every candidate is within ``epsilon`` of
  the leader at the same confidence (``d + z * se < epsilon * |leader|``: no survivor can be worse by more than
  ``epsilon``, relative to the leader's value).

A teacher stays in the race while it is a candidate for a base model that is not decided. The probe stops when
every base model is decided, or when the budget (``max_instructions``, or every instruction there is) is spent.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from magpie_teach.scoring.confidence import (
    MIN_DISTINCT_SCORES,
    distinct_scores,
    evidence_shortfall,
    paired_samples,
    percentile_interval,
    posterior_p_best,
)
from magpie_teach.scoring.metrics import METRIC_DIRECTIONS, aggregate
from magpie_teach.settings import ProbeSettings


def round_sizes(n_available: int, settings: ProbeSettings) -> list[int]:
    """The cumulative number of instructions of each planned round."""
    budget = min(n_available, settings.max_instructions or n_available)
    sizes = [min(settings.start, budget)]
    while sizes[-1] < budget:
        sizes.append(min(math.ceil(sizes[-1] * settings.growth), budget))
    return sizes


def instruction_order(ids: list, seed: int) -> list:
    """One seeded permutation of the instruction ids (sorted first, so the input order does not matter)."""
    ordered = sorted(ids)
    return [ordered[k] for k in np.random.default_rng(seed).permutation(len(ordered))]


@dataclass
class ProbeResult:
    decisions: list[dict]
    rounds: pd.DataFrame
    """One row per (round, base model, teacher in the race): ``metric``, ``value``, ``ci_low``, ``ci_high``,
    ``p_best``, ``lead_z`` (the leader's lead in standard errors) and ``status`` (``leader``, ``candidate``,
    ``eliminated``); a teacher no longer a candidate for a base model has no later rows for it."""
    scores: pd.DataFrame
    """Per-example scores of every revealed response."""
    revealed: dict[str, int]
    """Instructions revealed per teacher."""
    sizes: list[int]
    finished_round: int
    stop_reason: str
    survivors: list[str]
    z: float
    """The corrected normal quantile a lead must exceed, in standard errors, to eliminate."""


@dataclass
class _BaseState:
    candidates: list[str]
    decided: bool = False
    reason: str = ""
    leader: str = ""
    p_best: float = float("nan")


Reveal = Callable[[list[str], list], pd.DataFrame]
"""``reveal(teachers, ids)``: the per-example scores (every base model) of those teachers on those instructions:
``teacher``, ``id``, ``base_model``, ``reward``, ``compat_loss`` and whatever else the scorer writes."""


def run_probe(
    ids: list,
    teachers: list[str],
    base_models: list[str],
    reveal: Reveal,
    settings: ProbeSettings,
    beta: float,
    reward_shift: str | float = "none",
    on_round: Callable[[int, int, list[str], dict[str, int]], None] | None = None,
) -> ProbeResult:
    """Runs the rounds over ``ids`` (in the order of :func:`instruction_order`) and returns what was decided."""
    settings.validate()
    sizes = round_sizes(len(ids), settings)
    order = instruction_order(ids, settings.seed)
    z = NormalDist().inv_cdf(1 - (1 - settings.confidence) / (max(len(teachers) - 1, 1) * len(sizes)))
    states = {base: _BaseState(list(teachers)) for base in base_models}
    survivors = list(teachers)
    revealed: dict[str, int] = {}  # round 1 reveals every teacher: its keys come in `teachers`' order
    frames: list[pd.DataFrame] = []
    rounds: list[dict] = []
    stop = "budget spent"
    finished = 0  # pragma: no mutate (round 1 always runs: a plan has at least one round)
    for k, size in enumerate(sizes, start=1):
        new_ids = order[sizes[k - 2] if k > 1 else 0 : size]  # the survivors have answered every earlier round
        if new_ids:
            frames.append(reveal(survivors, new_ids))
        for teacher in survivors:
            revealed[teacher] = size
        scores = pd.concat(frames, ignore_index=True)
        current = set(order[:size])
        for base, state in states.items():
            if state.decided:
                continue
            rows = scores[(scores["base_model"] == base) & scores["id"].isin(current)]
            _judge(rows[rows["teacher"].isin(state.candidates)], base, state, settings, z, beta, reward_shift, k,
                   size, rounds)  # fmt: skip
        finished = k
        survivors = [t for t in teachers if any(t in s.candidates for s in states.values() if not s.decided)]
        if on_round is not None:
            on_round(k, size, survivors, dict(revealed))
        if all(state.decided for state in states.values()):
            stop = "every base model decided"
            break
    decisions = [
        {"base_model": base, "teacher": state.leader, "confidence": state.p_best, "decided": state.decided,
         "reason": state.reason or "budget spent", "candidates": list(state.candidates)}
        for base, state in states.items()
    ]  # fmt: skip
    return ProbeResult(decisions, pd.DataFrame(rounds), pd.concat(frames, ignore_index=True), revealed, sizes,
                       finished, stop, survivors, z)  # fmt: skip


def _judge(
    rows: pd.DataFrame,
    base: str,
    state: _BaseState,
    settings: ProbeSettings,
    z: float,
    beta: float,
    reward_shift: str | float,
    round_number: int,
    size: int,
    out: list[dict],
) -> None:
    """One round's comparisons for one base model: updates ``state`` and appends the round's rows to ``out``."""
    ranking = aggregate(rows, beta=beta, reward_shift=reward_shift).reset_index(drop=True)
    samples = paired_samples(rows, ranking, settings.bootstrap, settings.seed + round_number)
    sign = 1.0 if METRIC_DIRECTIONS[settings.metric] else -1.0
    values = sign * samples[settings.metric]  # replicates x teachers, higher is better
    point = sign * ranking[settings.metric].to_numpy(dtype=np.float64)
    lead = int(np.argmax(point))
    p_best = posterior_p_best(point, values, settings.seed + round_number)
    distinct = distinct_scores(rows)
    too_few = evidence_shortfall(int(rows["id"].nunique()), distinct)
    flat = distinct < MIN_DISTINCT_SCORES  # too few distinct scores, whatever the number of instructions
    low, high = percentile_interval(samples[settings.metric], settings.confidence)
    eliminated, within = [], True
    lead_z = np.full(len(point), np.nan)
    for j in range(len(point)):
        if j == lead:
            continue
        gap = point[lead] - point[j]
        spread = float(np.nanstd(values[:, lead] - values[:, j], ddof=1))
        lead_z[j] = gap / spread if spread > 0 else math.inf
        if flat:  # scores with (almost) no variance: nothing to tell a lead from noise by
            within = False
            continue
        if gap - z * spread > 0:
            eliminated.append(j)
        if gap + z * spread >= settings.epsilon * abs(point[lead]):
            within = False
    teachers = ranking["teacher"].tolist()
    for j, teacher in enumerate(teachers):
        status = "leader" if j == lead else "eliminated" if j in eliminated else "candidate"
        out.append({"round": round_number, "instructions": size, "base_model": base, "teacher": teacher,
                    "metric": settings.metric, "value": float(sign * point[j]), "ci_low": float(low[j]),
                    "ci_high": float(high[j]), "p_best": float(p_best[j]), "lead_z": float(lead_z[j]),
                    "status": status})  # fmt: skip
    state.candidates = [t for j, t in enumerate(teachers) if j not in eliminated]
    state.leader = teachers[lead]
    state.p_best = float(p_best[lead])
    if len(state.candidates) == 1 and not flat:  # every other one lost at the corrected confidence
        state.decided, state.reason = True, "only candidate left"
    elif too_few:  # no claim that the candidates are equivalent on too little evidence
        state.reason = too_few
    elif within:
        state.decided, state.reason = True, f"every candidate within epsilon={settings.epsilon:g} of the leader"
    else:  # undecided: "budget spent" at the end
        state.reason = ""


def fixed_sample_choice(
    scores: pd.DataFrame, teachers: list[str], ids: list, n: int, settings: ProbeSettings, beta: float
) -> dict[str, str]:
    """The baseline a probe is measured against: every teacher on the first ``n`` instructions of the same order,
    and the best point estimate per base model."""
    chosen = set(instruction_order(ids, settings.seed)[:n])
    rows = scores[scores["id"].isin(chosen) & scores["teacher"].isin(teachers)]
    ranking = aggregate(rows, beta=beta)
    column = f"rank_{settings.metric}"
    return {str(b): str(g.sort_values(column).iloc[0]["teacher"]) for b, g in ranking.groupby("base_model")}
