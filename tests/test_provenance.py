"""What `push` rewrites of local paths (hub/provenance.py), on real folders and files made here: the pure rules,
in-process (the e2e push tests check the published result; these pin each rule, for `make mutation` too)."""

import json
import os

import pandas as pd
import pytest

from magpie_teach.hub.provenance import Publisher, collect_strings, is_local_path, public_name


@pytest.fixture
def disk(tmp_path, monkeypatch):
    model = tmp_path / "models" / "tiny-llama"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"weights")
    plain = tmp_path / "runs" / "gen"
    plain.mkdir(parents=True)
    data = tmp_path / "data.jsonl"
    data.write_text('{"x": 1}\n')
    monkeypatch.chdir(tmp_path)
    return model, plain, data


def test_a_local_path_is_absolute_or_relative_with_a_separator_and_exists(disk, tmp_path):
    model, plain, data = disk
    assert is_local_path(str(model)) and is_local_path(str(data)) and is_local_path("runs/gen")
    assert is_local_path("./runs/gen") and is_local_path(f"..{os.sep}{tmp_path.name}/runs")
    home = os.path.expanduser("~")
    assert is_local_path("~") == os.path.isdir(home)
    for value in ("", "Qwen/Qwen2-1.5B", "runs", str(tmp_path / "missing"), "runs/gen\n", "x" * 5000,
                  f"{tmp_path}/{'y' * 5000}", "data.jsonl"):  # fmt: skip
        assert not is_local_path(value), value
    assert not is_local_path(str(model) + "\nsecond line")


def test_a_model_folder_and_a_file_are_named_by_digest_and_other_folders_by_name(disk):
    from magpie_teach.artefacts import content_digest

    model, plain, data = disk
    assert public_name(str(model)) == f"tiny-llama@sha256:{content_digest(model)[:12]}"
    assert public_name(str(data)) == f"data.jsonl@sha256:{content_digest(data)[:12]}"
    assert public_name(str(plain)) == "gen" and public_name("runs/gen/") == "gen"
    before = public_name(str(model))
    (model / "model.safetensors").write_bytes(b"third weights")
    assert public_name(str(model)) != before


def test_every_string_of_a_nested_value_is_collected_and_nothing_else():
    value = {"a": "x", "b": [1, "y", {"c": ("z", None, 2.5)}], "d": {"e": {"f": "w"}}, "g": None}
    assert list(collect_strings(value)) == ["x", "y", "z", "w"]
    assert list(collect_strings("alone")) == ["alone"] and list(collect_strings(3)) == []


def test_the_publisher_rewrites_paths_longest_first_in_text_json_frames_and_attrs(disk, tmp_path):
    model, plain, data = disk
    publisher = Publisher()
    assert publisher.names == {}
    frame = pd.DataFrame({
        "teacher": [str(model), "Qwen/Qwen2-1.5B"],
        "settings": [json.dumps({"model": str(model), "n": 1}), "not json " + str(plain)],
        "response": [f"I was written by {model}", "plain"],  # a text: published as written
        "magpie_model": [f"base={model}", None],
        "n": [1, 2],
    })  # fmt: skip
    frame.attrs = {"source": str(data), "nested": {"list": [str(plain)]}}
    public = publisher.rewrite_frame(frame)
    model_name = public_name(str(model))
    assert list(public["teacher"]) == [model_name, "Qwen/Qwen2-1.5B"]
    assert json.loads(public["settings"][0]) == {"model": model_name, "n": 1}
    assert public["settings"][1] == "not json gen"
    assert list(public["response"]) == list(frame["response"])
    assert public["magpie_model"][0] == f"base={model_name}" and pd.isna(public["magpie_model"][1])
    assert list(public["n"]) == [1, 2]
    assert public.attrs == {"source": public_name(str(data)), "nested": {"list": ["gen"]}}
    assert frame.attrs["source"] == str(data) and frame["teacher"][0] == str(model)  # the original is untouched
    # the resolved spelling of a learnt path is rewritten too, and the longest path first (no prefix cut)
    resolved = str(model.resolve())
    assert publisher.rewrite(f"{resolved} and {plain}/sub") == f"{model_name} and gen/sub"
    assert publisher.rewrite_frame(pd.DataFrame({"teacher": ["Qwen/Qwen2-1.5B"], "n": [1]})) is None


def test_name_equals_path_learns_the_path_part_and_json_that_is_a_path_alone(disk):
    model, plain, data = disk
    publisher = Publisher()
    publisher.learn([f"s1={model}"])
    assert publisher.rewrite(f"s1={model}") == f"s1={public_name(str(model))}"
    other = Publisher()
    other.learn_json_strings([str(data), "[1, 2]", json.dumps([str(plain)])])
    assert other.rewrite(f"{data} {plain}") == f"{public_name(str(data))} gen"


def test_nested_paths_are_rewritten_longest_first_and_a_relative_path_by_its_resolved_spelling_too(disk, tmp_path):
    model, plain, data = disk
    inner = plain / "student"  # a model folder inside an output folder: the longer path must win
    inner.mkdir()
    (inner / "config.json").write_text("{}")
    publisher = Publisher()
    publisher.learn(["runs/gen", "runs/gen/student"])  # relative to the working folder
    student = public_name(str(inner))
    assert publisher.rewrite("runs/gen/student and runs/gen") == f"{student} and gen"
    assert publisher.rewrite(f"{inner.resolve()} in {plain.resolve()}") == f"{student} in gen"


def test_a_path_with_an_equals_sign_after_a_name_and_an_over_long_component(disk, tmp_path):
    folder = tmp_path / "k=v"
    folder.mkdir()
    publisher = Publisher()
    publisher.learn([f"s1={folder}"])  # evaluate's --student NAME=PATH, the path holding "=" itself
    assert publisher.rewrite(f"s1={folder}") == "s1=k=v"
    assert not is_local_path(str(tmp_path / ("y" * 300)))  # the system refuses the name: not a local path


def test_json_columns_are_searched_whatever_their_name_and_settings_alone_holds_a_path(disk):
    import numpy as np

    model, plain, data = disk
    frame = pd.DataFrame({"teacher": ["Qwen/Qwen2-1.5B"], "settings": [json.dumps({"model": str(model)})],
                          "magpie_config": [json.dumps({"path": str(data)})]})  # fmt: skip
    frame.attrs = {"rows": np.int64(3)}  # not JSON itself: kept as it is when nothing in it changes
    public = Publisher().rewrite_frame(frame)
    assert json.loads(public["settings"][0]) == {"model": public_name(str(model))}
    assert json.loads(public["magpie_config"][0]) == {"path": public_name(str(data))}
    assert public.attrs == {"rows": 3} and isinstance(public.attrs["rows"], np.integer)
