"""Each score computed once: the content-keyed score cache, counted in forward passes of real (tiny) models."""

import contextlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from magpie_teach.ranking.rank import RankConfig, rank
from magpie_teach.scoring.cache import ScoreCache, example_keys


def _in_startup_check() -> bool:
    """Whether TokenNLLScorer's start-up check of its output layer is on the call stack."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_fast_path_matches":
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def counted_forward_rows():
    """Counts the rows (sequences) of every outermost forward pass of a transformers model, per model class;
    the scorer's one-row start-up check of its output layer is left out (it scores nothing)."""
    import torch
    from transformers import PreTrainedModel

    counts: dict[str, int] = {}
    depth = [0]

    def before(module, args):
        if isinstance(module, PreTrainedModel):
            depth[0] += 1

    def after(module, args, output):
        if not isinstance(module, PreTrainedModel):
            return
        depth[0] -= 1
        if depth[0] == 0:
            shape = getattr(output, "logits", None)
            shape = (shape if shape is not None else output.last_hidden_state).shape
            if not _in_startup_check():
                counts[type(module).__name__] = counts.get(type(module).__name__, 0) + int(shape[0])

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(before),
             torch.nn.modules.module.register_module_forward_hook(after)]  # fmt: skip
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


def _ranked(rows: pd.DataFrame, tmp_path, name: str, bases: list[str], reward: str, **settings):
    path = tmp_path / f"{name}.jsonl"
    rows.to_json(path, orient="records", lines=True)
    config = RankConfig(data=str(path), output_dir=str(tmp_path / name), base_models=bases, reward_model=reward,
                        bootstrap=0, cache_dir=str(tmp_path / "cache"), **settings)  # fmt: skip
    with counted_forward_rows() as counts:
        result = rank(config)
    return result, counts


def test_a_new_teacher_a_new_base_model_and_a_new_beta_cost_only_their_own_forward_passes(
    tiny_suite, sample_rows, tmp_path
):
    rows = sample_rows[["instruction", "response", "teacher"]]
    n_rows, n_instructions = len(rows), rows["instruction"].nunique()
    small, medium = tiny_suite.base_small, tiny_suite.base_medium

    first, counts = _ranked(rows, tmp_path, "first", [small], tiny_suite.reward)
    # a causal LM: every response twice (given the instruction, and alone for L(y)), every instruction once (L(x))
    assert counts == {"LlamaForSequenceClassification": n_rows, "LlamaModel": 2 * n_rows + n_instructions}

    extra = rows[rows["teacher"] == rows["teacher"].iloc[0]].assign(
        teacher="new-teacher", response=lambda f: f["response"] + " Hope this helps."
    )
    more, counts = _ranked(pd.concat([rows, extra]), tmp_path, "teacher", [small], tiny_suite.reward)
    assert counts == {"LlamaForSequenceClassification": n_instructions, "LlamaModel": 2 * n_instructions}
    assert more.summary["work"]["reward"] == {"scored": n_instructions, "from_cache": n_rows}
    old = more.scores[more.scores["teacher"] != "new-teacher"].sort_values(["id", "teacher"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(old, first.scores.sort_values(["id", "teacher"]).reset_index(drop=True))

    _, counts = _ranked(rows, tmp_path, "base", [small, medium], tiny_suite.reward)
    assert counts == {"LlamaModel": 2 * n_rows + n_instructions}  # the new base model's passes alone

    again, counts = _ranked(rows, tmp_path, "beta", [small], tiny_suite.reward, beta=1.0, reward_shift=2.0)
    assert counts == {}
    assert all(stage["scored"] == 0 for stage in again.summary["work"].values())
    pd.testing.assert_frame_equal(again.scores, first.scores)


def test_a_killed_run_resumes_from_its_last_finished_window(tiny_suite, sample_rows, tmp_path):
    rows = sample_rows[["instruction", "response", "teacher"]]
    path = tmp_path / "data.jsonl"
    rows.to_json(path, orient="records", lines=True)
    config = RankConfig(data=str(path), output_dir=str(tmp_path / "out"), base_models=[tiny_suite.base_small],
                        reward_model=tiny_suite.reward, bootstrap=0, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    from magpie_teach.scoring import compatibility

    calls = []
    real = compatibility._run_windows

    def killed_after_two_windows(*args, **kwargs):  # the run dies as its third window of compat starts
        on_window = kwargs["on_window"]

        def counting(start, frame):
            calls.append(start)
            if len(calls) == 2:
                on_window(start, frame)
                raise KeyboardInterrupt
            on_window(start, frame)

        return real(*args, **{**kwargs, "on_window": counting, "window": 16})

    compatibility._run_windows = killed_after_two_windows
    try:
        with pytest.raises(KeyboardInterrupt):
            rank(config)
    finally:
        compatibility._run_windows = real
    with counted_forward_rows() as counts:
        result = rank(config)
    assert result.summary["work"]["compat tiny-llama-s"] == {"scored": len(rows) - 32, "from_cache": 32}
    assert counts["LlamaModel"] == 2 * (len(rows) - 32) + rows["instruction"].nunique()


def test_a_cache_already_read_answers_for_what_it_stores_afterwards(tmp_path):
    identity = {"kind": "compat", "model": "m", "model_id": "sha256:x", "max_length": 8, "dtype": "float32"}
    keys = example_keys([f"q{i}" for i in range(4)], [f"a{i}" for i in range(4)])
    values = pd.DataFrame({"compat_loss": [0.0, 1.0, 2.0, 3.0], "n_tokens": [1, 2, 3, 4]})
    ScoreCache(tmp_path, identity).add(keys[:2], values.iloc[:2])
    cache = ScoreCache(tmp_path, identity)
    assert cache.lookup(keys)[0].tolist() == [True, True, False, False]
    cache.add(keys[1:3], values.iloc[1:3].assign(compat_loss=[9.0, 5.0]))  # keys[1] again: the first entry stays
    cache.add(keys[3:], values.iloc[3:])
    found, got = cache.lookup(keys[::-1])
    assert found.all() and got["compat_loss"].tolist() == [3.0, 5.0, 1.0, 0.0]
    assert got["n_tokens"].tolist() == [4, 3, 2, 1]


def test_entries_round_trip_and_a_corrupt_or_altered_part_is_never_read(tmp_path, caplog):
    identity = {"kind": "compat", "model": "m", "model_id": "sha256:x", "max_length": 8, "dtype": "float32"}
    keys = example_keys([f"q{i}" for i in range(6)], [f"a{i}" for i in range(6)])
    values = pd.DataFrame({"compat_loss": np.arange(6) / 7, "n_tokens": np.arange(6), "truncated": [True, False] * 3})
    cache = ScoreCache(tmp_path, identity)
    cache.add(keys[:3], values.iloc[:3])
    cache.add(keys[3:], values.iloc[3:])

    fresh = ScoreCache(tmp_path, identity)
    probe = np.concatenate([keys[::-1], example_keys(["q0"], ["another answer"])])
    found, got = fresh.lookup(probe)
    assert found.tolist() == [True] * 6 + [False]
    pd.testing.assert_frame_equal(got, values.iloc[::-1].reset_index(drop=True))
    assert json.loads((cache.folder / "scorer.json").read_text()) == identity
    assert ScoreCache(tmp_path, {**identity, "max_length": 9}).lookup(keys)[0].sum() == 0  # another setting

    first, second = sorted(cache.folder.glob("part-*.parquet"), key=lambda p: p.stat().st_mtime_ns)
    first.write_bytes(first.read_bytes()[:-20])  # cut short, as by a full disk
    import pyarrow.parquet as pq

    table = pq.read_table(second)  # readable, but one value changed after the checksum was taken
    altered = table.set_column(0, "compat_loss", [[9.0, 9.0, 9.0]])
    pq.write_table(altered.replace_schema_metadata(table.schema.metadata), second)
    with caplog.at_level(logging.WARNING):
        found, got = ScoreCache(tmp_path, identity).lookup(keys)
    assert not found.any() and got is None
    assert caplog.text.count("is corrupt or incomplete") == 2 and "(checksum mismatch)" in caplog.text
    assert not list(cache.folder.glob("part-*.parquet"))


def test_keys_follow_the_texts_and_read_a_context_as_messages():
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    as_json = example_keys(["q"], ["a"], [json.dumps(turns)])
    as_list = example_keys(["q"], ["a"], [turns])
    assert as_json[0] == as_list[0]
    assert example_keys(["q"], ["a"], [None])[0] != example_keys(["nullq"], ["a"])[0]  # the context is delimited
    assert len({example_keys(["q"], ["a"])[0], as_json[0], example_keys(["q"], ["b"])[0],
                example_keys(["q\x00a"], [""])[0], example_keys(["q"])[0]}) == 5  # fmt: skip


def test_rank_in_windows_scores_each_example_once_and_writes_what_one_window_writes(
    tiny_suite, sample_rows, tmp_path, monkeypatch, capsys
):
    """Past `data.WINDOW_ROWS` responses, `rank` scores a window at a time: each model passes over every window
    (loaded once), then the scores are read back from the cache and written; no text is held beyond a window."""
    from magpie_teach import data

    rows = sample_rows[["instruction", "response", "teacher"]]
    bases = [tiny_suite.base_small, tiny_suite.base_medium]
    whole, whole_counts = _ranked(rows, tmp_path, "whole", bases, tiny_suite.reward)
    (tmp_path / "w").mkdir()
    monkeypatch.setattr(data, "WINDOW_ROWS", 5)
    capsys.readouterr()
    windowed, counts = _ranked(rows, tmp_path / "w", "windowed", bases, tiny_suite.reward)
    assert f"tiny-llama-s: scoring {len(rows)} responses in windows of 5" in capsys.readouterr().err
    assert len(rows) > 2 * 5  # several windows, and instructions whose answers fall in two of them
    assert counts == whole_counts  # every response, and every instruction's L(x), scored once
    scored = {stage: work["scored"] for stage, work in windowed.summary["work"].items()}
    assert scored == {stage: work["scored"] for stage, work in whole.summary["work"].items()}
    for name in ("scores.parquet", "ranking.csv"):
        read = pd.read_parquet if name.endswith(".parquet") else pd.read_csv
        got, expected = read(windowed.output_dir / name), read(whole.output_dir / name)
        pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-5, atol=1e-6)
    assert not (windowed.output_dir / ".scores-partial.parquet").exists()
    # what stays in memory: the ranked columns of every row, names as categories, and no text
    from magpie_teach.ranking.rank import RANKED_COLUMNS

    assert set(windowed.scores.columns) <= set(RANKED_COLUMNS) and len(windowed.scores) == len(whole.scores)
    assert set(windowed.scores.columns) == set(RANKED_COLUMNS)
    assert all(windowed.scores[c].dtype == "category" for c in ("id", "teacher", "base_model"))
    numbers = windowed.scores.astype({c: str for c in ("id", "teacher", "base_model")})
    pd.testing.assert_frame_equal(numbers, whole.scores[list(windowed.scores.columns)].astype(numbers.dtypes.to_dict()),
                                  check_exact=False, rtol=1e-5, atol=1e-6)  # fmt: skip


def test_rows_staged_for_ray_read_back_in_shards_of_the_size_asked_with_their_stage_position_and_key(tmp_path):
    """What the driver stages for Ray Data (:class:`magpie_teach.scoring.on_ray.Staging`), read back by the read
    tasks' own function: shards of 3 rows across the stages' boundary, each row's texts (earlier turns as the same
    messages, whether given as a list or as JSON text; no response for L(x)), stage, position within its stage
    and 16-byte key, one ending in zero bytes included; an empty frame adds nothing; a rerun's stale shards go."""
    import pyarrow as pa

    from magpie_teach.chat import parse_context
    from magpie_teach.scoring.on_ray import Staging, _read_shards

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    answers = pd.DataFrame({"instruction": [f"q{i}" for i in range(5)], "response": [f"a{i}" for i in range(5)],
                            "context": [turns, None, json.dumps(turns), "", None]})  # fmt: skip
    questions = pd.DataFrame({"id": [7, 8], "instruction": ["q0", "q9"]})
    keys = example_keys(answers["instruction"].tolist(), answers["response"].tolist())
    keys[1] = b"\x01" * 8 + b"\x00" * 8  # a key whose last bytes are zeros keeps all 16
    question_keys = example_keys(questions["instruction"].tolist())

    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "shard-000009.parquet").write_bytes(b"from a killed run")
    with Staging(tmp_path / "stage", rows=3) as staging:
        staging.add(0, answers.iloc[:2], keys[:2])  # one stage in two parts: its positions run on
        staging.add(0, answers.iloc[2:], keys[2:])
        staging.add(1, questions.iloc[:0], question_keys[:0])
        staging.add(1, questions, question_keys)
        files = staging.close()
        assert [pd.read_parquet(f).shape[0] for f in files] == [3, 3, 1]
        assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == sorted(Path(f).name for f in files)
        assert staging.counts == {0: 5, 1: 2}

        rows = _read_shards(pa.table({"path": files})).to_pandas()
        assert rows["_stage"].tolist() == [0] * 5 + [1] * 2 and rows["_position"].tolist() == [0, 1, 2, 3, 4, 0, 1]
        assert rows["instruction"].tolist() == [*answers["instruction"], *questions["instruction"]]
        assert rows["response"].tolist()[:5] == answers["response"].tolist() and rows["response"].isna()[5:].all()
        assert [parse_context(c) for c in rows["context"]] == [turns, None, turns, None, None, None, None]
        staged = np.array([bytes(k) for k in rows["_key"]], dtype="S16")
        assert all(len(k) == 16 for k in rows["_key"])
        assert (staged == np.concatenate([keys, question_keys])).all()
    assert not (tmp_path / "stage").exists()


def test_a_local_model_whose_weights_are_replaced_keeping_size_and_mtime_gets_a_new_identity(tmp_path):
    """`cp -p`, `rsync -a` and archives keep a file's mtime: weights replaced that way (same size, same mtime) must
    not be taken for the old ones, or their old scores would be read back."""
    import os
    import shutil

    from magpie_teach.scoring.cache import model_identity

    model, other, cache = tmp_path / "model", tmp_path / "other", tmp_path / "cache"
    model.mkdir()
    other.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"A" * 64)
    (other / "model.safetensors").write_bytes(b"B" * 64)
    first = model_identity(str(model), cache)
    assert first.startswith("sha256:") and model_identity(str(model), cache) == first  # remembered
    weights = model / "model.safetensors"
    before = weights.stat()
    os.utime(other / "model.safetensors", ns=(before.st_atime_ns, before.st_mtime_ns))
    weights.unlink()
    shutil.copy2(other / "model.safetensors", weights)  # cp -p: the new bytes under the old size and mtime
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = model_identity(str(model), cache)
    assert second != first and second.startswith("sha256:")


def test_a_run_at_another_max_length_scores_again_and_gets_its_own_numbers(tiny_suite, sample_rows, tmp_path):
    """max_length changes what is scored (a conversation is cut there): a run at another max_length must not read
    the first run's scores from the cache, and gets what a run without any cache gets at that length."""
    rows = sample_rows[["instruction", "response", "teacher"]]
    n_rows = len(rows)
    first, _ = _ranked(rows, tmp_path, "long", [tiny_suite.base_small], tiny_suite.reward, max_length=256)
    short, counts = _ranked(rows, tmp_path, "short", [tiny_suite.base_small], tiny_suite.reward, max_length=64)
    assert short.summary["work"]["reward"]["scored"] == n_rows and counts["LlamaForSequenceClassification"] == n_rows
    assert short.summary["work"]["compat tiny-llama-s"] == {"scored": n_rows, "from_cache": 0}
    (tmp_path / "fresh").mkdir()
    alone, _ = _ranked(rows, tmp_path / "fresh", "short", [tiny_suite.base_small], tiny_suite.reward, max_length=64,
                       cache=False)  # fmt: skip
    key = ["id", "teacher"]
    got = short.scores.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, alone.scores.sort_values(key).reset_index(drop=True))
    assert not np.allclose(got["compat_loss"], first.scores.sort_values(key)["compat_loss"])  # 64 tokens cut some


def test_dtype_auto_is_float32_on_the_cpu_so_it_reads_what_float32_stored_and_bfloat16_on_gpu_actors(
    tiny_suite, sample_rows, tmp_path
):
    """The default dtype is auto: float32 where the scores are computed on the CPU (a run with --dtype float32
    stored them: nothing is scored again), bfloat16 where a Ray actor holds a GPU (the cache keys say so, so those
    scores are never read as float32 ones); float16 stays float16."""
    from magpie_teach.errors import ConfigError
    from magpie_teach.modeling import dtype_for, load_tokenizer
    from magpie_teach.scoring.executor import score_caches

    assert (dtype_for("auto", "cpu"), dtype_for("auto", "cuda:1"), dtype_for("float16", "cuda")) == (
        "float32", "bfloat16", "float16")  # fmt: skip
    with pytest.raises(ConfigError, match="dtype='fp8' is not one of"):
        dtype_for("fp8", "cpu")
    rows = sample_rows[["instruction", "response", "teacher"]]
    _ranked(rows, tmp_path, "fp32", [tiny_suite.base_small], tiny_suite.reward, dtype="float32")
    again, counts = _ranked(rows, tmp_path, "auto", [tiny_suite.base_small], tiny_suite.reward)
    assert RankConfig.__dataclass_fields__["dtype"].default == "auto" and not counts
    assert all(stage["scored"] == 0 for stage in again.summary["work"].values())
    tokenizer = load_tokenizer(tiny_suite.base_small)
    on_gpus = RankConfig(data="x", output_dir=str(tmp_path / "o"), base_models=[tiny_suite.base_small], reward_model=tiny_suite.reward,
                         cache_dir=str(tmp_path / "cache"), ray_address="127.0.0.1:6379", gpus_per_worker=1)  # fmt: skip
    (cache,) = score_caches(on_gpus, ["compat"], tiny_suite.base_small, tokenizer)
    assert cache.identity["dtype"] == "bfloat16"
    (cache,) = score_caches(RankConfig(**{**vars(on_gpus), "gpus_per_worker": 0}), ["compat"], tiny_suite.base_small,
                             tokenizer)  # fmt: skip
    assert cache.identity["dtype"] == "float32"


def test_a_model_whose_weights_cannot_be_named_resumes_from_its_output_folder_and_nowhere_else(
    tiny_suite, sample_rows, tmp_path, monkeypatch
):
    """A model with no content identity (a Hub id whose commit cannot be learnt) is cached under the run's folder:
    a rerun into that folder scores nothing again; a run into another folder, which cannot know the weights are
    the same, scores it all again; the named models' scores stay in the shared cache either way."""
    from magpie_teach.scoring import cache

    named = cache.model_identity
    monkeypatch.setattr(cache, "model_identity", lambda model, root: None if model == tiny_suite.base_small
                        else named(model, root))  # fmt: skip
    rows = sample_rows[["instruction", "response", "teacher"]]
    n_rows, n_instructions = len(rows), rows["instruction"].nunique()
    path = tmp_path / "rows.jsonl"
    rows.to_json(path, orient="records", lines=True)

    def ranked(folder: str):
        config = RankConfig(data=str(path), output_dir=str(tmp_path / folder), base_models=[tiny_suite.base_small],
                            reward_model=tiny_suite.reward, bootstrap=0, cache_dir=str(tmp_path / "cache"))  # fmt: skip
        with counted_forward_rows() as counts:
            return rank(config), counts

    first, counts = ranked("run")
    assert counts == {"LlamaForSequenceClassification": n_rows, "LlamaModel": 2 * n_rows + n_instructions}
    assert (tmp_path / "run" / ".score-cache").is_dir()
    again, counts = ranked("run")
    assert not counts and all(stage["scored"] == 0 for stage in again.summary["work"].values())
    pd.testing.assert_frame_equal(again.scores, first.scores)
    elsewhere, counts = ranked("other")
    assert counts == {"LlamaModel": 2 * n_rows + n_instructions}  # the reward model's scores came from the cache
