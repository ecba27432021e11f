"""Whole commands, run as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from magpie_teach.cli import build_parser, main

SUBCOMMANDS = ["rank", "paradox", "select", "train", "validate", "evaluate", "calibrate", "tiny", "demo", "probe"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "magpie_teach.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: magpie-teach" in text
    if command == "evaluate":
        for flag in ("--student", "--students-from", "--baseline",
                     "--baseline-answers", "--judge", "--judge-backend", "--judge-base-url", "--judge-reward-model",
                     "--prompts", "--backend", "--output", "--push-to-hub", "both orders"):  # fmt: skip
            assert flag in text
    if command == "rank":
        for flag in (
            "--data",
            "--base-model",
            "--reward-model",
            "--reward-column",
            "--reference-model",
            "--beta",
            "--sample",
            "--seed",
            "--performance",
            "--output",
            "(default: 3.0)",
        ):
            assert flag in text


def test_import_and_help_load_no_heavy_modules():
    code = (
        "import sys, magpie_teach, magpie_teach.cli as c\n"
        "try:\n    c.main(['rank', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'vllm', 'argilla', 'distilabel', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def performance_file(tmp_path_factory, tiny_suite):
    path = tmp_path_factory.mktemp("perf") / "perf.csv"
    rows = []
    for base, values in (("tiny-llama-s", [10.0, 5.0, 7.0]), ("tiny-llama-m", [4.0, 9.0, 6.0])):
        for teacher, value in zip(("tiny-teacher-terse", "tiny-teacher-thorough", "tiny-teacher-lists"), values):
            rows.append({"teacher": teacher, "base_model": base, "AE2_LC_WR": value, "ArenaHard_WR": value / 2})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def rank_run(tmp_path_factory, tiny_suite, sample_path, performance_file):
    out = tmp_path_factory.mktemp("rank")
    args = [
        "rank",
        "--data",
        sample_path,
        "--base-model",
        tiny_suite.base_small,
        "--base-model",
        tiny_suite.base_medium,
        "--reward-model",
        tiny_suite.reward,
        "--reference-model",
        tiny_suite.reference,
        "--performance",
        str(performance_file),
        "--output",
        str(out),
    ]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return out, args, result


def test_rank_writes_the_contracted_outputs(rank_run, tiny_suite):
    out, _, result = rank_run
    ranking = pd.read_csv(out / "ranking.csv")
    for column in (
        "teacher",
        "base_model",
        "n",
        "reward",
        "compat_loss",
        "car",
        "length",
        "ppl_self",
        "ifd_self",
        "ppl_ref",
        "ifd_ref",
        "ic_ifd_self",
        "rank_car",
        "rank_reward",
        "rank_compat_loss",
        "n_truncated",
    ):
        assert column in ranking.columns, column
    assert len(ranking) == 6 and set(ranking["base_model"]) == {tiny_suite.base_small, tiny_suite.base_medium}
    assert (ranking["n"] == 24).all()
    np.testing.assert_allclose(ranking["car"], ranking["reward"] / (1 + 3 * ranking["compat_loss"]))
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 72 * 2
    for column in ("id", "teacher", "base_model", "reward", "compat_loss", "logprob_norm", "n_tokens", "truncated"):
        assert column in scores.columns
    # the ranking is the mean of the per-example scores
    means = scores.groupby(["teacher", "base_model"])["compat_loss"].mean()
    for row in ranking.itertuples():
        assert row.compat_loss == pytest.approx(means[(row.teacher, row.base_model)])
    corr = pd.read_csv(out / "correlations.csv", index_col="metric")
    small, medium = tiny_suite.base_small, tiny_suite.base_medium
    assert list(corr.columns) == [small, f"{small} ci_low", f"{small} ci_high", medium, f"{medium} ci_low",
                                  f"{medium} ci_high", "mean"]  # fmt: skip
    assert corr.loc["car", "mean"] == pytest.approx((corr.loc["car", small] + corr.loc["car", medium]) / 2)
    assert "ranked by CAR" in result.stdout and "Spearman" in result.stdout
    assert (out / "rank_config.yaml").exists() and (out / "summary.json").exists()
    # the bootstrap (default 1000 replicates, seed 0) over the per-example scores written beside the ranking
    from magpie_teach.scoring.confidence import bootstrap_ranking
    from magpie_teach.scoring.metrics import aggregate

    expected, verdicts = bootstrap_ranking(scores, aggregate(scores), 1000, 0.95, 0)
    key = ["base_model", "teacher"]
    columns = [f"{m}_ci_{end}" for m in ("car", "reward", "compat_loss") for end in ("low", "high")] + ["p_best"]
    pd.testing.assert_frame_equal(ranking.sort_values(key)[columns].reset_index(drop=True),
                                  expected.sort_values(key)[columns].reset_index(drop=True), rtol=1e-9)  # fmt: skip
    confidence = json.loads((out / "summary.json").read_text())["confidence"]
    assert confidence["base_models"] == [json.loads(json.dumps(v.to_json())) for v in verdicts]
    assert confidence["sentences"] and all(sentence in result.stdout for sentence in confidence["sentences"])


def test_rank_reports_each_stages_progress_with_rate_and_eta_in_a_log(rank_run, tiny_suite, sample_rows):
    """Not on a terminal (run_cli captures stderr), every scoring stage prints where it starts and where it ends."""
    import re

    _, _, result = rank_run
    n_rows, n_instructions = len(sample_rows), sample_rows["id"].nunique()
    stages = {"reward": n_rows}
    for model in (tiny_suite.base_small, tiny_suite.base_medium, tiny_suite.reference):
        name = model.rstrip("/").split("/")[-1]
        stages.update({f"compat {name}": n_rows, f"L(x) {name}": n_instructions})
    for stage, total in stages.items():
        prefix = re.escape(f"{stage}: ")
        assert re.search(rf"^{prefix}0/{total} ex \(0%\), 0\.00 ex/s, ETA unknown$", result.stderr, re.M), stage
        assert re.search(rf"^{prefix}{total}/{total} ex \(100%\), [0-9.]+ ex/s, ETA 0:00:00$", result.stderr, re.M), (
            stage
        )


def test_rank_scores_match_the_engine_called_directly(rank_run, tiny_suite, sample_rows):
    from magpie_teach.modeling import load_model, load_tokenizer
    from magpie_teach.scoring.compatibility import score_compatibility

    out, _, _ = rank_run
    scores = pd.read_parquet(out / "scores.parquet")
    mine = scores[scores.base_model == tiny_suite.base_small].set_index(["id", "teacher"])
    direct = score_compatibility(
        load_model(tiny_suite.base_small, device="cpu"),
        load_tokenizer(tiny_suite.base_small),
        sample_rows["instruction"].tolist(),
        sample_rows["response"].tolist(),
        show_progress=False,
    )
    for (_, row), loss in zip(sample_rows.iterrows(), direct["compat_loss"]):
        assert mine.loc[(row["id"], row["teacher"]), "compat_loss"] == pytest.approx(loss, abs=1e-6)


def test_select_command_on_rank_output(rank_run, tmp_path):
    out, _, _ = rank_run
    result = run_cli("select", "--scores", str(out), "--base-model", "tiny-llama-s", "--strategy", "best-of-n",
                     "--output", str(tmp_path / "sft"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "selected 24 rows (best-of-n)" in result.stdout
    data = pd.read_parquet(tmp_path / "sft" / "data" / "train-00000-of-00001.parquet")
    scores = pd.read_parquet(out / "scores.parquet")
    scores = scores[scores.base_model.str.endswith("tiny-llama-s")]
    best = scores.loc[scores.groupby("id")["reward"].idxmax()].set_index("id")["teacher"]
    assert data.set_index("id")["teacher"].to_dict() == best.to_dict()


def test_a_rerun_reads_every_score_from_the_cache_loads_no_model_and_ranks_identically(rank_run, score_cache):
    out, args, _ = rank_run
    before = pd.read_csv(out / "ranking.csv")
    for kind in ("compat", "instruction-loss", "reward"):
        assert list((score_cache / kind).glob("*/part-*.parquet")), kind
    first = json.loads((out / "summary.json").read_text())["work"]
    assert first and all(stage["from_cache"] == 0 and stage["scored"] > 0 for stage in first.values())
    # the rerun, in a process that counts what it loads: no model at all (every score is cached)
    result = subprocess.run(
        [sys.executable, "-c", _COUNTING_LOADS, *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.split("LOADED ")[1].splitlines()[0])
    assert loaded == []
    second = json.loads((out / "summary.json").read_text())["work"]
    assert second == {stage: {"scored": 0, "from_cache": n["scored"]} for stage, n in first.items()}
    assert f"reward: {first['reward']['scored']} of {first['reward']['scored']} from the score cache" in result.stderr
    pd.testing.assert_frame_equal(pd.read_csv(out / "ranking.csv"), before)


_COUNTING_LOADS = (
    "import sys, json, magpie_teach.modeling as m\n"
    "loaded = []\n"
    "real = m.load_model\n"
    "def counting(name, kind='causal-lm', *a, **k):\n"
    "    loaded.append(kind)\n"
    "    return real(name, kind, *a, **k)\n"
    "m.load_model = counting\n"
    "from magpie_teach.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('LOADED', json.dumps(loaded))\n"
    "sys.exit(code)\n"
)


def test_dry_run_says_where_each_model_loads_from_and_what_it_would_score_loading_and_writing_nothing(
    rank_run, tiny_suite, sample_rows, tmp_path
):
    """After `rank_run` scored its models, a dry run that adds a third base model: the cached models would not load
    and score nothing, the new one would score every response and every instruction; no model loads, no folder."""
    _, args, _ = rank_run
    out = tmp_path / "never-written"
    kept = args[: args.index("--performance")]  # the table has no row for the new base model (a run checks that)
    argv = [*kept, "--base-model", tiny_suite.base_large, "--output", str(out), "--dry-run"]
    result = subprocess.run([sys.executable, "-c", _COUNTING_LOADS, *argv], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.split("LOADED ")[1].splitlines()[0]) == []
    assert not out.exists()
    n, m = len(sample_rows), sample_rows["instruction"].nunique()
    for model in (tiny_suite.reward, tiny_suite.base_small, tiny_suite.base_medium, tiny_suite.reference):
        assert f"{model}: from local folder {Path(model).resolve()}; does not load" in result.stdout
    assert (
        f"{tiny_suite.base_large}: from local folder {Path(tiny_suite.base_large).resolve()}; loads" in result.stdout
    )
    assert f"compat tiny-llama-l: {n} examples, 0 in the score cache, {n} to score" in result.stdout
    assert f"L(x) tiny-llama-l: {m} examples, 0 in the score cache, {m} to score" in result.stdout
    assert f"compat tiny-llama-s: {n} examples, {n} in the score cache, 0 to score" in result.stdout
    assert f"dry run: {n + m} example(s) to score by 1 model(s)" in result.stdout


@pytest.mark.parametrize("hub", ["reachable, without the model", "unreachable"])
def test_a_hub_model_named_second_that_cannot_load_fails_in_one_line_before_any_model_scores(
    hub, tmp_path, tiny_suite, sample_path
):
    """Every model is located before the first one loads: the second base model, a Hub id that the Hub does not
    hold (or a Hub that cannot be reached), fails the run before the reward model and the first base model score
    anything (the cache stays empty)."""
    import os

    from tests.hub.local import OFFLINE_FLAGS, LocalHub
    from tests.processes import free_port

    server = LocalHub(tmp_path / "hub").start() if hub.startswith("reachable") else None
    try:
        env = {k: v for k, v in os.environ.items() if k not in OFFLINE_FLAGS}
        env.update(HF_ENDPOINT=server.url if server else f"http://127.0.0.1:{free_port()}",
                   HF_HOME=str(tmp_path / "hf-home"), MAGPIE_TEACH_CACHE=str(tmp_path / "cache"))  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "magpie_teach.cli", "rank", "--data", sample_path, "--reward-model",
             tiny_suite.reward, "--base-model", tiny_suite.base_small, "--base-model", "lab/missing-model",
             "--output", str(tmp_path / "out")],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        if server:
            server.stop()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    expected = "no model 'lab/missing-model' on the Hub" if server else "it is not a folder here, the Hub at"
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr
    assert lines[0].startswith("magpie-teach rank: error: --base-model")
    assert not list((tmp_path / "cache").rglob("*.parquet"))


def test_rank_with_reward_column_and_sample(tmp_path, tiny_suite):
    zoo = pd.DataFrame(
        {"uuid": [f"u{i}" for i in range(10)], "instruction": [f"Question number {i}?" for i in range(10)]}
    )
    for t, teacher in enumerate(("small-it", "large-it", "mid-it")):
        zoo[teacher] = [
            {"content": f"Answer {i} from {teacher}. " * (t + 1), "ArmoRM-Llama3-8B-v0.1": 0.1 + 0.01 * i + t}
            for i in range(10)
        ]
    zoo.to_parquet(tmp_path / "zoo.parquet")
    code = main(
        [
            "rank",
            "--data",
            str(tmp_path / "zoo.parquet"),
            "--base-model",
            tiny_suite.base_small,
            "--reward-column",
            "ArmoRM-Llama3-8B-v0.1",
            "--sample",
            "4",
            "--seed",
            "1",
            "--output",
            str(tmp_path / "o"),
            "--bootstrap",
            "0",
        ]
    )
    assert code == 0
    assert "p_best" not in pd.read_csv(tmp_path / "o" / "ranking.csv").columns  # --bootstrap 0 turns it off
    assert "confidence" not in json.loads((tmp_path / "o" / "summary.json").read_text())
    scores = pd.read_parquet(tmp_path / "o" / "scores.parquet")
    ids = scores.groupby("teacher")["id"].apply(lambda s: tuple(sorted(s)))
    assert ids.nunique() == 1 and len(ids.iloc[0]) == 4
    ranking = pd.read_csv(tmp_path / "o" / "ranking.csv")
    assert ranking.set_index("teacher")["rank_reward"].to_dict() == {"mid-it": 1, "large-it": 2, "small-it": 3}


def test_bad_input_exits_2_with_one_line(tmp_path, tiny_suite):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "teacher": "t", "response": ""}\n')
    result = run_cli(
        "rank",
        "--data",
        str(bad),
        "--base-model",
        tiny_suite.base_small,
        "--reward-column",
        "r",
        "--output",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no reward column 'r'" in result.stderr
    result = run_cli(
        "rank", "--data", str(bad), "--base-model", tiny_suite.base_small, "--output", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "exactly one of --reward-model and --reward-column" in result.stderr


def test_rank_matches_performance_names_before_any_model_loads(
    rank_run, tmp_path, tiny_suite, sample_path, performance_file
):
    _, _, result = rank_run
    for base in (tiny_suite.base_small, tiny_suite.base_medium):
        name = base.rstrip("/").split("/")[-1]
        assert f"performance: {base} = {name!r} in the table: 3 teacher(s) matched" in result.stderr
    assert result.stderr.index("performance: ") < result.stderr.index("reward: 0/")  # before the first stage
    # a base model the table does not name stops the run at once: one line, nothing scored, no model loaded
    out = tmp_path / "unmatched"
    result = run_cli("rank", "--data", sample_path, "--base-model", tiny_suite.base_large, "--reward-model", tiny_suite.reward,
                     "--performance", str(performance_file), "--output", str(out))  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "base model" in result.stderr and "(key 'tiny-llama-l') matches no base model" in result.stderr
    assert not (out / "scores.parquet").exists()


def test_yaml_config_with_a_misspelt_key(tmp_path, sample_path):
    config = tmp_path / "rank.yaml"
    config.write_text(f"data: {sample_path}\nbase_models: [x]\nreward_colum: r\n")
    result = run_cli("rank", "--config", str(config), "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "unknown key 'reward_colum'; did you mean 'reward_column'?" in result.stderr


def test_paradox_command(tmp_path):
    from tests.test_paradox import table6

    out = tmp_path / "pairs.csv"
    result = run_cli("paradox", "--performance", table6(), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "Qwen2-7B-Instruct" in result.stdout and "paradox pair(s) over 5 base model(s)" in result.stdout
    assert len(pd.read_csv(out)) > 10


def test_parser_builds():
    assert build_parser().prog == "magpie-teach"


def test_rank_refuses_conversations_with_no_response_token_left(tmp_path, tiny_suite):
    rows = [{"instruction": "word " * 60, "teacher": t, "response": "ok", "r": 1.0} for t in ("a", "b", "c")]
    pd.DataFrame(rows).to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    result = run_cli("rank", "--data", str(tmp_path / "d.jsonl"), "--base-model", tiny_suite.base_small,
                     "--reward-column", "r", "--max-length", "20", "--output", str(tmp_path / "o"))  # fmt: skip
    assert result.returncode == 2 and "keep no response token within --max-length 20" in result.stderr


def _zoo_with_one_empty_response(path):
    zoo = pd.DataFrame({"uuid": [f"u{i}" for i in range(6)], "instruction": [f"Question {i}?" for i in range(6)]})
    for t, teacher in enumerate(("a-it", "b-it")):
        zoo[teacher] = [{"content": f"Answer {i} by {teacher}." * (t + 1), "rm": 0.5 + 0.1 * i + t} for i in range(6)]
    zoo.at[2, "a-it"] = {"content": "", "rm": 0.1}
    zoo.to_parquet(path)


def test_a_reused_output_folder_holds_only_the_last_runs_files(tmp_path, tiny_suite, sample_path):
    data = tmp_path / "zoo.parquet"
    _zoo_with_one_empty_response(data)
    out = tmp_path / "o"
    common = ["--base-model", tiny_suite.base_small, "--reward-column", "rm", "--output", str(out)]
    assert main(["rank", "--data", str(data), "--drop-invalid", *common]) == 0
    assert len(pd.read_csv(out / "dropped.csv")) == 2  # the empty answer and its sibling
    data_ok = tmp_path / "ok.parquet"
    frame = pd.read_parquet(data)
    frame.at[2, "a-it"] = {"content": "Now answered.", "rm": 0.1}
    frame.to_parquet(data_ok)
    assert main(["rank", "--data", str(data_ok), *common]) == 0
    assert not (out / "dropped.csv").exists()  # the first run's drops are not this run's
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert summary["counts"]["rows_kept"] == summary["counts"]["rows_in"] == 12


def test_two_runs_into_one_folder_cannot_both_succeed(tmp_path, tiny_suite, sample_path):
    from magpie_teach.artefacts import LOCK

    out = tmp_path / "o"
    args = ["rank", "--data", sample_path, "--base-model", tiny_suite.base_small, "--base-model",
            tiny_suite.base_medium, "--reward-model", tiny_suite.reward, "--output", str(out), "--no-cache"]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "magpie_teach.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    import time

    deadline = time.monotonic() + 60
    while not ((out / LOCK).exists() and "pid" in (out / LOCK).read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    second = run_cli(*args)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    assert f"{out} is in use by another run (pid {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    assert len(pd.read_csv(out / "ranking.csv")) == 2 * pd.read_json(sample_path, lines=True)["teacher"].nunique()


def test_a_mistyped_model_path_and_an_unreachable_hub_are_one_line_errors(tmp_path):
    import os
    import time

    from tests.hub.local import OFFLINE_FLAGS
    from tests.processes import free_port

    data = tmp_path / "zoo.parquet"
    _zoo_with_one_empty_response(data)
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_FLAGS}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf-home"))
    base = ["rank", "--data", str(data), "--drop-invalid", "--reward-column", "rm", "--output", str(tmp_path / "o")]
    for model, expected in (
        ("outputs/models/tiny-llama-s", "--base-model: 'outputs/models/tiny-llama-s' is not a folder here"),
        (str(tmp_path / "no-such-model"), f"--base-model: '{tmp_path / 'no-such-model'}' is not a folder here"),
        ("./tiny", "--base-model: './tiny' is not a folder here"),
        (
            "Qwen/Qwen2.5-3B",
            f"'Qwen/Qwen2.5-3B': it is not a folder here, the Hub at {env['HF_ENDPOINT']} cannot be reached",
        ),
    ):
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "magpie_teach.cli", *base, "--base-model", model],
                                env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("magpie-teach rank: error: ") and expected in lines[0], lines[0]
        assert time.monotonic() - started < 60  # was: minutes of retries


def test_an_output_or_cache_folder_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, tiny_suite):
    """A file where the folder should be (as root, permissions do not stop a write; this does): exit 2 with one line
    naming the folder (nothing was scored: scoring prints its progress), and no output folder is left behind."""
    data = tmp_path / "zoo.parquet"
    _zoo_with_one_empty_response(data)
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    base = [
        "rank",
        "--data",
        str(data),
        "--drop-invalid",
        "--reward-column",
        "rm",
        "--base-model",
        tiny_suite.base_small,
    ]
    for extra, expected in (
        (["--output", str(in_the_way / "out")], f"the output folder {in_the_way / 'out'} cannot be written"),
        (["--output", str(tmp_path / "o"), "--cache-dir", str(in_the_way / "cache")],
         f"--cache-dir {in_the_way / 'cache'} cannot be written"),
    ):  # fmt: skip
        result = run_cli(*base, *extra)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr
        assert "scored" not in result.stderr and not (tmp_path / "o").exists()


def _plain_nll(model, ids, mask) -> float:
    """Mean NLL of the masked tokens of one sequence, from one forward pass (no batching, no padding)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    positions = [t for t in range(1, len(ids)) if mask[t]]
    return float(-np.mean([logprobs[t - 1, ids[t]].item() for t in positions]))


def test_ifd_and_ic_ifd_follow_their_formulas_and_a_plain_forward_pass(rank_run, tiny_suite, sample_rows):
    from magpie_teach.chat import context_token_id, tokenize_conversation
    from magpie_teach.modeling import load_model, load_tokenizer

    out, _, _ = rank_run
    scores = pd.read_parquet(out / "scores.parquet")
    np.testing.assert_allclose(scores["ifd_self"], scores["compat_loss"] / scores["uncond_loss"], rtol=1e-6)
    np.testing.assert_allclose(
        scores["ic_ifd_self"], scores["compat_loss"] / (scores["instr_loss"] * scores["uncond_loss"]), rtol=1e-6
    )
    np.testing.assert_allclose(scores["ppl_self"], np.exp(scores["compat_loss"]), rtol=1e-6)
    np.testing.assert_allclose(scores["ppl_ref"], np.exp(scores["loss_ref"]), rtol=1e-6)
    assert scores["ic_ifd_self"].nunique() > 1 and scores["ifd_self"].nunique() > 1

    base = tiny_suite.base_small
    model, tokenizer = load_model(base, device="cpu"), load_tokenizer(base)
    row = sample_rows.iloc[5]
    mine = scores[(scores.base_model == base) & (scores.id == row["id"]) & (scores.teacher == row["teacher"])].iloc[0]
    example = tokenize_conversation(tokenizer, row["instruction"], row["response"])
    start = context_token_id(tokenizer)
    response_ids = example.input_ids[example.loss_mask].tolist()
    instruction_ids = tokenizer(row["instruction"], add_special_tokens=False)["input_ids"]
    compat = _plain_nll(model, example.input_ids.tolist(), example.loss_mask.tolist())
    uncond = _plain_nll(model, [start, *response_ids], [False] + [True] * len(response_ids))
    instr = _plain_nll(model, [start, *instruction_ids], [False] + [True] * len(instruction_ids))
    assert mine["compat_loss"] == pytest.approx(compat, rel=1e-5)
    assert mine["uncond_loss"] == pytest.approx(uncond, rel=1e-5)
    assert mine["instr_loss"] == pytest.approx(instr, rel=1e-5)
    assert mine["ifd_self"] == pytest.approx(compat / uncond, rel=1e-5)
    assert mine["ic_ifd_self"] == pytest.approx(compat / (instr * uncond), rel=1e-5)


def test_the_non_positive_reward_warning_is_printed_once(tmp_path, tiny_suite):
    zoo = pd.DataFrame({"uuid": [f"u{i}" for i in range(4)], "instruction": [f"Question {i}?" for i in range(4)]})
    for t, teacher in enumerate(("a-it", "b-it")):
        zoo[teacher] = [{"content": f"Answer {i} by {teacher}.", "rm": -1.0 - t - 0.1 * i} for i in range(4)]
    zoo.to_parquet(tmp_path / "zoo.parquet")
    result = run_cli("rank", "--data", str(tmp_path / "zoo.parquet"), "--base-model", tiny_suite.base_small,
                     "--reward-column", "rm", "--output", str(tmp_path / "o"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("CAR assumes positive rewards") == 1, result.stderr


def test_a_misspelt_flag_gets_the_subcommands_usage_and_the_closest_flag():
    result = run_cli("rank", "--base-modle", "x")
    assert result.returncode == 2
    assert "usage: magpie-teach rank" in result.stderr
    assert (
        "magpie-teach rank: error: unrecognized arguments: --base-modle (did you mean --base-model?)" in result.stderr
    )
    nested = run_cli("review", "push", "runs/rank", "--datset", "d")
    assert (
        "magpie-teach review push: error: unrecognized arguments: --datset (did you mean --dataset?)" in nested.stderr
    )


def test_push_reports_argument_errors_before_saying_where_it_would_publish(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
    env["MAGPIE_TEACH_HUB_ROOT"] = str(tmp_path / "hub")
    result = subprocess.run([sys.executable, "-m", "magpie_teach.cli", "push", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "magpie-teach push: error: missing required option(s): --repo-id"
