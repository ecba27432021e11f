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
