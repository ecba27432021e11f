import re

import datasets
import numpy as np
import pandas as pd
import pytest

from magpie_teach.data import instruction_id, load_responses, sample_instructions, validated_responses
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


# -- streaming: many batches, shards, sampling before the texts ---------------------------------------------------


def _zoo_frame(n: int, teachers=("Qwen2-7B-Instruct", "gemma-2-9b-it", "Meta-Llama-3-8B-Instruct")) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"uuid": [f"u{i:03d}" for i in range(n)], "instruction": [f"question {i}?" for i in range(n)]}
    )
    for k, teacher in enumerate(teachers):
        frame[teacher] = [
            {
                "content": f"{teacher} says {i} " + "word " * int(rng.integers(1, 30)),
                "ArmoRM-Llama3-8B-v0.1": k + i / n,
            }
            for i in range(n)
        ]
    return frame


def _write_shards(folder, frame, shards: int, row_group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True)
    for shard, part in enumerate(np.array_split(np.arange(len(frame)), shards)):
        table = pa.Table.from_pandas(frame.iloc[part].reset_index(drop=True), preserve_index=False)
        pq.write_table(table, folder / "data" / f"train-{shard:05d}-of-{shards:05d}.parquet", row_group_size=row_group)


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of a few rows, so that every source is read in many batches."""
    from magpie_teach import tables

    monkeypatch.setattr(tables, "BATCH_BYTES", 200)
    monkeypatch.setattr(tables, "TEXT_CHUNK_ROWS", 3)


def _reference(frame: pd.DataFrame, **kwargs):
    """The in-memory path: the whole wide frame turned long and validated at once."""
    from magpie_teach.data import to_long, validated_responses

    return validated_responses(to_long(frame), "reference", **kwargs)


def _by_key(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.sort_values(["teacher", "id"]).reset_index(drop=True)[sorted(rows.columns)]


def test_a_sharded_zoo_folder_read_in_many_batches_equals_the_whole_table_read_at_once(tmp_path, small_batches):
    frame = _zoo_frame(40)
    _write_shards(tmp_path / "zoo", frame, shards=3, row_group=4)
    (tmp_path / "zoo" / "data" / "test-00000-of-00001.parquet").write_bytes(b"not read: another split")
    loaded = load_responses(str(tmp_path / "zoo"), reward_column="ArmoRM-Llama3-8B-v0.1")
    reference = _reference(frame, reward_column="ArmoRM-Llama3-8B-v0.1")
    pd.testing.assert_frame_equal(_by_key(loaded.rows), _by_key(reference.rows), check_dtype=False)
    assert loaded.fingerprint == reference.fingerprint
    assert loaded.counts == {"rows_in": 120, "rows_kept": 120}


def test_sample_reads_the_texts_of_the_drawn_instructions_only_and_draws_what_the_in_memory_path_draws(
    tmp_path, small_batches
):
    frame = _zoo_frame(20)
    _write_shards(tmp_path / "zoo", frame, shards=2, row_group=5)
    loaded = load_responses(str(tmp_path / "zoo"), reward_column="ArmoRM-Llama3-8B-v0.1", sample=7, seed=3)
    every = load_responses(str(tmp_path / "zoo"), reward_column="ArmoRM-Llama3-8B-v0.1")
    expected = sample_instructions(every.rows, 7, seed=3)
    pd.testing.assert_frame_equal(_by_key(loaded.rows), _by_key(expected), check_dtype=False)
    assert len(loaded.rows) == 7 * 3 and loaded.counts["rows_sampled"] == 21
    assert loaded.fingerprint == every.fingerprint  # validation and the fingerprint cover every row


def test_a_stream_yields_the_kept_rows_in_windows_of_the_size_asked_and_its_dropped_rows_after_a_pass(
    tmp_path, small_batches
):
    from magpie_teach.data import open_responses

    frame = _zoo_frame(16)
    frame.at[5, "gemma-2-9b-it"] = {"content": " ", "ArmoRM-Llama3-8B-v0.1": 1.0}  # drops instruction u005
    _write_shards(tmp_path / "zoo", frame, shards=3, row_group=4)
    source, reward = str(tmp_path / "zoo"), "ArmoRM-Llama3-8B-v0.1"
    reference = _reference(frame, reward_column=reward, drop_invalid=True)  # the whole table at once, in memory
    stream = open_responses(source, reward_column=reward, drop_invalid=True)
    assert (stream.n_rows, stream.fingerprint, stream.counts) == (45, reference.fingerprint, reference.counts)
    assert stream.dropped is None  # nothing read yet
    windows = list(stream.windows(10))
    assert [len(w) for w in windows] == [10] * 4 + [5]
    assert all(list(w.index) == list(range(len(w))) for w in windows)
    rows = pd.concat(windows, ignore_index=True)
    pd.testing.assert_frame_equal(_by_key(rows), _by_key(reference.rows), check_dtype=False)
    dropped = reference.dropped.drop(columns="_pos", errors="ignore")
    pd.testing.assert_frame_equal(_by_key(stream.dropped), _by_key(dropped), check_dtype=False)
    assert stream.dropped[["id", "reason"]].to_dict("records") == [
        {"id": "u005", "reason": r} for r in ("sibling_dropped", "empty_response", "sibling_dropped")
    ]
    sampled = open_responses(source, reward_column=reward, drop_invalid=True, sample=7, seed=3)
    rows = pd.concat(list(sampled.windows(4)), ignore_index=True)
    assert len(rows) == sampled.n_rows == 21 and rows["id"].nunique() == 7
    clean = open_responses(source, reward_column=reward, teachers=["Qwen2-7B-Instruct"])
    assert len(pd.concat(list(clean.windows(1)))) == 16 and clean.dropped.empty
    assert list(clean.dropped.columns) == [*clean.dropped.columns[:-1], "reason"] and "response" in clean.dropped
    with pytest.raises(ValueError, match="a window holds at least one row, got 0"):
        next(clean.windows(0))


def test_rows_are_numbered_across_batches_in_errors_and_in_what_is_dropped(tmp_path, small_batches):
    frame = _long()
    frame = pd.concat([frame, frame.assign(instruction=lambda f: f["instruction"] + " again")], ignore_index=True)
    frame.loc[13, "response"] = " "  # in the fifth chunk of three lines
    path = _write(tmp_path, frame)
    with pytest.raises(DataError, match=r"null or empty 'response' in row 13 \(id='.*', teacher='t2'\)"):
        load_responses(path)
    loaded = load_responses(path, drop_invalid=True)
    reference = validated_responses(pd.read_json(path, lines=True, dtype=False), path, drop_invalid=True)
    assert loaded.dropped[["_row", "id", "teacher", "reason"]].to_dict("records") == reference.dropped[
        ["_row", "id", "teacher", "reason"]
    ].to_dict("records")
    assert loaded.dropped.set_index("_row").loc[13, "response"] == " "  # dropped rows keep their texts
    assert sorted(loaded.dropped["_row"]) == [9, 13]  # t1's answer to the same instruction goes too
    assert len(loaded.rows) == 14


def test_a_corrupt_shard_and_a_shard_with_another_schema_are_named_before_any_row_is_read(tmp_path):
    frame = _zoo_frame(6)
    _write_shards(tmp_path / "zoo", frame, shards=2, row_group=2)
    second = tmp_path / "zoo" / "data" / "train-00001-of-00002.parquet"
    good = second.read_bytes()
    second.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"train-00001-of-00002.parquet: not a readable parquet file"):
        load_responses(str(tmp_path / "zoo"))
    frame.drop(columns=["gemma-2-9b-it"]).iloc[3:].to_parquet(second)
    with pytest.raises(
        DataError, match=r"train-00001-of-00002.parquet: its schema differs from .*only in train-00000"
    ):
        load_responses(str(tmp_path / "zoo"))


# -- every rule of the validation on keys, in memory (fast: `make mutation` runs these) ------------------------------


def _frame(n_ids=3, teachers=("t1", "t2"), **columns):
    rows = [{"id": f"q{i}", "instruction": f"question {i}?", "teacher": t, "response": f"{t} answers {i}"}
            for i in range(n_ids) for t in teachers]  # fmt: skip
    frame = pd.DataFrame(rows)
    for name, values in columns.items():
        frame[name] = values
    return frame


@pytest.mark.parametrize("value", [-1, 1.5, "two"])
def test_a_generation_index_that_is_not_a_whole_number_from_0_names_its_row(value):
    frame = _frame(generation_index=[0, 0, 0, 0, 0, 0]).astype({"generation_index": object})
    frame.loc[3, "generation_index"] = value
    with pytest.raises(
        DataError, match=r"data: 'generation_index' must be a whole number >= 0: row 3 \(id='q1', teacher='t2'\)\.$"
    ):
        validated_responses(frame, "data")


def test_generations_of_one_teacher_are_told_apart_by_their_index_and_kept_as_integers():
    frame = pd.concat([_frame(generation_index=0), _frame(generation_index="1")], ignore_index=True)
    loaded = validated_responses(frame, "data")
    assert len(loaded.rows) == 12 and loaded.rows["generation_index"].dtype.kind == "i"
    assert sorted(loaded.rows["generation_index"].unique()) == [0, 1]
    frame.loc[7, "generation_index"] = 0  # a second generation 0 of (q0, t2)
    with pytest.raises(DataError, match=r"duplicate \(id, teacher, generation_index\) rows: row 1 \(id='q0', "
                                        r"teacher='t2'\); row 7 \(id='q0', teacher='t2'\)\.$"):  # fmt: skip
        validated_responses(frame, "data")


def test_one_id_with_two_instruction_texts_names_every_row_of_that_id():
    frame = _frame()
    frame.loc[3, "instruction"] = "another question?"
    with pytest.raises(DataError, match=r"^data: one id with different instruction texts: row 2 \(id='q1', teacher='t1'\); "
                                        r"row 3 \(id='q1', teacher='t2'\)\.$"):  # fmt: skip
        validated_responses(frame, "data")
    frame.loc[3, "instruction"] = " "  # an empty instruction is not a second text: it is dropped, not an error
    loaded = validated_responses(frame, "data", drop_invalid=True)
    assert loaded.counts["empty_instruction"] == 1 and loaded.counts["sibling_dropped"] == 1


def test_failed_generations_stop_the_run_unless_dropped_with_the_other_teachers_answers():
    frame = _frame(status=["ok", "ok", "ok", "error", "ok", "ok"])
    with pytest.raises(DataError, match=r"failed generations \(status other than 'ok'\) in row 3 \(id='q1', teacher='t2'\) "
                                        r"\(pass --drop-invalid"):  # fmt: skip
        validated_responses(frame, "data")
    frame.loc[3, "response"] = None  # failed and empty: counted once, as failed
    loaded = validated_responses(frame, "data", drop_invalid=True)
    assert dict(zip(loaded.dropped["_row"], loaded.dropped["reason"])) == {
        2: "sibling_dropped",
        3: "failed_generation",
    }
    assert loaded.counts == {"rows_in": 6, "rows_kept": 4, "failed_generation": 1, "sibling_dropped": 1}
    assert list(loaded.dropped.columns) == ["id", "instruction", "teacher", "response", "status", "_row", "reason"]
    assert validated_responses(_frame(status=[None] * 6), "data").counts["rows_kept"] == 6  # no status reads as ok


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "n/a"])
def test_a_reward_that_is_missing_or_not_finite_is_an_error_or_dropped(bad):
    frame = _frame(rm=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).astype({"rm": object})
    frame.loc[4, "rm"] = bad
    with pytest.raises(
        DataError, match=r"null or empty 'rm' in row 4 \(id='q2', teacher='t1'\) \(pass --drop-invalid"
    ):
        validated_responses(frame, "data", reward_column="rm")
    loaded = validated_responses(frame, "data", reward_column="rm", drop_invalid=True)
    assert loaded.counts["missing_reward"] == 1 and loaded.counts["sibling_dropped"] == 1
    assert loaded.rows["rm"].tolist() == [1.0, 2.0, 3.0, 4.0] and loaded.rows["rm"].dtype == float
    assert validated_responses(frame, "data", drop_invalid=True).counts["rows_kept"] == 6  # no reward asked: kept


def test_an_empty_instruction_is_dropped_with_its_reason_and_every_row_dropped_is_an_error():
    frame = _frame()
    frame.loc[0, "instruction"] = None
    with pytest.raises(DataError, match=r"null or empty 'instruction' in row 0 \(id='q0', teacher='t1'\)"):
        validated_responses(frame, "data")
    loaded = validated_responses(frame, "data", drop_invalid=True)
    assert dict(zip(loaded.dropped["_row"], loaded.dropped["reason"])) == {
        0: "empty_instruction",
        1: "sibling_dropped",
    }
    frame["response"] = ""
    with pytest.raises(DataError, match=r"every row was dropped \(\{'empty_response': 5, 'empty_instruction': 1\}\)"):
        validated_responses(frame, "data", drop_invalid=True)


@pytest.mark.parametrize("column", ["instruction", "response"])
def test_a_value_that_is_not_text_is_an_error_naming_the_first_and_its_type(column):
    frame = _frame().astype({column: object})
    frame.loc[1, column] = 7
    frame.loc[4, column] = 2.5
    with pytest.raises(DataError, match=rf"data: '{column}' must be text, but 2 row\(s\) hold other values \(first: 7, "
                                        rf"a int\): row 1 \(id='q0', teacher='t2'\); row 4"):  # fmt: skip
        validated_responses(frame, "data", drop_invalid=True)


def test_only_instructions_every_teacher_answered_are_kept_and_the_others_counted():
    frame = _frame(n_ids=4, teachers=("t1", "t2", "t3")).drop(index=[4, 9])  # q1 lacks t2, q3 lacks t1
    with pytest.raises(
        DataError, match=r"teacher 't1' lacks 1 \(e.g. id='q3'\); teacher 't2' lacks 1 \(e.g. id='q1'\)"
    ):
        validated_responses(frame, "data")
    loaded = validated_responses(frame, "data", drop_invalid=True)
    assert sorted(loaded.rows["id"].unique()) == ["q0", "q2"]
    assert loaded.counts["incomplete_instruction"] == 4 and set(loaded.dropped["reason"]) == {"incomplete_instruction"}


def test_a_sample_covering_every_instruction_draws_nothing_and_a_sample_must_be_positive():
    from magpie_teach.data import sample_ids

    ids = ["q0", "q1", "q2", "q1"]
    assert sample_ids(ids, 3, 0) is None and sample_ids(ids, 4, 0) is None
    drawn = sample_ids(ids, 2, 0)
    assert len(drawn) == 2 and drawn <= {"q0", "q1", "q2"} and drawn == sample_ids(ids, 2, 0)
    assert len(sample_ids(ids, 1, 5)) == 1
    for n in (0, -1):
        with pytest.raises(DataError, match=rf"--sample must be positive, got {n}\."):
            sample_ids(ids, n, 0)


def test_an_error_names_five_rows_and_counts_the_rest():
    frame = _frame(n_ids=4, generation_index=[-1] * 8)  # 8 bad rows: 5 named, 3 counted
    with pytest.raises(DataError, match=r"row 4 \(id='q2', teacher='t1'\); and 3 more\.$"):
        validated_responses(frame, "data")
    frame = _frame(n_ids=3, generation_index=[-1] * 5 + [0])  # exactly 5: all named, nothing counted
    with pytest.raises(DataError, match=r"row 4 \(id='q2', teacher='t1'\)\.$"):
        validated_responses(frame, "data")


# -- the wide layout in memory (fast: `make mutation`) -----------------------------------------------------------


def test_to_long_turns_each_teacher_struct_into_rows_counted_from_the_batch_offset():
    from magpie_teach.data import to_long

    wide = pd.DataFrame({"instruction": ["q0", "q1"],
                         "t1": [{"content": "a0", "rm": 1.0}, None],
                         "t2": [{"content": "b0"}, {"content": "b1", "rm": 2.0}]})  # fmt: skip
    wide.attrs["offset"] = 10
    long = to_long(wide, "zoo.parquet")
    assert long.astype(object).where(long.notna(), None).to_dict("records") == [
        {"id": None, "instruction": "q0", "teacher": "t1", "response": "a0", "_row": 10, "rm": 1.0},
        {"id": None, "instruction": "q1", "teacher": "t1", "response": None, "_row": 11, "rm": None},
        {"id": None, "instruction": "q0", "teacher": "t2", "response": "b0", "_row": 10, "rm": None},
        {"id": None, "instruction": "q1", "teacher": "t2", "response": "b1", "_row": 11, "rm": 2.0},
    ]
    assert list(long.index) == [0, 1, 2, 3]
    # a teacher not named in `fields` is read from its dicts, even beside a column named like a flattened field
    odd = to_long(wide.assign(**{"t2.content": ["x", "y"]}), "zoo", teachers=["t2"], fields={"t1": ["content", "rm"]})
    assert list(odd["response"]) == ["b0", "b1"]
    with_ids = to_long(wide.assign(uuid=["u0", "u1"]), "zoo.parquet", teachers=["t2"])
    assert list(with_ids["id"]) == ["u0", "u1"] and set(with_ids["teacher"]) == {"t2"}
    none = to_long(pd.DataFrame({"instruction": ["q0"]}), "zoo.parquet")
    assert none.empty and list(none.columns) == ["id", "instruction", "teacher", "response", "_row"]
    with pytest.raises(DataError) as err:
        to_long(wide.drop(columns="instruction"), "zoo.parquet")
    assert str(err.value) == "zoo.parquet: wide format without an 'instruction' column (columns: ['t1', 't2'])."


def test_to_long_reads_a_flattened_struct_from_its_columns_and_a_plain_one_from_its_dicts():
    from magpie_teach.data import to_long

    wide = pd.DataFrame({"instruction": ["q0", "q1"], "t1.content": ["a0", "a1"], "t1.rm": [1.0, 2.0],
                         "t2": [{"content": "b0"}, {"content": "b1"}]}, index=[5, 6])  # fmt: skip
    long = to_long(wide, "zoo", teachers=["t1", "t2"], fields={"t1": ["content", "rm"]})
    assert list(long["response"]) == ["a0", "a1", "b0", "b1"] and list(long["_row"]) == [0, 1, 0, 1]
    assert list(long["rm"].iloc[:2]) == [1.0, 2.0] and long["rm"].iloc[2:].isna().all()
    assert list(long.index) == [0, 1, 2, 3]


def test_a_long_file_with_uuid_and_no_id_takes_its_ids_from_uuid():
    from magpie_teach.data import _long_batch

    frame = pd.DataFrame({"uuid": ["u0", "u1"], "instruction": ["q0", "q1"], "teacher": ["t", "t"],
                          "response": ["a", "b"]})  # fmt: skip
    batch = _long_batch(frame, None, "data.jsonl", 7)
    assert list(batch["id"]) == ["u0", "u1"] and list(batch["_row"]) == [7, 8]
    derived = _long_batch(frame.drop(columns="uuid"), None, "data.jsonl", 0)
    assert list(derived["id"]) == [instruction_id("q0"), instruction_id("q1")]
    kept = _long_batch(frame.assign(id=["i0", "i1"]), None, "data.jsonl", 0)
    assert list(kept["id"]) == ["i0", "i1"] and "uuid" in kept.columns


def test_a_generation_index_spelled_as_text_or_float_is_one_whole_number():
    """ "1" and 1.0 are the same generation: as keys they are one response, and a second row of it is a duplicate."""
    from magpie_teach.data import validate_long

    base = {"id": ["a", "a", "b", "b"], "teacher": ["t"] * 4, "instruction": ["x", "x", "y", "y"],
            "response": ["r1", "r2", "r3", "r4"]}  # fmt: skip
    rows, dropped = validate_long(pd.DataFrame({**base, "generation_index": ["0", "1", 0.0, 1.0]}))
    assert rows["generation_index"].tolist() == [0, 1, 0, 1] and rows["generation_index"].dtype == "int64"
    assert dropped.empty
    with pytest.raises(DataError, match=r"^data: duplicate \(id, teacher, generation_index\) rows"):
        validate_long(pd.DataFrame({**base, "generation_index": ["0", "1", 1.0, "1"]}))
    empty = pd.DataFrame({**base, "generation_index": [0, 1, 0, 1], "response": ["r1", "r2", "", "r4"]})
    with pytest.raises(DataError, match="^data: "):  # not dropped unless asked
        validate_long(empty)
    rows, dropped = validate_long(empty, drop_invalid=True)
    assert rows["id"].tolist() == ["a", "a"] and dropped["reason"].tolist()[0] == "empty_response"


# -- the small rules: text states, keys, the fingerprint (fast: `make mutation`) ----------------------------------


def test_an_instruction_id_is_the_first_16_hex_digits_of_the_sha1_of_its_utf8_text():
    import hashlib

    for text in ("question 1?", "café, s'il vous plaît", "数学の問題"):
        assert instruction_id(text) == hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def test_only_a_table_without_a_teacher_column_and_with_content_structs_is_wide():
    from magpie_teach.data import is_wide

    structs = pd.DataFrame({"instruction": ["q"], "t1": [{"content": "a"}]})
    assert is_wide(structs)
    assert not is_wide(structs.assign(teacher="t1"))  # long rows that happen to hold a struct column
    assert not is_wide(pd.DataFrame({"instruction": ["q"], "t1": [{"text": "a"}]}))  # a struct without content
    assert not is_wide(_frame())


def test_the_text_columns_are_the_key_then_instruction_context_and_response_and_the_flags_are_carried():
    from magpie_teach.data import carried_columns, text_columns

    assert text_columns(_frame()) == ["id", "teacher", "instruction", "response"]
    with_context = _frame(context=None, generation_index=0)
    assert text_columns(with_context) == ["id", "teacher", "generation_index", "instruction", "context", "response"]
    assert carried_columns(_frame()) == []
    assert carried_columns(_frame(hit_max_new_tokens=False)) == ["hit_max_new_tokens"]


def _fingerprint_of(frame):
    loaded = validated_responses(frame, "data")
    assert len(loaded.fingerprint) == 16 and int(loaded.fingerprint, 16) >= 0
    return loaded.fingerprint


def test_the_fingerprint_follows_every_text_and_key_and_not_the_row_order():
    """The run record's identity of the data: a change to any response, instruction, earlier turn or key is a
    new fingerprint; the same rows in another order are the same data."""
    turns = [
        [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}] for i in range(6)
    ]
    frame = _frame(context=pd.Series(turns, dtype=object))
    frame.loc[5, "context"] = None  # a single-turn row among multi-turn ones
    same = _fingerprint_of(frame)
    assert _fingerprint_of(frame.iloc[::-1].reset_index(drop=True)) == same
    changed = {
        "response": lambda f: f.assign(response=f["response"].where(f.index != 2, "another answer")),
        "instruction": lambda f: f.assign(instruction=f["instruction"].where(f["id"] != "q1", "another question?")),
        "context": lambda f: f.assign(context=[*f["context"][:3], [{"role": "user", "content": "?"}], *f["context"][4:]]),
        "null context as text": lambda f: f.assign(context=[*f["context"][:5], "None"]),
        "teacher": lambda f: f.assign(teacher=f["teacher"].replace({"t2": "t3"})),
        "id": lambda f: f.assign(id=f["id"].replace({"q2": "q9"})),
    }  # fmt: skip
    prints = {name: _fingerprint_of(change(frame.copy())) for name, change in changed.items()}
    assert same not in prints.values() and len(set(prints.values())) == len(prints)


def test_text_held_as_python_objects_is_blank_null_or_not_text_by_value():
    """Object columns (mixed values, as JSON and pandas give them) are read value by value: blank and null are
    empty, numbers and lists are not text (the first named as the Python value it is)."""
    frame = _frame().astype({"response": object})
    frame["response"] = pd.Series(["fine", None, "   ", np.nan, "good", "also fine"], dtype=object)
    loaded = validated_responses(frame, "data", drop_invalid=True)
    assert dict(zip(loaded.dropped["_row"], loaded.dropped["reason"])) == {
        0: "sibling_dropped", 1: "empty_response", 2: "empty_response", 3: "empty_response",
    }  # fmt: skip
    assert loaded.rows["response"].tolist() == ["good", "also fine"]
    for bad, shown in ((np.int64(5), "first: 5, a int"), (["a", "list"], "first: ['a', 'list'], a list")):
        frame = _frame().astype({"response": object})
        frame["response"] = pd.Series(["fine", "fine", bad, "fine", "fine", "fine"], dtype=object)
        with pytest.raises(
            DataError, match=rf"'response' must be text, but 1 row\(s\) hold other values \({re.escape(shown)}\)"
        ):
            validated_responses(frame, "data", drop_invalid=True)


def test_a_null_instruction_without_an_id_is_dropped_and_teachers_are_named_as_text():
    frame = _frame().drop(columns="id").assign(teacher=[1, 2] * 3)
    frame.loc[[2, 3], "instruction"] = None
    loaded = validated_responses(frame, "data", drop_invalid=True)
    assert loaded.counts == {"rows_in": 6, "rows_kept": 4, "empty_instruction": 2}
    assert sorted(loaded.rows["teacher"].unique()) == ["1", "2"]
    assert loaded.rows["id"].tolist() == [instruction_id(f"question {i}?") for i in (0, 0, 2, 2)]


def test_the_column_errors_name_the_source_and_only_the_users_columns():
    from magpie_teach.data import to_long, validate_long

    with pytest.raises(DataError) as err:
        validate_long(_frame().drop(columns="teacher"), "mine.jsonl")
    assert str(err.value) == "mine.jsonl: missing column(s) ['teacher']; found ['id', 'instruction', 'response']."
    with pytest.raises(DataError) as err:
        validate_long(_frame(score=1.0), "mine.jsonl", reward_column="rm")
    assert str(err.value) == "mine.jsonl: no reward column 'rm'; other columns: ['score']."
    with pytest.raises(DataError) as err:
        validate_long(_frame().iloc[:0], "mine.jsonl")
    assert str(err.value) == "mine.jsonl: no rows (columns: ['id', 'instruction', 'teacher', 'response'])."
    with pytest.raises(DataError, match=r"^data: wide format without an 'instruction' column"):
        to_long(pd.DataFrame({"t1": [{"content": "a"}]}))
    rows, _ = validate_long(_frame(rm=[1.0] * 6))
    assert len(rows) == 6  # no reward asked: none checked
    with pytest.raises(DataError, match=r"^data: null or empty 'rm' in row 4"):
        validate_long(_frame(rm=[1.0, 1.0, 1.0, 1.0, np.nan, 1.0]), reward_column="rm")


def test_a_streamed_wide_source_without_the_reward_column_lists_its_fields_and_no_internal_column(tmp_path):
    datasets.Dataset.from_pandas(_wide()).save_to_disk(str(tmp_path / "zoo"))
    with pytest.raises(DataError) as err:
        load_responses(str(tmp_path / "zoo"), reward_column="rm")
    assert str(err.value).endswith(
        "zoo: no reward column 'rm'; other columns: ['ArmoRM-Llama3-8B-v0.1', 'Skywork-Reward-Llama-3.1-8B']."
    )


def test_validated_responses_keep_their_source_and_revision_and_a_sample_is_seeded_42_by_default(tmp_path):
    from magpie_teach.data import sample_ids

    loaded = validated_responses(_frame(), "org/data", "abc123")
    assert (loaded.source, loaded.revision) == ("org/data", "abc123")
    frame = _frame(n_ids=12)
    path = tmp_path / "data.parquet"
    frame.to_parquet(path)
    drawn = load_responses(str(path), sample=4)
    assert set(drawn.rows["id"]) == sample_ids(frame["id"], 4, 42)


def test_an_unanswered_instruction_error_says_how_to_keep_the_answered_ones():
    with pytest.raises(
        DataError, match=r"\(pass --drop-invalid to keep only instructions every teacher answered\)\.$"
    ):
        validated_responses(_frame().drop(index=[3]), "data")


def test_a_shard_set_missing_a_shard_or_mixing_two_counts_is_an_error_naming_what_is_missing(tmp_path):
    frame = _zoo_frame(8)
    _write_shards(tmp_path / "zoo", frame, shards=4, row_group=2)
    rows = load_responses(str(tmp_path / "zoo")).rows
    assert rows["id"].nunique() == 8  # the whole set reads
    data = tmp_path / "zoo" / "data"
    (data / "train-00001-of-00004.parquet").unlink()
    (data / "train-00003-of-00004.parquet").unlink()
    with pytest.raises(DataError) as err:
        load_responses(str(tmp_path / "zoo"))
    assert str(err.value) == (
        f"{data}: 2 of the 4 shards of 'train' are missing (train-00001-of-00004.parquet, "
        "train-00003-of-00004.parquet); a partial set would be ranked as if it were the whole data: fetch the "
        "missing shards."
    )
    frame.iloc[:3].to_parquet(data / "train-00001-of-00004.parquet")
    frame.iloc[3:].to_parquet(data / "train-00000-of-00002.parquet")
    with pytest.raises(
        DataError, match=r"the shards of 'train' disagree on how many there are \(-of-00002, -of-00004\)"
    ):
        load_responses(str(tmp_path / "zoo"))


def test_sample_picks_the_same_instructions_in_processes_of_different_hash_seeds(tmp_path):
    """`--sample N --seed S` must choose the same instructions on every machine and run: two processes with
    different PYTHONHASHSEED (which reorders sets and dicts of strings) draw from the same file."""
    import json
    import os
    import subprocess
    import sys

    rows = [{"instruction": f"question number {i}?", "response": f"answer {i}", "teacher": t}
            for i in range(200) for t in ("t1", "t2")]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = ("import sys, json; from magpie_teach.data import load_responses, sample_instructions; "
            "rows = load_responses(sys.argv[1]).rows; "
            "print(json.dumps(sorted(sample_instructions(rows, 17, seed=5)['instruction'].unique())))")  # fmt: skip
    drawn = []
    for hash_seed in ("1", "987654"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, check=True
        )
        drawn.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert len(drawn[0]) == 17 and drawn[0] == drawn[1]
