"""Publishing and consuming versioned data sets through the unmodified huggingface_hub and datasets
clients, against the project's local Hub-compatible server (a real process, real git, real LFS)."""

import json
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from tests.hub.local import cli, python

LOAD = """
import json, sys, datasets
ds = datasets.load_dataset({repo!r}, revision={revision!r}, split="train")
print(json.dumps(ds.to_pandas().to_dict("list"), default=str))
"""


def load(hub, repo, revision):
    out = python(LOAD.format(repo=repo, revision=revision), hub.env()).stdout
    return pd.DataFrame(json.loads(out.strip().splitlines()[-1]))


def read_remote(hub, repo, revision, path):
    code = f"from huggingface_hub import hf_hub_download; print(open(hf_hub_download({repo!r}, {path!r}, repo_type='dataset', revision={revision!r})).read())"
    return python(code, hub.env()).stdout


def test_push_is_one_tagged_commit_that_loads_back(local_hub, ranked_sample):
    result = cli("push", str(ranked_sample), "--repo-id", "lab/ranking", env=local_hub.env())
    assert result.returncode == 0, result.stderr
    assert "published ranking: lab/ranking tag v1.0.0 commit" in result.stdout
    commit = result.stdout.split("commit ")[1].split()[0]
    # one commit on top of the repo's initial one, and the tag is a real git ref pointing at it
    assert local_hub.git("lab/ranking", "rev-list", "--count", "main") == "2"
    assert local_hub.git("lab/ranking", "rev-parse", "v1.0.0^{commit}") == commit
    files = set(local_hub.git("lab/ranking", "ls-tree", "-r", "--name-only", commit).split())
    assert files == {".gitattributes", "README.md", "data/train-00000-of-00001.parquet",
                     "magpie_teach/rank_config.yaml", "magpie_teach/summary.json"}  # fmt: skip
    # the parquet went through LFS: git holds a pointer, the bytes are in the LFS store
    pointer = local_hub.git("lab/ranking", "cat-file", "-p", f"{commit}:data/train-00000-of-00001.parquet")
    assert pointer.startswith("version https://git-lfs.github.com/spec/v1")
    assert local_hub.stats()["lfs_uploads"] == 1

    expected = pd.read_csv(ranked_sample / "ranking.csv")
    loaded = load(local_hub, "lab/ranking", "v1.0.0")
    assert list(loaded.columns) == list(expected.columns)
    pd.testing.assert_series_equal(loaded["car"].astype(float), expected["car"], check_names=False)
    assert loaded["teacher"].tolist() == expected["teacher"].tolist()

    card = read_remote(local_hub, "lab/ranking", "v1.0.0", "README.md")
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "other" and front["size_categories"] == ["n<1K"]
    assert {"magpie-teach", "synthetic"} <= set(front["tags"])
    assert front["configs"][0]["data_files"][0]["path"] == "data/train-*"
    assert 'load_dataset("lab/ranking", revision="v1.0.0"' in card
    best = expected.sort_values("car", ascending=False).iloc[0]
    assert f"| {best['teacher']} |" in card and "@inproceedings{xu2025stronger" in card
    # the uncertainty travels with the ranking: intervals, p_best and rank's own sentences
    assert "| teacher | car | car_ci_low | car_ci_high | p_best |" in card
    assert f"| {best['teacher']} | {best['car']:.4g} | {best['car_ci_low']:.4g} | {best['car_ci_high']:.4g} |" in card
    summary = json.loads((ranked_sample / "summary.json").read_text())
    assert all(sentence in card for sentence in summary["confidence"]["sentences"])
    config = yaml.safe_load(read_remote(local_hub, "lab/ranking", "v1.0.0", "magpie_teach/rank_config.yaml"))
    assert config["beta"] == 3.0


def _folder_sha256(folder):
    """The published digest of a local model folder, computed here: its files' relative paths and contents."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def test_a_push_publishes_no_local_path_and_names_local_models_by_content(
    local_hub, ranked_sample, tiny_suite, sample_path
):
    """The publisher's disk layout stays home: the data, the card and the side files name a local model folder
    by its name and content hash, the data file by its name and hash; the local folder keeps its full paths."""
    import hashlib
    from pathlib import Path

    result = cli("push", str(ranked_sample), "--repo-id", "lab/private-paths", env=local_hub.env())
    assert result.returncode == 0, result.stderr
    local = [tiny_suite.base_small, tiny_suite.reward, str(sample_path), str(ranked_sample), str(Path.home())]
    base = f"{Path(tiny_suite.base_small).name}@sha256:{_folder_sha256(tiny_suite.base_small)}"
    reward = f"{Path(tiny_suite.reward).name}@sha256:{_folder_sha256(tiny_suite.reward)}"
    data = f"{Path(sample_path).name}@sha256:{hashlib.sha256(Path(sample_path).read_bytes()).hexdigest()[:12]}"
    texts = {}
    for path in ("README.md", "magpie_teach/rank_config.yaml", "magpie_teach/summary.json"):
        texts[path] = read_remote(local_hub, "lab/private-paths", "v1.0.0", path)
        assert not [p for p in local if p in texts[path]], path
    assert base in texts["README.md"] and reward in texts["README.md"]
    config = yaml.safe_load(texts["magpie_teach/rank_config.yaml"])
    assert config["base_models"] == [base] and config["reward_model"] == reward and config["data"] == data
    assert config["output_dir"] == ranked_sample.name
    loaded = load(local_hub, "lab/private-paths", "v1.0.0")
    assert set(loaded["base_model"]) == {base}
    assert set(pd.read_csv(ranked_sample / "ranking.csv")["base_model"]) == {tiny_suite.base_small}  # kept locally


def test_versions_are_immutable_and_reruns_do_not_republish(local_hub, ranked_sample, tmp_path):
    env = local_hub.env()
    assert cli("push", str(ranked_sample), "--repo-id", "lab/r", env=env).returncode == 0
    first = local_hub.git("lab/r", "rev-parse", "v1.0.0^{commit}")

    again = cli("push", str(ranked_sample), "--repo-id", "lab/r", env=env)
    assert again.returncode == 0 and "already published, unchanged: ranking: lab/r tag v1.0.0" in again.stdout
    assert local_hub.git("lab/r", "rev-list", "--count", "main") == "2"

    same_tag = cli("push", str(ranked_sample), "--repo-id", "lab/r", "--tag", "v1.0.0", env=env)
    assert same_tag.returncode == 0 and "already published, unchanged" in same_tag.stdout, same_tag.stderr

    changed = tmp_path / "changed"
    shutil.copytree(ranked_sample, changed)
    ranking = pd.read_csv(changed / "ranking.csv")
    ranking.head(1).to_csv(changed / "ranking.csv", index=False)
    (changed / "manifest.json").unlink()  # edited by hand: no longer the run its manifest describes
    refused = cli("push", str(changed), "--repo-id", "lab/r", "--tag", "v1.0.0", env=env)
    assert refused.returncode == 2 and "tag v1.0.0 already exists" in refused.stderr
    assert "--overwrite" in refused.stderr
    assert local_hub.git("lab/r", "rev-list", "--count", "main") == "2"
    second = cli("push", str(changed), "--repo-id", "lab/r", env=env)
    assert second.returncode == 0 and "tag v1.1.0" in second.stdout, second.stderr
    assert len(load(local_hub, "lab/r", "v1.0.0")) == len(ranking)  # the old version still reads the old bytes
    assert len(load(local_hub, "lab/r", "v1.1.0")) == 1
    assert local_hub.git("lab/r", "rev-parse", "v1.0.0^{commit}") == first

    moved = cli("push", str(changed), "--repo-id", "lab/r", "--tag", "v1.0.0", "--overwrite", env=env)
    assert moved.returncode == 0, moved.stderr
    assert local_hub.git("lab/r", "rev-parse", "v1.0.0^{commit}") != first


@pytest.mark.parametrize(
    "args, edit, message",
    [
        (["--repo-id", "not-a-repo-id"], None, "expected ORG/NAME"),
        (["--repo-id", "lab/bad..name"], None, "--repo-id 'lab/bad..name'"),
        (["--repo-id", "lab/x", "--tag", "v 1"], None, "--tag 'v 1'"),
        (["--repo-id", "lab/x"], "config", "missing base_models"),
        (["--repo-id", "lab/x"], "data", "ranking.csv is missing"),
    ],
)
def test_bad_input_fails_before_any_upload(local_hub, ranked_sample, tmp_path, args, edit, message):
    source = tmp_path / "src"
    shutil.copytree(ranked_sample, source)
    if edit == "config":
        config = yaml.safe_load((source / "rank_config.yaml").read_text())
        config["base_models"] = []
        (source / "rank_config.yaml").write_text(yaml.safe_dump(config))
    elif edit == "data":
        (source / "ranking.csv").unlink()
    (source / "manifest.json").unlink(missing_ok=True)  # edited by hand: these are the checks before the manifest's
    before = sorted(p.name for p in source.iterdir())
    result = cli("push", str(source), *args, env=local_hub.env())
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert local_hub.stats() | {"root": None} == {"lfs_uploads": 0, "commits": 0, "root": None}
    assert not (local_hub.root / "repos" / "datasets" / "lab").exists()  # not even the repo was created
    assert sorted(p.name for p in source.iterdir()) == before


def test_token_never_appears_in_output_files_or_server_log(local_hub, ranked_sample):
    token = "hf_magpieSECRETtoken0123456789abcdef"
    env = local_hub.env(HF_TOKEN=token)
    outputs = [cli("-v", "push", str(ranked_sample), "--repo-id", "lab/secret", env=env),
               cli("-v", "push", str(ranked_sample), "--repo-id", "lab/secret", "--tag", "v1.0.0", "--kind", "scores", env=env),
               cli("-v", "push", str(ranked_sample), "--repo-id", "lab/secret", "--kind", "scores", env=env)]  # fmt: skip
    assert outputs[0].returncode == 0 and outputs[1].returncode == 2
    for result in outputs:
        assert token not in result.stdout + result.stderr
    local_hub.stop()
    assert token not in local_hub.log.read_text()
    for path in local_hub.root.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    for path in ranked_sample.rglob("*"):
        assert not path.is_file() or token.encode() not in path.read_bytes()


def test_a_500_on_the_commit_leaves_the_last_version_and_a_rerun_finishes(local_hub, ranked_sample, tmp_path):
    env = local_hub.env()
    assert cli("push", str(ranked_sample), "--repo-id", "lab/f", env=env).returncode == 0
    head = local_hub.git("lab/f", "rev-parse", "main")
    changed = tmp_path / "changed"
    shutil.copytree(ranked_sample, changed)
    pd.read_csv(changed / "ranking.csv").head(2).to_csv(changed / "ranking.csv", index=False)
    (changed / "manifest.json").unlink()  # edited by hand: no longer the run its manifest describes

    local_hub.fault(r"^POST /api/datasets/lab/f/commit/", status=500, message="simulated outage")
    failed = cli("push", str(changed), "--repo-id", "lab/f", env=env)
    assert failed.returncode == 2 and "HTTP 500" in failed.stderr and "Rerun the same command" in failed.stderr
    assert local_hub.git("lab/f", "rev-parse", "main") == head  # nothing half-published
    assert "v1.1.0" not in local_hub.git("lab/f", "tag")
    uploads = local_hub.stats()["lfs_uploads"]
    assert uploads == 2  # v1.0.0's parquet, then the changed one before the commit failed

    finished = cli("push", str(changed), "--repo-id", "lab/f", env=env)
    assert finished.returncode == 0 and "tag v1.1.0" in finished.stdout, finished.stderr
    assert local_hub.stats()["lfs_uploads"] == uploads  # the uploaded object was not sent again
    assert len(load(local_hub, "lab/f", "v1.1.0")) == 2 and len(load(local_hub, "lab/f", "v1.0.0")) > 2


def test_server_killed_mid_push_then_rerun_finishes_without_duplicates(local_hub, ranked_sample):
    env = local_hub.env()
    local_hub.fault(r"^POST /api/datasets/lab/k/commit/", delay=30)
    push = subprocess.Popen([sys.executable, "-m", "magpie_teach.cli", "push", str(ranked_sample), "--repo-id", "lab/k"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while local_hub.stats()["lfs_uploads"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the client is now waiting on the stalled commit
    local_hub.kill()
    _, err = push.communicate(timeout=120)
    assert push.returncode == 2 and "Rerun the same command" in err, err
    assert local_hub.git("lab/k", "rev-list", "--count", "main") == "1"  # only the initial commit

    local_hub.start()  # same root, a new process
    rerun = cli("push", str(ranked_sample), "--repo-id", "lab/k", env=local_hub.env())
    assert rerun.returncode == 0, rerun.stderr
    assert local_hub.stats()["lfs_uploads"] == 0  # the parquet stored before the kill was reused
    objects = list((local_hub.root / "lfs").glob("??/??/*"))
    assert len(objects) == 1
    assert local_hub.git("lab/k", "rev-list", "--count", "main") == "2"


def test_stale_parent_commit_is_refused_with_412(local_hub):
    code = """
from huggingface_hub import HfApi, CommitOperationAdd
from huggingface_hub.errors import HfHubHTTPError
api = HfApi()
api.create_repo("lab/p", repo_type="dataset")
first = api.repo_info("lab/p", repo_type="dataset").sha
api.create_commit("lab/p", [CommitOperationAdd("a.txt", b"a")], commit_message="a", repo_type="dataset", parent_commit=first)
try:
    api.create_commit("lab/p", [CommitOperationAdd("b.txt", b"b")], commit_message="b", repo_type="dataset", parent_commit=first)
except HfHubHTTPError as err:
    print("status", err.response.status_code)
"""
    assert "status 412" in python(code, local_hub.env()).stdout


def test_hub_errors_map_to_the_clients_exceptions(local_hub):
    code = """
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError
api = HfApi()
api.create_repo("lab/e", repo_type="dataset")
for call, kind in ((lambda: api.dataset_info("lab/missing"), RepositoryNotFoundError),
                   (lambda: api.dataset_info("lab/e", revision="v9"), RevisionNotFoundError),
                   (lambda: hf_hub_download("lab/e", "nope.txt", repo_type="dataset"), EntryNotFoundError)):
    try:
        call()
    except kind:
        print("ok", kind.__name__)
"""
    out = python(code, local_hub.env()).stdout
    assert out.count("ok ") == 3, out


@pytest.mark.slow
def test_rank_reads_a_hub_revision_and_records_its_commit(local_hub, tiny_suite, sample_rows, tmp_path):
    env = local_hub.env()
    data = tmp_path / "responses.parquet"
    sample_rows.to_parquet(data, index=False)
    code = f"""
from huggingface_hub import HfApi
api = HfApi()
api.create_repo("lab/responses", repo_type="dataset")
info = api.upload_file(path_or_fileobj={str(data)!r}, path_in_repo="data/train-00000-of-00001.parquet", repo_id="lab/responses", repo_type="dataset")
api.create_tag("lab/responses", tag="v1.0.0", repo_type="dataset")
api.upload_file(path_or_fileobj=b"later", path_in_repo="later.txt", repo_id="lab/responses", repo_type="dataset")
print(info.oid)
"""
    commit = python(code, env).stdout.strip().splitlines()[-1]
    out = tmp_path / "rank"
    result = cli("rank", "--data", "lab/responses", "--revision", "v1.0.0", "--base-model", tiny_suite.base_small,
                 "--reward-model", tiny_suite.reward, "--output", str(out), env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    recorded = yaml.safe_load((out / "rank_config.yaml").read_text())
    assert recorded["revision"] == commit != local_hub.git("lab/responses", "rev-parse", "main")
    assert json.loads((out / "summary.json").read_text())["resolved_revision"] == commit
    ranking = pd.read_csv(out / "ranking.csv")
    assert sorted(ranking["teacher"]) == sorted(sample_rows["teacher"].unique())


def start_olah(tmp_path, mirrors):
    """olah (an independent Hub mirror, its own venv: `make olah`) serving MIRRORS offline; stopped by PID."""
    import socket

    from tests.conftest import REPO

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{tmp_path / "olah-cache"}"\n'
        f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
        f'mirrors-path = ["{mirrors}"]\n\n[accessibility]\noffline = true\n'
    )
    binary = REPO / ".olah-venv" / "bin" / "olah-cli"
    assert binary.exists(), "olah is not installed: run `make olah` (make test does)"
    log = open(tmp_path / "olah.log", "w")
    process = subprocess.Popen([str(binary), "-c", str(config), "--log-path", str(tmp_path / "olah-logs")],
                               cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "olah.log").read_text()[-2000:]) from None
            time.sleep(0.2)


def test_what_push_publishes_reads_the_same_through_olah(local_hub, ranked_sample, tmp_path):
    """The repos are plain git + standard LFS pointers: an independent server (olah, offline mode, serving a
    clone of them) gives the datasets client the same rows at the same tag."""
    assert cli("push", str(ranked_sample), "--repo-id", "lab/olah", env=local_hub.env()).returncode == 0
    clone = tmp_path / "mirrors" / "datasets" / "lab" / "olah"
    subprocess.run(["git", "clone", "-q", str(local_hub.root / "repos" / "datasets" / "lab" / "olah.git"), str(clone)],
                   check=True)  # fmt: skip
    for obj in (local_hub.root / "lfs").glob("??/??/*"):  # git lfs's own layout inside the clone
        target = clone / ".git" / "lfs" / "objects" / obj.name[:2] / obj.name[2:4] / obj.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(obj, target)
    process, url = start_olah(tmp_path, tmp_path / "mirrors")
    try:
        env = {**local_hub.env(), "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "olah-client")}
        code = LOAD.format(repo="lab/olah", revision="v1.0.0")
        through_olah = pd.DataFrame(json.loads(python(code, env).stdout.strip().splitlines()[-1]))
    finally:
        process.terminate()
        process.wait(timeout=10)
    expected = pd.read_csv(ranked_sample / "ranking.csv")
    assert through_olah["teacher"].tolist() == expected["teacher"].tolist()
    pd.testing.assert_series_equal(through_olah["car"].astype(float), expected["car"], check_names=False)


@pytest.mark.real_hub
def test_push_to_the_real_hub(ranked_sample):
    """Opt-in (`make test-real-hub`): needs HF_TOKEN with write access and MAGPIE_TEACH_TEST_ORG."""
    import os
    import uuid

    org = os.environ["MAGPIE_TEACH_TEST_ORG"]
    repo = f"{org}/magpie-teach-ci-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT")}
    result = cli("push", str(ranked_sample), "--repo-id", repo, "--private", env=env)
    assert result.returncode == 0 and "tag v1.0.0" in result.stdout, result.stderr
    assert os.environ["HF_TOKEN"] not in result.stdout + result.stderr
    loaded = pd.DataFrame(
        json.loads(python(LOAD.format(repo=repo, revision="v1.0.0"), env).stdout.strip().splitlines()[-1])
    )
    assert loaded["teacher"].tolist() == pd.read_csv(ranked_sample / "ranking.csv")["teacher"].tolist()
    python(f"from huggingface_hub import HfApi; HfApi().delete_repo({repo!r}, repo_type='dataset')", env)


def test_select_push_to_hub_publishes_sft_data_with_its_command(local_hub, ranked_sample, tmp_path):
    out = tmp_path / "sft"
    args = ["select", "--scores", str(ranked_sample), "--strategy", "best-of-n", "--output", str(out),
            "--push-to-hub", "lab/sft", "--hub-tag", "v0.1.0"]  # fmt: skip
    result = cli(*args, env=local_hub.env())
    assert result.returncode == 0 and "published sft: lab/sft tag v0.1.0" in result.stdout, result.stderr
    assert json.loads((out / "command.json").read_text())["argv"] == args
    expected = pd.read_parquet(out / "data" / "train-00000-of-00001.parquet")
    code = (
        "import datasets; ds = datasets.load_dataset('lab/sft', revision='v0.1.0', split='train'); "
        "print(ds.num_rows, ds[0]['messages'][0]['role'], ds[0]['messages'][1]['content'] == "
        f"{expected['messages'][0][1]['content']!r})"
    )
    assert python(code, local_hub.env()).stdout.split()[-3:] == [str(len(expected)), "user", "True"]
    card = read_remote(local_hub, "lab/sft", "v0.1.0", "README.md")
    assert "magpie-teach select --scores" in card and "--push-to-hub lab/sft" in card
    assert "| teacher | rows |" in card


def test_select_reads_published_scores_by_tag_and_records_the_commit(local_hub, ranked_sample, tiny_suite, tmp_path):
    env = local_hub.env()
    pushed = cli("push", str(ranked_sample), "--repo-id", "lab/scores", "--kind", "scores", env=env)
    assert pushed.returncode == 0, pushed.stderr
    commit = local_hub.git("lab/scores", "rev-parse", "v1.0.0^{commit}")
    out = tmp_path / "sft"
    result = cli("select", "--scores", "lab/scores", "--revision", "v1.0.0", "--strategy", "best-of-n",
                 "--output", str(out), env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    local = tmp_path / "sft-local"
    assert (
        cli(
            "select", "--scores", str(ranked_sample), "--strategy", "best-of-n", "--output", str(local), env=env
        ).returncode
        == 0
    )
    from pathlib import Path

    from_hub = pd.read_parquet(out / "data" / "train-00000-of-00001.parquet")
    expected = pd.read_parquet(local / "data" / "train-00000-of-00001.parquet")
    # the published scores name the local base model by its name and content hash, the local ones by its path
    expected["base_model"] = expected["base_model"].replace(
        tiny_suite.base_small, f"{Path(tiny_suite.base_small).name}@sha256:{_folder_sha256(tiny_suite.base_small)}"
    )
    pd.testing.assert_frame_equal(from_hub, expected)
    assert yaml.safe_load((out / "select_config.yaml").read_text())["revision"] == commit
    assert json.loads((out / "selection_summary.json").read_text())["scores_revision"] == commit


def test_evaluate_push_to_hub_publishes_the_judgements_with_the_win_rates_on_the_card(local_hub, tiny_suite, tmp_path):
    """`evaluate --push-to-hub` (a reward model judging, the baseline's answers from a file): the judgements load
    back as the data set; the card names the judge, the baseline and the prompts and tabulates the win rates; the
    performance table travels beside them."""
    from magpie_teach.evaluation.evaluate import load_prompts

    prompts = load_prompts(None).head(4)
    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text("".join(json.dumps({"id": i, "response": "Blue."}) + "\n" for i in prompts["id"]))
    prompts_file = tmp_path / "prompts.jsonl"
    prompts.to_json(prompts_file, orient="records", lines=True)
    out = tmp_path / "evaluate"
    args = ["evaluate", "--student", f"tiny-s={tiny_suite.base_small}", "--baseline-answers", str(baseline),
            "--judge-reward-model", tiny_suite.reward, "--prompts", str(prompts_file), "--max-new-tokens", "4",
            "--bootstrap", "50", "--output", str(out), "--push-to-hub", "lab/evaluation"]  # fmt: skip
    result = cli(*args, env=local_hub.env())
    assert result.returncode == 0 and "published evaluation: lab/evaluation tag v1.0.0" in result.stdout, result.stderr
    expected = pd.read_parquet(out / "judgements.parquet")
    loaded = load(local_hub, "lab/evaluation", "v1.0.0")
    assert loaded["id"].tolist() == expected["id"].tolist()
    assert loaded["preference"].astype(float).round(12).tolist() == expected["preference"].round(12).tolist()
    card = read_remote(local_hub, "lab/evaluation", "v1.0.0", "README.md")
    rates = pd.read_csv(out / "win_rates.csv")
    row = rates.iloc[0]
    cells = " | ".join(f"{row[c]:.4g}" for c in ("win_rate", "win_rate_low", "win_rate_high", "lc_win_rate"))
    assert f"| tiny-s | 4 | 0 | {cells} |" in card
    assert "reward model `" in card and "baseline.jsonl" in card and "prompts.jsonl" in card and "(4)" in card
    performance = pd.read_csv(read_remote_path(local_hub, "lab/evaluation", "v1.0.0", "magpie_teach/performance.csv"))
    assert performance["ap"].tolist() == pytest.approx(pd.read_csv(out / "performance.csv")["ap"].tolist())


def read_remote_path(hub, repo, revision, path):
    code = f"from huggingface_hub import hf_hub_download; print(hf_hub_download({repo!r}, {path!r}, repo_type='dataset', revision={revision!r}))"
    return python(code, hub.env()).stdout.strip().splitlines()[-1]


EVERY_STRING = """
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
from huggingface_hub import snapshot_download
folder = Path(snapshot_download({repo!r}, repo_type="dataset", revision={revision!r}))
out = []
for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    name = str(path.relative_to(folder))
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        out.append([name + " (metadata)", json.dumps({{k.decode(): v.decode() for k, v in (table.schema.metadata or {{}}).items()}})])
        for column in table.column_names:
            out.append([name + ":" + column, json.dumps(table.column(column).to_pylist(), default=str)])
    else:
        out.append([name, path.read_text(errors="replace")])
print(json.dumps(out))
"""


def _every_published_string(hub, repo, revision):
    """(file or file:column, text) for every file of the published commit: texts whole, parquet files decoded
    column by column with their schema metadata (compressed bytes would hide a path)."""
    return json.loads(python(EVERY_STRING.format(repo=repo, revision=revision), hub.env()).stdout.splitlines()[-1])


def test_no_kind_publishes_a_local_path_and_a_local_name_still_selects_after_the_round_trip(
    local_hub, ranked_sample, tiny_suite, tmp_path
):
    """Scores, ranking, SFT data chosen by CAR (its decision rides in the parquet's metadata) and an evaluation
    against a local baseline model: every file, column and metadata field of every published commit is searched
    for this machine's paths; then `select` names the base model as the user did locally, on the published scores."""
    from pathlib import Path

    env = local_hub.env()
    sft, evaluation = tmp_path / "sft", tmp_path / "evaluate"
    assert cli("select", "--scores", str(ranked_sample), "--output", str(sft), env=env).returncode == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "instruction": f"Name a colour {i}."}) + "\n" for i in range(3))
    )
    result = cli("evaluate", "--student", f"tiny-s={tiny_suite.base_small}", "--baseline", tiny_suite.base_medium,
                 "--judge-reward-model", tiny_suite.reward, "--prompts", str(prompts), "--max-new-tokens", "4",
                 "--bootstrap", "20", "--output", str(evaluation), env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    pushes = [(ranked_sample, "lab/p-scores", "scores"), (ranked_sample, "lab/p-ranking", "ranking"),
              (sft, "lab/p-sft", "sft"), (evaluation, "lab/p-evaluation", "evaluation")]  # fmt: skip
    local = [str(tiny_suite.base_small), str(tiny_suite.base_medium), str(tiny_suite.reward), str(tmp_path),
             str(ranked_sample), str(Path.home())]  # fmt: skip
    for source, repo, kind in pushes:
        pushed = cli("push", str(source), "--repo-id", repo, "--kind", kind, env=env)
        assert pushed.returncode == 0, pushed.stderr
        for where, text in _every_published_string(local_hub, repo, "v1.0.0"):
            assert not [p for p in local if p in text], (kind, where, [p for p in local if p in text])
    # the name the user gave (the local folder's name) selects the same rows from the published scores
    name = Path(tiny_suite.base_small).name
    again = cli("select", "--scores", "lab/p-scores", "--base-model", name, "--strategy", "best-of-n",
                "--output", str(tmp_path / "sft-hub"), env=env)  # fmt: skip
    assert again.returncode == 0, again.stderr
    mine = cli("select", "--scores", str(ranked_sample), "--base-model", name, "--strategy", "best-of-n",
               "--output", str(tmp_path / "sft-local"), env=env)  # fmt: skip
    assert mine.returncode == 0, mine.stderr
    hub_rows = pd.read_parquet(tmp_path / "sft-hub" / "data" / "train-00000-of-00001.parquet")
    local_rows = pd.read_parquet(tmp_path / "sft-local" / "data" / "train-00000-of-00001.parquet")
    assert hub_rows[["id", "teacher"]].values.tolist() == local_rows[["id", "teacher"]].values.tolist()


def test_push_refuses_a_file_linked_from_outside_the_folder(local_hub, ranked_sample, tmp_path):
    """A symlink in the folder would publish whatever it points at (here a private file next to the folder): push
    refuses it in one line before anything is uploaded."""
    source = tmp_path / "src"
    shutil.copytree(ranked_sample, source)
    secret = tmp_path / "private.json"
    secret.write_text('{"api_key": "not for publishing"}')
    (source / "summary.json").unlink()
    (source / "summary.json").symlink_to(secret)
    (source / "manifest.json").unlink()  # edited by hand
    result = cli("push", str(source), "--repo-id", "lab/linked", env=local_hub.env())
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{source / 'summary.json'}: a symbolic link to {secret}" in result.stderr
    assert local_hub.stats() | {"root": None} == {"lfs_uploads": 0, "commits": 0, "root": None}


def test_a_push_whose_tag_is_refused_says_its_commit_was_published_and_a_rerun_tags_it(local_hub, ranked_sample):
    """The loser of two concurrent pushes: its commit made it to main, its tag did not (409, as when the other push
    took it). The message says what was published; the rerun tags that commit without committing again."""
    env = local_hub.env()
    local_hub.fault(r"^POST /api/datasets/lab/t/tag/", status=409, message="tag already exists")
    failed = cli("push", str(ranked_sample), "--repo-id", "lab/t", env=env)
    head = local_hub.git("lab/t", "rev-parse", "main")
    assert failed.returncode == 2 and "Nothing was published" not in failed.stderr, failed.stderr
    assert (
        f"the files were committed to main (commit {head[:12]}), but tag v1.0.0 could not be created" in failed.stderr
    )
    assert local_hub.git("lab/t", "tag") == ""
    rerun = cli("push", str(ranked_sample), "--repo-id", "lab/t", env=env)
    assert rerun.returncode == 0 and f"tag v1.0.0 commit {head}" in rerun.stdout, rerun.stderr
    assert local_hub.git("lab/t", "rev-parse", "main") == head  # tagged, not committed again
