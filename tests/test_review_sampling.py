import numpy as np
import pandas as pd
import pytest

from magpie_teach.errors import DataError
from magpie_teach.review.argilla_io import push_sample
from magpie_teach.review.sampling import sample_for_review
from magpie_teach.review.summary import summarize_reviews


def _scores(n=30):
    rng = np.random.default_rng(0)
    rows = []
    for teacher in ("a", "b"):
        for i in range(n):
            rows.append({"id": str(i), "instruction": f"q{i}", "response": f"{teacher}{i}", "teacher": teacher,
                         "base_model": "m", "reward": float(rng.normal()), "compat_loss": float(rng.uniform(1, 3)),
                         "truncated": i == 3, "status": "failed" if i == 4 else "ok"})  # fmt: skip
    return pd.DataFrame(rows)


def test_sample_covers_every_band_and_adds_flagged_rows():
    scores = _scores()
    sample = sample_for_review(scores, per_teacher=9, strata=["reward"], bands=3, seed=1)
    plain = sample[sample["flags"] == ""]
    flagged = sample[sample["flags"] != ""]
    for teacher in ("a", "b"):
        mine = sample[sample.teacher == teacher]
        assert len(mine[mine["flags"] == ""]) <= 9
        assert set(mine["reward_band"]) == {0, 1, 2}  # top and bottom of the range are both there
    assert {"truncated", "failed"} <= {f for flags in flagged["flags"] for f in flags.split(",")}
    # reference for the disagreement flag, computed here from the raw columns
    reward_top = scores["reward"].rank(pct=True) > 2 / 3
    loss_top = scores["compat_loss"].rank(pct=True) > 2 / 3
    reward_low = scores["reward"].rank(pct=True) <= 1 / 3
    loss_low = scores["compat_loss"].rank(pct=True) <= 1 / 3
    expected = scores[(reward_top & loss_top) | (reward_low & loss_low)]
    got = sample[sample["flags"].str.contains("disagree")]
    assert set(zip(got.teacher, got.id)) == set(zip(expected.teacher, expected.id))
    assert len(plain) > 0


def test_sample_is_seeded():
    scores = _scores()
    a = sample_for_review(scores, per_teacher=5, seed=3)
    b = sample_for_review(scores, per_teacher=5, seed=3)
    c = sample_for_review(scores, per_teacher=5, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert set(zip(a.teacher, a.id)) != set(zip(c.teacher, c.id))


def test_missing_columns_are_named_before_anything_is_sent():
    with pytest.raises(DataError, match=r"lack column\(s\) \['compat_loss'\]"):
        sample_for_review(_scores().drop(columns=["compat_loss"]))
    with pytest.raises(DataError, match=r"lack column\(s\) \['response'\] needed for review"):
        push_sample(sample_for_review(_scores()).drop(columns=["response"]), "never-created")


def test_summary_against_scipy():
    from scipy.stats import spearmanr

    reviews = pd.DataFrame(
        {"record_id": ["r1", "r2", "r3", "r4", "r1", "r2", "r3", "r4"], "teacher": ["a"] * 4 * 2,
         "annotator": ["u1"] * 4 + ["u2"] * 4, "helpfulness": [1, 2, 4, 5, 1, 3, 4, 4],
         "reward": [0.1, 0.5, 0.4, 0.9] * 2, "car": [0.2, 0.1, 0.4, 0.3] * 2}
    )  # fmt: skip
    table, agreement = summarize_reviews(reviews)
    mean = reviews.groupby("record_id")["helpfulness"].mean()
    row = table[table.teacher == "a"].iloc[0]
    assert row["mean_rating"] == pytest.approx(mean.mean())
    assert row["rho_rating_reward"] == pytest.approx(spearmanr(mean, [0.1, 0.5, 0.4, 0.9]).statistic)
    assert row["rho_rating_car"] == pytest.approx(spearmanr(mean, [0.2, 0.1, 0.4, 0.3]).statistic)
    assert agreement["annotators"] == 2 and agreement["exact_agreement"] == pytest.approx(0.5)
    assert agreement["mean_pairwise_rho"] == pytest.approx(spearmanr([1, 2, 4, 5], [1, 3, 4, 4]).statistic)
