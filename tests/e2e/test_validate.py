"""`magpie-teach validate` end to end on tiny models: select, train, generate, score (a reward model's mean, or
win rates judged by a judge LLM), correlate."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from magpie_teach.evaluation.validate import ValidateConfig, validate
from tests.test_train import RECIPE


@pytest.mark.slow
def test_validate_fine_tunes_each_teacher_and_correlates(tmp_path, tiny_suite, ranked_sample):
    config = ValidateConfig(
        scores=str(ranked_sample), output_dir=str(tmp_path), recipe=RECIPE, recipe_overrides=["max_steps=2", "save_steps=2"],
        eval_size=4, reward_model=tiny_suite.reward, max_new_tokens=8, device="cpu",
    )  # fmt: skip
    result = validate(config)
    students = pd.read_csv(tmp_path / "students.csv")
    assert sorted(students["teacher"]) == ["tiny-teacher-lists", "tiny-teacher-terse", "tiny-teacher-thorough"]
    for teacher in students["teacher"]:
        assert (tmp_path / "students" / teacher / "model.safetensors").exists()
        # save_steps=2 wrote a checkpoint (weights and optimizer state): evaluation needs the model only
        assert not list((tmp_path / "students" / teacher).glob("checkpoint-*"))
        generations = pd.read_parquet(tmp_path / "generations" / f"{teacher}.parquet")
        assert len(generations) == 4
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["kind"] == "validate" and manifest["complete"]
    assert set(manifest["files"]) == {"students.csv", "correlations.csv", "ranking.csv"}
    # held-out instructions were not trained on
    heldout = set(pd.read_parquet(tmp_path / "generations" / "tiny-teacher-terse.parquet")["id"])
    trained = set(
        pd.read_parquet(tmp_path / "data" / "tiny-teacher-terse" / "data" / "train-00000-of-00001.parquet")["id"]
    )
    assert heldout and not heldout & trained and len(trained) == 20
    # rho computed here from the files, independently of the library
    ranking = pd.read_csv(tmp_path / "ranking.csv").set_index("teacher").sort_index()
    ap = students.set_index("teacher").sort_index()["ap"]
    assert result.correlations.loc["car", tiny_suite.base_small] == pytest.approx(
        spearmanr(ranking["car"], ap).statistic
    )
    # a rerun reuses the students and their generations
    stamp = (tmp_path / "students" / "tiny-teacher-terse" / "model.safetensors").stat().st_mtime_ns
    validate(config)
    assert (tmp_path / "students" / "tiny-teacher-terse" / "model.safetensors").stat().st_mtime_ns == stamp

    # --judge: the same students and answers, judged against a baseline by a judge LLM (transformers)
    judged = validate(
        ValidateConfig(scores=str(ranked_sample), output_dir=str(tmp_path), recipe=RECIPE, eval_size=4, max_new_tokens=8,
                       device="cpu", judge=tiny_suite.base_medium, baseline=tiny_suite.base_large)
    )  # fmt: skip
    assert (tmp_path / "students" / "tiny-teacher-terse" / "model.safetensors").stat().st_mtime_ns == stamp
    judgements = pd.read_parquet(tmp_path / "judgements.parquet")
    assert len(judgements) == 3 * 4 and set(judgements["id"]) == heldout
    students = pd.read_csv(tmp_path / "students.csv").set_index("teacher").sort_index()
    for teacher, rows in judgements.groupby("student"):
        answers = pd.read_parquet(tmp_path / "generations" / f"{teacher}.parquet").set_index("id")["response"]
        assert (rows["student_length"].to_numpy() == answers.loc[rows["id"]].str.len().to_numpy()).all()
        assert students.loc[teacher, "win_rate"] == pytest.approx(100 * rows["preference"].mean())
    assert np.allclose(students["ap"], (students["AE2_LC_WR"] + students["ArenaHard_WR"]) / 2)
    assert judged.correlations.loc["car", tiny_suite.base_small] == pytest.approx(
        spearmanr(ranking["car"], students["ap"]).statistic
    )


def test_validate_with_imported_benchmark_results(tmp_path, tiny_suite, ranked_sample):
    perf = tmp_path / "perf.csv"
    pd.DataFrame(
        {"teacher": ["tiny-teacher-terse", "tiny-teacher-thorough", "tiny-teacher-lists"], "base_model": "tiny-llama-s",
         "AE2_LC_WR": [3.0, 1.0, 2.0], "ArenaHard_WR": [1.0, 2.0, 0.5]}
    ).to_csv(perf, index=False)  # fmt: skip
    result = validate(ValidateConfig(scores=str(ranked_sample), output_dir=str(tmp_path / "v"), performance=str(perf)))
    assert not (tmp_path / "v" / "students").exists()
    ranking = pd.read_csv(tmp_path / "v" / "ranking.csv").set_index("teacher").sort_index()
    ap = pd.Series({"tiny-teacher-terse": 2.0, "tiny-teacher-thorough": 1.5, "tiny-teacher-lists": 1.25}).sort_index()
    assert result.correlations.loc["reward", tiny_suite.base_small] == pytest.approx(
        spearmanr(ranking["reward"], ap).statistic
    )
