"""Per-instruction routing (scoring/route.py): planted structure recovered, no structure falls back, replay figures
against an independent computation."""

import numpy as np
import pandas as pd
import pytest

from magpie_teach.errors import ConfigError
from magpie_teach.scoring.route import decide, example_targets, fit_router, replay, spend


def pool(n: int, teachers: int, categories: int, structured: bool, seed: int, dims: int = 8, bonus: float = 0.2,
         separation: float = 2.0):  # fmt: skip
    """Instructions in categories (features: a category centre, SEPARATION apart in scale, plus unit noise); every
    teacher's per-example score is its base quality plus noise (sd 0.05), and with STRUCTURED a BONUS for the
    category's own best teacher."""
    rng = np.random.default_rng(seed)
    category = rng.integers(0, categories, n)
    centres = rng.normal(size=(categories, dims)) * separation
    features = centres[category] + rng.normal(size=(n, dims))
    quality = np.linspace(0.50, 0.56, teachers)
    targets = quality + rng.normal(scale=0.05, size=(n, teachers))
    if structured:
        best = (
            rng.permutation(teachers)[:categories] if categories <= teachers else rng.integers(0, teachers, categories)
        )
        targets[np.arange(n), best[category]] += bonus
    else:
        features = rng.normal(size=(n, dims))  # nothing in the instruction says which teacher will do best
    names = [f"t{i}" for i in range(teachers)]
    return features, pd.DataFrame(targets, index=[f"i{k:05d}" for k in range(n)], columns=names)


def test_the_target_is_car_per_example_averaged_over_a_teachers_generations():
    scores = pd.DataFrame({"id": ["a", "a", "a", "b", "b"], "teacher": ["x", "x", "y", "x", "y"],
                           "reward": [1.0, 3.0, 2.0, 0.5, -1.0], "compat_loss": [1.0, 0.0, 2.0, 0.5, 1.0]})  # fmt: skip
    table = example_targets(scores, beta=2.0, shift=1.5)
    assert table.loc["a", "x"] == pytest.approx(((1 + 1.5) / 3 + (3 + 1.5) / 1) / 2)
    assert table.loc["a", "y"] == pytest.approx((2 + 1.5) / 5)
    assert table.loc["b", "y"] == pytest.approx(0.5 / 3)
    assert example_targets(scores, beta=1.0).loc["b", "x"] == pytest.approx(0.5 / 1.5)  # no shift by default
    with pytest.raises(ConfigError, match=r"instruction 'b' has no scored response of teacher 'y' \(and 0 more"):
        example_targets(scores.iloc[:4], beta=2.0)
    with pytest.raises(ConfigError, match=r"scores lack \['compat_loss'\]"):
        example_targets(scores.drop(columns="compat_loss"), beta=2.0)


def test_a_planted_linear_score_is_recovered():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(400, 5))
    weights = rng.normal(size=(5, 3))
    targets = features @ weights + 0.7 + rng.normal(scale=0.01, size=(400, 3))
    router = fit_router(features, targets, ["a", "b", "c"])
    fresh = rng.normal(size=(50, 5))
    np.testing.assert_allclose(router.predict(fresh), fresh @ weights + 0.7, atol=0.05)


def test_the_head_is_the_same_whatever_the_features_scale_and_a_huge_penalty_leaves_each_teachers_mean():
    """Ridge on standardised features: rescaling or shifting a feature changes no prediction, a constant feature is
    harmless, and the intercept is never shrunk (an infinite penalty predicts each teacher's mean target)."""
    rng = np.random.default_rng(4)
    features = np.hstack([rng.normal(size=(300, 3)), np.full((300, 1), 7.0)])
    targets = features[:, :3] @ rng.normal(size=(3, 2)) + rng.normal(scale=0.1, size=(300, 2))
    fresh = np.hstack([rng.normal(size=(20, 3)), np.full((20, 1), 7.0)])
    stretch, offset = np.array([1000.0, 0.001, 3.0, 1.0]), np.array([5.0, -2.0, 0.0, 0.0])
    for penalty in (0.1, 50.0):
        plain = fit_router(features, targets, ["a", "b"], penalty=penalty).predict(fresh)
        scaled = fit_router(features * stretch + offset, targets, ["a", "b"], penalty=penalty)
        np.testing.assert_allclose(scaled.predict(fresh * stretch + offset), plain, rtol=1e-6, atol=1e-9)
        assert np.isfinite(plain).all()
    flat = fit_router(features, targets, ["a", "b"], penalty=1e12).predict(fresh)
    np.testing.assert_allclose(flat, np.broadcast_to(targets.mean(axis=0), flat.shape), rtol=1e-6)
    with pytest.raises(ValueError, match="300 feature rows for 299 target rows"):
        fit_router(features, targets[:299], ["a", "b"])
    spread = [np.abs(fit_router(features, targets, ["a", "b"], penalty=p).predict(fresh) - targets.mean(axis=0)).mean()
              for p in (0.001, 10.0, 1000.0, 1e5)]  # fmt: skip
    assert spread == sorted(spread, reverse=True)  # a larger penalty shrinks every prediction towards the mean


def test_the_penalty_is_chosen_by_cross_validation():
    """Targets unrelated to the features: the largest penalty (predict the mean); a strong linear signal with little
    noise: a small one."""
    from magpie_teach.scoring.route import PENALTIES

    rng = np.random.default_rng(6)
    features = rng.normal(size=(200, 6))
    noise = fit_router(features, rng.normal(size=(200, 3)), ["a", "b", "c"], seed=1)
    assert noise.penalty == max(PENALTIES) and noise.teachers == ["a", "b", "c"]
    signal = fit_router(features, features @ rng.normal(size=(6, 3)) + rng.normal(scale=0.01, size=(200, 3)),
                        ["a", "b", "c"], seed=1)  # fmt: skip
    assert signal.penalty <= 0.1


def test_the_decisions_interval_is_the_bootstrap_of_the_cross_fitted_gains():
    """The gain's interval brackets it, nests by confidence, and its width is what normal theory gives for the
    mean of the cross-fitted per-instruction gains (about 2 x 1.96 x sd / sqrt(n) at 95%)."""
    from magpie_teach.scoring.route import cross_fitted_gains

    features, targets = pool(400, 4, 4, structured=True, seed=11, bonus=0.05, separation=1.0)
    values, names = targets.to_numpy(), list(targets.columns)
    gains = cross_fitted_gains(features, values, names, seed=2)
    wide = decide(features, values, names, seed=2, confidence=0.99)
    usual = decide(features, values, names, seed=2)
    narrow = decide(features, values, names, seed=2, confidence=0.5)
    assert usual.gain == pytest.approx(gains.mean())
    assert wide.gain_interval[0] < usual.gain_interval[0] < narrow.gain_interval[0] < usual.gain
    assert usual.gain < narrow.gain_interval[1] < usual.gain_interval[1] < wide.gain_interval[1]
    width = usual.gain_interval[1] - usual.gain_interval[0]
    assert width == pytest.approx(2 * 1.96 * gains.std() / np.sqrt(len(gains)), rel=0.06)
    assert f"{usual.gain:+.4g}" in usual.sentence() and "95% interval" in usual.sentence()


def test_with_a_best_teacher_per_category_routing_closes_most_of_the_gap_at_a_third_of_the_grid():
    features, targets = pool(1200, 5, 4, structured=True, seed=0)
    result = replay(features, targets, n_seed=200, seed=1)
    assert result.decision.routed and result.decision.gain_interval[0] > 0
    assert result.gap_closed() >= 0.5
    assert result.spend == pytest.approx((200 * 5 + 1000) / (1200 * 5))
    # the figures, recomputed from their definitions
    held = np.random.default_rng(1).permutation(1200)[200:]
    values = targets.to_numpy()[held]
    seed_rows = np.random.default_rng(1).permutation(1200)[:200]
    single = int(np.argmax(targets.to_numpy()[seed_rows].mean(axis=0)))
    assert result.single_teacher == targets.columns[single]
    assert result.score_single == pytest.approx(values[:, single].mean())
    assert result.score_oracle == pytest.approx(values.max(axis=1).mean())
    assert result.score_single < result.score_routed <= result.score_oracle
    assert sum(result.assigned.values()) == 1000 and sum(v > 0 for v in result.assigned.values()) >= 3
    assert (result.n_seed, result.n_held_out) == (200, 1000)
    assert result.decision.confidence == 0.95
    assert replay(features, targets, n_seed=200, seed=1, confidence=0.5).decision.confidence == 0.5
    assert result.gap_closed() == pytest.approx((result.score_routed - result.score_single)
                                                / (result.score_oracle - result.score_single))  # fmt: skip
    # what the verb writes: the seed's positions and the router fitted on them, which routed the held-out ones
    assert np.array_equal(result.seed_positions, seed_rows) and len(result.router.teachers) == targets.shape[1]
    chosen = result.router.choose(features[held])
    assert result.score_routed == pytest.approx(values[np.arange(len(held)), chosen].mean())


def test_without_structure_routing_falls_back_and_is_never_worse_than_the_single_teacher():
    routed = 0
    for seed in range(20):
        features, targets = pool(600, 4, 4, structured=False, seed=100 + seed)
        result = replay(features, targets, n_seed=150, seed=seed)
        if result.decision.routed:
            routed += 1
        else:
            assert result.score_routed == result.score_single
            assert set(result.assigned) == set(targets.columns)
            assert result.assigned[result.single_teacher] == 450
        assert "single best teacher" in result.decision.sentence()
    assert routed <= 3  # a 95% interval above zero by chance: rare


def test_the_decision_is_seeded_and_reproducible():
    features, targets = pool(300, 3, 3, structured=True, seed=7)
    first = decide(features, targets.to_numpy(), list(targets.columns), seed=5)
    again = decide(features, targets.to_numpy(), list(targets.columns), seed=5)
    assert first == again


def test_no_gap_to_close_is_not_a_number():
    from magpie_teach.scoring.route import ReplayResult, RoutingDecision

    decision = RoutingDecision("a", 0.0, (-0.1, 0.1), 0.95, False)
    rest = (None, np.arange(20))
    result = ReplayResult("a", 0.5, 0.5, 0.5, 0.3, decision, {"a": 10}, 20, 10, *rest)
    assert np.isnan(result.gap_closed())
    assert ReplayResult("a", 0.5, 0.6, 0.9, 0.3, decision, {"a": 10}, 20, 10, *rest).gap_closed() == pytest.approx(
        0.25
    )


def test_spend_and_a_seed_too_small_or_too_large():
    assert spend(1000, 100, 19) == pytest.approx((100 * 19 + 900) / (1000 * 19))
    features, targets = pool(100, 3, 2, structured=True, seed=0)
    with pytest.raises(ConfigError, match="--seed-instructions 5: needs at least 10"):
        replay(features, targets, n_seed=5)
    with pytest.raises(ConfigError, match="fewer than the 100 instructions"):
        replay(features, targets, n_seed=100)
    assert replay(features, targets, n_seed=10).n_seed == 10  # the smallest seed: two instructions per fold
