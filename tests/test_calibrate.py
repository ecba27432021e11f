"""`calibrate`: CAR's beta recovered when planted, its crossing points and its fit checked against brute force,
the leave-one-base-model-out figures recomputed here, and `rank --beta-from`."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq
from scipy.stats import spearmanr

from magpie_teach.errors import ConfigError

PLANTED = 1.7
BASES = ["base-a", "base-b", "base-c", "base-d"]


def _ranking(rng, teachers, bases=BASES):
    rows = []
    for base in bases:
        for teacher in teachers:
            reward, loss = rng.uniform(1.0, 3.0), rng.uniform(0.5, 2.0)
            rows.append({"teacher": teacher, "base_model": base, "n": 10, "reward": reward, "compat_loss": loss,
                         "length": rng.uniform(50, 500), "car": reward / (1 + 3 * loss), "car_reward_shift": 0.0})  # fmt: skip
    return pd.DataFrame(rows)


def _write(folder, ranking):
    folder.mkdir(parents=True, exist_ok=True)
    ranking.to_csv(folder / "ranking.csv", index=False)
    return str(folder)


def _performance(ranking, beta=PLANTED, shift=0.0, noise=0.0):
    """AP an exact increasing function of CAR at BETA (with SHIFT), plus NOISE (a standard deviation), split
    into the two benchmark columns."""
    car = (ranking["reward"] + shift) / (1 + beta * ranking["compat_loss"])
    ap = (
        20 + 10 * np.log(car) + np.random.default_rng(1).normal(0, noise, len(car)) if noise else 20 + 10 * np.log(car)
    )
    return pd.DataFrame({"teacher": ranking["teacher"], "base_model": ranking["base_model"],
                         "AE2_LC_WR": ap + 1.0, "ArenaHard_WR": ap - 1.0})  # fmt: skip


@pytest.fixture
def planted(tmp_path):
    rng = np.random.default_rng(7)
    ranking = _ranking(rng, [f"teacher-{i}" for i in range(7)])
    scores = _write(tmp_path / "rank", ranking)
    _performance(ranking).to_csv(tmp_path / "performance.csv", index=False)
    return ranking, scores, str(tmp_path / "performance.csv")


def _calibrate(tmp_path, scores, performance, *extra):
    from magpie_teach.cli import main

    out = tmp_path / "calibration"
    args = ["calibrate", *[a for s in scores for a in ("--scores", s)], "--performance", performance,
            "--output", str(out), *extra]  # fmt: skip
    assert main(args) == 0
    return json.loads((out / "calibration.json").read_text()), out


def _ranks(values):
    return np.argsort(np.argsort(values, axis=-1), axis=-1).astype(float)


def _mean_rho(ranking, performance, betas, bases=BASES):
    """Mean over BASES of Spearman's rho between CAR and AP at each of BETAS: the Pearson correlation of the
    ranks (no ties in this data), computed from the frames directly."""
    merged = ranking.merge(performance, on=["teacher", "base_model"])
    merged["ap"] = (merged["AE2_LC_WR"] + merged["ArenaHard_WR"]) / 2
    betas = np.atleast_1d(np.asarray(betas, dtype=float))
    rhos = []
    for base in bases:
        group = merged[merged["base_model"] == base]
        car = group["reward"].to_numpy() / (1 + betas[:, None] * group["compat_loss"].to_numpy())
        x, y = _ranks(car), _ranks(group["ap"].to_numpy())
        x, y = x - x.mean(axis=1, keepdims=True), y - y.mean()
        rhos.append((x * y).sum(axis=1) / np.sqrt((x**2).sum(axis=1) * (y**2).sum()))
    means = np.mean(rhos, axis=0)
    return means if len(means) > 1 else float(means[0])


def test_crossing_points_are_where_two_teachers_car_are_equal():
    from magpie_teach.scoring.calibrate import crossings

    rng = np.random.default_rng(3)
    reward, loss = rng.uniform(1, 3, 8), rng.uniform(0.5, 2, 8)
    expected = []
    for i in range(8):
        for j in range(i + 1, 8):
            gap = lambda b, i=i, j=j: reward[i] / (1 + b * loss[i]) - reward[j] / (1 + b * loss[j])  # noqa: E731
            if gap(1e-9) * gap(1e9) < 0:  # one sign change: the two lines cross once at a positive beta
                expected.append(brentq(gap, 1e-9, 1e9, xtol=1e-14, rtol=1e-14))
    found = crossings(reward, loss)
    assert len(expected) >= 5
    np.testing.assert_allclose(found, np.sort(expected), rtol=1e-9)


def test_a_planted_beta_is_recovered_and_the_fit_matches_brute_force(planted, tmp_path):
    ranking, scores, performance = planted
    result, out = _calibrate(tmp_path, [scores], performance)
    low, high = result["stable_beta_range"]
    assert result["best_metric"] == "car" and low < PLANTED < high
    assert low < result["best_beta"] < high and result["mean_rho"]["best"] == pytest.approx(1.0)
    # brute force on a dense grid: the best mean rho is the fit's, and every beta reaching it is in its interval
    perf = pd.read_csv(performance)
    grid = np.geomspace(1e-3, 1e3, 20000)
    means = _mean_rho(ranking, perf, grid)
    assert means.max() == pytest.approx(result["mean_rho"]["best"], abs=1e-12)
    best = grid[np.isclose(means, means.max(), atol=1e-12)]
    assert best.min() >= low and best.max() <= high
    assert result["mean_rho"]["default"] == pytest.approx(_mean_rho(ranking, perf, 3.0), abs=1e-12)
    assert result["mean_rho"]["default"] < 1.0  # the default beta is not the planted one here
    # the figure's curve: the mean rho at each beta, as recomputed here
    curve = pd.read_csv(out / "beta_curve.csv")
    for _, row in curve.sample(10, random_state=0).iterrows():
        assert row["mean_rho"] == pytest.approx(_mean_rho(ranking, perf, row["beta"]), abs=1e-12)
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_held_out_figures_are_fitted_without_the_base_model_they_score(tmp_path):
    ranking = _ranking(np.random.default_rng(7), [f"teacher-{i}" for i in range(7)])
    scores = _write(tmp_path / "rank", ranking)
    performance = str(tmp_path / "performance.csv")
    _performance(ranking, noise=1.5).to_csv(performance, index=False)  # noisy: each subset fits its own beta
    result, _ = _calibrate(tmp_path, [scores], performance)
    perf = pd.read_csv(performance)
    grid = np.geomspace(1e-3, 1e3, 20000)
    held = {h["base_model"]: h for h in result["held_out"]}
    assert sorted(held) == BASES
    rhos = []
    for base in BASES:
        others = [b for b in BASES if b != base]
        means = _mean_rho(ranking, perf, grid, others)
        reached = grid[np.isclose(means, means.max(), atol=1e-12)]
        fitted = held[base]["beta"]
        # the beta fitted without BASE reaches the others' best mean rho, and is scored on BASE alone
        assert _mean_rho(ranking, perf, fitted, others) == pytest.approx(means.max(), abs=1e-12)
        assert reached.min() / 1.01 <= fitted <= reached.max() * 1.01
        rho = _mean_rho(ranking, perf, fitted, [base])
        assert held[base]["rho"] == pytest.approx(rho, abs=1e-12)
        assert held[base]["rho_default"] == pytest.approx(_mean_rho(ranking, perf, 3.0, [base]), abs=1e-12)
        rhos.append(rho)
    assert result["held_out_mean_rho"]["fitted"] == pytest.approx(np.mean(rhos), abs=1e-12)
    assert len({h["beta"] for h in held.values()}) > 1  # the subsets did fit different betas


def test_the_predictive_reward_model_and_reward_shift_are_chosen(tmp_path):
    rng = np.random.default_rng(11)
    teachers = [f"teacher-{i}" for i in range(6)]
    good = _ranking(rng, teachers)
    noise = good.assign(reward=rng.uniform(1.0, 3.0, len(good)))  # another reward model, unrelated to AP
    _performance(good, beta=0.8, shift=-0.9).to_csv(tmp_path / "perf.csv", index=False)
    folders = [_write(tmp_path / "noise", noise), _write(tmp_path / "good", good)]
    result, out = _calibrate(tmp_path, folders, str(tmp_path / "perf.csv"), "--reward-shift", "-0.9")
    assert result["best_scores"] == folders[1] and result["best_reward_shift"] == -0.9
    assert result["best_metric"] == "car" and result["mean_rho"]["best"] == pytest.approx(1.0)
    low, high = result["stable_beta_range"]
    assert low < 0.8 < high
    table = pd.read_csv(out / "correlations.csv", index_col=0)
    assert len(table) == 2 * 2 * 5  # two folders x two shifts x (CAR at 3, CAR fitted, reward, compat_loss, length)


def test_a_baseline_that_beats_car_is_named(tmp_path):
    rng = np.random.default_rng(5)
    ranking = _ranking(rng, [f"teacher-{i}" for i in range(6)])
    perf = pd.DataFrame({"teacher": ranking["teacher"], "base_model": ranking["base_model"],
                         "AE2_LC_WR": ranking["length"], "ArenaHard_WR": ranking["length"]})  # fmt: skip
    perf.to_csv(tmp_path / "perf.csv", index=False)
    result, _ = _calibrate(tmp_path, [_write(tmp_path / "rank", ranking)], str(tmp_path / "perf.csv"))
    assert result["best_metric"] == "length" and result["mean_rho"]["best"] == pytest.approx(1.0)
    assert "length predicts AP better than CAR" in result["note"]


def test_beta_from_sets_beta_and_a_bad_file_is_one_line(tmp_path):
    from magpie_teach.settings import CARSettings

    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"best_beta": 1.25}))
    settings = CARSettings(beta_from=str(path))
    settings.check_car()
    assert settings.beta == 1.25
    for value in (0, 0.5):  # any beta >= 0: 0 is CAR = reward
        path.write_text(json.dumps({"best_beta": value}))
        settings = CARSettings(beta_from=str(path))
        settings.check_car()
        assert settings.beta == value
    bad = [("{", "not a calibration.json"), ('{"beta": 1}', "not a calibration.json")]
    bad += [(f'{{"best_beta": {v}}}', "is not a beta") for v in ("-1", "-0.01", '"3"', "true", "Infinity", "NaN")]
    for text, message in bad:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message) as err:
            CARSettings(beta_from=str(path)).check_car()
        assert "--beta-from" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="scoring.beta_from .*No such file"):
        CARSettings(beta_from=str(tmp_path / "missing.json")).check_car("scoring.")


def test_a_base_model_without_performance_numbers_is_one_line(planted, tmp_path):
    from magpie_teach.cli import main

    ranking, scores, performance = planted
    perf = pd.read_csv(performance)
    perf[perf["base_model"] != "base-c"].to_csv(tmp_path / "perf.csv", index=False)
    code = main(["calibrate", "--scores", scores, "--performance", str(tmp_path / "perf.csv"), "--output",
                 str(tmp_path / "out")])  # fmt: skip
    assert code == 2 and not (tmp_path / "out" / "calibration.json").exists()


def test_the_intervals_run_from_zero_to_infinity_each_with_the_documented_beta_inside():
    from magpie_teach.scoring.calibrate import intervals

    default = 3.0
    cases = {
        (): [(0.0, np.inf, default)],
        (0.2, 1.0, 5.0, 40.0): [
            (0.0, 0.2, 0.1),
            (0.2, 1.0, np.sqrt(0.2)),
            (1.0, 5.0, default),
            (5.0, 40.0, np.sqrt(200.0)),
            (40.0, np.inf, 80.0),
        ],  # fmt: skip
        (1.0, 3.0, 7.0): [(0.0, 1.0, 0.5), (1.0, 3.0, np.sqrt(3.0)), (3.0, 7.0, np.sqrt(21.0)), (7.0, np.inf, 14.0)],
        (4.0,): [(0.0, 4.0, default), (4.0, np.inf, 8.0)],
        (1.0,): [(0.0, 1.0, 0.5), (1.0, np.inf, default)],
    }
    for points, expected in cases.items():
        found = intervals(np.asarray(points, dtype=float))
        assert len(found) == len(expected), points
        for (lo, hi, inside), (elo, ehi, einside) in zip(found, expected):
            assert (lo, hi) == (elo, ehi), points
            assert inside == pytest.approx(einside, rel=1e-12) and lo < inside < hi, (points, lo, hi, inside)


def _bases(rng, names, n_teachers=6):
    from magpie_teach.scoring.calibrate import Base

    out = {}
    for name in names:
        reward, loss, ap = rng.uniform(1, 3, n_teachers), rng.uniform(0.5, 2, n_teachers), rng.normal(size=n_teachers)
        metrics = {"reward": reward, "length": rng.normal(size=n_teachers), "flat": np.ones(n_teachers)}
        out[name] = Base(name, [f"t{i}" for i in range(n_teachers)], reward, loss, ap, metrics)
    return out


def _spearman(values, ap):
    """Spearman's rho as the Pearson correlation of the ranks (no ties here); NaN for a constant input."""
    if np.ptp(values) == 0:
        return float("nan")
    x, y = _ranks(np.asarray(values)), _ranks(np.asarray(ap))
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x**2).sum() * (y**2).sum()))


def test_the_correlation_table_holds_each_metrics_rho_per_base_model_and_their_mean():
    from magpie_teach.scoring.calibrate import Candidate, correlation_table, fit_beta

    rng = np.random.default_rng(4)
    names = ["base-a", "base-b", "base-c"]
    candidates = [
        Candidate(f"/runs/{folder}", shift, _bases(rng, names)) for folder, shift in (("x", 0.0), ("y", -0.5))
    ]
    table = correlation_table(candidates, names)
    assert list(table.columns) == [*names, "mean"]
    expected_index = []
    for candidate in candidates:
        label = f"{candidate.scores.rsplit('/', 1)[1]} shift {candidate.reward_shift:g}: "
        bases = [candidate.bases[n] for n in names]
        fitted = fit_beta(bases).beta
        rows = {f"{label}car (beta 3)": lambda b: _spearman(b.reward / (1 + 3.0 * b.loss), b.ap),
                f"{label}car (fitted beta {fitted:.4g})": lambda b, f=fitted: _spearman(b.reward / (1 + f * b.loss), b.ap)}  # fmt: skip
        rows.update(
            {f"{label}{m}": (lambda b, m=m: _spearman(b.metrics[m], b.ap)) for m in ("reward", "length", "flat")}
        )
        for metric, rho in rows.items():
            expected = [rho(b) for b in bases]
            np.testing.assert_allclose(table.loc[metric, names].to_numpy(dtype=float), expected, atol=1e-12)
            if metric.endswith("flat"):  # a constant metric has no rho, and no mean
                assert table.loc[metric].isna().all()
            else:
                assert table.loc[metric, "mean"] == pytest.approx(np.mean(expected), abs=1e-12)
        expected_index += list(rows)
    assert list(table.index) == expected_index
    one = correlation_table(candidates[:1], names)  # one candidate: the metrics are not labelled
    assert list(one.index) == ["car (beta 3)", expected_index[1].split(": ")[1], "reward", "length", "flat"]


def test_rho_needs_two_distinct_values_on_each_side_and_no_more():
    from magpie_teach.scoring.calibrate import _rho

    ap = np.array([1.0, 2.0, 3.0, 4.0])
    two = np.array([1.0, 1.0, 2.0, 2.0])  # ties: Pearson's correlation of the mid-ranks 1.5, 1.5, 3.5, 3.5
    expected = np.corrcoef([1.5, 1.5, 3.5, 3.5], [1.0, 2.0, 3.0, 4.0])[0, 1]
    assert _rho(two, ap) == pytest.approx(expected) and _rho(ap, two) == pytest.approx(expected)
    assert np.isnan(_rho(np.ones(4), ap)) and np.isnan(_rho(ap, np.ones(4)))


def test_the_beta_curve_spans_every_crossing_and_holds_each_base_models_rho_and_their_mean():
    from magpie_teach.scoring.calibrate import Candidate, beta_curve, crossings

    rng = np.random.default_rng(8)
    names = ["base-a", "base-b"]
    candidate = Candidate("/runs/x", 0.0, _bases(rng, names))
    points = sorted(np.unique(np.concatenate([crossings(b.reward, b.loss) for b in candidate.bases.values()])))
    assert len(points) >= 3
    curve = beta_curve(candidate, names, points)
    betas = curve["beta"].to_numpy()
    assert betas[0] == 0.0 and np.all(np.diff(betas) > 0)
    assert betas[1] == pytest.approx(min(points[0], 0.01) / 10) and betas[-1] == pytest.approx(
        max(points[-1], 100) * 10
    )
    for point in points:  # both sides of every crossing point, a hair away
        assert (
            np.isclose(betas, point * (1 - 1e-9), rtol=1e-13, atol=0).any()
            and np.isclose(betas, point * (1 + 1e-9), rtol=1e-13, atol=0).any()
        )
    assert len(curve) >= 200
    for _, row in curve.iterrows():
        rhos = [_spearman(b.reward / (1 + row["beta"] * b.loss), b.ap) for b in candidate.bases.values()]
        np.testing.assert_allclose(row[names].to_numpy(dtype=float), rhos, atol=1e-12)
        assert row["mean_rho"] == pytest.approx(np.mean(rhos), abs=1e-12)
    wide = beta_curve(candidate, names, [1e-4, 5e3])  # crossing points beyond the default span widen it
    assert wide["beta"].iloc[1] == pytest.approx(1e-5) and wide["beta"].iloc[-1] == pytest.approx(5e4)


def test_the_distance_from_the_default_beta_is_zero_inside_and_the_log_ratio_to_the_nearer_edge_outside():
    from magpie_teach.scoring.calibrate import DEFAULT_BETA, _log_distance

    assert DEFAULT_BETA == 3.0
    for lo, hi in ((1.0, 5.0), (3.0, 5.0), (1.0, 3.0), (0.0, np.inf)):
        assert _log_distance(lo, hi) == 0.0
    for lo, hi, edge in ((0.5, 1.5, 1.5), (0.1, 0.5, 0.5), (6.0, 12.0, 6.0), (4.0, np.inf, 4.0)):
        assert _log_distance(lo, hi) == pytest.approx(abs(np.log(edge / 3.0)), rel=1e-12)


def _base(reward, loss, ap, name="b"):
    from magpie_teach.scoring.calibrate import Base

    reward, loss, ap = (np.asarray(v, dtype=float) for v in (reward, loss, ap))
    return Base(name, [f"t{i}" for i in range(len(ap))], reward, loss, ap, {"reward": reward})


def test_among_betas_of_equal_mean_rho_the_fit_takes_the_interval_nearest_the_default():
    """Teachers 1 and 2 tie on AP and swap at beta 5 (their only crossing): both sides rank equally well, and the
    fit keeps the side that holds the default beta 3, whichever side comes first."""
    from magpie_teach.scoring.calibrate import crossings, fit_beta

    base = _base(reward=[0.1, 2.0, 1.0], loss=[1.0, 1.0, 0.4], ap=[0.0, 1.0, 1.0])
    np.testing.assert_allclose(crossings(base.reward, base.loss), [5.0])
    fit = fit_beta([base])
    assert (
        fit.interval == (0.0, pytest.approx(5.0)) and fit.beta == 3.0 and fit.mean_rho == pytest.approx(np.sqrt(3) / 2)
    )
    # the crossing at 0.5: the later interval holds the default
    late = _base(reward=[0.1, 2.0, 1.0], loss=[1.0, 4.0, 1.0], ap=[0.0, 1.0, 1.0])
    np.testing.assert_allclose(crossings(late.reward, late.loss), [0.5])
    assert fit_beta([late]).interval == (pytest.approx(0.5), np.inf) and fit_beta([late]).beta == 3.0


def test_car_is_chosen_over_a_baseline_that_only_ties_it_and_a_calibration_needs_a_scores_folder(tmp_path):
    from magpie_teach.ranking.calibrate import CalibrateConfig
    from magpie_teach.scoring.calibrate import Candidate, choose

    same_loss = [_base(reward=[1.0, 2.0, 3.0], loss=[1.0, 1.0, 1.0], ap=[1.0, 2.0, 3.0], name=n) for n in "ab"]
    choice = choose([Candidate("run", 0.0, {b.name: b for b in same_loss})], ["a", "b"])
    assert choice.metric == "car" and choice.mean_rho == pytest.approx(1.0)  # reward ranks as well: CAR stays
    with pytest.raises(ConfigError) as err:
        CalibrateConfig(scores=[], performance="p.csv", output_dir=str(tmp_path)).check()
    assert str(err.value) == "give at least one --scores folder"


def test_rho_equals_scipys_spearman_with_ties_on_either_side_and_is_nan_for_a_constant_side():
    from scipy.stats import spearmanr

    from magpie_teach.scoring.calibrate import _rho

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(3, 9))
        values, ap = rng.integers(0, 3, n).astype(float), rng.normal(size=n)
        if rng.random() < 0.5:
            values, ap = ap, values
        if len(set(values)) > 1 and len(set(ap)) > 1:
            assert _rho(values, ap) == pytest.approx(spearmanr(values, ap).statistic, abs=1e-12)
    assert np.isnan(_rho(np.ones(4), np.arange(4.0))) and np.isnan(_rho(np.arange(4.0), np.ones(4)))


def test_a_baseline_choice_is_scored_on_its_own_scores_folder_and_reward_shift():
    """The held-out rho of a chosen baseline is its metric's rho against AP on the candidate the choice names:
    not another folder with the same shift, nor the same folder with another shift."""
    from magpie_teach.scoring.calibrate import Candidate, Choice, _choice_rho

    rng = np.random.default_rng(8)
    names = ["m1", "m2"]
    candidates = [
        Candidate(folder, shift, _bases(rng, names)) for folder, shift in (("x", 0.0), ("y", 1.0), ("y", 0.0))
    ]
    choice = Choice("y", 0.0, "length", None, None, 0.0)
    for name in names:
        base = candidates[2].bases[name]
        expected = spearmanr(base.metrics["length"], base.ap).statistic
        assert _choice_rho(candidates, choice, name) == pytest.approx(expected, abs=1e-12)
        others = [spearmanr(c.bases[name].metrics["length"], c.bases[name].ap).statistic for c in candidates[:2]]
        assert all(abs(other - expected) > 1e-6 for other in others)  # the setup: the wrong candidate differs


def test_the_mean_of_held_out_figures_leaves_out_nan_and_is_none_when_none_are_left():
    from magpie_teach.scoring.calibrate import _nanmean

    assert _nanmean([1.0, float("nan"), 4.0]) == 2.5
    assert _nanmean([float("nan"), float("nan")]) is None
    assert _nanmean([]) is None


@pytest.mark.parametrize("what", ["constant", "two values", "all NaN"])
def test_performance_that_cannot_rank_teachers_is_one_line_and_writes_nothing(planted, tmp_path, what, capsys):
    from magpie_teach.cli import main

    ranking, scores, _ = planted
    performance = _performance(ranking)
    broken = performance["base_model"] == "base-c"
    if what == "constant":
        performance.loc[broken, ["AE2_LC_WR", "ArenaHard_WR"]] = 30.0
    elif what == "two values":
        values = np.where(np.arange(broken.sum()) % 2, 20.0, 40.0)
        performance.loc[broken, "AE2_LC_WR"] = values
        performance.loc[broken, "ArenaHard_WR"] = values
    else:
        performance.loc[broken, ["AE2_LC_WR", "ArenaHard_WR"]] = np.nan
    performance.to_csv(tmp_path / "bad.csv", index=False)
    out = tmp_path / "calibration"
    code = main(["calibrate", "--scores", scores, "--performance", str(tmp_path / "bad.csv"), "--output", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    if what == "all NaN":  # refused as the table is read, naming its row
        assert "row " in err and "not a number" in err
    else:
        described = {"constant": "constant", "two values": "2 distinct values"}[what]
        assert f"the performance of base-c's teachers is {described}: calibrate needs at least 3" in err
    assert not out.exists()


def test_calibration_json_is_strict_json_and_the_choice_carries_its_bootstrap(planted, tmp_path):
    """The stable range of a planted beta ends at infinity here or not, but the file never holds NaN or Infinity;
    the bootstrap of the choice is seeded, and recomputed here from the same draws of teachers."""
    from magpie_teach.scoring.calibrate import choice_bootstrap, choose

    ranking, scores, performance = planted
    noisy = _performance(ranking, noise=3.0)
    noisy.to_csv(tmp_path / "noisy.csv", index=False)
    result, out = _calibrate(tmp_path, [scores], str(tmp_path / "noisy.csv"))

    def strict(token):
        raise AssertionError(f"not JSON: {token}")

    json.loads((out / "calibration.json").read_text(), parse_constant=strict)
    boot = result["choice_bootstrap"]
    assert boot["replicates"] == 200 and 0.0 <= boot["same_metric_share"] <= 1.0
    assert boot["seed"] == 0 and boot["confidence"] == 0.95
    low, high = boot["best_beta_ci"]
    assert low <= high
    # the same protocol by hand: teachers drawn with replacement per base model, in base-model order
    from magpie_teach.ranking import calibrate as verb
    from magpie_teach.scoring import calibrate as module
    from magpie_teach.scoring.metrics import load_performance

    table = load_performance(str(tmp_path / "noisy.csv"), ["AE2_LC_WR", "ArenaHard_WR"], None)
    candidates = verb._load_candidates(verb.CalibrateConfig(scores=[scores], performance="x", output_dir="y"), table)
    names = list(candidates[0].bases)
    best = choose(candidates, names)
    rng = np.random.default_rng(0)
    same, betas = 0, []
    for _ in range(200):
        draws = {n: rng.integers(0, 7, 7) for n in names}
        drawn = [module.Candidate(c.scores, c.reward_shift, {n: module._take(c.bases[n], draws[n]) for n in names})
                 for c in candidates]  # fmt: skip
        choice = choose(drawn, names)
        same += choice.metric == best.metric
        betas.append((choice if choice.metric == "car" else choose(drawn, names, car_only=True)).beta)
    assert boot["same_metric_share"] == same / 200
    assert boot["best_beta_ci"] == pytest.approx(list(np.quantile(betas, [0.025, 0.975])))
    assert choice_bootstrap(candidates, names, best) == boot  # seeded: the same again


def test_the_choice_sentence_and_the_stable_range_read_exactly_as_their_numbers_say():
    """The sentences calibrate prints and report shows, word for word: firm at 90% of replicates or more, and
    otherwise a warning; the fitted beta's interval when one was fitted; an open range end read as infinity."""
    from magpie_teach.scoring.calibrate import choice_sentence, stable_range_text

    firm = {"best_metric": "car", "choice_bootstrap": {"replicates": 200, "same_metric_share": 0.9, "confidence": 0.95,
                                                       "best_beta_ci": [1.25, 7.5]}}  # fmt: skip
    assert choice_sentence(firm) == (
        "Teachers drawn again (200 bootstrap replicates) choose car 90% of the time: the choice is firm. "
        "CAR's fitted beta: 95% interval [1.25, 7.5]."
    )
    shaky = {"best_metric": "reward", "choice_bootstrap": {"replicates": 50, "same_metric_share": 0.894,
                                                           "confidence": 0.9, "best_beta_ci": None}}  # fmt: skip
    assert choice_sentence(shaky) == (
        "Teachers drawn again (50 bootstrap replicates) choose reward 89% of the time: another metric could "
        "predict as well on other teachers."
    )
    assert choice_sentence({"best_metric": "car"}) == "" and choice_sentence({"choice_bootstrap": None}) == ""
    assert stable_range_text({"stable_beta_range": [0.5, None]}) == "[0.5, infinity]"
    assert stable_range_text({"stable_beta_range": [0.123456, 12.34567]}) == "[0.1235, 12.35]"
    assert stable_range_text({"stable_beta_range": [1e-5, 123456.0]}) == "[1e-05, 1.235e+05]"


@pytest.mark.parametrize(
    ("ap", "what"),
    [([np.nan] * 4, "all NaN"), ([3.0, 3.0, 3.0, np.nan], "constant"), ([1.0, 2.0, 2.0, 1.0], "2 distinct values")],
)
def test_performance_that_cannot_rank_teachers_names_the_base_model_and_why(ap, what):
    from magpie_teach.errors import DataError
    from magpie_teach.scoring.calibrate import Base, Candidate, check_performance

    teachers = ["a", "b", "c", "d"]
    good = Base("good", teachers, np.ones(4), np.ones(4), np.array([1.0, 2.0, 3.0, 4.0]), {})
    bad = Base("qwen", teachers, np.ones(4), np.ones(4), np.array(ap), {})
    check_performance(Candidate("s", 0.0, {"good": good}))
    three = Base("three", teachers, np.ones(4), np.ones(4), np.array([1.0, 2.0, 3.0, 3.0]), {})
    check_performance(Candidate("s", 0.0, {"three": three}))  # three distinct values are enough
    with pytest.raises(DataError) as caught:
        check_performance(Candidate("s", 0.0, {"good": good, "qwen": bad}))
    assert str(caught.value) == (
        f"the performance of qwen's teachers is {what}: calibrate needs at least 3 distinct AP values per base "
        "model to rank them; nothing was written"
    )
