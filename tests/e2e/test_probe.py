"""`magpie-teach probe`: a real probe through distilabel with three tiny teachers, killed and resumed; replay of a
Generator-Zoo-layout file."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from magpie_teach.artefacts import read_rank_folder
from magpie_teach.scoring.probe import instruction_order
from tests.conftest import REPO
from tests.readme_commands import run_readme_command

KEY = ["teacher", "id", "generation_index"]


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magpie_teach.cli", *args], capture_output=True, text=True, **kwargs)


def probe_config(tmp_path: Path, tiny_suite, sample_path) -> Path:
    """The shipped tiny probe config, pointed at this session's tiny models and a fresh output folder."""
    config = yaml.safe_load((REPO / "pipelines" / "configs" / "tiny_cpu_probe.yaml").read_text())
    models = {"outputs/models/tiny-llama-s": tiny_suite.base_small, "outputs/models/tiny-llama-m": tiny_suite.base_medium,
              "outputs/models/tiny-llama-l": tiny_suite.base_large, "outputs/models/tiny-reward": tiny_suite.reward}  # fmt: skip
    for teacher in config["teachers"]:
        teacher["model"] = models[teacher["model"]]
    config["scoring"]["reward_model"] = models[config["scoring"]["reward_model"]]
    config["scoring"]["base_models"] = [models[b] for b in config["scoring"]["base_models"]]
    config["instructions"]["path"] = sample_path
    config["output_dir"] = str(tmp_path / "probe")
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stored_rows(store: Path) -> tuple[int, pd.DataFrame]:
    """(rows over every batch file, the distinct rows) of a batch store."""
    frames = [pd.read_parquet(p) for p in store.glob("*/batch-*.parquet")]
    if not frames:
        return 0, pd.DataFrame(columns=KEY)
    everything = pd.concat(frames, ignore_index=True)
    return len(everything), everything.drop_duplicates(KEY)


def readme_folder(tmp_path: Path, tiny_suite) -> Path:
    """A folder where the README's probe commands run as written: the shipped configs, and the tiny models where
    `magpie-teach tiny --output outputs/models` puts them."""
    (tmp_path / "pipelines").symlink_to(REPO / "pipelines")
    (tmp_path / "src").symlink_to(REPO / "src")
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "models").symlink_to(Path(tiny_suite.base_small).parent)
    return tmp_path


@pytest.mark.slow
def test_a_probe_drops_the_losers_generates_only_their_rounds_and_resumes_after_sigkill(tmp_path, tiny_suite):
    """The README's probe commands on the shipped tiny config: killed during its first round, then run again."""
    folder = readme_folder(tmp_path, tiny_suite)
    command = ["probe", "pipelines/configs/tiny_cpu_probe.yaml"]
    dry = run_readme_command([*command, "--dry-run"], cwd=folder, capture_output=True, text=True)
    assert dry.returncode == 0 and "full grid: 3 teachers x 24 instructions = 72 generations" in dry.stdout
    out = folder / "outputs" / "probe-tiny"
    assert not out.exists()
    process = run_readme_command(command, background=True, cwd=folder, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not list((out / "store").glob("*/batch-*.parquet")) and process.poll() is None:
        assert time.monotonic() < deadline, "no batch stored within 240 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = {p: p.stat().st_mtime_ns for p in (out / "store").glob("*/batch-*.parquet")}
    assert before and not (out / "probe_summary.json").exists()

    result = run_readme_command(command, cwd=folder, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "round 1/3: 8 instructions" in result.stdout
    # what was stored before the kill is kept as it was, and no response was generated twice
    assert all(p.exists() and p.stat().st_mtime_ns == t for p, t in before.items())
    total, rows = stored_rows(out / "store")
    assert total == len(rows)

    summary = json.loads((out / "probe_summary.json").read_text())
    (decision,) = summary["decisions"]
    # the greedy teacher is the base model itself: its answers are the most compatible by construction
    assert decision["teacher"] == "tiny-greedy" and decision["decided"]
    assert decision["candidates"] == ["tiny-greedy"]
    # each teacher answered exactly the first instructions of the probe's order, as many as its rounds needed
    ids = yaml.safe_load((folder / command[1]).read_text())
    instructions = pd.read_json(REPO / ids["instructions"]["path"], lines=True).drop_duplicates("instruction")
    from magpie_teach.data import instruction_id

    order = instruction_order([instruction_id(t) for t in instructions["instruction"]], ids["probe"].get("seed", 0))
    per_teacher = summary["instructions_per_teacher"]
    for teacher, n in per_teacher.items():
        assert sorted(rows.loc[rows["teacher"] == teacher, "id"]) == sorted(order[:n]), teacher
    rounds = pd.read_csv(out / "probe_rounds.csv")
    for teacher in ("tiny-hot-m", "tiny-hot-l"):
        out_at = rounds.loc[(rounds["teacher"] == teacher) & (rounds["status"] == "eliminated"), "round"]
        assert len(out_at) == 1 and per_teacher[teacher] == summary["round_sizes"][int(out_at.iloc[0]) - 1]
    assert summary["responses_used"] == sum(per_teacher.values()) < summary["responses_full"] == 3 * len(order)
    assert summary["tokens_generated"] == rows.groupby("teacher")["n_tokens"].sum().to_dict()

    # the rank-layout folder holds every scored response, and reads like a rank output
    ranking, _, rank_summary = read_rank_folder(out / "rank")
    failed = summary["failed_generations"]  # a failed generation (an empty completion) is counted, not scored
    assert failed == rows[rows["status"] != "ok"].groupby("teacher").size().to_dict()
    assert ranking.set_index("teacher")["n"].to_dict() == {t: n - failed.get(t, 0) for t, n in per_teacher.items()}
    assert ranking.loc[ranking["car"].idxmax(), "teacher"] == "tiny-greedy" and "confidence" in rank_summary

    # a rerun of the finished probe generates and scores nothing again, and decides the same
    files = {p: p.stat().st_mtime_ns for p in out.glob("store/*/batch-*")}
    again = cli(*command, cwd=folder, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.glob("store/*/batch-*")} == files
    rerun = json.loads((out / "probe_summary.json").read_text())
    assert rerun["decisions"] == summary["decisions"]
    assert rerun["work"] and all(stage["scored"] == 0 and stage["from_cache"] for stage in rerun["work"].values())


def zoo_file(path: Path, n: int = 64) -> Path:
    """A Generator-Zoo-layout file: the 'good-it' teacher's reward is higher by construction."""
    rng = np.random.default_rng(0)
    zoo = pd.DataFrame({"uuid": [f"u{i}" for i in range(n)],
                        "instruction": [f"What is {i} plus {i}?" for i in range(n)]})  # fmt: skip
    for teacher, mean in (("good-it", 3.0), ("mid-it", 1.6), ("weak-it", 1.2)):
        zoo[teacher] = [{"content": f"{i} plus {i} is {2 * i}.", "ArmoRM-Llama3-8B-v0.1": float(mean + rng.normal(0, 0.3))}
                        for i in range(n)]  # fmt: skip
    zoo.to_parquet(path)
    return path


def test_replay_of_a_zoo_layout_file_measures_the_spend_and_resumes(tmp_path, tiny_suite):
    data = zoo_file(tmp_path / "zoo.parquet")
    args = ["probe", "--replay", str(data), "--reward-column", "ArmoRM-Llama3-8B-v0.1", "--base-model",
            tiny_suite.base_small, "--start", "8", "--output", str(tmp_path / "replay")]  # fmt: skip
    dry = cli(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "full grid: 3 teachers x 64 instructions = 192 generations" in dry.stdout
    assert "probe round 1/4: 8 instructions; at most 24 new generations" in dry.stdout
    assert not (tmp_path / "replay").exists()

    result = cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "replay" / "probe_summary.json").read_text())
    assert [(d["teacher"], d["decided"]) for d in summary["decisions"]] == [("good-it", True)]
    assert summary["responses_full"] == 192 and summary["round_sizes"] == [8, 16, 32, 64]
    assert summary["responses_used"] == sum(summary["instructions_per_teacher"].values()) < 192
    assert f"({summary['share_of_full_grid']:.1%} of the full grid)" in result.stdout
    # the scores are the Zoo's own rewards for the revealed responses
    scores = pd.read_parquet(tmp_path / "replay" / "rank" / "scores.parquet")
    zoo = pd.read_parquet(data)
    for row in scores.sample(5, random_state=0).itertuples():
        uuid = f"u{int(row.instruction.split()[2])}"
        assert row.reward == zoo.set_index("uuid").loc[uuid, row.teacher]["ArmoRM-Llama3-8B-v0.1"]

    assert summary["work"] and all(stage["scored"] for stage in summary["work"].values())
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((tmp_path / "replay" / "probe_summary.json").read_text())
    assert rerun["decisions"] == summary["decisions"]
    assert all(stage["scored"] == 0 and stage["from_cache"] for stage in rerun["work"].values())  # resumed: no model
    # a rank of the same data and base model after the probe scores only what the probe never revealed
    ranked = cli("rank", "--data", str(data), "--reward-column", "ArmoRM-Llama3-8B-v0.1", "--base-model",
                 tiny_suite.base_small, "--output", str(tmp_path / "ranked"))  # fmt: skip
    assert ranked.returncode == 0, ranked.stderr[-3000:]
    work = json.loads((tmp_path / "ranked" / "summary.json").read_text())["work"]
    compat = work["compat tiny-llama-s"]
    assert compat["from_cache"] == summary["responses_used"] and compat["scored"] == 192 - summary["responses_used"]
    # and a probe after that rank scores nothing at all
    after = cli(*args[:-1], str(tmp_path / "replay-after"))
    assert after.returncode == 0, after.stderr[-3000:]
    later = json.loads((tmp_path / "replay-after" / "probe_summary.json").read_text())["work"]
    assert later and all(stage["scored"] == 0 for stage in later.values())


def test_probe_argument_errors_are_one_line(tmp_path, tiny_suite, sample_path):
    config = probe_config(tmp_path, tiny_suite, sample_path)
    both = cli("probe", str(config), "--replay", "x.parquet")
    assert both.returncode == 2 and "not both" in both.stderr and "Traceback" not in both.stderr
    flags = cli("probe", str(config), "--base-model", tiny_suite.base_small)
    assert flags.returncode == 2 and "--base-model: with a YAML config" in flags.stderr
    neither = cli("probe", "--output", str(tmp_path / "o"))
    assert neither.returncode == 2 and "give a generate YAML with a probe: block, or --replay" in neither.stderr
    bad = cli("probe", str(config), "--growth", "1")
    assert bad.returncode == 2 and "probe.growth must be > 1" in bad.stderr
