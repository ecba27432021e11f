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


def _ranking(base: str, teachers: list[str], car_values: list[float], **columns) -> pd.DataFrame:
    return pd.DataFrame({"teacher": teachers, "base_model": base, "car": car_values, **columns})


def test_correlations_match_by_last_path_component_and_only_on_matched_teachers(caplog):
    ranking = _ranking("models/Qwen2-1.5B", ["org/t1", "org/t2", "org/t3", "org/t4"], [0.1, 0.4, 0.3, 0.9])
    performance = pd.DataFrame({"teacher": ["t1", "t2", "t3", "other"], "base_model": "Qwen2-1.5B",
                                "ap": [1.0, 3.0, 2.0, 9.0]})  # fmt: skip
    with caplog.at_level("WARNING"):
        table = correlations(ranking, performance, ["car"])
    assert "base model models/Qwen2-1.5B: no performance numbers for ['org/t4']" in caplog.text
    assert table.loc["car", "models/Qwen2-1.5B"] == pytest.approx(spearmanr([0.1, 0.4, 0.3], [1, 3, 2]).statistic)
    assert table.loc["n_teachers", "models/Qwen2-1.5B"] == 3.0 and math.isnan(table.loc["n_teachers", "mean"])
    assert table.index.name == "metric"  # correlations.csv's first column header


def test_correlations_need_three_matched_teachers():
    ranking = _ranking("b", ["t1", "t2", "t3"], [0.1, 0.2, 0.3])
    performance = pd.DataFrame({"teacher": ["t1", "t2", "x"], "base_model": "b", "ap": [1.0, 2.0, 3.0]})
    with pytest.raises(ConfigError, match=r"base model 'b': only 2 teacher\(s\) have performance numbers"):
        correlations(ranking, performance, ["car"])


def test_a_constant_metric_has_no_rho_and_the_other_metrics_still_do():
    ranking = _ranking("b", ["t1", "t2", "t3", "t4"], [0.1, 0.4, 0.3, 0.2], length=[5.0, 5.0, 5.0, 5.0],
                       reward=[1.0, 1.0, 2.0, 2.0], compat_loss=[1.0, 2.0, 3.0, 4.0])  # fmt: skip
    performance = pd.DataFrame({"teacher": ["t1", "t2", "t3", "t4"], "base_model": "b", "ap": [1.0, 4.0, 3.0, 2.0]})
    table = correlations(ranking, performance, ["length", "car", "reward", "compat_loss"])
    assert math.isnan(table.loc["length", "b"])  # listed first: the metrics after it are still computed
    assert table.loc["car", "b"] == pytest.approx(1.0)
    # two distinct values are enough for a rho
    assert table.loc["reward", "b"] == pytest.approx(spearmanr([1, 1, 2, 2], [1, 4, 3, 2]).statistic)
    assert table.loc["compat_loss", "b"] == pytest.approx(spearmanr([-1, -2, -3, -4], [1, 4, 3, 2]).statistic)
    flat = performance.assign(ap=2.0)  # a constant AP: no rho for any metric
    assert table.shape == correlations(ranking, flat, ["length", "car", "reward", "compat_loss"]).shape
    assert correlations(ranking, flat, ["car", "reward"]).loc[["car", "reward"], "b"].isna().all()


def test_performance_files_with_comments_a_generator_column_and_their_errors(tmp_path):
    path = tmp_path / "perf.csv"
    path.write_text("# Source: a comment line\ngenerator,base_model,AE2_LC_WR,ArenaHard_WR\ng1,b,2,4\ng2,b,1,1\n")
    table = load_performance(str(path))
    assert table["teacher"].tolist() == ["g1", "g2"] and table["ap"].tolist() == [3.0, 1.0]
    both = tmp_path / "both.csv"  # a teacher column wins over a generator column
    both.write_text("teacher,generator,base_model,AE2_LC_WR,ArenaHard_WR\nt1,g1,b,2,4\n")
    assert load_performance(str(both))["teacher"].tolist() == ["t1"]
    twice = tmp_path / "twice.csv"
    twice.write_text("teacher,base_model,AE2_LC_WR,ArenaHard_WR\nt1,b,1,1\nt2,b,1,1\nt1,b,2,2\n")
    with pytest.raises(DataError, match=r"\(teacher, base_model\) = \('t1', 'b'\) appears twice"):
        load_performance(str(twice))
    same_teacher = tmp_path / "ok.csv"  # the same teacher under two base models is not a duplicate
    same_teacher.write_text("teacher,base_model,AE2_LC_WR,ArenaHard_WR\nt1,b1,1,1\nt1,b2,1,1\n")
    assert len(load_performance(str(same_teacher))) == 2
    with pytest.raises(DataError, match=f"{tmp_path / 'missing.csv'}: could not be read as CSV"):
        load_performance(str(tmp_path / "missing.csv"))


def test_aggregate_ranks_are_integers_and_reference_metrics_use_the_reference_loss():
    scores = _scores([1.0, 2.0, 3.0])
    scores["loss_ref"] = scores["compat_loss"] * 2 + 0.5
    scores["ifd_ref"] = scores["loss_ref"] / 4.0
    scores["ic_ifd_ref"] = scores["loss_ref"] / 8.0
    table = aggregate(scores)
    assert str(table["rank_car"].dtype) == "Int64" and str(table["rank_ppl_ref"].dtype) == "Int64"
    for row in table.itertuples():
        group = scores[(scores.teacher == row.teacher) & (scores.base_model == row.base_model)]
        assert row.ppl_ref == pytest.approx(math.exp(group["loss_ref"].mean()))
        assert row.ifd_ref == pytest.approx(group["ifd_ref"].mean())
        assert row.ic_ifd_ref == pytest.approx(group["ic_ifd_ref"].mean())
        assert row.ppl_self == pytest.approx(math.exp(group["compat_loss"].mean()))
    assert list(table.index) == list(range(len(table)))


def test_rho_is_undefined_when_either_the_metric_or_ap_is_constant_over_the_teachers():
    from magpie_teach.scoring.metrics import correlations

    ranking = pd.DataFrame({"teacher": ["a", "b", "c"], "base_model": "m", "reward": [1.0, 2.0, 3.0],
                            "compat_loss": [1.0, 1.0, 1.0]})  # fmt: skip
    two_values = pd.DataFrame({"teacher": ["a", "b", "c"], "base_model": "m", "ap": [1.0, 2.0, 2.0]})
    table = correlations(ranking, two_values, metrics=["reward", "compat_loss"])
    assert table.loc["reward", "m"] == pytest.approx(spearmanr([1, 2, 3], [1, 2, 2]).statistic)
    assert math.isnan(table.loc["compat_loss", "m"])  # a constant metric
    flat = two_values.assign(ap=5.0)
    assert math.isnan(correlations(ranking, flat, metrics=["reward"]).loc["reward", "m"])  # a constant AP
    assert math.isnan(table.loc["n_teachers", "mean"]) and table.loc["n_teachers", "m"] == 3


def test_aggregate_keeps_the_pairs_first_seen_order_and_counts_responses_cut_by_the_generation_cap():
    scores = _scores([1.0, 2.0, 3.0])
    scores["teacher"] = scores["teacher"].map(lambda t: f"z-{t}" if t.endswith("0") else t)  # not in sorted order
    scores = scores.iloc[::-1].reset_index(drop=True)
    seen = list(dict.fromkeys(zip(scores["teacher"], scores["base_model"])))
    assert seen != sorted(seen)
    table = aggregate(scores)
    assert list(zip(table["teacher"], table["base_model"])) == seen
    assert "n_hit_max_new_tokens" not in table.columns  # data without generate's flag
    scores["hit_max_new_tokens"] = np.arange(len(scores)) % 3 == 0
    table = aggregate(scores).set_index(["teacher", "base_model"])
    expected = scores.groupby(["teacher", "base_model"])["hit_max_new_tokens"].sum()
    assert (table["n_hit_max_new_tokens"] == expected.reindex(table.index)).all() and expected.sum() > 0
    assert table["n_hit_max_new_tokens"].nunique() > 1


def test_a_performance_table_names_its_first_value_that_is_not_a_number_and_its_first_repeated_pair(tmp_path):
    path = tmp_path / "perf.csv"
    path.write_text("teacher,base_model,AE2_LC_WR,ArenaHard_WR\nt1,b,1,2\nt2,b,abc,3\nt3,b,x,4\n")
    with pytest.raises(DataError) as err:
        load_performance(str(path))
    assert str(err.value) == f"{path}: row 2, column 'AE2_LC_WR': not a number ('abc')."
    path.write_text("teacher,base_model,AE2_LC_WR,ArenaHard_WR\nt2,b,1,2\nt1,b,1,2\nt2,b,3,4\nt1,b,5,6\n")
    with pytest.raises(DataError) as err:
        load_performance(str(path))
    assert str(err.value) == f"{path}: (teacher, base_model) = ('t2', 'b') appears twice."


def test_a_short_name_is_the_last_path_component_with_or_without_a_trailing_slash():
    from magpie_teach.scoring.metrics import short_name

    assert (
        short_name("Qwen/Qwen2-1.5B/") == short_name("models/Qwen2-1.5B") == short_name("Qwen2-1.5B") == "Qwen2-1.5B"
    )


def test_the_reward_shift_warning_auto_value_and_error_are_exact():
    rewards = pd.Series({"t1": -0.5, "t2": 1.0, "t3": 0.0})
    with pytest.warns(UserWarning) as record:
        assert resolve_reward_shift(rewards, None) == 0.0
    assert str(record[0].message) == (
        "CAR assumes positive rewards, but mean reward <= 0 for t1, t3 (min -0.5); CAR then prefers incompatible "
        "teachers. Use --reward-shift auto (or a number) to shift rewards affinely before CAR."
    )
    # auto: the lowest mean moved to the spread of the means (here 0.5), or to 1 when they are all equal
    assert resolve_reward_shift(pd.Series([-0.2, 0.3]), "auto") == pytest.approx(0.2 + 0.5)
    assert resolve_reward_shift(pd.Series([-1.0, -1.0]), "auto") == pytest.approx(1.0 + 1.0)
    assert resolve_reward_shift(pd.Series([0.5, 2.0]), "auto") == 0.0
    with pytest.raises(ConfigError) as err:
        resolve_reward_shift(rewards, "lots")
    assert str(err.value) == "reward_shift='lots': expected 'none', 'auto' or a number."


def test_unmatched_teachers_are_logged_only_when_asked(caplog):
    from magpie_teach.scoring.metrics import match_performance

    group = pd.DataFrame({"teacher": ["t1", "t2", "t3", "t9"], "base_model": "b", "car": [1.0, 2.0, 3.0, 4.0]})
    performance = pd.DataFrame({"teacher": ["t1", "t2", "t3"], "base_model": "b", "ap": [1.0, 2.0, 3.0]})
    with caplog.at_level("WARNING", logger="magpie_teach.scoring.metrics"):
        assert len(match_performance(group, performance, "b")) == 3
        assert not caplog.records
        match_performance(group, performance, "b", warn=True)
    assert [r.getMessage() for r in caplog.records] == ["base model b: no performance numbers for ['t9']"]


def test_the_ranking_has_one_row_per_pair_numbered_from_0_and_no_index_column():
    scores = pd.DataFrame({"teacher": ["t2", "t1", "t2", "t1"], "base_model": "b", "id": ["a", "a", "b", "b"],
                           "reward": [1.0, 2.0, 3.0, 4.0], "compat_loss": [1.0, 1.0, 2.0, 2.0],
                           "n_tokens_full": 5, "truncated": False}, index=[7, 3, 9, 1])  # fmt: skip
    ranking = aggregate(scores)
    assert list(ranking.index) == [0, 1] and "index" not in ranking.columns
    assert list(ranking["teacher"]) == ["t2", "t1"]


def test_correlations_keep_the_base_models_in_the_rankings_order_not_sorted():
    teachers = [f"t{k}" for k in range(4)]
    ranking = pd.DataFrame({"teacher": teachers * 2, "base_model": ["zeta"] * 4 + ["alpha"] * 4,
                            "car": [1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0]})  # fmt: skip
    performance = pd.DataFrame({"teacher": teachers * 2, "base_model": ["zeta"] * 4 + ["alpha"] * 4,
                                "ap": [1.0, 2.0, 3.0, 4.0] * 2})  # fmt: skip
    table = correlations(ranking, performance, ["car"])
    assert list(table.columns) == ["zeta", "alpha", "mean"]
    assert table.loc["car", "zeta"] == 1.0 and table.loc["car", "alpha"] == -1.0


def test_scores_aggregated_in_parts_give_the_means_of_the_whole_and_means_skip_nan():
    """`rank` in windows aggregates from each window's sums: the ranking equals plain means over all the rows
    (computed here with numpy), whatever the split, with a NaN IFD skipped as pandas' mean skips it."""
    from magpie_teach.scoring.metrics import add_sums, aggregate_sums, sum_scores

    rng = np.random.default_rng(3)
    n = 60
    scores = pd.DataFrame({"teacher": rng.choice(["t1", "t2", "t3"], n), "base_model": rng.choice(["m2", "m1"], n),
                           "id": [f"q{i % 20}" for i in range(n)], "reward": rng.normal(2, 1, n),
                           "compat_loss": rng.uniform(0.5, 2, n), "n_tokens_full": rng.integers(5, 90, n),
                           "truncated": rng.random(n) < 0.3, "hit_max_new_tokens": rng.random(n) < 0.2,
                           "ifd_self": rng.uniform(0.5, 1.5, n), "ic_ifd_self": rng.uniform(0.1, 1, n)})  # fmt: skip
    scores.loc[4, "ifd_self"] = np.nan
    parts = [scores.iloc[:7], scores.iloc[7:31], scores.iloc[31:]]
    summed = add_sums([sum_scores(p) for p in parts])
    table = aggregate_sums(summed, beta=2.0)
    pd.testing.assert_frame_equal(table, aggregate(scores, beta=2.0), check_exact=False, rtol=1e-12)
    pairs = list(dict.fromkeys(zip(scores["teacher"], scores["base_model"])))
    assert list(zip(table["teacher"], table["base_model"])) == pairs  # the order the pairs first appear in
    for (teacher, base), row in zip(pairs, table.itertuples()):
        rows = scores[(scores["teacher"] == teacher) & (scores["base_model"] == base)]
        ifd_values = rows["ifd_self"].to_numpy()
        assert row.n == len(rows) and row.n_truncated == rows["truncated"].sum()
        assert row.n_hit_max_new_tokens == rows["hit_max_new_tokens"].sum()
        assert row.reward == pytest.approx(rows["reward"].to_numpy().mean(), rel=1e-12)
        assert row.length == pytest.approx(rows["n_tokens_full"].to_numpy().mean(), rel=1e-12)
        assert row.ifd_self == pytest.approx(ifd_values[~np.isnan(ifd_values)].mean(), rel=1e-12)
        assert row.ppl_self == pytest.approx(np.exp(rows["compat_loss"].to_numpy().mean()), rel=1e-12)
        loss = rows["compat_loss"].to_numpy().mean()
        assert row.car == pytest.approx(row.reward / (1 + 2.0 * loss), rel=1e-12)


def test_aggregate_of_names_held_as_categories_has_a_row_per_pair_seen_only():
    """`rank`'s windowed scores hold their names as categories: a (teacher, base model) pair never seen gets no
    row, though both names are categories of the columns."""
    scores = _scores([1.0, 2.0, 3.0]).astype({"teacher": "category", "base_model": "category"})
    scores = pd.concat([scores, scores.assign(base_model="other").iloc[:2]], ignore_index=True)
    scores = scores.astype({"teacher": "category", "base_model": "category"})
    table = aggregate(scores)
    seen = set(zip(scores["teacher"].astype(str), scores["base_model"].astype(str)))
    assert set(zip(table["teacher"].astype(str), table["base_model"].astype(str))) == seen
    assert len(table) == len(seen) < scores["teacher"].nunique() * scores["base_model"].nunique()
