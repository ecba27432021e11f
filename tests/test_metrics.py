import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from magpie_teach.errors import ConfigError, DataError
from magpie_teach.scoring.metrics import (
    aggregate,
    car,
    correlations,
    ic_ifd,
    ifd,
    load_performance,
    resolve_reward_shift,
)


def test_formulas():
    assert car(0.8, 1.5, beta=3) == pytest.approx(0.8 / 5.5)
    assert car(0.8, 1.5, beta=0) == pytest.approx(0.8)
    assert ifd(1.0, 2.0) == pytest.approx(0.5)
    assert ic_ifd(1.0, 4.0, 2.0) == pytest.approx(1.0 / 8.0)


def _scores(rewards):
    rng = np.random.default_rng(0)
    rows = []
    for base in ("b1", "b2"):
        for t, teacher in enumerate(("t1", "t2", "t3")):
            for i in range(4):
                loss = 1.0 + 0.3 * t + 0.1 * rng.random() + (0.5 if base == "b2" and t == 0 else 0)
                rows.append(
                    {
                        "teacher": teacher,
                        "base_model": base,
                        "id": str(i),
                        "reward": rewards[t] + 0.01 * i,
                        "compat_loss": loss,
                        "uncond_loss": loss * 1.2,
                        "instr_loss": 2.0,
                        "n_tokens_full": 10 * (t + 1) + i,
                        "truncated": i == 0 and t == 2,
                        "ifd_self": 1 / 1.2,
                        "ic_ifd_self": 1 / 2.4,
                    }
                )
    return pd.DataFrame(rows)


def test_aggregate_computes_means_car_and_ranks():
    scores = _scores([1.0, 2.0, 3.0])
    table = aggregate(scores, beta=3.0)
    for (teacher, base), group in scores.groupby(["teacher", "base_model"]):
        row = table[(table.teacher == teacher) & (table.base_model == base)].iloc[0]
        reward, loss = group["reward"].mean(), group["compat_loss"].mean()
        assert row["n"] == 4
        assert row["car"] == pytest.approx(reward / (1 + 3 * loss))
        assert row["ppl_self"] == pytest.approx(math.exp(loss))
        assert row["length"] == pytest.approx(group["n_tokens_full"].mean())
        assert row["n_truncated"] == group["truncated"].sum()
    b1 = table[table.base_model == "b1"].set_index("teacher")
    assert b1.loc["t3", "rank_reward"] == 1 and b1.loc["t1", "rank_compat_loss"] == 1
    assert b1["rank_car"].tolist() == b1["car"].rank(ascending=False).astype(int).tolist()


def test_non_positive_rewards_warn_and_auto_shift_restores_order():
    scores = _scores([-3.0, -2.0, -1.0])
    with pytest.warns(UserWarning, match="positive rewards"):
        raw = aggregate(scores)
    assert (raw["car_reward_shift"] == 0).all()
    shifted = aggregate(scores, reward_shift="auto")
    shift = shifted["car_reward_shift"].iloc[0]
    means = scores.groupby("teacher")["reward"].mean()
    assert shift == pytest.approx(-means.min() + (means.max() - means.min()))
    assert ((shifted["reward"] + shift) > 0).all()
    assert resolve_reward_shift(means, 5) == 5.0
    with pytest.raises(ConfigError):
        resolve_reward_shift(means, "lots")


def test_correlations_equal_scipy_spearman(tmp_path):
    scores = _scores([1.0, 2.0, 3.0])
    table = aggregate(scores)
    perf = pd.DataFrame(
        {
            "teacher": ["t1", "t2", "t3"] * 2,
            "base_model": ["models/b1"] * 3 + ["b2"] * 3,
            "AE2_LC_WR": [5.0, 3.0, 1.0, 2.0, 6.0, 4.0],
            "ArenaHard_WR": [1.0, 2.0, 0.5, 2.0, 3.0, 1.0],
        }
    )
    path = tmp_path / "perf.csv"
    perf.to_csv(path, index=False)
    loaded = load_performance(str(path))
    corr = correlations(table, loaded)
    for base in ("b1", "b2"):
        sub = table[table.base_model == base].set_index("teacher").sort_index()
        ap = perf[perf.base_model.str.endswith(base)].set_index("teacher").sort_index()
        ap = (ap["AE2_LC_WR"] + ap["ArenaHard_WR"]) / 2
        assert corr.loc["car", base] == pytest.approx(spearmanr(sub["car"], ap).statistic)
        assert corr.loc["compat_loss", base] == pytest.approx(spearmanr(-sub["compat_loss"], ap).statistic)
    assert corr.loc["car", "mean"] == pytest.approx(corr.loc["car", ["b1", "b2"]].mean())


def test_performance_file_errors_name_the_problem(tmp_path):
    path = tmp_path / "perf.csv"
    path.write_text("teacher,base_model,AE2_LC_WR\nt1,b1,3\n")
    with pytest.raises(DataError, match="ArenaHard_WR"):
        load_performance(str(path))
    path.write_text("teacher,base_model,AE2_LC_WR,ArenaHard_WR\nt1,b1,3,n/a\n")
    with pytest.raises(DataError, match=r"row 1, column 'ArenaHard_WR'"):
        load_performance(str(path))


@pytest.mark.parametrize("reward_shift", ["auto", 2.5, "none"])
def test_car_applies_the_reward_shift_and_rank_car_follows_car(reward_shift):
    scores = _scores([-3.0, -2.0, -1.0] if reward_shift != "none" else [1.0, 2.0, 3.0])
    table = aggregate(scores, beta=2.0, reward_shift=reward_shift)
    means = scores.groupby("teacher")["reward"].mean()
    expected_shift = {"auto": -means.min() + (means.max() - means.min()), 2.5: 2.5, "none": 0.0}[reward_shift]
    np.testing.assert_allclose(table["car_reward_shift"], expected_shift)
    for row in table.itertuples():
        group = scores[(scores.teacher == row.teacher) & (scores.base_model == row.base_model)]
        expected = (group["reward"].mean() + expected_shift) / (1 + 2.0 * group["compat_loss"].mean())
        assert row.car == pytest.approx(expected)
    for _, group in table.groupby("base_model"):
        order = group.sort_values("car", ascending=False)["teacher"].tolist()
        assert group.sort_values("rank_car")["teacher"].tolist() == order


def test_reward_shift_boundaries():
    import warnings

    means = pd.Series({"t1": 0.0, "t2": 0.5, "t3": 2.0})  # a mean of exactly 0 is not positive
    with pytest.warns(UserWarning, match="mean reward <= 0 for t1 "):
        assert resolve_reward_shift(means, None) == 0.0
    assert resolve_reward_shift(means, "auto") == pytest.approx(2.0)  # -min + (max - min)
    small = pd.Series({"t1": 0.25, "t2": 0.5, "t3": 1.0})  # positive, if below 1: no warning, no shift
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_reward_shift(small, None) == 0.0
        assert resolve_reward_shift(small, "none") == 0.0
    assert resolve_reward_shift(small, "auto") == 0.0
    equal = pd.Series({"t1": -1.0, "t2": -1.0})
    assert resolve_reward_shift(equal, "auto") == pytest.approx(2.0)  # spread 0: the lowest lands at 1
