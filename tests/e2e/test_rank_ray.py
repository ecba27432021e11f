"""`rank` on a real Ray cluster (a head on 127.0.0.1 with two CPUs, two scoring actors): the local run's scores
and ranking, a killed actor retried, a killed driver resumed from the score cache, and the up-front checks."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.processes import ray_head

KEY = ["id", "teacher", "base_model"]
SCORES = ["compat_loss", "uncond_loss", "instr_loss", "n_tokens", "reward"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A local Hub-compatible server for the module: the README's Zoo command reads the Zoo and the five base
    models from it, on the driver and in the actors."""
    from tests.hub.local import LocalHub

    server = LocalHub(tmp_path_factory.mktemp("hub") / "hub").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, hub):
    """One Ray head for the module (a second one in the same CI run costs minutes), its workers pointed at ``hub``
    (the tests that score local folders never ask it for anything)."""
    with ray_head(tmp_path_factory.mktemp("ray"), env=hub.env()) as address:
        yield address


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory):
    """300 responses (100 instructions x 3 teachers) of real words with a reward column, in 8 blocks: a kill
    lands while the actors still have work."""
    from magpie_teach.tiny import shipped_texts

    words = " ".join(shipped_texts()).split()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(100):
        instruction = " ".join(rng.choice(words, 6)) + f" ({i})?"
        for teacher, length in (("short", 20), ("medium", 40), ("long", 60)):
            response = " ".join(rng.choice(words, length))
            rows.append({"instruction": instruction, "response": response, "teacher": teacher, "rm": rng.normal()})
    path = tmp_path_factory.mktemp("data") / "many.jsonl"
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return str(path)


def _rank_args(data, out, base, *extra):
    return ["rank", "--data", data, "--base-model", base, "--reward-column", "rm", "--max-length", "128",
            "--bootstrap", "0", "--output", str(out), *extra]  # fmt: skip


def _cli(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "magpie_teach.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})  # fmt: skip


@pytest.fixture(scope="module")
def local_ranking(many_rows, tiny_suite, tmp_path_factory):
    """`rank` of ``many_rows`` in this process, without Ray and without the cache: the reference."""
    from magpie_teach.cli import main

    out = tmp_path_factory.mktemp("local")
    assert main(_rank_args(many_rows, out, tiny_suite.base_small, "--no-cache")) == 0
    return out


def _same_scores(out, reference):
    mine = pd.read_parquet(out / "scores.parquet").sort_values(KEY).reset_index(drop=True)
    theirs = pd.read_parquet(reference / "scores.parquet").sort_values(KEY).reset_index(drop=True)
    assert len(mine) == len(theirs)
    for column in SCORES:
        np.testing.assert_allclose(mine[column], theirs[column], atol=1e-5, rtol=0, err_msg=column)
    ranking = ["teacher", "base_model", "rank_car", "rank_reward", "rank_compat_loss"]
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "ranking.csv")[ranking], pd.read_csv(reference / "ranking.csv")[ranking]
    )


def test_rank_and_generates_scoring_stage_on_ray_give_the_local_scores_and_ranking(
    cluster, tiny_suite, sample_path, tmp_path
):
    """`rank --ray-address`, then `generate`'s scoring stage with a `ray:` block (the same Ray Data path), each
    against a local `rank` without the cache; both score all 72 responses on the cluster (empty caches)."""
    import yaml

    from magpie_teach.cli import main

    reference = tmp_path / "local"
    args = ["--base-model", tiny_suite.base_small, "--reward-model", tiny_suite.reward, "--bootstrap", "0"]
    assert main(["rank", "--data", sample_path, *args, "--output", str(reference), "--no-cache"]) == 0
    out = tmp_path / "ray"
    run = _cli("rank", "--data", sample_path, *args, "--output", str(out), "--ray-address", "auto",
               "--num-workers", "2", "--cache-dir", str(tmp_path / "cache"), env={"RAY_ADDRESS": cluster})  # fmt: skip
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    _same_scores(out, reference)
    work = json.loads((out / "summary.json").read_text())["work"]
    assert work["compat tiny-llama-s"] == {"scored": 72, "from_cache": 0} and work["reward"]["scored"] == 72
    assert "compat tiny-llama-s: 72/72 ex (100%)" in stderr

    generated = tmp_path / "generate"
    config = tmp_path / "generate.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(generated), "instructions": {"path": sample_path},
        "teachers": [{"name": "unused", "model": tiny_suite.base_small}],
        "scoring": {"reward_model": tiny_suite.reward, "base_models": [tiny_suite.base_small], "bootstrap": 0,
                    "num_workers": 2},
        "ray": {"address": "auto"},
    }))  # fmt: skip
    stage = (
        "import sys, pandas as pd\n"
        "from magpie_teach.generation.config import load_generate_config\n"
        "from magpie_teach.generation.score_stage import score_responses\n"
        "score_responses(load_generate_config(sys.argv[1]), pd.read_json(sys.argv[2], lines=True))"
    )
    run = subprocess.run([sys.executable, "-c", stage, str(config), sample_path], capture_output=True, text=True,
                         env={**os.environ, "RAY_ADDRESS": cluster, "MAGPIE_TEACH_CACHE": str(tmp_path / "gen-cache")},
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    _same_scores(generated / "rank", reference)
    work = json.loads((generated / "rank" / "summary.json").read_text())["work"]
    assert work["compat tiny-llama-s"] == {"scored": 72, "from_cache": 0} and work["reward"]["scored"] == 72
    assert not (generated / "rank" / ".store").exists()  # not the distilabel scoring pipeline


def _first_part(cache, process, timeout=300):
    """Waits until the run has stored its first block of compatibility scores in the cache."""
    deadline = time.monotonic() + timeout
    while not list(cache.glob("compat/*/part-*.parquet")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_an_actor_killed_mid_run_is_retried_and_the_scores_do_not_change(
    cluster, tiny_suite, many_rows, local_ranking, tmp_path
):
    out, cache = tmp_path / "ray", tmp_path / "cache"
    run = _cli(*_rank_args(many_rows, out, tiny_suite.base_small, "--ray-address", cluster, "--num-workers", "2",
                           "--cache-dir", str(cache)))  # fmt: skip
    _first_part(cache, run)
    from tests.processes import ray_processes

    actors = ray_processes(cluster, "MapWorker")  # under this module's own head only
    assert actors, "no Ray Data actor process found under the test's Ray head"
    os.kill(actors[0], signal.SIGKILL)
    at_kill = len(list(cache.glob("*/*/part-*.parquet")))
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    # 300 responses and 100 instructions (L(x)), one dataset of 8 blocks: the kill came before the last one
    assert at_kill < 8 == len(list(cache.glob("*/*/part-*.parquet")))
    _same_scores(out, local_ranking)


def test_a_driver_killed_mid_run_resumes_from_the_blocks_it_stored(
    cluster, tiny_suite, many_rows, local_ranking, tmp_path
):
    out, cache = tmp_path / "ray", tmp_path / "cache"
    args = _rank_args(many_rows, out, tiny_suite.base_small, "--ray-address", cluster, "--num-workers", "2",
                      "--cache-dir", str(cache))  # fmt: skip
    run = _cli(*args)
    _first_part(cache, run)
    run.send_signal(signal.SIGKILL)
    run.wait()
    stored = len(list(cache.glob("compat/*/part-*.parquet")))
    rerun = _cli(*args)
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    work = json.loads((out / "summary.json").read_text())["work"]["compat tiny-llama-s"]
    assert work["from_cache"] > 0 and work["scored"] + work["from_cache"] == 300, (work, stored)
    _same_scores(out, local_ranking)


def test_rank_in_windows_on_ray_stages_each_example_once_and_gives_the_local_scores(
    cluster, tiny_suite, many_rows, local_ranking, tmp_path
):
    """Past ``$MAGPIE_TEACH_WINDOW_ROWS`` (50 here: the 300 responses in 6 windows) the driver reads a window at a
    time and stages what the cache lacks for Ray Data to read: every response and every instruction's L(x) is
    scored once (an instruction whose answers fall in two windows is staged once), into the cache, with the local
    run's scores and ranking, and no staged shard is left."""
    out, cache = tmp_path / "ray", tmp_path / "cache"
    run = _cli(*_rank_args(many_rows, out, tiny_suite.base_small, "--ray-address", cluster, "--num-workers", "2",
                           "--cache-dir", str(cache)), env={"MAGPIE_TEACH_WINDOW_ROWS": "50"})  # fmt: skip
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    assert "tiny-llama-s: scoring 300 responses in windows of 50" in stderr
    assert "compat tiny-llama-s: 300/300 ex (100%)" in stderr and "L(x) tiny-llama-s: 100/100 ex (100%)" in stderr
    # the file holds 3 answers per instruction in a row: an instruction is in every window one of its rows is in
    in_windows = len({(row // 50, row // 3) for row in range(300)})
    work = json.loads((out / "summary.json").read_text())["work"]
    assert work["compat tiny-llama-s"] == {"scored": 300, "from_cache": 0}
    # on Ray an instruction's L(x) is staged once: its later windows repeat it in this run, none read from a cache
    assert work["L(x) tiny-llama-s"] == {"scored": 100, "from_cache": 0, "repeated_in_run": in_windows - 100}
    assert in_windows > 100
    stored = [pd.read_parquet(part) for part in cache.glob("compat/*/part-*.parquet")]
    assert sum(len(part) for part in stored) == 300
    _same_scores(out, local_ranking)
    assert not (out / ".ray-staging").exists()


def test_an_unreachable_cluster_and_a_missing_ray_are_one_line_each_before_any_model_loads(
    tiny_suite, sample_path, tmp_path
):
    from tests.processes import free_port

    args = ["rank", "--data", sample_path, "--base-model", tiny_suite.base_small, "--reward-model", tiny_suite.reward,
            "--output", str(tmp_path / "out")]  # fmt: skip
    nobody = f"127.0.0.1:{free_port()}"
    run = _cli(*args, "--ray-address", nobody)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 2 and stderr.strip().count("\n") == 0, stderr
    assert f"--ray-address {nobody}: the Ray cluster cannot be reached" in stderr
    without_ray = (
        "import sys; sys.modules['ray'] = None; from magpie_teach.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run([sys.executable, "-c", without_ray, *args, "--ray-address", "auto"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "pip install 'magpie-teach[ray]'" in done.stderr, done.stderr
    assert done.stderr.strip().count("\n") == 0 and not (tmp_path / "out" / "scores.parquet").exists()


def test_more_gpus_than_the_cluster_has_is_one_line_before_any_model_loads(tiny_suite, sample_path, tmp_path,
                                                                          cluster):  # fmt: skip
    """This CPU head has no GPU: actors of one GPU each could never start (Ray Data would wait for ever, their logs
    hidden). The run says so in one line, with what would fit, and leaves no output."""
    args = ["rank", "--data", sample_path, "--base-model", tiny_suite.base_small, "--reward-model", tiny_suite.reward,
            "--output", str(tmp_path / "out"), "--ray-address", cluster, "--num-workers", "2",
            "--gpus-per-worker", "1"]  # fmt: skip
    run = _cli(*args)
    _, stderr = run.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, stderr
    assert "--gpus-per-worker 1 x --num-workers 2 asks 2 GPU(s), but the Ray cluster" in lines[0]
    assert "has 0: its actors could never start; use --gpus-per-worker 0" in lines[0]
    assert not (tmp_path / "out" / "scores.parquet").exists()


ZOO_REWARDS = ["ArmoRM-Llama3-8B-v0.1", "Skywork-Reward-Llama-3.1-8B", "Skywork-Reward-Gemma-2-27B"]
PAPER_BASES = {"Qwen/Qwen2-1.5B": "base_small", "google/gemma-2-2b": "base_medium", "Qwen/Qwen2.5-3B": "base_large",
               "meta-llama/Llama-3.2-3B": "base_small", "nvidia/Llama-3.1-Minitron-4B-Width-Base": "base_medium"}  # fmt: skip


def test_the_readme_ranks_the_zoo_under_the_five_paper_base_models_on_a_ray_cluster(
    tmp_path, tiny_suite, hub, cluster
):
    """The README's command as written, on a CPU Ray head (no GPU per actor, one actor per pool): the Zoo's layout and
    names published on the local hub, tiny models under the five base models' Hub ids; all 19 teachers match
    the shipped Table 6 for each base model."""
    from tests.readme_commands import run_readme_command
    from tests.test_names import ZOO_COLUMNS
    from tests.test_readme import commands

    argv = next(a for a in commands() if a[:3] == ["rank", "--data", "Magpie-Align/Magpie-100K-Generator-Zoo"])
    env = hub.env()
    rng = np.random.default_rng(0)
    zoo = pd.DataFrame(
        {"uuid": [f"u{i}" for i in range(4)], "instruction": [f"Question {i} about plants?" for i in range(4)]}
    )
    for teacher in ZOO_COLUMNS:
        zoo[teacher] = [{"content": f"{teacher} answers {i}. " * int(rng.integers(1, 4)),
                         **{name: float(rng.normal()) for name in ZOO_REWARDS}} for i in range(4)]  # fmt: skip
    data = tmp_path / "zoo" / "data"
    data.mkdir(parents=True)
    zoo.to_parquet(data / "train-00000-of-00001.parquet")
    publish = "\n".join(
        f"api.create_repo({name!r}, exist_ok=True); api.upload_folder(repo_id={name!r}, folder_path={getattr(tiny_suite, attr)!r})"
        for name, attr in PAPER_BASES.items()
    )
    publish += ("\napi.create_repo('Magpie-Align/Magpie-100K-Generator-Zoo', repo_type='dataset', exist_ok=True)"
                f"\napi.upload_folder(repo_id='Magpie-Align/Magpie-100K-Generator-Zoo', repo_type='dataset', folder_path={str(tmp_path / 'zoo')!r})")  # fmt: skip
    subprocess.run([sys.executable, "-c", f"from huggingface_hub import HfApi\napi = HfApi()\n{publish}"],
                   env=env, check=True, capture_output=True)  # fmt: skip
    (tmp_path / "src").symlink_to(Path(__file__).resolve().parents[2] / "src")
    # the module's Ray head, whose actors download the models from the hub
    result = run_readme_command(argv, cpu=True, cwd=tmp_path, env={**env, "RAY_ADDRESS": cluster},
                                capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for base in PAPER_BASES:
        assert re.search(
            rf"performance: {re.escape(base)} = '.*' in the table: 19 teacher\(s\) matched", result.stderr
        )
    correlations = pd.read_csv(tmp_path / "runs" / "zoo" / "correlations.csv", index_col=0)
    assert (correlations.loc["n_teachers", list(PAPER_BASES)] == 19).all()
    scores = pd.read_parquet(tmp_path / "runs" / "zoo" / "scores.parquet")
    assert len(scores) == 4 * 19 * 5 and scores["compat_loss"].notna().all()


def test_the_drivers_hub_token_and_endpoint_reach_the_workers_and_are_not_printed(cluster, tmp_path):
    """Gated and private models need the token on every node; the nodes' own environment has none (the head was
    started without it). A driver connected through `connect` gives its token (here from a stored login, as `hf
    auth login` leaves it) and its endpoint to the job's workers, and prints neither."""
    token = "hf_planted" + "x" * 24
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "token").write_text(token)  # huggingface_hub's stored login
    code = ("import os, ray\nfrom magpie_teach.scoring.on_ray import connect\n"
            f"connect({cluster!r})\n"
            "got = ray.get(ray.remote(lambda: (os.environ.get('HF_TOKEN'), os.environ.get('HF_ENDPOINT')))"
            ".options(num_cpus=0).remote())\n"
            f"print('token ok' if got[0] == {token!r} else f'token {{got[0]!r}}', 'endpoint', got[1])")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9", RAY_USAGE_STATS_ENABLED="0")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "token ok endpoint http://127.0.0.1:9" in result.stdout, result.stdout + result.stderr[-2000:]
    assert token not in result.stdout + result.stderr


def test_a_gpu_teacher_on_a_cluster_without_gpus_is_one_line_before_any_model_loads(tiny_suite, sample_path,
                                                                                    tmp_path, cluster):  # fmt: skip
    """On Ray the cluster's GPUs decide a teacher's device, not the driver's: this CPU head has none, so a teacher
    that asks for cuda could never start (its actor would wait for ever for a GPU). The run says so, naming it."""
    import yaml

    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "instructions": {"path": sample_path},
        "teachers": [{"name": "cpu", "model": tiny_suite.base_small, "device": "cpu"},
                     {"name": "gpu", "model": tiny_suite.base_small, "device": "cuda"}],
        "ray": {"address": cluster},
    }))  # fmt: skip
    run = _cli("generate", str(config))
    _, stderr = run.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, stderr  # no warning of distilabel's, no Ray INFO lines
    assert "teachers[1].device: cuda, but the Ray cluster has no GPU (its 1 node(s) offer none)" in lines[0]
    assert not (tmp_path / "out" / "responses.parquet").exists()
