"""Test session setup: offline by construction, tiny models built once per session from a fixed seed."""

import os

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


LONGEST_FILES_FIRST = ("test_demo.py", "test_generate.py", "test_walkthrough.py", "test_rank_ray.py", "test_probe.py",
                       "test_readme.py", "test_openai.py", "test_vllm.py", "test_review.py", "test_cli.py")  # fmt: skip
"""Test files that take minutes, longest first: two xdist workers (a file each) then finish close together."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (a stable sort: tests keep their order within a file, and the rest theirs).

    Under `make mutation` the order is the other way round, by test: the fastest first, by the durations mutmut
    recorded (`mutants/mutmut-stats.json`). A mutant's session stops at its first failing test (`-x`), so a mutant
    that a fast test kills never waits for a slow one."""
    if os.environ.get("MAGPIE_TEACH_MUTATION"):
        durations = _mutmut_durations()
        items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
        return
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _mutmut_durations() -> dict[str, float]:
    """Each test's duration in mutmut's record (its sessions run in `mutants/`); empty before mutmut has timed the
    tests. Read by every session: the fork server may have started before the record was written."""
    import json

    stats = Path("mutmut-stats.json")
    return json.loads(stats.read_text()).get("duration_by_test", {}) if stats.exists() else {}


MUTATION_PRELOAD = ("scipy.optimize", "scipy.special", "scipy.stats", "torch", "transformers", "trl", "datasets",
                    "pyarrow.parquet", "matplotlib.pyplot", "magpie_teach.cli", "magpie_teach.training.sft")  # fmt: skip
"""What the tests `make mutation` runs import inside their bodies: loaded once by mutmut's fork server."""


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under `make mutation` ($MAGPIE_TEACH_MUTATION), mutmut forks one pytest session per mutant from a server that
    has collected the tests: load what the tests import lazily there, once, and freeze the heap, so that each
    mutant's session neither imports them again nor walks them in the garbage collections pytest runs at its end
    (those took more time than most of the tests)."""
    import gc
    import importlib

    global _FROZEN
    if os.environ.get("MAGPIE_TEACH_MUTATION") and not _FROZEN:  # (gc.get_freeze_count() walks the frozen heap)
        for module in MUTATION_PRELOAD:
            importlib.import_module(module)
        gc.freeze()
        _FROZEN = True


_FROZEN = False


def pytest_sessionstart(session: pytest.Session) -> None:
    """A test run starts a fresh record of the README commands it runs (the xdist controller does it, before the
    workers start), unless `make test` asks to keep the record for the coverage test it runs last."""
    from tests.readme_commands import RECORD

    if not hasattr(session.config, "workerinput") and not os.environ.get("MAGPIE_TEACH_KEEP_README_RECORD"):
        RECORD.unlink(missing_ok=True)
    if not hasattr(session.config, "workerinput"):
        session.config._repo_files_before = _repo_changes()


def _repo_changes() -> set[str] | None:
    """The checkout's files that git sees as new or changed (ignored ones aside), or None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                             text=True, timeout=60, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {line[3:] for line in out.splitlines()}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A test that writes into the checkout (a relative output folder run from the repository root) fails the run:
    it would be committed by whoever commits next (a stray report/ was, once). The xdist controller compares git's
    view of the checkout before and after."""
    before = getattr(session.config, "_repo_files_before", None)
    after = _repo_changes() if before is not None else None
    if after is not None and after - before:
        written = sorted(after - before)
        session.config.get_terminal_writer().line(
            f"the tests wrote into the checkout (use tmp_path): {written[:10]}", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="module", autouse=True)
def score_cache(tmp_path_factory):
    """Each test module scores into a score cache of its own ($MAGPIE_TEACH_CACHE, inherited by the commands the
    tests start), so that no module reads scores another module computed."""
    path = tmp_path_factory.mktemp("score-cache")
    before = os.environ.get("MAGPIE_TEACH_CACHE")
    os.environ["MAGPIE_TEACH_CACHE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("MAGPIE_TEACH_CACHE", None)
    else:
        os.environ["MAGPIE_TEACH_CACHE"] = before


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory):
    """The tiny models, built in the session's temporary folder; or, when $MAGPIE_TEACH_TEST_MODELS names a folder,
    built there once and reused by later sessions (`make mutation` runs a pytest session per mutant)."""
    from magpie_teach.tiny import build_tiny_suite

    root = os.environ.get("MAGPIE_TEACH_TEST_MODELS") or tmp_path_factory.mktemp("tiny-models")
    return build_tiny_suite(root, seed=0)


@pytest.fixture(scope="session")
def sample_path():
    from magpie_teach.artefacts import sample_responses_path

    return sample_responses_path()


@pytest.fixture(scope="session")
def sample_rows(sample_path):
    import pandas as pd

    return pd.read_json(sample_path, lines=True)


@pytest.fixture(scope="session")
def argilla_server(tmp_path_factory):
    """A real Argilla 2.8 server with a real Redis and the in-memory search engine, stopped by PID."""
    from tests.argilla_memory.server import start_argilla_server

    server = start_argilla_server(tmp_path_factory.mktemp("argilla"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ranked_sample(tmp_path_factory, tiny_suite, sample_path):
    """`rank` output of the shipped sample under the small tiny base model, with the tiny reward model."""
    from magpie_teach.ranking.rank import RankConfig, rank

    out = tmp_path_factory.mktemp("ranked")
    rank(
        RankConfig(
            data=sample_path, output_dir=str(out), base_models=[tiny_suite.base_small], reward_model=tiny_suite.reward
        )
    )
    return out


@pytest.fixture
def local_hub(tmp_path):
    """A fresh local Hub-compatible server (magpie-teach hub serve) on 127.0.0.1, stopped by PID."""
    from tests.hub.local import LocalHub

    hub = LocalHub(tmp_path / "hub").start()
    yield hub
    hub.stop()
