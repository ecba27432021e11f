"""The distilabel scoring steps give the same numbers as `magpie-teach rank` on the same data."""

import pandas as pd
import pytest

from magpie_teach.errors import MagpieTeachError


def _pipeline(name, rows, tiny_suite, reward_model=None):
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts

    from magpie_teach.steps.score_steps import CARScore, CompatibilityScore, RewardScore

    with Pipeline(name=name) as pipeline:
        load = LoadDataFromDicts(data=rows, batch_size=20)
        reward = RewardScore(model=reward_model or tiny_suite.reward, input_batch_size=20)
        compat = CompatibilityScore(model=tiny_suite.base_small, input_batch_size=20)
        car = CARScore()
        load >> reward >> compat >> car
    return pipeline


@pytest.mark.slow
def test_pipeline_scores_equal_rank(tiny_suite, ranked_sample, sample_rows, tmp_path, monkeypatch):
    from magpie_teach.steps.score_steps import run_checked

    monkeypatch.setenv("DISTILABEL_CACHE_DIR", str(tmp_path / "cache"))
    rows = sample_rows[["id", "instruction", "response", "teacher"]].to_dict("records")
    out = run_checked(_pipeline("scores-equal-rank", rows, tiny_suite), use_cache=False)["default"][
        "train"
    ].to_pandas()
    scores = pd.read_parquet(ranked_sample / "scores.parquet").set_index(["id", "teacher"])
    ranking = pd.read_csv(ranked_sample / "ranking.csv").set_index("teacher")
    assert len(out) == len(rows)
    for row in out.itertuples():
        ref = scores.loc[(row.id, row.teacher)]
        assert row.reward == pytest.approx(ref["reward"], abs=1e-5)
        assert row.compat_loss == pytest.approx(ref["compat_loss"], abs=1e-5)
        assert row.n_tokens_full == ref["n_tokens_full"]
        assert row.car == pytest.approx(ranking.loc[row.teacher, "car"], rel=1e-5)
        assert row.rank_car == ranking.loc[row.teacher, "rank_car"]


@pytest.mark.slow
def test_a_failing_scoring_step_fails_the_run_loudly(tiny_suite, sample_rows, tmp_path, monkeypatch):
    from magpie_teach.steps.score_steps import run_checked

    monkeypatch.setenv("DISTILABEL_CACHE_DIR", str(tmp_path / "cache"))
    rows = sample_rows[["id", "instruction", "response", "teacher"]].head(12).to_dict("records")
    rows[3]["response"] = None  # the engine raises on this batch; distilabel would fill the column with None
    with pytest.raises(MagpieTeachError, match=r"a step failed"):
        run_checked(_pipeline("fails-loudly", rows, tiny_suite), use_cache=False)


def test_hit_max_new_tokens_follows_the_engines_finish_reason_and_guesses_only_without_one(tiny_suite, tmp_path):
    """vLLM and OpenAI-compatible servers say why a generation stopped: "length" is the cap, whatever the text
    re-tokenises to (a short text can have used up the cap, a long one can have stopped on its own). Without that
    word (transformers), a response of max_new_tokens tokens is taken to have hit the cap."""
    from magpie_teach.steps.generation import ResponseFormat

    step = ResponseFormat(teacher="t", model=tiny_suite.base_small, settings="{}", max_new_tokens=8,
                          store_dir=str(tmp_path / "store"))  # fmt: skip
    step.load()
    long_text = "plants need water and light to grow every single day"
    rows = [
        {"id": "a", "instruction": "x", "generation": ["short", long_text],
         "llm_text_generation_0_finish_reason": ["length", "stop"]},
        {"id": "b", "instruction": "y", "generation": ["short", long_text]},
    ]  # fmt: skip
    (out,) = list(step.process(rows))
    assert [r["hit_max_new_tokens"] for r in out] == [True, False, False, True]
