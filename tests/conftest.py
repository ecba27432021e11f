"""Test session setup: offline by construction, tiny models built once per session from a fixed seed."""

import os

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory):
    from magpie_teach.tiny import build_tiny_suite

    return build_tiny_suite(tmp_path_factory.mktemp("tiny-models"), seed=0)


@pytest.fixture(scope="session")
def sample_path():
    from magpie_teach.cli import _sample_path

    return _sample_path()


@pytest.fixture(scope="session")
def sample_rows(sample_path):
    import pandas as pd

    return pd.read_json(sample_path, lines=True)
