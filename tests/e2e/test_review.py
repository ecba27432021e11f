"""Review round trip against a real Argilla 2.8 server (real Redis; the search engine is the in-memory test stand-in)."""

import subprocess
import sys

import httpx
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from tests.argilla_memory.server import add_annotator

DATASET = "review-tests"
"""This module's data set: not the README's `spot-check`, which the walkthrough pushes to the same session's server."""


def cli(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "magpie_teach.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def env(argilla_server):
    import os

    return {**os.environ, "ARGILLA_API_URL": argilla_server.url, "ARGILLA_API_KEY": argilla_server.api_key}


@pytest.fixture(scope="module")
def pushed(env, ranked_sample):
    result = cli("review", "push", str(ranked_sample), "--dataset", DATASET, "--per-teacher", "4", "--seed", "7",
                 "--with-vectors", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def client(server, key=None):
    import argilla as rg

    return rg.Argilla(api_url=server.url, api_key=key or server.api_key)


def test_push_creates_the_dataset_with_the_library_settings(pushed, argilla_server, ranked_sample):
    from magpie_teach.review.sampling import sample_for_review

    dataset = client(argilla_server).datasets(DATASET)
    settings = dataset.settings
    assert [f.name for f in settings.fields] == ["instruction", "response"]
    assert {q.name for q in settings.questions} == {"helpfulness", "problems", "comment"}
    assert {m.name for m in settings.metadata} >= {"teacher", "base_model", "reward", "compat_loss", "car", "length"}
    expected = sample_for_review(pd.read_parquet(ranked_sample / "scores.parquet"), per_teacher=4, seed=7)
    records = list(dataset.records())
    assert len(records) == len(expected)
    assert {(r.metadata["teacher"], r.metadata["example_id"]) for r in records} == set(
        zip(expected.teacher, expected.id)
    )
    assert f"sent {len(expected)} records" in pushed.stdout


def test_pushing_again_updates_instead_of_duplicating(pushed, env, argilla_server):
    again = cli(*pushed.args[3:], env=env)
    assert again.returncode == 0, again.stderr
    assert len(list(client(argilla_server).datasets(DATASET).records())) == int(pushed.stdout.split()[1])


def test_search_engine_stand_in_serves_the_real_query_api(pushed, argilla_server):
    import argilla as rg

    dataset = client(argilla_server).datasets(DATASET)
    records = list(dataset.records())
    teacher = records[0].metadata["teacher"]
    by_teacher = list(dataset.records(query=rg.Query(filter=rg.Filter(("metadata.teacher", "==", teacher)))))
    assert {r.metadata["teacher"] for r in by_teacher} == {teacher}
    assert len(by_teacher) == sum(r.metadata["teacher"] == teacher for r in records)
    cut = sorted(r.metadata["reward"] for r in records)[len(records) // 2]
    high = list(dataset.records(query=rg.Query(filter=rg.Filter(("metadata.reward", ">=", cut)))))
    assert {r.id for r in high} == {r.id for r in records if r.metadata["reward"] >= cut}
    word = records[0].fields["instruction"].split()[0]
    hits = list(dataset.records(query=rg.Query(query=word)))
    assert records[0].id in {r.id for r in hits}
    assert all(word.lower() in (r.fields["instruction"] + " " + r.fields["response"]).lower() for r in hits)
    vectors = {r.id: r.vectors["scores"] for r in dataset.records(with_vectors=True)}
    probe = vectors[records[0].id]
    similar = list(dataset.records(query=rg.Query(similar=rg.Similar(name="scores", value=probe)), limit=5))

    def cosine(v):
        dot = sum(a * b for a, b in zip(probe, v))
        return dot / (sum(a * a for a in probe) ** 0.5 * sum(b * b for b in v) ** 0.5)

    expected = sorted(vectors, key=lambda i: -cosine(vectors[i]))[:5]
    assert [record.id for record, _score in similar] == expected


def test_annotations_come_back_with_a_summary(pushed, argilla_server, env, ranked_sample, tmp_path):
    import argilla as rg

    owner = client(argilla_server)
    records = list(owner.datasets(DATASET).records())
    rater_id = client(argilla_server, add_annotator(argilla_server, "rater")).me.id
    ratings = {}
    for i, record in enumerate(records):
        ratings[record.id] = (1 + i % 5, 1 + (i * 2) % 5)
        record.responses.add(
            rg.Response("helpfulness", ratings[record.id][0], user_id=owner.me.id, status="submitted")
        )
        record.responses.add(rg.Response("helpfulness", ratings[record.id][1], user_id=rater_id, status="submitted"))
        if i == 0:
            record.responses.add(rg.Response("problems", ["truncated"], user_id=rater_id, status="submitted"))
    owner.datasets(DATASET).records.log(records)

    # the stand-in engine answers response-status filters and progress like the real one
    dataset = owner.datasets(DATASET)
    submitted = list(dataset.records(query=rg.Query(filter=rg.Filter(("response.status", "==", "submitted")))))
    assert len(submitted) == len(records)
    progress = dataset.progress()
    assert progress["total"] == len(records)

    result = cli(
        "review", "pull", "--dataset", DATASET, "--scores", str(ranked_sample), "--output", str(tmp_path), env=env
    )
    assert result.returncode == 0, result.stderr
    reviews = pd.read_parquet(tmp_path / "reviews.parquet")
    assert len(reviews) == 2 * len(records) and reviews["annotator"].nunique() == 2
    assert "n_tokens_full" in reviews.columns  # joined to the scored rows
    summary = pd.read_csv(tmp_path / "review_summary.csv").set_index("teacher")
    meta = pd.DataFrame([{"id": r.id, "teacher": r.metadata["teacher"], "car": r.metadata["car"],
                          "reward": r.metadata["reward"], "rating": sum(ratings[r.id]) / 2} for r in records])  # fmt: skip
    checked = 0
    for teacher, group in meta.groupby("teacher"):
        assert summary.loc[teacher, "mean_rating"] == pytest.approx(group["rating"].mean())
        for metric in ("car", "reward"):
            defined = len(group) >= 3 and group["rating"].nunique() > 1 and group[metric].nunique() > 1
            expected = (
                spearmanr(group["rating"], group[metric]).statistic if defined else np.nan
            )  # the documented rule
            got = summary.loc[teacher, f"rho_rating_{metric}"]
            if np.isnan(expected):
                assert np.isnan(got)
            else:
                assert got == pytest.approx(expected)
                checked += 1
    assert checked >= 2  # at least one teacher's ratings vary: both rhos were compared
    assert "annotator agreement: exact" in result.stdout
    assert reviews.loc[reviews["problems"].map(len) > 0, "problems"].iloc[0].tolist() == ["truncated"]


def test_metadata_metrics_from_the_stand_in(pushed, argilla_server):
    dataset = client(argilla_server).datasets(DATASET)
    prop = dataset.settings.metadata["reward"]
    reply = httpx.get(f"{argilla_server.url}/api/v1/metadata-properties/{prop.id}/metrics",
                      headers={"X-Argilla-Api-Key": argilla_server.api_key})  # fmt: skip
    rewards = [r.metadata["reward"] for r in dataset.records()]
    metrics = reply.json()  # the server rounds metrics to a few digits
    assert metrics["min"] == pytest.approx(min(rewards), rel=1e-3) and metrics["max"] == pytest.approx(
        max(rewards), rel=1e-3
    )


def test_wrong_url_and_wrong_key_are_one_line_errors_without_the_key(env, ranked_sample, argilla_server):
    from tests.argilla_memory.server import free_port

    bad_url = {**env, "ARGILLA_API_URL": f"http://127.0.0.1:{free_port()}"}
    result = cli("review", "push", str(ranked_sample), "--dataset", "x", env=bad_url)
    assert (
        result.returncode == 2 and result.stderr.count("\n") == 1 and "cannot use the Argilla server" in result.stderr
    )
    bad_key = {**env, "ARGILLA_API_KEY": "not-the-key-0123456789"}
    result = cli("review", "push", str(ranked_sample), "--dataset", "x", env=bad_key)
    assert result.returncode == 2 and "API key was rejected (401)" in result.stderr
    assert "not-the-key-0123456789" not in result.stderr + result.stdout
    assert argilla_server.api_key not in result.stderr + result.stdout


def test_missing_columns_fail_before_anything_is_sent(env, argilla_server, tmp_path):
    scores = tmp_path / "scores.parquet"
    pd.DataFrame(
        {"id": ["1"], "teacher": ["t"], "base_model": ["m"], "reward": [1.0], "compat_loss": [1.0]}
    ).to_parquet(scores)
    result = cli("review", "push", str(scores), "--dataset", "never-created", env=env)
    assert result.returncode == 2 and "missing column(s) ['instruction', 'response']" in result.stderr
    assert client(argilla_server).datasets("never-created") is None


@pytest.mark.slow
def test_a_push_cut_short_finishes_on_rerun_and_a_gone_server_is_one_line(tmp_path, ranked_sample):
    import os

    from magpie_teach.review.argilla_io import _records, build_settings
    from magpie_teach.review.sampling import sample_for_review
    from tests.argilla_memory.server import start_argilla_server

    server = start_argilla_server(tmp_path / "argilla")
    env = {**os.environ, "ARGILLA_API_URL": server.url, "ARGILLA_API_KEY": server.api_key}
    try:
        import argilla as rg

        owner = client(server)
        sample = sample_for_review(pd.read_parquet(ranked_sample / "scores.parquet"), per_teacher=4, seed=7)
        records = _records(sample, with_vectors=False)
        # what a push that died after its first batch leaves behind
        dataset = rg.Dataset(name="cut", settings=build_settings(), client=owner).create()
        dataset.records.log(records[: len(records) // 2])
        assert len(list(owner.datasets("cut").records())) == len(records) // 2
        result = cli(
            "review", "push", str(ranked_sample), "--dataset", "cut", "--per-teacher", "4", "--seed", "7", env=env
        )
        assert result.returncode == 0, result.stderr
        ids = [r.id for r in owner.datasets("cut").records()]
        assert len(ids) == len(set(ids)) == len(records)
        assert set(ids) == {r["id"] for r in records}
        server.stop()
        result = cli("review", "push", str(ranked_sample), "--dataset", "cut", env=env)
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert "cannot use the Argilla server" in result.stderr and "connection failed" in result.stderr
    finally:
        server.stop()


@pytest.mark.slow
def test_distilabel_step_sends_the_same_sample(argilla_server, ranked_sample, monkeypatch, tmp_path):
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts

    from magpie_teach.review.sampling import sample_for_review
    from magpie_teach.steps.review import ReviewSampleToArgilla

    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_server.api_key)
    monkeypatch.setenv("DISTILABEL_CACHE_DIR", str(tmp_path / "cache"))
    scores = pd.read_parquet(ranked_sample / "scores.parquet")
    rows = scores[["id", "instruction", "response", "teacher", "base_model", "reward", "compat_loss", "truncated"]]
    with Pipeline(name="review-step-test") as pipeline:
        load = LoadDataFromDicts(data=rows.to_dict("records"), batch_size=16)
        review = ReviewSampleToArgilla(dataset_name="from-pipeline", per_teacher=3, seed=5)
        load >> review
    distiset = pipeline.run(use_cache=False)
    out = distiset["default"]["train"].to_pandas()
    assert len(out) == len(rows)
    expected = sample_for_review(rows, per_teacher=3, seed=5)
    assert out["review_record_id"].notna().sum() == len(expected)
    sent = {
        (r.metadata["teacher"], r.metadata["example_id"])
        for r in client(argilla_server).datasets("from-pipeline").records()
    }
    assert sent == set(zip(expected.teacher, expected.id))
