"""Applying a router (scoring/routing.py): the assignment file's checks, where a --routing path points, and the
router folder read back as the Router that wrote it."""

import json

import numpy as np
import pandas as pd
import pytest

from magpie_teach.errors import ConfigError, DataError
from magpie_teach.scoring.routing import (
    RoutingSettings,
    assignments,
    read_router,
    router_rows,
    routing_source,
)

INSTRUCTIONS = pd.DataFrame({"id": ["a", "b", "c"], "instruction": ["x?", "y?", "z?"]})


def test_an_assignment_file_gives_each_instruction_its_teacher_in_the_instructions_order(tmp_path):
    for name, write in (("a.csv", lambda f, p: f.to_csv(p, index=False)),
                        ("a.parquet", lambda f, p: f.to_parquet(p)),
                        ("a.jsonl", lambda f, p: f.to_json(p, orient="records", lines=True))):  # fmt: skip
        write(pd.DataFrame({"id": ["c", "a", "b"], "teacher": ["t2", "t1", "t1"]}), tmp_path / name)
        frame, about = assignments(RoutingSettings(assignments=str(tmp_path / name)), INSTRUCTIONS, ["t1", "t2"])
        assert frame["teacher"].tolist() == ["t1", "t1", "t2"] and set(frame["how"]) == {"file"}
        assert about["rows_per_teacher"] == {"t1": 2, "t2": 1}


@pytest.mark.parametrize(
    "table, message",
    [(pd.DataFrame({"id": ["a", "a"], "teacher": ["t1", "t2"]}), "'a' is assigned more than once"),
     (pd.DataFrame({"id": ["a"], "model": ["t1"]}), r"missing column\(s\) \['teacher'\]"),
     (pd.DataFrame({"id": ["a", "b"], "teacher": ["t1", "t1"]}), "no teacher for instruction 'c' \\(and 0 more\\)")],
)  # fmt: skip
def test_a_bad_assignment_file_is_named_with_what_is_wrong(tmp_path, table, message):
    table.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=message):
        assignments(RoutingSettings(assignments=str(tmp_path / "bad.csv")), INSTRUCTIONS, ["t1", "t2"])


def test_routing_settings_need_exactly_one_source():
    for settings in (RoutingSettings(), RoutingSettings(router="r", assignments="a")):
        with pytest.raises(ConfigError, match="give exactly one"):
            settings.check_routing()


def test_a_router_folder_reads_back_as_the_router_that_wrote_it_and_a_fall_back_needs_no_model(tmp_path):
    from magpie_teach import artefacts
    from magpie_teach.scoring.route import RoutingDecision, fit_router

    rng = np.random.default_rng(0)
    features, targets = rng.normal(size=(40, 5)), rng.normal(size=(40, 3))
    router = fit_router(features, targets, ["t1", "t2", "t3"])
    decision = RoutingDecision("t2", 0.0, (-0.1, 0.1), 0.95, False)
    files = artefacts.RunOutputs(tmp_path, "route")
    table = router_rows("base", router, decision, targets.mean(axis=0))
    files.write(artefacts.ROUTER, lambda tmp: table.to_parquet(tmp, index=False))
    summary = {"base_models": [{"base_model": "base", "decision": decision.sentence()}], "features": {}}
    files.write(artefacts.ROUTE_SUMMARY, lambda tmp: open(tmp, "w").write(json.dumps(summary)))
    files.finish()
    back = read_router(tmp_path)
    np.testing.assert_array_equal(back.routers["base"].predict(features), router.predict(features))
    assert back.routed == {"base": False} and back.single == {"base": "t2"}
    assert pd.read_parquet(tmp_path / artefacts.ROUTER)["mean_target"].tolist() == targets.mean(axis=0).tolist()
    assert routing_source(str(tmp_path)).router == str(tmp_path)
    frame, about = assignments(RoutingSettings(router=str(tmp_path)), INSTRUCTIONS, ["t1", "t2", "t3"])
    assert set(frame["teacher"]) == {"t2"} and set(frame["how"]) == {"single"}
    assert about["decision"] == decision.sentence()
    with pytest.raises(ConfigError, match="no router for base model 'other'"):
        back.base_model("other")
    (tmp_path / artefacts.ROUTER).write_bytes(b"changed")
    with pytest.raises(DataError, match="changed since"):
        read_router(tmp_path)


def test_a_routing_path_that_is_none_of_the_three_is_named(tmp_path):
    with pytest.raises(DataError, match="neither a `route` output folder"):
        routing_source(str(tmp_path))


def write_router(folder, routers: dict, routed: bool, features: dict, decisions: dict | None = None):
    """A router folder as `route` writes it, for the given fitted routers (base model -> Router)."""
    from magpie_teach import artefacts
    from magpie_teach.scoring.route import RoutingDecision

    files = artefacts.RunOutputs(folder, "route")
    tables, entries = [], []
    for base, router in routers.items():
        decision = RoutingDecision(router.teachers[0], 0.1, (0.05, 0.15), 0.95, routed)
        tables.append(router_rows(base, router, decision, np.arange(len(router.teachers), dtype=float)))
        entries.append({"base_model": base, "decision": (decisions or {}).get(base, decision.sentence())})
    table = pd.concat(tables, ignore_index=True)
    files.write(artefacts.ROUTER, lambda tmp: table.to_parquet(tmp, index=False))
    summary = json.dumps({"base_models": entries, "features": features})
    files.write(artefacts.ROUTE_SUMMARY, lambda tmp: open(tmp, "w").write(summary))
    files.finish()


def test_a_routed_router_sends_each_instruction_where_its_weights_say_on_the_recorded_max_length(tmp_path, tiny_suite):
    from transformers import AutoModelForCausalLM

    from magpie_teach.modeling import load_tokenizer
    from magpie_teach.scoring.features import COLUMNS, RULE, score_instruction_features
    from magpie_teach.scoring.route import fit_router

    texts = [f"Question {i}: " + "why is the sky blue and the grass green " * (1 + i % 4) for i in range(16)]
    instructions = pd.DataFrame({"id": [f"i{k}" for k in range(16)], "instruction": texts})
    model = AutoModelForCausalLM.from_pretrained(tiny_suite.base_small).eval()
    tokenizer = load_tokenizer(tiny_suite.base_small)
    short = score_instruction_features(model, tokenizer, texts, max_length=12, show_progress=False)[COLUMNS]
    full = score_instruction_features(model, tokenizer, texts, show_progress=False)[COLUMNS]
    rng = np.random.default_rng(0)
    targets = (short - short.mean()).to_numpy(float) @ rng.normal(size=(64, 3))  # each teacher best somewhere
    router = fit_router(short.to_numpy(float), targets, ["t1", "t2", "t3"], penalty=0.01)
    by_hand = np.asarray(router.teachers)[router.choose(short.to_numpy(float))]
    assert len(set(by_hand)) > 1 and not np.array_equal(
        by_hand, np.asarray(router.teachers)[router.choose(full.to_numpy(float))]
    )
    other = fit_router(short.to_numpy(float), -targets, ["t1", "t2", "t3"], penalty=0.01)
    write_router(tmp_path / "router", {tiny_suite.base_small: router, "lab/other-base": other}, True,
                 {"rule": RULE, "max_length": 12}, {tiny_suite.base_small: "routing beats it"})  # fmt: skip
    settings = RoutingSettings(router=str(tmp_path / "router"), base_model="tiny-llama-s")  # the short name finds it
    frame, about = assignments(settings, instructions, ["t1", "t2", "t3"])
    assert frame["teacher"].tolist() == by_hand.tolist() and set(frame["how"]) == {"routed"}
    assert frame["id"].tolist() == instructions["id"].tolist()
    counts = pd.Series(by_hand).value_counts().sort_index().to_dict()
    assert about == {"source": str(tmp_path / "router"), "base_model": tiny_suite.base_small, "how": "router",
                     "decision": "routing beats it", "rows_per_teacher": counts}  # fmt: skip
    with pytest.raises(ConfigError, match="routes for several base models; choose one"):
        assignments(RoutingSettings(router=str(tmp_path / "router")), instructions, ["t1", "t2", "t3"])
    with pytest.raises(ConfigError, match=r"not among the teachers \['t1', 't2'\]"):
        assignments(settings, instructions, ["t1", "t2"])
    write_router(tmp_path / "old", {tiny_suite.base_small: router}, True, {"rule": "mean-last-hidden/v0"})
    with pytest.raises(DataError, match="its features are 'mean-last-hidden/v0', this version computes"):
        assignments(RoutingSettings(router=str(tmp_path / "old")), instructions, ["t1", "t2", "t3"])


def test_routing_settings_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^routing\.router or routing\.assignments: give exactly one \(a `route` "
                                          r"output folder, or a file of id and teacher\)$"):  # fmt: skip
        RoutingSettings().check_routing()
    with pytest.raises(ConfigError, match=r"^routing\.max_length must be >= 2"):
        RoutingSettings(router="r", max_length=1).check_routing()
    with pytest.raises(ConfigError, match=r"^routing\.num_workers must be >= 1"):
        RoutingSettings(router="r", num_workers=0).check_routing()
