import datasets
import numpy as np
import pandas as pd
import pytest

from magpie_teach.data import instruction_id, load_responses, sample_instructions
from magpie_teach.errors import DataError


def _long():
    rows = []
    for teacher in ("t1", "t2"):
        for i in range(4):
            rows.append(
                {
                    "instruction": f"question {i}?",
                    "teacher": teacher,
                    "response": f"{teacher} answers {i}",
                    "rm": float(i),
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_long_format_from_files(tmp_path, suffix):
    frame = _long()
    path = tmp_path / f"data{suffix}"
    {
        ".jsonl": lambda p: frame.to_json(p, orient="records", lines=True),
        ".parquet": frame.to_parquet,
        ".csv": lambda p: frame.to_csv(p, index=False),
    }[suffix](path)
    loaded = load_responses(str(path), reward_column="rm")
    assert len(loaded.rows) == 8
    assert loaded.rows["id"].tolist()[:4] == [instruction_id(f"question {i}?") for i in range(4)]
    assert loaded.counts == {"rows_in": 8, "rows_kept": 8}


def _wide():
    return pd.DataFrame(
        {
            "uuid": ["u1", "u2", "u3"],
            "instruction": ["a?", "b?", "c?"],
            "Qwen2-7B-Instruct": [
                {"content": f"qwen {i}", "ArmoRM-Llama3-8B-v0.1": 0.1 * i, "Skywork-Reward-Llama-3.1-8B": i}
                for i in range(3)
            ],
            "gemma-2-9b-it": [
                {"content": f"gemma {i}", "ArmoRM-Llama3-8B-v0.1": 0.2 * i, "Skywork-Reward-Llama-3.1-8B": -i}
                for i in range(3)
            ],
        }
    )


def test_generator_zoo_wide_format_from_a_saved_dataset_folder(tmp_path):
    datasets.Dataset.from_pandas(_wide()).save_to_disk(str(tmp_path / "zoo"))
    loaded = load_responses(str(tmp_path / "zoo"), reward_column="ArmoRM-Llama3-8B-v0.1")
    rows = loaded.rows.sort_values(["teacher", "id"])
    assert sorted(rows["teacher"].unique()) == ["Qwen2-7B-Instruct", "gemma-2-9b-it"]
    assert rows["id"].tolist() == ["u1", "u2", "u3"] * 2
    gemma = rows[rows.teacher == "gemma-2-9b-it"]
    assert gemma["response"].tolist() == ["gemma 0", "gemma 1", "gemma 2"]
    np.testing.assert_allclose(gemma["ArmoRM-Llama3-8B-v0.1"], [0.0, 0.2, 0.4])
    assert gemma["Skywork-Reward-Llama-3.1-8B"].tolist() == [0, -1, -2]


def test_dataset_dict_folder_split(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(_long())}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_responses(str(tmp_path / "dd")).rows) == 8
    with pytest.raises(DataError, match="no split 'test'"):
        load_responses(str(tmp_path / "dd"), split="test")


def _write(tmp_path, frame):
    path = tmp_path / "bad.jsonl"
    frame.to_json(path, orient="records", lines=True)
    return str(path)


def test_missing_columns_are_named(tmp_path):
    path = _write(tmp_path, _long().drop(columns=["teacher"]))
    with pytest.raises(DataError, match=r"bad.jsonl: missing column\(s\) \['teacher'\]"):
        load_responses(path)


def test_empty_and_null_responses_name_the_row(tmp_path):
    frame = _long()
    frame.loc[5, "response"] = "   "
    frame.loc[2, "response"] = None
    path = _write(tmp_path, frame)
    with pytest.raises(
        DataError, match=r"'response' in row 2 \(id='.*', teacher='t1'\); row 5 \(id='.*', teacher='t2'\)"
    ):
        load_responses(path)
    loaded = load_responses(path, drop_invalid=True)
    # the empty rows and the other teacher's answers to the same instructions are dropped and counted
    assert len(loaded.rows) == 4
    assert loaded.counts["empty_response"] == 2 and loaded.counts["sibling_dropped"] == 2
    assert set(loaded.dropped["reason"]) == {"empty_response", "sibling_dropped"}
    assert loaded.rows.groupby("teacher").size().tolist() == [2, 2]


def test_teachers_with_different_instruction_sets(tmp_path):
    frame = _long().drop(index=[7])
    path = _write(tmp_path, frame)
    with pytest.raises(DataError, match=r"different instruction sets: teacher 't2' lacks 1 \(e.g. id="):
        load_responses(path)
    loaded = load_responses(path, drop_invalid=True)
    assert loaded.counts["incomplete_instruction"] == 1 and len(loaded.rows) == 6


def test_duplicate_pairs_are_an_error(tmp_path):
    frame = pd.concat([_long(), _long().iloc[[3]]], ignore_index=True)
    with pytest.raises(DataError, match=r"duplicate \(id, teacher\) rows: row 3 .*row 8"):
        load_responses(_write(tmp_path, frame))


def test_missing_reward_values_and_columns(tmp_path):
    frame = _long()
    frame.loc[1, "rm"] = None
    path = _write(tmp_path, frame)
    with pytest.raises(DataError, match=r"null or empty 'rm' in row 1"):
        load_responses(path, reward_column="rm")
    with pytest.raises(DataError, match="no reward column 'armo'"):
        load_responses(path, reward_column="armo")


def test_unsupported_and_missing_sources(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_responses(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="no such file"):
        load_responses(str(tmp_path / "nope.jsonl"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="broken.jsonl: could not be read"):
        load_responses(str(tmp_path / "broken.jsonl"))


def test_sample_draws_the_same_instructions_for_every_teacher():
    frame = pd.concat([_long().assign(id=lambda f: f["instruction"])] * 1, ignore_index=True)
    picked = sample_instructions(frame, 2, seed=3)
    per_teacher = picked.groupby("teacher")["id"].apply(lambda s: sorted(s))
    assert per_teacher["t1"] == per_teacher["t2"] and len(per_teacher["t1"]) == 2
    assert sample_instructions(frame, 2, seed=3).equals(picked)
    assert len(sample_instructions(frame, 10, seed=3)) == len(frame)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("top.json", b'{"rows": [{"instruction": "a", "response": "b", "teacher": "t"}]}',
         "top level is an object (keys: ['rows'])"),
        ("items.json", b'[{"instruction": "a", "response": "b", "teacher": "t"}, 3]', "item 1 is a int"),
        ("broken.json", b'[{"instruction": "a",\n "response": }]', "line 2, column"),
        ("empty.jsonl", b"", "the file is empty"),
        ("int.jsonl", b'{"instruction": "a", "response": 5, "teacher": "t"}\n',
         "'response' must be text, but 1 row(s) hold other values (first: 5, a int)"),
        ("latin.jsonl", '{"instruction": "a", "response": "b", "teacher": "t"}\n{"instruction": "caf\xe9", "response": "b", "teacher": "t"}\n'.encode("latin-1"),
         "line 2 is not UTF-8 text (column 21"),
        ("latin.csv", "instruction,response,teacher\na,b,t\nc,caf\xe9,t\n".encode("latin-1"), "line 3 is not UTF-8 text"),
        ("cols.jsonl", b'{"question": "a", "answer": "b"}\n', "missing column(s) ['instruction', 'response', 'teacher']; found ['question', 'answer']"),
    ],
)  # fmt: skip
def test_unreadable_input_says_what_is_wrong(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_responses(str(path), reward_column=None)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "_row" not in str(err.value)
