"""The probe's engine on synthetic pools with a known truth: rounds, elimination, epsilon ties, the budget, the
correction, and what it asks to reveal."""

import math
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from magpie_teach.errors import ConfigError
from magpie_teach.scoring.probe import fixed_sample_choice, instruction_order, round_sizes, run_probe
from magpie_teach.settings import ProbeSettings
from tests.test_confidence import synthetic_scores


def pool(means, n=400, seed=0, bases=("m",)):
    scores = synthetic_scores(means, n=n, seed=seed, bases=bases)
    return scores, list(dict.fromkeys(scores["id"]))


class Revealer:
    """Reveals a pool, and records every (teacher, id) it was asked for."""

    def __init__(self, scores):
        self.scores = scores
        self.asked: list[tuple[str, str]] = []

    def __call__(self, teachers, ids):
        self.asked += [(t, i) for t in teachers for i in ids]
        return self.scores[self.scores["teacher"].isin(teachers) & self.scores["id"].isin(ids)]


def test_round_sizes_grow_geometrically_up_to_the_budget():
    assert round_sizes(1000, ProbeSettings(start=10, growth=2)) == [10, 20, 40, 80, 160, 320, 640, 1000]
    assert round_sizes(1000, ProbeSettings(start=10, growth=3, max_instructions=100)) == [10, 30, 90, 100]
    assert round_sizes(5, ProbeSettings(start=10)) == [5]
    assert round_sizes(100, ProbeSettings(start=10, growth=1.5)) == [10, 15, 23, 35, 53, 80, 100]


def test_the_instruction_order_is_a_seeded_permutation_independent_of_input_order():
    ids = [f"i{k}" for k in range(50)]
    first = instruction_order(ids, 3)
    assert sorted(first) == sorted(ids) and first != sorted(ids)
    assert instruction_order(list(reversed(ids)), 3) == first
    assert instruction_order(ids, 4) != first


def test_a_clear_winner_eliminates_the_others_who_are_asked_only_for_the_rounds_they_were_in():
    means = {"best": (3.0, 1.0), "mid": (2.0, 1.0), "low": (1.0, 1.0)}
    scores, ids = pool(means)
    reveal = Revealer(scores)
    settings = ProbeSettings(start=8)
    rounds_seen = []
    result = run_probe(ids, list(means), ["m"], reveal, settings, beta=3.0,
                       on_round=lambda k, n, survivors, revealed: rounds_seen.append((k, n, survivors)))  # fmt: skip
    assert result.decisions[0]["teacher"] == "best" and result.decisions[0]["decided"]
    assert result.decisions[0]["reason"] == "only candidate left"
    assert result.stop_reason == "every base model decided" and result.finished_round < len(result.sizes)
    # each teacher was asked exactly for the first `revealed[t]` instructions of the order, once each
    order = instruction_order(ids, settings.seed)
    for teacher, n in result.revealed.items():
        asked = [i for t, i in reveal.asked if t == teacher]
        assert asked == order[:n], teacher
    # a teacher eliminated in round k is not asked for round k + 1
    rounds = result.rounds
    for teacher in ("mid", "low"):
        out_at = rounds[(rounds["teacher"] == teacher) & (rounds["status"] == "eliminated")]["round"].min()
        assert result.revealed[teacher] == result.sizes[out_at - 1]
    assert [k for k, _, _ in rounds_seen] == list(range(1, result.finished_round + 1))


def test_the_elimination_is_the_corrected_one_sided_test_on_the_bootstrap_lead():
    means = {"a": (2.5, 1.0), "b": (2.3, 1.0), "c": (2.2, 1.0), "d": (1.0, 1.0)}
    scores, ids = pool(means, n=300, seed=5)
    settings = ProbeSettings(start=300)  # one round: every comparison is visible in it
    result = run_probe(ids, list(means), ["m"], Revealer(scores), settings, beta=3.0)
    z = NormalDist().inv_cdf(1 - 0.05 / (3 * 1))
    rows = result.rounds.set_index("teacher")
    leader = rows["value"].idxmax()
    assert rows.loc[leader, "status"] == "leader"
    for teacher in set(means) - {leader}:
        eliminated = rows.loc[teacher, "status"] == "eliminated"
        assert eliminated == (rows.loc[teacher, "lead_z"] > z), (teacher, rows.loc[teacher, "lead_z"], z)
    assert rows.loc["d", "status"] == "eliminated"
    assert rows["status"].eq("candidate").any()  # the top three are too close for 300 instructions


def test_survivors_within_epsilon_stop_the_race():
    twins = {"x": (3.0, 1.0), "y": (3.0, 1.0)}
    scores, ids = pool(twins, n=20000, seed=1)
    loose = ProbeSettings(start=500, epsilon=0.2)
    result = run_probe(ids, list(twins), ["m"], Revealer(scores), loose, beta=3.0)
    assert result.decisions[0]["decided"] and "within epsilon=0.2" in result.decisions[0]["reason"]
    assert result.finished_round < len(result.sizes)
    strict = ProbeSettings(start=500, epsilon=0.0, max_instructions=4000)
    result = run_probe(ids, list(twins), ["m"], Revealer(scores), strict, beta=3.0)
    assert not result.decisions[0]["decided"] and result.stop_reason == "budget spent"
    assert result.decisions[0]["reason"] == "budget spent"
    assert result.revealed == {"x": 4000, "y": 4000}


def test_a_teacher_stays_while_it_is_a_candidate_for_an_undecided_base_model():
    # under m1, "a" wins by far (b's loss is tripled); under m2, "b" wins by less (a's loss x 1.3); "c" loses both
    scores = synthetic_scores({"a": (3.0, 1.0), "b": (3.0, 1.0), "c": (2.0, 1.0)}, n=2000, seed=2, bases=("m1", "m2"))
    scores.loc[(scores["base_model"] == "m1") & (scores["teacher"] == "b"), "compat_loss"] *= 3
    scores.loc[(scores["base_model"] == "m2") & (scores["teacher"] == "a"), "compat_loss"] *= 1.3
    ids = list(dict.fromkeys(scores["id"]))
    result = run_probe(ids, ["a", "b", "c"], ["m1", "m2"], Revealer(scores), ProbeSettings(start=8), beta=3.0)
    assert {d["base_model"]: d["teacher"] for d in result.decisions} == {"m1": "a", "m2": "b"}
    assert all(d["decided"] for d in result.decisions)
    rounds = result.rounds
    m1_decided = rounds.loc[rounds["base_model"] == "m1", "round"].max()
    m2_decided = rounds.loc[rounds["base_model"] == "m2", "round"].max()
    assert m1_decided < m2_decided  # the setup: m1 is decided first
    # a won m1 but stayed in the race while it was a candidate for m2
    assert result.revealed["a"] == result.revealed["b"] == result.sizes[m2_decided - 1]
    assert result.revealed["c"] < result.revealed["a"]


def test_the_same_seed_gives_the_same_probe():
    scores, ids = pool({"a": (2.4, 1.0), "b": (2.2, 1.0), "c": (2.1, 1.1)}, n=600, seed=9)
    first = run_probe(ids, ["a", "b", "c"], ["m"], Revealer(scores), ProbeSettings(start=16, seed=4), beta=3.0)
    again = run_probe(ids, ["a", "b", "c"], ["m"], Revealer(scores), ProbeSettings(start=16, seed=4), beta=3.0)
    pd.testing.assert_frame_equal(first.rounds, again.rounds)
    assert first.revealed == again.revealed


def test_the_fixed_sample_baseline_takes_the_best_point_estimate_on_the_first_instructions():
    scores, ids = pool({"a": (2.0, 1.0), "b": (2.1, 1.0)}, n=50, seed=3)
    settings = ProbeSettings(seed=2)
    first = set(instruction_order(ids, 2)[:10])
    subset = scores[scores["id"].isin(first)].groupby("teacher")[["reward", "compat_loss"]].mean()
    expected = (subset["reward"] / (1 + 3 * subset["compat_loss"])).idxmax()
    assert fixed_sample_choice(scores, ["a", "b"], ids, 10, settings, 3.0) == {"m": expected}


def test_the_fixed_sample_baseline_uses_its_seed_its_beta_and_only_the_teachers_named():
    """CAR against an independent computation, for several seeds and betas; a third teacher, the best by far,
    is not among the teachers named and never chosen."""
    scores, ids = pool({"a": (2.0, 0.5), "b": (2.4, 1.5), "out": (9.0, 0.1)}, n=40, seed=6, bases=("m1", "m2"))
    chosen_per_call = set()
    for seed in range(6):
        order = instruction_order(ids, seed)
        for beta in (0.2, 6.0):
            expected = {}
            for base in ("m1", "m2"):
                rows = scores[
                    (scores["base_model"] == base) & scores["id"].isin(order[:8]) & (scores["teacher"] != "out")
                ]
                means = rows.groupby("teacher")[["reward", "compat_loss"]].mean()
                expected[base] = (means["reward"] / (1 + beta * means["compat_loss"])).idxmax()
            got = fixed_sample_choice(scores, ["a", "b"], ids, 8, ProbeSettings(seed=seed), beta)
            assert got == expected, (seed, beta)
            chosen_per_call.add(tuple(got.values()))
    assert len(chosen_per_call) > 1  # the seed and beta matter on this data


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("start", 1, "probe.start must be >= 2"), ("growth", 1.0, "probe.growth must be > 1"),
     ("confidence", 1.5, "probe.confidence must be between 0 and 1"), ("epsilon", -0.1, "probe.epsilon must be >= 0"),
     ("metric", "ppl", "probe.metric 'ppl' is not one of car, reward, compat_loss"),
     ("max_instructions", 4, "probe.max_instructions (4) is below start (32)")],
)  # fmt: skip
def test_probe_settings_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ProbeSettings(**{field: value}).validate()


def test_probe_rounds_hold_intervals_around_each_value():
    scores, ids = pool({"a": (2.0, 1.0), "b": (1.0, 1.0)}, n=100, seed=0)
    result = run_probe(ids, ["a", "b"], ["m"], Revealer(scores), ProbeSettings(start=100), beta=3.0)
    rounds = result.rounds
    assert (rounds["ci_low"] <= rounds["value"]).all() and (rounds["value"] <= rounds["ci_high"]).all()
    assert math.isclose(rounds["p_best"].sum(), 1.0)
    means = scores.groupby("teacher")[["reward", "compat_loss"]].mean()
    expected = means["reward"] / (1 + 3 * means["compat_loss"])
    assert rounds.set_index("teacher")["value"].to_dict() == pytest.approx(expected.to_dict())
    assert np.isnan(rounds.set_index("teacher").loc["a", "lead_z"])


def test_the_correction_covers_every_comparison_in_every_planned_round():
    scores, ids = pool({"a": (3.0, 1.0), "b": (1.0, 1.0), "c": (1.0, 1.0), "d": (1.0, 1.0)}, n=100, seed=0)
    settings = ProbeSettings(start=10, confidence=0.9)
    result = run_probe(ids, ["a", "b", "c", "d"], ["m"], Revealer(scores), settings, beta=3.0)
    assert len(result.sizes) == 5  # 10, 20, 40, 80, 100
    assert result.z == pytest.approx(NormalDist().inv_cdf(1 - 0.1 / (3 * 5)))


def test_rounds_record_what_each_round_saw_and_leads_in_standard_errors():
    from magpie_teach.scoring.confidence import bootstrap_ranking, paired_samples
    from magpie_teach.scoring.metrics import aggregate

    means = {"a": (2.0, 1.0), "b": (1.7, 1.0), "c": (1.0, 1.2)}
    scores, ids = pool(means, n=200, seed=4)
    settings = ProbeSettings(start=20, seed=7, bootstrap=400, confidence=0.8)
    seen = []
    result = run_probe(ids, list(means), ["m"], Revealer(scores), settings, beta=1.5,
                       on_round=lambda k, n, survivors, revealed: seen.append((k, n, list(survivors), revealed)))  # fmt: skip
    rounds = result.rounds
    assert list(rounds.columns) == ["round", "instructions", "base_model", "teacher", "metric", "value", "ci_low",
                                    "ci_high", "p_best", "lead_z", "status"]  # fmt: skip
    assert set(rounds["metric"]) == {"car"}
    assert (rounds["instructions"] == [result.sizes[k - 1] for k in rounds["round"]]).all()
    for k, n, survivors, revealed in seen:
        assert n == result.sizes[k - 1]
        assert survivors == sorted(rounds.loc[(rounds["round"] == k) & (rounds["status"] != "eliminated"), "teacher"],
                                   key=list(means).index) or not survivors  # fmt: skip
        assert all(revealed[t] == n for t in survivors)
    assert result.survivors == seen[-1][2]
    # round 1, recomputed here: every teacher on the first 20 instructions of the order, bootstrap seed = seed + 1
    first = scores[scores["id"].isin(instruction_order(ids, 7)[:20])]
    ranking = aggregate(first, beta=1.5).reset_index(drop=True)
    samples = paired_samples(first, ranking, 400, 8)["car"]
    expected, _ = bootstrap_ranking(first, ranking, n_replicates=400, confidence=0.8, seed=8)
    got = rounds[rounds["round"] == 1].set_index("teacher")
    lead = int(ranking["car"].idxmax())
    for j, teacher in enumerate(ranking["teacher"]):
        assert got.loc[teacher, "value"] == pytest.approx(ranking.loc[j, "car"])
        assert got.loc[teacher, "ci_low"] == pytest.approx(expected.loc[j, "car_ci_low"])
        assert got.loc[teacher, "ci_high"] == pytest.approx(expected.loc[j, "car_ci_high"])
        assert got.loc[teacher, "p_best"] == pytest.approx(expected.loc[j, "p_best"])
        if j != lead:
            differences = samples[:, lead] - samples[:, j]
            gap = ranking.loc[lead, "car"] - ranking.loc[j, "car"]
            assert got.loc[teacher, "lead_z"] == pytest.approx(gap / np.std(differences, ddof=1))
    # the whole record of revealed scores is there, one row per revealed response
    assert len(result.scores) == sum(result.revealed.values())
    decision = result.decisions[0]
    assert set(decision) == {"base_model", "teacher", "confidence", "decided", "reason", "candidates"}
    last = rounds[rounds["round"] == result.finished_round].set_index("teacher")
    assert decision["confidence"] == pytest.approx(last.loc[decision["teacher"], "p_best"])


def test_the_epsilon_rule_is_relative_to_the_leaders_value():
    # CAR 0.25 at beta 3 (a margin of 0.2 is 0.05 in CAR units), and CAR 5 at beta 1 (a margin of 0.02 is 0.1):
    # a leader's value below 1 and above it, so that a rule dividing by the value differs from one multiplying
    cases = [({"x": (1.0, 1.0), "y": (1.0, 1.0)}, 3.0, 0.2), ({"x": (10.0, 1.0), "y": (10.0, 1.0)}, 1.0, 0.02),
             ({"x": (1.0, 1.0), "y": (1.0, 1.0)}, 3.0, 0.6)]  # fmt: skip
    for twins, beta, epsilon in cases:
        scores, ids = pool(twins, n=8000, seed=3)
        result = run_probe(ids, list(twins), ["m"], Revealer(scores), ProbeSettings(start=500, epsilon=epsilon),
                           beta=beta)  # fmt: skip
        assert result.decisions[0]["decided"] and "within epsilon" in result.decisions[0]["reason"], epsilon
        rounds = result.rounds
        for k, group in rounds.groupby("round"):
            group = group.set_index("teacher")
            leader = group[group["status"] == "leader"].index[0]
            other = group.drop(index=leader)
            gap = group.loc[leader, "value"] - other["value"]
            bound = gap + result.z * gap / other["lead_z"]
            within = bool((bound < epsilon * abs(group.loc[leader, "value"])).all())
            decided_here = k == result.finished_round and result.decisions[0]["decided"]
            assert within == decided_here, (epsilon, k, bound.tolist())


def test_a_probe_on_compatibility_loss_keeps_the_lowest_loss_and_a_shift_reaches_car():
    scores, ids = pool({"easy": (2.0, 0.5), "hard": (2.0, 2.0), "mid": (2.0, 1.0)}, n=200, seed=1)
    result = run_probe(ids, ["easy", "hard", "mid"], ["m"], Revealer(scores), ProbeSettings(start=16, metric="compat_loss"),
                       beta=3.0)  # fmt: skip
    assert result.decisions[0]["teacher"] == "easy"
    leader = result.rounds[result.rounds["status"] == "leader"]
    assert (leader["teacher"] == "easy").all() and (leader["p_best"] > 0.9).all()
    negative = scores.assign(reward=scores["reward"] - 5.0)  # every mean reward below 0: CAR needs a shift
    shifted = run_probe(ids, ["easy", "hard", "mid"], ["m"], Revealer(negative), ProbeSettings(start=16), beta=3.0,
                        reward_shift=6.0)  # fmt: skip
    assert shifted.decisions[0]["teacher"] == "easy"
    first = shifted.rounds[shifted.rounds["round"] == 1].set_index("teacher")
    subset = negative[negative["id"].isin(instruction_order(ids, 0)[:16])]
    means = subset.groupby("teacher")[["reward", "compat_loss"]].mean()
    expected = (means["reward"] + 6.0) / (1 + 3.0 * means["compat_loss"])
    assert first["value"].to_dict() == pytest.approx(expected.to_dict())


def test_no_equivalence_on_too_few_instructions_and_nothing_on_flat_scores():
    """The minimum evidence of `rank` in the probe: twins within a huge epsilon are not declared equivalent on
    fewer than MIN_DECISION_INSTRUCTIONS instructions (the first round that reaches it decides), and a teacher
    whose scores are all equal is neither eliminated nor decided on, however far behind it looks."""
    from magpie_teach.scoring.confidence import MIN_DECISION_INSTRUCTIONS

    twins = {"x": (3.0, 1.0), "y": (3.0, 1.0)}
    scores, ids = pool(twins, n=64, seed=1)
    settings = ProbeSettings(start=4, growth=2, epsilon=10.0)
    result = run_probe(ids, list(twins), ["m"], Revealer(scores), settings, beta=3.0)
    decision = result.decisions[0]
    assert decision["decided"] and "within epsilon" in decision["reason"]
    first_enough = next(k for k, n in enumerate(result.sizes, start=1) if n >= MIN_DECISION_INSTRUCTIONS)
    assert result.finished_round == first_enough  # 4, 8, 16: too few; 32 decides
    short = run_probe(ids, list(twins), ["m"], Revealer(scores), ProbeSettings(start=4, epsilon=10.0,
                      max_instructions=16), beta=3.0)  # fmt: skip
    assert not short.decisions[0]["decided"]
    assert short.decisions[0]["reason"].startswith("16 instruction(s) are too few to decide on")

    flat, ids = pool({"good": (3.0, 1.0), "flat": (1.0, 1.0)}, n=64, seed=2)
    flat.loc[flat["teacher"] == "flat", ["reward", "compat_loss"]] = [1.0, 1.0]
    result = run_probe(ids, ["good", "flat"], ["m"], Revealer(flat), ProbeSettings(start=32, epsilon=0.0), beta=3.0)
    assert set(result.rounds["status"]) <= {"leader", "candidate"} and not result.decisions[0]["decided"]
    assert "distinct value(s)" in result.decisions[0]["reason"]
