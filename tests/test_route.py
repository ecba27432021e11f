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
    with pytest.raises(ConfigError, match="instruction 'b' has no scored response of teacher 'y'"):
        example_targets(scores.iloc[:4], beta=2.0)


def test_a_planted_linear_score_is_recovered():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(400, 5))
    weights = rng.normal(size=(5, 3))
    targets = features @ weights + 0.7 + rng.normal(scale=0.01, size=(400, 3))
    router = fit_router(features, targets, ["a", "b", "c"])
    fresh = rng.normal(size=(50, 5))
    np.testing.assert_allclose(router.predict(fresh), fresh @ weights + 0.7, atol=0.05)


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


def test_spend_and_a_seed_too_small_or_too_large():
    assert spend(1000, 100, 19) == pytest.approx((100 * 19 + 900) / (1000 * 19))
    features, targets = pool(100, 3, 2, structured=True, seed=0)
    with pytest.raises(ConfigError, match="--seed-instructions 5: needs at least 10"):
        replay(features, targets, n_seed=5)
    with pytest.raises(ConfigError, match="fewer than the 100 instructions"):
        replay(features, targets, n_seed=100)
