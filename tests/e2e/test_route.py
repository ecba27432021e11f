"""`magpie-teach route` end to end on tiny models: a replay on a pool with planted per-category best teachers
(its figures against an independent computation), the router applied by a routed `generate` (each instruction
written once, by the teacher the router's weights choose) and taken by `select --strategy routed`; and probe ->
route -> routed generate -> select, where routing falls back to the single best teacher."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.e2e.test_probe import stored_rows

TOPICS = ["sorting", "parsing dates", "reading files", "graphs", "caching", "regular expressions", "sockets", "json",
          "threads", "matrices"]  # fmt: skip
ERAS = ["Roman empire", "Ming dynasty", "Industrial Revolution", "Renaissance", "Cold War", "Aztec empire",
        "Viking age", "Meiji era", "Bronze age", "Ottoman empire"]  # fmt: skip
TEACHERS = ("coder", "historian", "generalist")


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magpie_teach.cli", *args], capture_output=True, text=True, **kwargs)


def planted_pool(path: Path, n: int = 60) -> pd.DataFrame:
    """Code and history instructions, alternating; the coder's reward is high on code, the historian's on history,
    the generalist's in between everywhere (the single best teacher loses half the instructions)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        code = i % 2 == 0
        text = (f"Write a Python function for {TOPICS[i % 10]} number {i}." if code
                else f"Tell me about the history of the {ERAS[i % 10]}, part {i}.")  # fmt: skip
        for teacher in TEACHERS:
            good = (teacher == "coder") == code
            reward = 2.8 if teacher == "generalist" else (5.0 if good else 1.0)
            rows.append({"id": f"q{i:03d}", "instruction": text, "teacher": teacher,
                         "response": f"{teacher} answers {i}.", "reward": reward + rng.normal(0, 0.2)})  # fmt: skip
    frame = pd.DataFrame(rows)
    frame.to_json(path, orient="records", lines=True)
    return frame


def features_by_hand(model_path: str, texts: list[str]) -> np.ndarray:
    """The base model's features of each instruction, computed by the scorer directly (no executor, no cache)."""
    from transformers import AutoModelForCausalLM

    from magpie_teach.modeling import load_tokenizer
    from magpie_teach.scoring.features import COLUMNS, score_instruction_features

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    features = score_instruction_features(model, load_tokenizer(model_path), texts, show_progress=False)
    return features[COLUMNS].to_numpy(float)


def choices_by_hand(router: pd.DataFrame, features: np.ndarray) -> np.ndarray:
    """The teacher router.parquet's ridge heads predict best for each row of FEATURES, by hand."""
    mean, scale = np.asarray(router["feature_mean"].iloc[0]), np.asarray(router["feature_scale"].iloc[0])
    weights = np.array([np.asarray(w) for w in router["weights"]]).T  # features + 1 x teachers
    predicted = np.hstack([(features - mean) / scale, np.ones((len(features), 1))]) @ weights
    return router["teacher"].to_numpy()[predicted.argmax(axis=1)]


@pytest.fixture(scope="module")
def replayed(tmp_path_factory, tiny_suite):
    folder = tmp_path_factory.mktemp("route")
    pool = planted_pool(folder / "pool.jsonl")
    result = cli("route", "--replay", str(folder / "pool.jsonl"), "--reward-column", "reward", "--base-model",
                 tiny_suite.base_small, "--seed-instructions", "30", "--output", str(folder / "router"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    return folder, pool, result.stdout


def test_a_replay_on_planted_categories_routes_and_its_figures_match_an_independent_computation(replayed, tiny_suite):
    from magpie_teach.ranking.rank import RankConfig, rank

    folder, pool, stdout = replayed
    summary = json.loads((folder / "router" / "route_summary.json").read_text())
    (entry,) = summary["base_models"]
    # the targets: per example reward / (1 + 3 * compat_loss), the losses from an independent `rank` of the pool
    rank(RankConfig(data=str(folder / "pool.jsonl"), output_dir=str(folder / "rank"), reward_column="reward",
                    base_models=[tiny_suite.base_small], bootstrap=0))  # fmt: skip
    scores = pd.read_parquet(folder / "rank" / "scores.parquet")
    expected = scores.assign(target=scores["reward"] / (1 + 3.0 * scores["compat_loss"]))
    targets = pd.read_parquet(folder / "router" / "route_targets.parquet")
    merged = targets.merge(expected[["id", "teacher", "target"]], on=["id", "teacher"], suffixes=("", "_hand"))
    assert len(merged) == len(pool) == 180
    np.testing.assert_allclose(merged["target"], merged["target_hand"], rtol=1e-9)
    table = merged.pivot_table(index="id", columns="teacher", values="target_hand")
    roles = merged.drop_duplicates("id").set_index("id")["role"]
    seed, held = table[roles.loc[table.index] == "seed"], table[roles.loc[table.index] == "held_out"]
    assert (len(seed), len(held)) == (30, 30) and entry["n_seed"] == 30 and entry["n_held_out"] == 30
    single = seed.mean().idxmax()
    assert entry["single_teacher"] == single
    assert entry["score_single"] == pytest.approx(held[single].mean(), rel=1e-9)
    assert entry["score_oracle"] == pytest.approx(held.max(axis=1).mean(), rel=1e-9)
    assert entry["spend"] == pytest.approx((30 * 3 + 30) / (60 * 3))
    # routed: the held-out instructions sent where router.parquet's weights say, on features computed by hand
    assert entry["routed"] and entry["gain_interval"][0] > 0
    router = pd.read_parquet(folder / "router" / "router.parquet")
    texts = pool.drop_duplicates("id").set_index("id").loc[held.index, "instruction"].tolist()
    chosen = choices_by_hand(router, features_by_hand(tiny_suite.base_small, texts))
    routed = held.to_numpy()[np.arange(len(held)), [list(held.columns).index(t) for t in chosen]]
    assert entry["score_routed"] == pytest.approx(routed.mean(), rel=1e-9)
    closed = (entry["score_routed"] - entry["score_single"]) / (entry["score_oracle"] - entry["score_single"])
    assert entry["gap_closed"] == pytest.approx(closed) and closed >= 0.5
    assert "held out (30 instructions)" in stdout and "routing beats the single best teacher" in stdout


def routed_config(folder: Path, tiny_suite, instructions: str, router: str, out: Path) -> Path:
    models = {"coder": tiny_suite.base_small, "historian": tiny_suite.base_medium, "generalist": tiny_suite.base_large}
    config = {
        "output_dir": str(out),
        "instructions": {"path": instructions, "column": "instruction"},
        "teachers": [
            {"name": name, "model": model, "sampling": {"temperature": 0.0, "max_new_tokens": 6}}
            for name, model in models.items()
        ],  # fmt: skip
        "routing": {"router": router},
        "batch_size": 8,
    }
    path = folder / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_routed_generate_writes_each_instruction_once_by_the_router_s_choice_and_select_takes_it(
    replayed, tiny_suite
):
    folder, pool, _ = replayed
    out = folder / "routed"
    config = routed_config(folder, tiny_suite, str(folder / "pool.jsonl"), str(folder / "router"), out)
    result = cli("generate", str(config))
    assert result.returncode == 0, result.stderr
    responses = pd.read_parquet(out / "responses.parquet")
    routing = pd.read_csv(out / "routing.csv")
    assert responses.groupby("instruction").size().eq(1).all() and len(responses) == 60  # each written once
    texts = list(dict.fromkeys(pool["instruction"]))
    router = pd.read_parquet(folder / "router" / "router.parquet")
    by_hand = dict(zip(texts, choices_by_hand(router, features_by_hand(tiny_suite.base_small, texts))))
    assert (responses["teacher"] == responses["instruction"].map(by_hand)).all()
    assert set(routing["how"]) == {"routed"} and len(routing) == 60
    summary = json.loads((out / "summary.json").read_text())
    counts = responses["teacher"].value_counts().to_dict()
    assert summary["routing"]["rows_per_teacher"] == counts and summary["routing"]["how"] == "router"
    assert {t: s["rows"] for t, s in summary["teachers"].items() if s["rows"]} == counts
    assert all(s["missing"] == 0 for s in summary["teachers"].values())
    # nothing else was generated: the store holds the routed rows alone, and each teacher was asked only for its own
    stored, distinct = stored_rows(out / "store")
    assert stored == len(distinct) == 60
    assert {t: n for t, n in summary["remaining"].items() if n} == counts
    # the code instructions mostly go to the coder, the history ones to the historian
    code = responses["instruction"].str.startswith("Write")
    assert (responses.loc[code, "teacher"] == "coder").mean() > 0.8
    assert (responses.loc[~code, "teacher"] == "historian").mean() > 0.8

    again = cli("generate", str(config))  # resumable: nothing is left to generate
    assert again.returncode == 0 and "0 instruction(s) to generate" in again.stdout
    assert pd.read_parquet(out / "responses.parquet").equals(responses)

    selected = cli("select", "--scores", str(out), "--strategy", "routed", "--keep-capped", "--output",
                   str(folder / "sft"))  # fmt: skip
    assert selected.returncode == 0, selected.stderr
    sft = pd.read_parquet(folder / "sft" / "data" / "train-00000-of-00001.parquet")
    assert len(sft) == 60 and sft["teacher"].value_counts().to_dict() == counts
    record = sft.set_index("id").loc[responses["id"].iloc[0]]
    assert record["messages"][1]["content"] == responses["response"].iloc[0]
    about = json.loads((folder / "sft" / "selection_summary.json").read_text())["routing"]
    assert "routing beats the single best teacher" in about["decision"]

    from magpie_teach.hub.publish import stage

    card = stage(out, "responses", "lab/routed", "v1.0.0", "apache-2.0", folder / "card")["README.md"].read_text()
    assert "each written by the one teacher it was routed to" in card and "| coder | " in card
    assert str(folder) not in card


def test_a_router_folder_publishes_with_a_card_of_its_decisions(replayed):
    from magpie_teach.hub.publish import stage

    folder, _, _ = replayed
    files = stage(folder / "router", "router", "lab/router", "v1.0.0", "apache-2.0", folder / "router-card")
    card = files["README.md"].read_text()
    assert "| yes | coder |" in card or "| yes | historian |" in card or "| yes | generalist |" in card
    assert "Replay on held-out instructions" in card and str(folder) not in card
    assert {"magpie_teach/route_summary.json", "magpie_teach/route_targets.parquet"} <= set(files)
    published = pd.read_parquet(files["data/train-00000-of-00001.parquet"])
    assert len(published) == 3 and len(published["weights"].iloc[0]) == 65


def test_a_router_pushed_to_the_hub_routes_select_with_the_local_copy_of_its_base_model(replayed, tiny_suite,
                                                                                          local_hub):  # fmt: skip
    """The router was learnt on a local model, so the Hub knows its base model as NAME@sha256:DIGEST: `select
    --routing ORG/NAME` finds it from the scores' own base model (the local copy, its files checked against the
    digest) and picks each instruction's routed response, as the weights read back from the Hub say."""
    from magpie_teach.ranking.rank import RankConfig, rank

    folder, pool, _ = replayed
    pushed = cli("push", str(folder / "router"), "--repo-id", "lab/router", env=local_hub.env())
    assert pushed.returncode == 0, pushed.stderr
    rank(RankConfig(data=str(folder / "pool.jsonl"), output_dir=str(folder / "rank-hub"), reward_column="reward",
                    base_models=[tiny_suite.base_small], bootstrap=0))  # fmt: skip
    result = cli("select", "--scores", str(folder / "rank-hub"), "--strategy", "routed", "--routing", "lab/router",
                 "--routing-revision", "v1.0.0", "--keep-truncated", "--output", str(folder / "sft-hub"),
                 env=local_hub.env())  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((folder / "sft-hub" / "selection_summary.json").read_text())
    assert summary["routing"]["source"].startswith("lab/router@") and "@sha256:" in summary["routing"]["base_model"]
    router = pd.read_parquet(folder / "router" / "router.parquet")
    texts = list(dict.fromkeys(pool["instruction"]))
    by_hand = dict(zip(texts, choices_by_hand(router, features_by_hand(tiny_suite.base_small, texts))))
    ids = pool.drop_duplicates("id").set_index("id")["instruction"]
    sft = pd.read_parquet(folder / "sft-hub" / "data" / "train-00000-of-00001.parquet")
    assert len(sft) == 60 and (sft["teacher"] == sft["id"].map(ids).map(by_hand)).all()
    missing = cli("select", "--scores", str(folder / "rank-hub"), "--strategy", "routed", "--routing", "lab/nothing",
                  "--output", str(folder / "sft-none"), env=local_hub.env())  # fmt: skip
    assert missing.returncode != 0 and "lab/nothing: no such data set on the Hub" in missing.stderr


def test_a_published_base_model_name_needs_the_local_copy_with_the_same_files(tiny_suite):
    from magpie_teach.artefacts import public_name
    from magpie_teach.errors import ConfigError, DataError
    from magpie_teach.scoring.routing import feature_model

    name = public_name(tiny_suite.base_small)
    assert feature_model(name, tiny_suite.base_small) == tiny_suite.base_small
    assert feature_model("Qwen/Qwen2.5-3B", None) == "Qwen/Qwen2.5-3B"
    with pytest.raises(ConfigError, match="give the path of your copy"):
        feature_model(name, None)
    with pytest.raises(DataError, match="are not those of the model the router learnt on"):
        feature_model(name.split("@")[0] + "@sha256:000000000000", tiny_suite.base_small)


def test_routing_errors_are_one_line(replayed, tmp_path, tiny_suite):
    folder, _, _ = replayed
    ids = tmp_path / "assign.csv"
    pd.DataFrame({"id": ["a"], "teacher": ["coder"]}).to_csv(ids, index=False)
    config = routed_config(tmp_path, tiny_suite, str(folder / "pool.jsonl"), str(folder / "router"), tmp_path / "g")
    values = yaml.safe_load(config.read_text())
    for routing, message in (({"router": str(folder / "router"), "assignments": str(ids)}, "give exactly one"),
                             ({"assignments": str(ids)}, "no teacher for instruction")):  # fmt: skip
        config.write_text(yaml.safe_dump({**values, "routing": routing}))
        result = cli("generate", str(config))
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    scored = {**values, "scoring": {"reward_model": tiny_suite.reward, "base_models": [tiny_suite.base_small]}}
    config.write_text(yaml.safe_dump(scored))
    result = cli("generate", str(config))
    assert result.returncode != 0 and "routing: and scoring: together" in result.stderr
    result = cli("route", "--scores", str(folder / "router"), "--replay", "x", "--output", str(tmp_path / "r"))
    assert result.returncode != 0 and "exactly one of --scores" in result.stderr


@pytest.mark.slow
def test_probe_then_route_then_routed_generate_then_select_falls_back_to_the_single_teacher(tmp_path, tiny_suite,
                                                                                             sample_path):  # fmt: skip
    """The whole loop on the shipped tiny probe: its first round (12 instructions, every teacher) is the seed; the
    tiny teachers have no per-instruction structure for the router to find, so routing falls back, says so, and
    the routed generate sends every instruction to the single best teacher."""
    from tests.e2e.test_probe import probe_config  # noqa: PLC0415

    path = probe_config(tmp_path, tiny_suite, sample_path)
    values = yaml.safe_load(path.read_text())
    values["probe"]["start"] = 12
    path.write_text(yaml.safe_dump(values))
    assert cli("probe", str(path)).returncode == 0
    result = cli("route", "--scores", str(tmp_path / "probe"), "--output", str(tmp_path / "router"))
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads((tmp_path / "router" / "route_summary.json").read_text())["base_models"]
    ranking = pd.read_csv(tmp_path / "probe" / "rank" / "ranking.csv")
    assert entry["n_seed"] >= 12 and not entry["routed"] and "does not beat" in result.stdout
    assert entry["gain_interval"][0] <= 0 <= entry["gain_interval"][1] or entry["gain_interval"][1] <= 0
    assert entry["single_teacher"] in set(ranking["teacher"])

    values.pop("probe"), values.pop("scoring")
    values["output_dir"] = str(tmp_path / "routed")
    values["routing"] = {"router": str(tmp_path / "router")}
    path.write_text(yaml.safe_dump(values))
    result = cli("generate", str(path))
    assert result.returncode == 0, result.stderr
    responses = pd.read_parquet(tmp_path / "routed" / "responses.parquet")
    assert set(responses["teacher"]) == {entry["single_teacher"]} and responses["id"].is_unique
    assert set(pd.read_csv(tmp_path / "routed" / "routing.csv")["how"]) == {"single"}
    result = cli("select", "--scores", str(tmp_path / "routed"), "--strategy", "routed", "--keep-capped", "--output",
                 str(tmp_path / "sft"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "sft" / "selection_summary.json").read_text())
    assert summary["rows_per_teacher"] == {entry["single_teacher"]: len(responses)}
    assert "single teacher" in summary["routing"]["how"]
