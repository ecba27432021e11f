"""The README and docs/, run as written: every `magpie-teach` command in them, in order, in a fresh folder.

The Hub model ids it names (Qwen/Qwen2.5-3B, meta-llama/Llama-3.2-3B, the Skywork reward model,
openai-community/gpt2) are tiny models published under those names on the project's local Hub server,
which `HF_ENDPOINT` points at: transformers downloads them from it exactly as from huggingface.co.
`responses.jsonl` is the shipped sample, `my_benchmarks.csv` a performance table for its teachers
made here; pushes go to that local hub, `review` to a real Argilla server. Commands the README marks
as GPU-scale are not run (no GPU here); the README's generate commands run in tests/test_readme.py
and tests/e2e/test_generate.py (the Ray one needs a Ray head). The last test checks that nothing else
was left out.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO
from tests.readme_commands import run_readme_command
from tests.test_readme import README, commented_commands

HUB_NAMES = {  # README name -> tiny suite attribute
    "Qwen/Qwen2.5-3B": "base_small",
    "meta-llama/Llama-3.2-3B": "base_medium",
    "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": "reward",
    "openai-community/gpt2": "reference",
    "Qwen/Qwen2.5-0.5B-Instruct": "base_medium",
    "Qwen/Qwen2.5-7B-Instruct": "base_large",
}
RUN_ELSEWHERE = {  # first words of the command -> the test that runs it as written (through run_readme_command)
    ("tiny",): "tests/test_readme.py",
    ("generate", "pipelines/configs/tiny_cpu.yaml"): "tests/test_readme.py",
    ("generate", "pipelines/configs/tiny_cpu_magpie_scored.yaml"): "tests/test_readme.py",
    ("report", "outputs/generate-magpie/rank"): "tests/test_readme.py",
    ("generate", "pipelines/configs/tiny_cpu_ray.yaml"): "tests/e2e/test_generate.py (Ray head on 127.0.0.1)",
    ("paradox",): "tests/test_readme.py",
    ("report", "--performance"): "tests/test_readme.py",
    ("probe", "pipelines/configs/tiny_cpu_probe.yaml"): "tests/e2e/test_probe.py (killed and resumed)",
    ("rank", "--data", "Magpie-Align/Magpie-100K-Generator-Zoo"): "tests/e2e/test_rank_ray.py (Ray head on 127.0.0.1)",
}


def gpu_only(comment: str) -> bool:
    return "GPU" in comment and "CPU" not in comment


def elsewhere(argv: list[str]) -> str | None:
    return next((where for head, where in RUN_ELSEWHERE.items() if tuple(argv[: len(head)]) == head), None)


WALK = [
    list(argv)
    for argv in dict.fromkeys(  # in order; a command the README repeats from a docs page runs once
        tuple(argv) for argv, comment in commented_commands() if not gpu_only(comment) and not elsewhere(argv)
    )
]


@pytest.mark.slow
def test_the_readme_walkthrough(tmp_path, tiny_suite, sample_rows, local_hub, argilla_server):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("src", "recipes", "pipelines"):
        (work / name).symlink_to(REPO / name)
    env = local_hub.env(MAGPIE_TEACH_HUB_ROOT=str(local_hub.root), ARGILLA_API_URL=argilla_server.url,
                        ARGILLA_API_KEY=argilla_server.api_key, TOKENIZERS_PARALLELISM="false")  # fmt: skip
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # as with the venv activated

    # a fresh Argilla for the README's `spot-check` data set: other tests of this session use that name too
    import argilla as rg

    argilla = rg.Argilla(api_url=argilla_server.url, api_key=argilla_server.api_key)
    if (existing := argilla.datasets(name="spot-check")) is not None:
        existing.delete()
    # the models the README names, published on the local hub under those names
    publish = "\n".join(
        f"api.create_repo({name!r}, exist_ok=True); api.upload_folder(repo_id={name!r}, folder_path={getattr(tiny_suite, attr)!r})"
        for name, attr in HUB_NAMES.items()
    )
    subprocess.run([sys.executable, "-c", f"from huggingface_hub import HfApi\napi = HfApi()\n{publish}"],
                   env=env, check=True, capture_output=True)  # fmt: skip
    # the README's inputs: responses (the shipped sample) and benchmark results for its teachers
    sample_rows.to_json(work / "responses.jsonl", orient="records", lines=True)
    rng = np.random.default_rng(0)
    teachers = sorted(sample_rows["teacher"].unique())
    pd.DataFrame(
        [
            {"teacher": t, "base_model": b, "AE2_LC_WR": rng.uniform(5, 30), "ArenaHard_WR": rng.uniform(5, 30)}
            for t in teachers
            for b in ("Qwen/Qwen2.5-3B", "meta-llama/Llama-3.2-3B")
        ]  # fmt: skip
    ).to_csv(work / "my_benchmarks.csv", index=False)
    run_readme_command(["tiny", "--output", "outputs/models"], cwd=work, env=env, check=True, capture_output=True)

    serve = None
    try:
        for argv in WALK:
            if argv == ["hub", "serve"]:  # `magpie-teach hub serve &`, then the README's python line against it
                serve = run_readme_command(argv, background=True, cwd=work, env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)  # fmt: skip
                read_back(work, env)
                continue
            result = run_readme_command(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, (
                f"magpie-teach {' '.join(argv)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            )
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(timeout=10)

    ranking = pd.read_csv(work / "runs" / "rank" / "ranking.csv")
    assert set(ranking["base_model"]) == {"Qwen/Qwen2.5-3B", "meta-llama/Llama-3.2-3B"}
    assert set(ranking["teacher"]) == set(teachers) and "ppl_ref" in ranking.columns  # --reference-model gpt2
    assert (work / "runs" / "rank" / "correlations.csv").exists() and (
        work / "runs" / "report" / "report.html"
    ).exists()
    assert (work / "runs" / "student" / "model.safetensors").exists() or any(
        (work / "runs" / "student").glob("*/model.safetensors")
    )
    assert (work / "runs" / "validate-cpu" / "correlations.csv").exists()
    # validate --judge scored the students by win rates; evaluate judged the same students on the shipped prompts
    students = pd.read_csv(work / "runs" / "validate-cpu" / "students.csv")
    assert np.allclose(students["ap"], (students["AE2_LC_WR"] + students["ArenaHard_WR"]) / 2)
    performance = pd.read_csv(work / "runs" / "evaluate" / "performance.csv")
    assert sorted(performance["teacher"]) == sorted(students["teacher"])
    assert set(performance["base_model"]) == {"Qwen/Qwen2.5-3B"}
    judgements = pd.read_parquet(work / "runs" / "evaluate" / "judgements.parquet")
    assert len(judgements) == 24 * len(students) and judgements["parsed"].all()  # transformers: every verdict read
    # calibrate's beta, used by the rerun of rank: recorded as its beta, and every score read from the cache
    calibration = json.loads((work / "runs" / "calibration" / "calibration.json").read_text())
    calibrated = pd.read_csv(work / "runs" / "rank-calibrated" / "ranking.csv")
    assert set(calibrated["car_beta"]) == {calibration["best_beta"]}
    work_done = json.loads((work / "runs" / "rank-calibrated" / "summary.json").read_text())["work"]
    assert work_done and all(stage["scored"] == 0 for stage in work_done.values()), work_done
    assert (work / "runs" / "report-calibrated" / "figures" / "calibration.png").exists()
    assert (work / "runs" / "review" / "reviews.parquet").exists()
    # route: the router learnt from rank's scores; the routed generate wrote each instruction once; select took it
    (routes,) = json.loads((work / "runs" / "router" / "route_summary.json").read_text())["base_models"]
    routed = pd.read_parquet(work / "outputs" / "generate-routed" / "responses.parquet")
    assert routed["id"].is_unique and routed["id"].nunique() == sample_rows["instruction"].nunique()
    if not routes["routed"]:
        assert set(routed["teacher"]) == {routes["single_teacher"]}
    sft = pd.read_parquet(work / "runs" / "sft-routed" / "data" / "train-00000-of-00001.parquet")
    assert sorted(sft["id"]) == sorted(routed["id"])
    replayed = json.loads((work / "runs" / "route-replay" / "route_summary.json").read_text())["base_models"]
    assert replayed[0]["n_seed"] == 12 and replayed[0]["n_held_out"] == 12
    tags = json.loads(subprocess.run(
        [sys.executable, "-c", "import json; from huggingface_hub import HfApi; "
         "print(json.dumps([t.name for t in HfApi().list_repo_refs('my-org/scored', repo_type='dataset').tags]))"],
        env=env, check=True, capture_output=True, text=True).stdout)  # fmt: skip
    assert tags == ["v2.0.0"]


def read_back(work, env) -> None:
    """The README's read-back block: its `export` line, then its python line, against `hub serve` on 8765."""
    import re
    import time
    import urllib.request

    block = README.split("Read it back with", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    exports = dict(re.findall(r"(\w+)=(\S+)", next(line for line in block.splitlines() if line.startswith("export"))))
    python = next(line for line in block.splitlines() if line.startswith("python -c"))
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{exports['HF_ENDPOINT']}/api/whoami-v2", timeout=2)
            break
        except OSError:
            assert time.monotonic() < deadline, "magpie-teach hub serve did not come up on 127.0.0.1:8765"
            time.sleep(0.2)
    result = subprocess.run(["bash", "-c", python], cwd=work, env={**env, **exports}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "num_rows" in result.stdout
