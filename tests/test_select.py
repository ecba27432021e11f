import datasets
import numpy as np
import pandas as pd
import pytest

from magpie_teach.errors import ConfigError, DataError
from magpie_teach.selection.select import SelectConfig, select


@pytest.fixture()
def scores_file(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        for teacher in ("alpha", "beta", "gamma"):
            rows.append(
                {"id": f"q{i}", "instruction": f"Question {i}?", "response": f"{teacher} says {i}", "teacher": teacher,
                 "base_model": "models/base", "reward": float(rng.normal(1.0, 0.5)), "compat_loss": float(rng.uniform(1, 3)),
                 "n_tokens_full": int(rng.integers(5, 50)), "truncated": False, "status": "ok"}
            )  # fmt: skip
    frame = pd.DataFrame(rows)
    frame.loc[0, "truncated"] = True
    frame.loc[4, "status"] = "failed"
    path = tmp_path / "scores.parquet"
    frame.to_parquet(path)
    return path, frame


def _run(tmp_path, path, **kwargs):
    return select(SelectConfig(scores=str(path), output_dir=str(tmp_path / "out"), **kwargs))


def _valid(frame):
    return frame[(~frame.truncated) & (frame.status == "ok")]


def test_best_of_n_and_grape_and_mix_pick_the_argmax_per_instruction(tmp_path, scores_file):
    path, frame = scores_file
    valid = _valid(frame)
    expected = {
        "best-of-n": valid.loc[valid.groupby("id")["reward"].idxmax()],
        "grape": valid.loc[valid.groupby("id")["compat_loss"].idxmin()],
    }
    r = (valid["reward"] - valid["reward"].min()) / (valid["reward"].max() - valid["reward"].min())
    mix = 0.6 * r + 0.4 * -valid["compat_loss"]
    expected["mix"] = valid.loc[mix.groupby(valid["id"]).idxmax()]
    for strategy, chosen in expected.items():
        result = _run(tmp_path / strategy, path, strategy=strategy)
        got = result.dataset.set_index("id")["teacher"].to_dict()
        assert got == chosen.set_index("id")["teacher"].to_dict(), strategy
        assert result.summary["dropped_by_reason"] == {"truncated": 1, "failed": 1}


def test_responses_stopped_at_the_generation_cap_are_dropped_under_their_own_reason(tmp_path, scores_file):
    path, frame = scores_file
    frame = frame.assign(hit_max_new_tokens=False)
    frame.loc[[2, 5, 8], "hit_max_new_tokens"] = True
    frame.loc[0, "hit_max_new_tokens"] = True  # also cut at the scoring max_length: counted once, as the first reason
    frame.to_parquet(path)
    valid = _valid(frame)
    result = _run(tmp_path / "default", path, strategy="best-of-n")
    dropped = result.dropped
    assert result.summary["dropped_by_reason"] == {"hit_max_new_tokens": 4, "failed": 1}
    capped = dropped[dropped["reason"] == "hit_max_new_tokens"]
    assert set(zip(capped["id"], capped["teacher"])) == set(
        zip(frame.loc[[0, 2, 5, 8], "id"], frame.loc[[0, 2, 5, 8], "teacher"])
    )
    expected = valid[~valid["hit_max_new_tokens"]]
    assert (
        result.dataset.set_index("id")["teacher"].to_dict()
        == expected.loc[expected.groupby("id")["reward"].idxmax()].set_index("id")["teacher"].to_dict()
    )
    kept = _run(tmp_path / "kept", path, strategy="best-of-n", keep_capped=True)
    assert kept.summary["dropped_by_reason"] == {"truncated": 1, "failed": 1}


def test_whole_teacher_by_car_matches_a_hand_computed_car(tmp_path, scores_file):
    path, frame = scores_file
    means = frame.groupby("teacher")[["reward", "compat_loss"]].mean()
    best = (means["reward"] / (1 + 3 * means["compat_loss"])).idxmax()
    result = _run(tmp_path, path)
    assert set(result.dataset["teacher"]) == {best}
    assert result.summary["rows_per_teacher"] == {best: len(_valid(frame)[_valid(frame).teacher == best])}
    assert (result.dataset["selection_metric"] == "car").all()


def test_output_is_a_conversational_data_set_with_provenance(tmp_path, scores_file):
    path, _ = scores_file
    result = _run(tmp_path, path, strategy="best-of-n", min_reward=0.5, max_tokens=40)
    loaded = datasets.load_dataset(str(result.output_dir), split="train")
    assert loaded.num_rows == len(result.dataset)
    row = loaded[0]
    assert row["messages"][0]["role"] == "user" and row["messages"][1]["role"] == "assistant"
    for column in ("teacher", "selection_metric", "selection_score", "reward", "compat_loss"):
        assert column in loaded.column_names
    assert all(r >= 0.5 for r in loaded["reward"])
    dropped = pd.read_parquet(result.output_dir / "dropped.parquet")
    assert set(dropped["reason"]) <= {"truncated", "failed", "reward_below_min", "too_long"}
    assert len(dropped) + len(_run(tmp_path / "all", path, strategy="best-of-n", keep_truncated=True).dropped) > 0


def test_select_streams_the_texts_of_the_chosen_rows_from_a_file_read_in_many_batches(
    tmp_path, scores_file, monkeypatch
):
    """Scores of two base models, read a few rows at a time: the SFT rows carry exactly the chosen rows' texts (each
    response is unique, so a row read from the wrong place shows), in the scores' order, and the other base model's
    rows are never chosen."""
    import json

    from magpie_teach import tables
    from magpie_teach.chat import build_messages

    path, frame = scores_file
    earlier = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    frame = frame.assign(context=[earlier if i % 2 else None for i in range(len(frame))])  # multi-turn rows too
    other = frame.assign(
        base_model="models/other", response=frame["response"] + " (other)", reward=frame["reward"] + 9
    )
    both = pd.concat([other, frame], ignore_index=True).sample(frac=1, random_state=0).reset_index(drop=True)
    both.to_parquet(path)
    monkeypatch.setattr(tables, "BATCH_BYTES", 150)  # a few rows per batch
    result = _run(tmp_path, path, strategy="best-of-n", base_model="models/base")
    written = pd.read_parquet(result.output_dir / "data" / "train-00000-of-00001.parquet")
    valid = _valid(frame)
    chosen = valid.loc[valid.groupby("id")["reward"].idxmax()]
    assert len(written) == len(chosen) == 6
    expected = {(r.id, r.teacher): build_messages(r.instruction, r.response, context=r.context)
                for r in chosen.itertuples()}  # fmt: skip
    got = {(r.id, r.teacher): [dict(m) for m in r.messages] for r in written.itertuples()}
    assert got == expected and any(len(m) == 4 for m in got.values()) and any(len(m) == 2 for m in got.values())
    assert list(written.columns) == ["messages", "id", "teacher", "base_model", "selection_metric", "selection_score",
                                     "reward", "compat_loss"]  # fmt: skip
    order = both[both["base_model"] == "models/base"].reset_index(drop=True)
    place = {(r.id, r.teacher): i for i, r in enumerate(order.itertuples())}
    assert [place[(r.id, r.teacher)] for r in written.itertuples()] == sorted(place[k] for k in got)


def test_bad_choices_are_named(tmp_path, scores_file):
    path, _ = scores_file
    with pytest.raises(ConfigError, match="--teacher 'delta' is not in the scores"):
        _run(tmp_path, path, teacher="delta")
    with pytest.raises(ConfigError, match="no scores for base model 'other'"):
        _run(tmp_path, path, base_model="other")
    with pytest.raises(DataError, match="every response was filtered out"):
        _run(tmp_path, path, min_reward=100.0)
    with pytest.raises(DataError, match="no scores.parquet"):
        _run(tmp_path, tmp_path / "missing")


def test_a_teacher_whose_every_response_is_filtered_out_is_an_error_and_writes_nothing(tmp_path, scores_file):
    path, frame = scores_file
    limit = frame.loc[frame["teacher"] == "beta", "reward"].max() + 0.01  # above every one of beta's rewards
    assert (frame["reward"] >= limit).any()  # the setup: other teachers keep rows, so the filters leave some
    with pytest.raises(DataError) as err:
        _run(tmp_path, path, teacher="beta", min_reward=float(limit))
    beta = frame[frame["teacher"] == "beta"]
    assert (beta["status"] == "failed").sum() == 1 and len(beta) == 6  # one failed, the five others too low
    assert str(err.value) == (
        "every response of teacher 'beta' was filtered out ({'reward_below_min': 5, 'failed': 1}): nothing to select"
    )
    assert not (tmp_path / "out").exists()


def test_a_best_of_n_teacher_gives_its_highest_reward_generation_per_instruction(tmp_path, scores_file):
    _, frame = scores_file
    alpha = frame[(frame.teacher == "alpha") & (frame.status == "ok") & ~frame.truncated]
    second = alpha.assign(
        generation_index=1,
        response=alpha["response"] + " (again)",
        reward=alpha["reward"] + [0.3, -0.3, 0.3, -0.3, 0.3][: len(alpha)],
    )
    both = pd.concat([alpha.assign(generation_index=0), second], ignore_index=True)
    path = tmp_path / "bon.parquet"
    both.to_parquet(path)
    result = _run(tmp_path, path, teacher="alpha")
    expected = both.loc[both.groupby("id")["reward"].idxmax()].set_index("id")
    got = result.dataset.set_index("id")
    assert got.index.is_unique and set(got.index) == set(alpha["id"])
    assert got["generation_index"].to_dict() == expected["generation_index"].to_dict()
    assert got["reward"].to_dict() == pytest.approx(expected["reward"].to_dict())


@pytest.fixture()
def ranked_at_beta_0(tmp_path):
    """A rank-layout folder whose rank_config.yaml records beta 0: by CAR at beta 0 teacher 'big' is best, at
    beta 3 'fit'. Half of big's rows are long (n_tokens_full 100) and carry its high rewards."""
    from magpie_teach.config import dump_config
    from magpie_teach.ranking.rank import RankConfig

    rows = []
    for i in range(8):
        big_reward = 18.0 if i % 2 else 2.0
        for teacher, reward, loss, tokens in (("big", big_reward, 3.0, 100 if i % 2 else 10), ("fit", 5.0, 0.5, 10),
                                              ("weak", 1.0, 1.0, 10)):  # fmt: skip
            rows.append({"id": f"q{i}", "instruction": f"Question {i}?", "response": f"{teacher} {i}",
                         "teacher": teacher, "base_model": "base", "reward": reward, "compat_loss": loss,
                         "n_tokens_full": tokens, "truncated": False})  # fmt: skip
    folder = tmp_path / "rank"
    folder.mkdir()
    pd.DataFrame(rows).to_parquet(folder / "scores.parquet")
    dump_config(RankConfig(data="x", output_dir=str(folder), base_models=["base"], reward_column="r", beta=0.0),
                folder / "rank_config.yaml")  # fmt: skip
    return folder


def test_select_uses_the_beta_rank_recorded_unless_given(tmp_path, ranked_at_beta_0):
    from magpie_teach.scoring.metrics import car

    recorded = _run(tmp_path, ranked_at_beta_0)
    assert set(recorded.dataset["teacher"]) == {"big"}
    assert recorded.summary["car"]["beta"] == 0.0 and "rank_config.yaml" in recorded.summary["car"]["source"]
    assert recorded.dataset["selection_score"].iloc[0] == pytest.approx(float(car(10.0, 3.0, 0.0)))

    given = select(SelectConfig(scores=str(ranked_at_beta_0), output_dir=str(tmp_path / "o3"), beta=3.0))
    assert set(given.dataset["teacher"]) == {"fit"}
    assert given.summary["car"]["beta"] == 3.0 and "beta from the command line" in given.summary["car"]["source"]


def test_select_filters_change_the_rows_not_the_best_teacher_unless_asked(tmp_path, ranked_at_beta_0):
    # --max-tokens 50 drops big's long, high-reward rows: on the kept rows 'fit' would lead at beta 0
    kept_rows = select(SelectConfig(scores=str(ranked_at_beta_0), output_dir=str(tmp_path / "a"), max_tokens=50))
    assert set(kept_rows.dataset["teacher"]) == {"big"} and len(kept_rows.dataset) == 4
    assert kept_rows.summary["dropped_by_reason"] == {"too_long": 4}
    reranked = select(SelectConfig(scores=str(ranked_at_beta_0), output_dir=str(tmp_path / "b"), max_tokens=50,
                                   rerank_after_filters=True))  # fmt: skip
    assert set(reranked.dataset["teacher"]) == {"fit"}
    # the decision recorded is the bootstrap of the rows kept, computed here on them, not of every scored row
    from magpie_teach.artefacts import load_scores
    from magpie_teach.scoring.confidence import bootstrap_ranking
    from magpie_teach.scoring.metrics import aggregate

    scores = load_scores(str(ranked_at_beta_0), None)
    kept = scores[scores["n_tokens_full"] <= 50]
    _, (on_kept,) = bootstrap_ranking(kept, aggregate(kept, beta=0.0))
    _, (on_all,) = bootstrap_ranking(scores, aggregate(scores, beta=0.0))
    assert on_kept.leader != on_all.leader  # the two decisions differ: the test can tell them apart
    decision = reranked.summary["decision"]
    assert (decision["leader"], decision["n_instructions"]) == (on_kept.leader, on_kept.n_instructions)
    assert decision["p_best"] == pytest.approx(on_kept.p_best)


def test_validate_and_review_use_the_beta_rank_recorded(tmp_path, ranked_at_beta_0):
    from magpie_teach.evaluation.validate import ValidateConfig, validate
    from magpie_teach.review.argilla_io import ReviewPushConfig, review_sample
    from magpie_teach.scoring.metrics import car

    perf = tmp_path / "perf.csv"
    pd.DataFrame({"teacher": ["big", "fit", "weak"], "base_model": "base", "AE2_LC_WR": [3.0, 2.0, 1.0],
                  "ArenaHard_WR": [3.0, 2.0, 1.0]}).to_csv(perf, index=False)  # fmt: skip
    validate(ValidateConfig(scores=str(ranked_at_beta_0), output_dir=str(tmp_path / "v"), performance=str(perf)))
    ranking = pd.read_csv(tmp_path / "v" / "ranking.csv").set_index("teacher")
    assert (ranking["car_beta"] == 0.0).all()
    assert ranking["rank_car"].to_dict() == {"big": 1, "fit": 2, "weak": 3}
    validate(ValidateConfig(scores=str(ranked_at_beta_0), output_dir=str(tmp_path / "v3"), performance=str(perf),
                            beta=3.0))  # fmt: skip
    assert pd.read_csv(tmp_path / "v3" / "ranking.csv").set_index("teacher")["rank_car"]["fit"] == 1

    sample = review_sample(ReviewPushConfig(scores=str(ranked_at_beta_0), dataset="d", per_teacher=3))
    np.testing.assert_allclose(sample["car"], car(sample["reward"], sample["compat_loss"], 0.0))


def test_max_tokens_drops_exactly_the_responses_over_the_limit(tmp_path, scores_file):
    path, frame = scores_file
    limit = int(frame["n_tokens_full"].median())
    result = _run(tmp_path, path, strategy="best-of-n", max_tokens=limit, keep_truncated=True)
    dropped = pd.read_parquet(result.output_dir / "dropped.parquet")
    too_long = dropped[dropped["reason"] == "too_long"]
    eligible = frame[frame["status"] == "ok"]  # failed rows are dropped first, for that reason
    expected = eligible[eligible["n_tokens_full"] > limit]
    assert len(expected) > 0
    assert sorted(zip(too_long["id"], too_long["teacher"])) == sorted(zip(expected["id"], expected["teacher"]))
    kept = frame.set_index(["id", "teacher"]).loc[list(zip(result.dataset["id"], result.dataset["teacher"]))]
    assert (kept["n_tokens_full"] <= limit).all()


def _two_teacher_scores(tmp_path, gap: float, n: int, confidence: float | None = None):
    """A rank-layout folder: teacher 'lead' has mean reward 2 + gap, 'other' 2 (noise sd 1, loss 1)."""
    from magpie_teach.config import dump_config
    from magpie_teach.ranking.rank import RankConfig

    rng = np.random.default_rng(1)
    rows = [{"id": f"q{i}", "instruction": f"Q{i}?", "response": f"{t} {i}", "teacher": t, "base_model": "base",
             "reward": float(mean + rng.normal()), "compat_loss": 1.0, "n_tokens_full": 10, "truncated": False}
            for i in range(n) for t, mean in (("lead", 2.0 + gap), ("other", 2.0))]  # fmt: skip
    folder = tmp_path / f"rank-{gap}-{n}"
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(folder / "scores.parquet")
    extra = {"confidence": confidence} if confidence else {}
    dump_config(RankConfig(data="x", output_dir=str(folder), base_models=["base"], reward_column="r", **extra),
                folder / "rank_config.yaml")  # fmt: skip
    return folder


def test_require_decided_refuses_an_undecided_best_teacher_and_records_the_decision(tmp_path, caplog):
    from magpie_teach.scoring.confidence import bootstrap_ranking
    from magpie_teach.scoring.metrics import aggregate

    close = _two_teacher_scores(tmp_path, gap=0.1, n=30)
    scores = pd.read_parquet(close / "scores.parquet")
    _, (verdict,) = bootstrap_ranking(scores, aggregate(scores))
    assert not verdict.separated  # the reference: rank's bootstrap with rank's default settings
    with pytest.raises(DataError, match="--require-decided: .* is not separated from it at 95% confidence"):
        _run(tmp_path / "a", close, require_decided=True)
    assert not (tmp_path / "a" / "out").exists()
    result = _run(tmp_path / "b", close)  # without the flag: a warning, and the choice is made
    assert "score more instructions to decide" in caplog.text
    assert result.summary["decision"]["separated"] is False
    assert result.summary["decision"]["leader"] == verdict.leader == result.dataset["teacher"].iloc[0]
    assert result.summary["decision"]["p_best"] == pytest.approx(verdict.p_best)

    clear = _two_teacher_scores(tmp_path, gap=3.0, n=40)
    result = _run(tmp_path / "c", clear, require_decided=True)
    assert result.summary["decision"]["separated"] is True and set(result.dataset["teacher"]) == {"lead"}


def test_require_decided_refuses_a_clear_lead_on_too_few_instructions_and_says_how_many_more(tmp_path):
    """A gap of 3 standard deviations on 8 instructions is separated by the bootstrap's interval, but 8 is below
    the documented minimum: no pass, and the message says how many instructions to add."""
    from magpie_teach.scoring.confidence import MIN_DECISION_INSTRUCTIONS

    few = _two_teacher_scores(tmp_path, gap=3.0, n=8)
    with pytest.raises(DataError) as err:
        _run(tmp_path / "a", few, require_decided=True)
    more = MIN_DECISION_INSTRUCTIONS - 8
    assert str(err.value) == (
        "--require-decided: lead leads for base, but nothing is decided: 8 instruction(s) are too few to decide on "
        f"(a decision needs at least {MIN_DECISION_INSTRUCTIONS}): score at least {more} more."
    )
    enough = _two_teacher_scores(tmp_path, gap=3.0, n=MIN_DECISION_INSTRUCTIONS)
    result = _run(tmp_path / "b", enough, require_decided=True)
    assert result.summary["decision"]["separated"] is True and result.summary["decision"]["too_few"] is None


def test_the_decision_uses_the_confidence_rank_recorded(tmp_path):
    """A gap separated at 50% confidence but not at 99%: the level recorded by rank decides."""
    from magpie_teach.scoring.confidence import bootstrap_ranking
    from magpie_teach.scoring.metrics import aggregate

    folders = {
        level: _two_teacher_scores(tmp_path / str(level), gap=0.4, n=24, confidence=level) for level in (0.5, 0.99)
    }
    scores = pd.read_parquet(folders[0.5] / "scores.parquet")
    separated = {level: bootstrap_ranking(scores, aggregate(scores), confidence=level)[1][0].separated
                 for level in folders}  # fmt: skip
    assert separated == {0.5: True, 0.99: False}  # the data set is one where the level matters
    for level, folder in folders.items():
        result = _run(tmp_path / f"out-{level}", folder)
        assert result.summary["decision"]["separated"] is separated[level]
        assert result.summary["decision"]["confidence"] == level


def test_the_decision_is_the_bootstrap_at_the_beta_shift_and_seed_given():
    """Noisy teachers: the decision's figures change with beta and with the bootstrap seed, and equal the
    bootstrap computed here with the same settings."""
    from magpie_teach.scoring.confidence import bootstrap_ranking
    from magpie_teach.scoring.metrics import aggregate
    from magpie_teach.selection.select import select_responses
    from magpie_teach.settings import CARChoice, ConfidenceSettings

    rng = np.random.default_rng(2)
    frame = pd.DataFrame([{"id": f"q{i}", "teacher": t, "instruction": f"Q{i}?", "response": t, "base_model": "b",
                           "reward": float(r + rng.normal()), "compat_loss": float(loss * rng.uniform(0.5, 1.5)),
                           "n_tokens_full": 10, "truncated": False}
                          for i in range(30) for t, r, loss in (("a", 3.0, 1.0), ("b", 2.5, 0.6))])  # fmt: skip
    config = SelectConfig(scores="x", output_dir="y")
    decisions = {}
    for beta, seed in ((0.5, 1), (0.5, 2), (4.0, 1)):
        car = CARChoice(beta=beta, reward_shift="1", source="test")
        chosen, _ = select_responses(frame, config, car, ConfidenceSettings(bootstrap=300, bootstrap_seed=seed))
        _, (verdict,) = bootstrap_ranking(frame, aggregate(frame, beta=beta, reward_shift="1"), 300, 0.95, seed)
        assert chosen.attrs["decision"] == {**verdict.to_json(), "confidence": 0.95, "replicates": 300}
        decisions[beta, seed] = chosen.attrs["decision"]["difference_ci"]
    assert len({tuple(v) for v in decisions.values()}) == 3  # each setting gives its own interval


def test_require_decided_needs_a_choice_by_car():
    with pytest.raises(ConfigError, match="--require-decided applies to --strategy teacher"):
        SelectConfig(scores="x", output_dir="y", strategy="best-of-n", require_decided=True)
    with pytest.raises(ConfigError, match="--require-decided applies"):
        SelectConfig(scores="x", output_dir="y", teacher="a", require_decided=True)


# -- the filters' boundaries and the strategies' tie rules, on select_responses directly (fast: `make mutation`) ---


def _rows(**columns):
    """Three teachers' answers to two instructions (ids q0, q1)."""
    frame = pd.DataFrame([{"id": f"q{i}", "teacher": t, "instruction": f"Question {i}?", "response": f"{t} {i}",
                           "base_model": "b", "reward": 1.0, "compat_loss": 1.0}
                          for i in range(2) for t in ("a", "b", "c")])  # fmt: skip
    for name, values in columns.items():
        frame[name] = values
    return frame


def _pick(frame, **kwargs):
    from magpie_teach.selection.select import select_responses

    chosen, dropped = select_responses(frame, SelectConfig(scores="x", output_dir="y", **kwargs))
    return chosen, dict(zip(dropped["teacher"] + dropped["id"], dropped["reason"]))


def test_filters_drop_exactly_the_rows_past_their_limits_and_keep_the_rows_at_them():
    frame = _rows(reward=[0.5, 1.0, 2.0, 0.4, 1.0, 3.0], n_tokens_full=[10, 20, 21, 5, 20, 30])
    _, dropped = _pick(frame, strategy="best-of-n", min_reward=1.0, max_tokens=20, exclude_ids=["q1"])
    # a reward equal to the minimum and a length equal to the maximum are kept; q1 is excluded whatever its rows
    assert dropped == {"aq0": "reward_below_min", "cq0": "too_long", "aq1": "reward_below_min", "bq1": "excluded_id",
                       "cq1": "too_long"}  # fmt: skip


def test_a_missing_status_is_a_failure_and_a_missing_cap_flag_is_not():
    frame = _rows(status=["ok", None, "ok", "ok", "error", "ok"], hit_max_new_tokens=[None, False, True] * 2)
    chosen, dropped = _pick(frame, strategy="best-of-n")
    assert dropped == {"bq0": "failed", "cq0": "hit_max_new_tokens", "bq1": "failed", "cq1": "hit_max_new_tokens"}
    assert chosen["teacher"].tolist() == ["a", "a"]


def test_best_of_n_ties_go_to_the_teacher_that_sorts_first_and_a_teacher_keeps_its_best_generation():
    frame = _rows(reward=[2.0, 2.0, 1.0, 1.0, 3.0, 3.0])
    chosen, _ = _pick(frame, strategy="best-of-n")
    assert chosen[["id", "teacher", "selection_metric"]].values.tolist() == [
        ["q0", "a", "reward"],
        ["q1", "b", "reward"],
    ]
    assert chosen["selection_score"].tolist() == [2.0, 3.0]
    # best-of-N output of one teacher: its highest-reward generation per instruction, the lower index on a tie
    gens = pd.concat([_rows(generation_index=1, reward=[4.0, 0, 0, 5.0, 0, 0]),
                      _rows(generation_index=0, reward=[1.0, 0, 0, 5.0, 0, 0])], ignore_index=True)  # fmt: skip
    chosen, _ = _pick(gens, teacher="a")
    assert chosen[["id", "generation_index", "reward"]].values.tolist() == [["q0", 1, 4.0], ["q1", 0, 5.0]]
    assert chosen["selection_metric"].tolist() == ["teacher", "teacher"] and chosen.index.tolist() == [0, 1]
    # the same without generation indexes (several rows per instruction, as a hand-made file has them)
    chosen, _ = _pick(gens.drop(columns="generation_index"), teacher="a")
    assert chosen[["id", "reward", "response"]].values.tolist() == [["q0", 4.0, "a 0"], ["q1", 5.0, "a 1"]]


def test_grape_and_mix_score_as_documented():
    frame = _rows(reward=[1.0, 3.0, 2.0, 5.0, 1.0, 1.0], compat_loss=[2.0, 1.5, 1.0, 1.0, 1.0, 0.5])
    chosen, _ = _pick(frame, strategy="grape")
    assert chosen["teacher"].tolist() == ["c", "c"] and chosen["selection_metric"].tolist() == ["logprob_norm"] * 2
    assert chosen["selection_score"].tolist() == [-1.0, -0.5]
    chosen, _ = _pick(frame, strategy="mix", alpha=0.25)
    normalised = (frame["reward"] - 1.0) / 4.0
    score = 0.75 * normalised - 0.25 * frame["compat_loss"]
    best = frame.assign(score=score).sort_values(["id", "score"], ascending=[True, False]).drop_duplicates("id")
    assert chosen["teacher"].tolist() == best["teacher"].tolist() == ["b", "a"]
    assert chosen["selection_score"].tolist() == pytest.approx(best["score"].tolist())
    assert set(chosen["selection_metric"]) == {"mix(alpha=0.25)"}
    # all rewards equal: the normalised reward is 0 everywhere, so the mix is decided by compatibility alone
    chosen, _ = _pick(frame.assign(reward=2.0), strategy="mix", alpha=0.5)
    assert chosen["teacher"].tolist() == ["c", "c"] and chosen["selection_score"].tolist() == [-0.5, -0.25]


@pytest.mark.parametrize(("alpha", "ok"), [(0.0, True), (1.0, True), (-0.01, False), (1.01, False)])
def test_alpha_is_accepted_on_the_closed_interval_from_0_to_1(alpha, ok):
    if ok:
        assert SelectConfig(scores="x", output_dir="y", strategy="mix", alpha=alpha).alpha == alpha
    else:
        with pytest.raises(ConfigError, match=rf"--alpha must be in \[0, 1\], got {alpha}"):
            SelectConfig(scores="x", output_dir="y", strategy="mix", alpha=alpha)
    with pytest.raises(ConfigError, match=r"--strategy 'best' is not one of teacher, best-of-n, grape, mix"):
        SelectConfig(scores="x", output_dir="y", strategy="best")


def test_the_best_teacher_follows_the_reward_shift_and_only_a_car_choice_carries_a_decision():
    """CAR = (reward + shift) / (1 + beta * loss): a shift turns the ranking (a: 1 / 2, b: 0.5 / 1.5 at beta 1;
    shifted by 2: 3 / 2 < 2.5 / 1.5)."""
    from magpie_teach.settings import DEFAULT_BOOTSTRAP, CARChoice, ConfidenceSettings

    frame = _rows(reward=[1.0, 0.5, 0.1] * 2, compat_loss=[1.0, 0.5, 1.0] * 2, n_tokens_full=10, truncated=False)
    frame = pd.concat([frame.assign(id=frame["id"] + f"-{k}") for k in range(4)], ignore_index=True)
    config = SelectConfig(scores="x", output_dir="y", beta=1.0)
    from magpie_teach.selection.select import select_responses

    unshifted = CARChoice(beta=1.0, reward_shift="none", source="test")
    plain, _ = select_responses(frame, config, unshifted, ConfidenceSettings(bootstrap=0))
    by_two = CARChoice(beta=1.0, reward_shift="2", source="test")
    shifted, _ = select_responses(frame, config, by_two, ConfidenceSettings(bootstrap=0))
    assert set(plain["teacher"]) == {"a"} and set(shifted["teacher"]) == {"b"}
    assert shifted["selection_score"].iloc[0] == pytest.approx(2.5 / 1.5)
    decision = shifted.attrs["decision"]
    assert decision["leader"] == "b" and decision["replicates"] == DEFAULT_BOOTSTRAP  # rank ran without a bootstrap
    chosen, _ = _pick(frame, strategy="best-of-n")
    assert "decision" not in chosen.attrs


def test_a_token_count_is_no_filter_without_max_tokens(tmp_path, scores_file):
    path, frame = scores_file
    result = _run(tmp_path, path, strategy="teacher", teacher="beta")
    assert result.summary["dropped_by_reason"] == {"truncated": 1, "failed": 1}
    assert frame["n_tokens_full"].max() > frame["n_tokens_full"].min()  # the counts differ: a limit would bite
    # no index leaks into what select returns or writes
    assert "index" not in result.dataset.columns and list(result.dataset.index) == list(range(len(result.dataset)))
    written = pd.read_parquet(result.output_dir / "data" / "train-00000-of-00001.parquet")
    assert not [c for c in written.columns if "index" in c]
    import pyarrow.parquet as pq

    file = pq.read_schema(result.output_dir / "data" / "train-00000-of-00001.parquet")
    assert file.names == ["messages", "id", "teacher", "base_model", "selection_metric", "selection_score", "reward",
                          "compat_loss"]  # fmt: skip


def test_select_config_and_metric_errors_are_exact(tmp_path, scores_file):
    path, _ = scores_file
    with pytest.raises(ConfigError) as err:
        SelectConfig(scores=str(path), output_dir=str(tmp_path), strategy="best-of-n", require_decided=True)
    assert str(err.value) == "--require-decided applies to --strategy teacher choosing by --metric car (no --teacher)"
    from magpie_teach.scoring.metrics import METRIC_DIRECTIONS

    with pytest.raises(ConfigError) as err:
        _run(tmp_path, path, strategy="teacher", metric="speed")
    assert str(err.value) == f"--metric 'speed' is not one of {', '.join(METRIC_DIRECTIONS)}"
    with pytest.raises(ConfigError) as err:
        _run(tmp_path, path, strategy="teacher", metric="ppl_ref")  # a known metric these scores have no column for
    assert str(err.value).startswith("--metric 'ppl_ref' is not in these scores (columns: ['teacher', 'base_model', ")


def test_routed_takes_each_instruction_s_routed_teacher_and_reports_the_ones_it_cannot(tmp_path, scores_file):
    path, frame = scores_file
    routing = pd.DataFrame({"id": [f"q{i}" for i in range(6)], "teacher": ["alpha", "beta", "gamma"] * 2})
    routing.to_csv(tmp_path / "assign.csv", index=False)
    result = _run(tmp_path, path, strategy="routed", routing=str(tmp_path / "assign.csv"))
    valid = _valid(frame)
    expected = valid.merge(routing, on=["id", "teacher"])  # q0's alpha is truncated, q1's beta failed: neither has one
    assert result.dataset.set_index("id")["teacher"].to_dict() == expected.set_index("id")["teacher"].to_dict()
    assert not {"q0", "q1"} & set(result.dataset["id"]) and len(result.dataset) == 4
    routed = result.summary["routing"]
    assert routed["how"] == "assignment file" and routed["routed_instructions_without_a_kept_response"] == 2
    assert routed["rows_per_teacher"] == {"alpha": 2, "beta": 2, "gamma": 2}
    with pytest.raises(ConfigError, match="several teachers: give --routing"):
        _run(tmp_path / "no-routing", path, strategy="routed")
    with pytest.raises(ConfigError, match="--routing applies to --strategy routed"):
        _run(tmp_path / "wrong", path, routing=str(tmp_path / "assign.csv"))
    routing.assign(teacher="delta").to_csv(tmp_path / "unknown.csv", index=False)
    with pytest.raises(ConfigError, match=r"sends instructions to \['delta'\]"):
        _run(tmp_path / "unknown", path, strategy="routed", routing=str(tmp_path / "unknown.csv"))


def test_routed_without_a_routing_takes_one_teacher_per_instruction_and_its_best_generation(tmp_path, scores_file):
    path, frame = scores_file
    one = frame[frame["teacher"] == frame["id"].map({f"q{i}": "alpha" if i % 2 else "gamma" for i in range(6)})]
    two = pd.concat([one.assign(generation_index=0), one.assign(generation_index=1, reward=one["reward"] + 1)])
    two.to_parquet(path)
    result = _run(tmp_path, path, strategy="routed", keep_truncated=True)
    assert len(result.dataset) == 6 and (result.dataset["generation_index"] == 1).all()
    assert result.summary["routing"]["source"] == "the scores' own teacher of each instruction"


def test_routed_names_the_instruction_that_two_teachers_answered_and_marks_its_rows(tmp_path, scores_file):
    path, frame = scores_file
    one = frame[frame["teacher"] == "alpha"]
    two = pd.concat([one, frame[(frame["id"] == "q5") & (frame["teacher"] == "beta")]])
    two.to_parquet(path)
    with pytest.raises(ConfigError, match="instruction 'q5' has responses of several teachers"):
        _run(tmp_path / "two", path, strategy="routed")
    tie = pd.concat([one.assign(generation_index=1), one.assign(generation_index=0)])  # equal rewards
    tie.to_parquet(path)
    result = _run(tmp_path / "tie", path, strategy="routed", keep_truncated=True)
    assert (result.dataset["generation_index"] == 0).all()  # a tie goes to the first generation
    assert (result.dataset["selection_metric"] == "routed").all() and result.dataset["selection_score"].isna().all()
    one.assign(status="failed").to_parquet(path)
    with pytest.raises(DataError, match="every response was filtered out"):
        _run(tmp_path / "none", path, strategy="routed")


def test_routed_with_no_kept_response_of_any_routed_teacher_says_so(tmp_path, scores_file):
    path, frame = scores_file
    frame.assign(truncated=frame["teacher"] == "beta").to_parquet(path)
    pd.DataFrame({"id": [f"q{i}" for i in range(6)], "teacher": "beta"}).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(DataError, match="^no kept response is of the teacher its instruction was routed to"):
        _run(tmp_path, path, strategy="routed", routing=str(tmp_path / "a.csv"))
