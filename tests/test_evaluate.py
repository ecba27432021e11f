"""`evaluate`: verdicts, position bias, unparseable verdicts, the judgement cache, the reward-model judge and
performance.csv, on tiny models (a real transformers judge) and on judges written here to behave a known way."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from magpie_teach.errors import ConfigError, DataError
from magpie_teach.evaluation import evaluate as ev


def _prompts(tmp_path, n=6):
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "instruction": f"Name {i + 1} colours of the rainbow" + ", please" * i} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_verdict_is_the_letters_share_of_probability_or_the_replys_first_letter():
    top = {"A": math.log(0.5), " A": math.log(0.1), "B": math.log(0.2), "C": math.log(0.15)}
    assert ev.verdict_from_logprobs(top) == pytest.approx(0.6 / 0.8)
    assert ev.verdict_from_logprobs({"C": 0.0, "Answer": -1.0}) is None
    assert ev.verdict_from_logprobs({" B": -0.1}) == 0.0
    assert ev.verdict_from_text("  A.") == 1.0
    assert ev.verdict_from_text("B") == 0.0
    assert ev.verdict_from_text("The first one") is None
    assert ev.verdict_from_text("") is None and ev.verdict_from_text(None) is None


class _FirstAnswerJudge:
    """A judge with a known bias: it always prefers the answer shown first; None for answers with a '?'."""

    identity = {"kind": "judge", "model": "first-answer", "model_id": "first-answer@test"}

    def __init__(self):
        self.forward_passes = 0

    def p_first(self, triples):
        self.forward_passes += len(triples)
        return [None if "?" in a + b else 1.0 for _, a, b in triples]


def test_a_judge_that_always_prefers_the_first_answer_gives_every_student_50_percent(tmp_path):
    prompts = ev.load_prompts(str(_prompts(tmp_path)))
    answers = {"short": ["x"] * 6, "long": ["a much longer answer"] * 6}
    judgements = ev.judge_students(_FirstAnswerJudge(), prompts, answers, ["baseline answer"] * 6, tmp_path / "c")
    assert (judgements["p_student_first"] == 1.0).all() and (judgements["p_baseline_first"] == 1.0).all()
    rates = ev.summarise(judgements, 200, 0.95, 0).set_index("student")
    for student in answers:
        assert rates.loc[student, "win_rate"] == pytest.approx(50.0)
        assert rates.loc[student, "lc_win_rate"] == pytest.approx(50.0, abs=1e-6)
        assert rates.loc[student, "bt_score"] == pytest.approx(50.0, abs=1e-6)


def test_unparseable_verdicts_are_counted_and_left_out_of_the_win_rates(tmp_path):
    prompts = ev.load_prompts(str(_prompts(tmp_path)))
    answers = {"s": ["fine", "what?", "fine", "fine", "maybe?", "fine"]}
    judgements = ev.judge_students(_FirstAnswerJudge(), prompts, answers, ["ok"] * 6, None)
    assert judgements["parsed"].tolist() == [True, False, True, True, False, True]
    assert judgements.loc[~judgements["parsed"], "preference"].isna().all()
    rates = ev.summarise(judgements, 0, 0.95, 0).set_index("student")
    assert rates.loc["s", "n_unparseable"] == 2 and rates.loc["s", "n"] == 4
    assert rates.loc["s", "win_rate"] == pytest.approx(100 * judgements["preference"].dropna().mean())


def test_a_student_with_no_readable_verdict_gets_no_win_rate(tmp_path):
    prompts = ev.load_prompts(str(_prompts(tmp_path, 2)))
    judgements = ev.judge_students(_FirstAnswerJudge(), prompts, {"q": ["?", "?"], "s": ["a", "b"]}, ["c", "d"], None)
    rates = ev.summarise(judgements, 0, 0.95, 0).set_index("student")
    assert math.isnan(rates.loc["q", "win_rate"]) and rates.loc["q", "n_unparseable"] == 2
    assert rates.loc["s", "win_rate"] == pytest.approx(50.0)


def _plain_verdicts(model_path, triples):
    """P(A) / (P(A) + P(B)) of the judge's next token, from one unpadded forward pass per triple, done here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    letters = {x: [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() == x] for x in "AB"}
    verdicts = []
    for instruction, first, second in triples:
        prompt = ev.JUDGE_PROMPT.format(instruction=instruction, answer_a=first, answer_b=second)
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            probs = torch.softmax(model(ids).logits[0, -1], dim=-1)
        a, b = float(probs[letters["A"]].sum()), float(probs[letters["B"]].sum())
        verdicts.append(a / (a + b))
    return np.array(verdicts)


def test_the_judge_computes_logits_at_each_rows_last_token_only_and_its_verdicts_match_a_plain_forward(
    tmp_path, tiny_suite
):
    """A batch of prompts of different lengths: the model's logits cover one position per row (not every
    position: 8.4 GB at 8 x 2,048 tokens with a 128K vocabulary), and the verdicts are those of one unpadded
    forward pass per prompt."""
    judge = ev.TransformersJudge(tiny_suite.base_medium, "cpu", "float32", 4, tmp_path)
    shapes = []
    judge.model.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.logits.shape)))
    triples = [("Why?", "Because " * n, "No.") for n in (1, 9, 30, 4)]
    verdicts = judge.p_first(triples)
    (shape,) = shapes
    assert shape[0] == 4 and shape[1] <= 4, shape  # rows x positions kept x vocabulary
    assert np.allclose(verdicts, _plain_verdicts(tiny_suite.base_medium, triples), atol=1e-5)


@pytest.mark.slow
def test_evaluate_judges_each_answer_once_and_matches_a_plain_forward_pass(tmp_path, tiny_suite):
    prompts = _prompts(tmp_path)
    common = dict(output_dir=str(tmp_path / "out"), base_model="tiny-base", prompts=str(prompts), baseline=tiny_suite.base_small,
                  judge=tiny_suite.base_medium, judge_batch_size=4, max_new_tokens=6, device="cpu", bootstrap=50,
                  cache_dir=str(tmp_path / "cache"))  # fmt: skip
    two = [f"t1={tiny_suite.base_medium}", f"t2={tiny_suite.base_large}"]
    first = ev.evaluate(ev.EvaluateConfig(students=two, **common))
    # per student: 6 prompts x 2 orders = 12 verdicts, in batches of 4
    assert first.judge_forward_passes == 2 * math.ceil(12 / 4)
    judgements = first.judgements
    assert len(judgements) == 12 and judgements["parsed"].all()
    answers = pd.read_parquet(tmp_path / "out" / "answers" / "t1.parquet").set_index("id")["response"]
    baseline = pd.read_parquet(tmp_path / "out" / "answers" / f"baseline-{_slug(tiny_suite.base_small)}.parquet")
    baseline = baseline.set_index("id")["response"]
    rows = judgements[judgements["student"] == "t1"]
    assert rows["instruction"].str.len().nunique() == len(rows)  # prompts of different lengths share a batch
    ours = [(r.instruction, answers[r.id], baseline[r.id]) for r in rows.itertuples()]
    swapped = [(i, b, a) for i, a, b in ours]
    assert np.allclose(rows["p_student_first"], _plain_verdicts(tiny_suite.base_medium, ours), atol=1e-5)
    assert np.allclose(rows["p_baseline_first"], _plain_verdicts(tiny_suite.base_medium, swapped), atol=1e-5)
    assert np.allclose(
        judgements["preference"], (judgements["p_student_first"] + 1 - judgements["p_baseline_first"]) / 2
    )
    assert (judgements["length_diff"] == judgements["student_length"] - judgements["baseline_length"]).all()

    # a third student: only its 12 verdicts are asked (batches of 4), the others come from the cache unchanged
    third = ev.evaluate(ev.EvaluateConfig(students=[*two, f"t3={tiny_suite.base_small}"], **common))
    assert third.judge_forward_passes == math.ceil(12 / 4)
    kept = third.judgements[third.judgements["student"] != "t3"].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[judgements.columns], judgements)
    # a rerun asks the judge nothing
    assert (
        ev.evaluate(ev.EvaluateConfig(students=[*two, f"t3={tiny_suite.base_small}"], **common)).judge_forward_passes
        == 0
    )

    performance = pd.read_csv(tmp_path / "out" / "performance.csv")
    rates = pd.read_csv(tmp_path / "out" / "win_rates.csv").set_index("student")
    assert list(performance["teacher"]) == ["t1", "t2", "t3"] and (performance["base_model"] == "tiny-base").all()
    for r in performance.itertuples():
        assert r.AE2_LC_WR == pytest.approx(rates.loc[r.teacher, "lc_win_rate"])
        assert r.ArenaHard_WR == pytest.approx(rates.loc[r.teacher, "bt_score"])
        assert r.ap == pytest.approx((r.AE2_LC_WR + r.ArenaHard_WR) / 2)
    from magpie_teach.scoring.metrics import load_performance

    read = load_performance(str(tmp_path / "out" / "performance.csv"), ["AE2_LC_WR", "ArenaHard_WR"])
    assert sorted(read["teacher"]) == ["t1", "t2", "t3"] and np.allclose(
        read.sort_values("teacher")["ap"], performance["ap"]
    )


def _slug(path):
    from magpie_teach.artefacts import slug

    return slug(path)


def test_a_reward_model_judges_by_the_sigmoid_of_the_reward_difference(tmp_path, tiny_suite):
    from magpie_teach.modeling import load_model, load_tokenizer
    from magpie_teach.scoring.reward import score_reward

    prompts = ev.load_prompts(str(_prompts(tmp_path, 4)))
    answers = {"a": ["red", "red and blue", "", "violet"], "b": ["green"] * 4}
    baseline = ["orange", "yellow", "blue", "indigo"]
    judge = ev.RewardJudge(tiny_suite.reward, "cpu", "float32", tmp_path / "cache")
    judgements = ev.judge_students(judge, prompts, answers, baseline, tmp_path / "cache").set_index(["student", "id"])
    model, tokenizer = load_model(tiny_suite.reward, "reward", device="cpu"), load_tokenizer(tiny_suite.reward)
    instructions = prompts["instruction"].tolist()
    base_rewards, _ = score_reward(model, tokenizer, instructions, baseline, show_progress=False)
    for name, texts in answers.items():
        rewards, _ = score_reward(model, tokenizer, instructions, [t or "(empty)" for t in texts], show_progress=False)
        expected = 1 / (1 + np.exp(-(np.asarray(rewards) - np.asarray(base_rewards))))
        assert np.allclose(judgements.loc[name, "preference"].to_numpy(), expected, atol=1e-5)
    # the baseline's rewards were computed once: the second student's pass found them in the cache
    passes = judge.forward_passes
    ev.judge_students(judge, prompts, answers, baseline, tmp_path / "cache")
    assert judge.forward_passes == passes


def test_bad_inputs_are_errors_that_name_the_file_and_the_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "hi"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: no `instruction` column"):
        ev.load_prompts(str(bad))
    bad.write_text('{"id": "a", "instruction": "hi"}\n{"id": "b", "instruction": "  "}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: row 1 has an empty"):
        ev.load_prompts(str(bad))
    bad.write_text('{"id": "a", "instruction": "hi"}\n{"id": "a", "instruction": "ho"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: id 'a' appears more than once"):
        ev.load_prompts(str(bad))
    prompts = ev.load_prompts(str(_prompts(tmp_path, 3)))
    answers = tmp_path / "baseline.jsonl"
    answers.write_text('{"id": "p0", "response": "r"}\n{"id": "p2", "response": "r"}\n')
    with pytest.raises(DataError, match=r"no answer for id 'p1'"):
        ev.read_baseline_answers(str(answers), prompts)
    shipped = ev.load_prompts(None)
    assert len(shipped) == 24 and shipped["id"].is_unique


def test_the_config_asks_for_one_judge_one_baseline_and_some_students(tmp_path):
    base = dict(output_dir=str(tmp_path), students=["m"], baseline="b")
    with pytest.raises(ConfigError, match="give one judge"):
        ev.EvaluateConfig(**base)
    with pytest.raises(ConfigError, match="give one judge"):
        ev.EvaluateConfig(**base, judge="j", judge_reward_model="r")
    with pytest.raises(ConfigError, match="give one baseline"):
        ev.EvaluateConfig(**{**base, "baseline": None}, judge="j")
    with pytest.raises(ConfigError, match="needs --judge-base-url"):
        ev.EvaluateConfig(**base, judge="j", judge_backend="openai")
    with pytest.raises(ConfigError, match="give the students"):
        ev.EvaluateConfig(**{**base, "students": []}, judge="j")
    config = ev.EvaluateConfig(**{**base, "students": ["/models/a/", "t2=/models/b"]}, judge="j")
    assert [(s.name, s.model) for s in ev.parse_students(config)] == [("a", "/models/a/"), ("t2", "/models/b")]
    with pytest.raises(ConfigError, match="given twice"):
        ev.parse_students(ev.EvaluateConfig(**{**base, "students": ["x=/a", "x=/b"]}, judge="j"))


@pytest.mark.slow
def test_a_killed_evaluate_resumes_asking_the_judge_only_for_the_verdicts_it_lacks(tmp_path, tiny_suite):
    """SIGKILL once the first window of verdicts is stored; the rerun asks the judge only for the rest (batches of
    8 over windows of 32 and 16 verdicts per student: no partial batch) and its verdicts equal an uninterrupted
    run's, made here with a fresh cache."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    import pyarrow.parquet as pq

    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "magpie_teach.cli", "evaluate", "--student", f"m={tiny_suite.base_medium}",
            "--student", f"l={tiny_suite.base_large}", "--baseline", tiny_suite.base_small, "--judge",
            tiny_suite.base_medium, "--judge-batch-size", "8", "--max-new-tokens", "4", "--bootstrap", "0",
            "--device", "cpu", "--cache-dir", str(cache), "--output", str(tmp_path / "out")]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(cache.glob("judge/*/part-*.parquet")):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stored = sum(pq.read_metadata(p).num_rows for p in cache.glob("judge/*/part-*.parquet"))
    total = 2 * 24 * 2  # students x shipped prompts x orders
    assert 0 < stored < total

    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    passes = int(re.search(r"judge: (\d+) forward pass", rerun.stdout).group(1))
    assert passes == (total - stored) // 8
    resumed = pd.read_parquet(tmp_path / "out" / "judgements.parquet")
    fresh = ev.evaluate(
        ev.EvaluateConfig(students=[f"m={tiny_suite.base_medium}", f"l={tiny_suite.base_large}"], baseline=tiny_suite.base_small,
                          judge=tiny_suite.base_medium, judge_batch_size=8, max_new_tokens=4, bootstrap=0, device="cpu",
                          cache_dir=str(tmp_path / "fresh-cache"), output_dir=str(tmp_path / "fresh"))
    )  # fmt: skip
    assert fresh.judge_forward_passes == total // 8
    assert np.allclose(resumed["p_student_first"], fresh.judgements["p_student_first"], atol=1e-6)
    assert np.allclose(resumed["p_baseline_first"], fresh.judgements["p_baseline_first"], atol=1e-6)


def test_a_student_retrained_in_place_gets_new_answers(tmp_path, tiny_suite):
    """A student folder fine-tuned again into the same path (other weights, same file names): `evaluate` must
    generate its answers again, not read the first run's back; unchanged, they are read back."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    student = tmp_path / "student"
    shutil.copytree(tiny_suite.base_small, student)
    prompts = _prompts(tmp_path, 4)
    config = dict(output_dir=str(tmp_path / "out"), base_model="tiny-base", prompts=str(prompts),
                  baseline=tiny_suite.base_small, judge_reward_model=tiny_suite.reward, max_new_tokens=6,
                  device="cpu", bootstrap=20, cache_dir=str(tmp_path / "cache"), students=[f"s={student}"])  # fmt: skip
    ev.evaluate(ev.EvaluateConfig(**config))
    answers = tmp_path / "out" / "answers" / "s.parquet"
    first = pd.read_parquet(answers)
    stamp = answers.stat().st_mtime_ns
    ev.evaluate(ev.EvaluateConfig(**config))
    assert answers.stat().st_mtime_ns == stamp  # the same weights: read back, not generated again
    model = AutoModelForCausalLM.from_pretrained(student)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(torch.randn_like(weight) * 0.5, alpha=1.0)
    model.save_pretrained(student)  # "retrained": the same files, other weights
    ev.evaluate(ev.EvaluateConfig(**config))
    again = pd.read_parquet(answers)
    assert (again["model_id"] != first["model_id"]).all()
    direct = ev.generate_answers(str(student), again["instruction"].tolist(), 6, "transformers", None, "cpu",
                                 "float32")  # fmt: skip
    assert again["response"].tolist() == direct  # the new weights' answers
