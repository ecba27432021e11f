"""`magpie-teach generate`: real distilabel pipelines on tiny models, killed with SIGKILL and resumed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.processes import ray_head as local_ray_head


def write_config(path: Path, tiny_suite, sample_path, out: Path, **extra) -> Path:
    config = {
        "output_dir": str(out),
        "instructions": {"path": sample_path},
        "teachers": [
            {"name": "small", "model": tiny_suite.base_small, "sampling": {"max_new_tokens": 16}},
            {"name": "medium", "model": tiny_suite.base_medium, "sampling": {"max_new_tokens": 16}},
        ],
        "batch_size": 3,
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def generate(config: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "magpie_teach.cli", "generate", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)  # fmt: skip


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def batches(out: Path) -> set[Path]:
    return set((out / "store").glob("*/batch-*.parquet"))


KEY = ["teacher", "id", "generation_index"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_suite, sample_path):
    root = tmp_path_factory.mktemp("gen-full")
    finish(generate(write_config(root / "c.yaml", tiny_suite, sample_path, root / "out")))
    return pd.read_parquet(root / "out" / "responses.parquet").sort_values(KEY).reset_index(drop=True)


def test_output_is_the_long_format(uninterrupted):
    assert set(uninterrupted["teacher"]) == {"small", "medium"}
    assert uninterrupted.groupby("teacher").size().tolist() == [24, 24]  # the 24 distinct instructions, once each
    for column in ("id", "instruction", "response", "n_tokens", "hit_max_new_tokens", "status", "reason", "settings"):
        assert column in uninterrupted.columns
    assert (uninterrupted["status"] == "ok").all()
    assert (uninterrupted["hit_max_new_tokens"] == (uninterrupted["n_tokens"] >= 16)).all()


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_same_rows_and_keeps_finished_batches(
    tmp_path, tiny_suite, sample_path, uninterrupted
):
    kill_after_batches = 4  # of 16: a kill mid-run, with finished batches to keep
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_suite, sample_path, out)
    process = generate(config)
    deadline = time.monotonic() + 240
    while len(batches(out)) < kill_after_batches and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = {p: pd.read_parquet(p) for p in batches(out)}
    assert before, "the run was killed before its first batch was stored"
    assert not (out / "responses.parquet").exists()
    # distilabel's cache writes are off, but a cache left by an older run, or a kill while distilabel wrote
    # its pipeline.yaml, leaves an empty file there: the rerun must not trip on it
    stale = out / ".distilabel-cache" / "generate" / "magpie-teach-generate" / "0" / "pipeline.yaml"
    stale.parent.mkdir(parents=True, exist_ok=True)
    for path in [stale, *(out / ".distilabel-cache").rglob("pipeline.yaml")]:
        path.write_text("")
    finish(generate(config))
    after = pd.read_parquet(out / "responses.parquet").sort_values(KEY).reset_index(drop=True)
    pd.testing.assert_frame_equal(after[[*KEY, "response"]], uninterrupted[[*KEY, "response"]])
    # finished batches were kept, and the rerun did not generate their rows again
    new_files = batches(out) - set(before)
    done_before = {(t, i) for frame in before.values() for t, i in zip(frame.teacher, frame.id)}
    redone = {(t, i) for p in new_files for t, i in zip(pd.read_parquet(p).teacher, pd.read_parquet(p).id)}
    assert all(p.exists() for p in before) and not done_before & redone


def test_dry_run_and_config_errors(tmp_path, tiny_suite, sample_path):
    config = write_config(tmp_path / "c.yaml", tiny_suite, sample_path, tmp_path / "out")
    result = subprocess.run([sys.executable, "-m", "magpie_teach.cli", "generate", str(config), "--dry-run"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0 and "small: 24 instruction(s) to generate" in result.stdout
    assert "to generate: 48 generations, at most 768 generated tokens" in result.stdout  # 2 x 24 x 16 tokens
    assert not (tmp_path / "out" / "store").exists()
    text = config.read_text().replace("max_new_tokens", "max_new_tokenz", 1)
    config.write_text(text)
    result = subprocess.run([sys.executable, "-m", "magpie_teach.cli", "generate", str(config), "--dry-run"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2
    assert "teachers[0].sampling.max_new_tokenz: unknown key; did you mean 'max_new_tokens'?" in result.stderr
    values = yaml.safe_load(text.replace("max_new_tokenz", "max_new_tokens"))
    for change, message in (({"teachers": []}, "at least one teacher"),
                            ({"teachers": values["teachers"][:1] * 2}, "names must be unique, ['small'] repeat"),
                            ({"teachers": [{**values["teachers"][0], "backend": "tgi"}]}, "teachers[0].backend: 'tgi' is not available"),
                            ({"teachers": [{**values["teachers"][0], "dtype": "bf16"}]}, "teachers[0].dtype: 'bf16' is not one of float32, bfloat16, float16, auto"),
                            ({"instructions": {"magpie": {"model": "m", "dtype": "fp8"}}}, "instructions.magpie.dtype: 'fp8' is not one of")):  # fmt: skip
        config.write_text(yaml.safe_dump({**values, **change}))
        result = subprocess.run(
            [sys.executable, "-m", "magpie_teach.cli", "generate", str(config)], capture_output=True, text=True
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_a_teacher_named_last_that_cannot_load_fails_in_one_line_before_anything_runs(tmp_path, tiny_suite,
                                                                                       sample_path):  # fmt: skip
    """Every model is located first: a second teacher the (unreachable) Hub would have to supply fails the run,
    dry or not, in one line naming its key, before the first teacher generates anything."""
    import os

    from tests.hub.local import OFFLINE_FLAGS
    from tests.processes import free_port

    config = write_config(tmp_path / "c.yaml", tiny_suite, sample_path, tmp_path / "out")
    values = yaml.safe_load(config.read_text())
    values["teachers"].append({**values["teachers"][0], "name": "hub-teacher", "model": "lab/missing-teacher"})
    last = len(values["teachers"]) - 1
    config.write_text(yaml.safe_dump(values))
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_FLAGS}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf-home"))
    for extra in (["--dry-run"], []):
        result = subprocess.run([sys.executable, "-m", "magpie_teach.cli", "generate", str(config), *extra],
                                capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert f"teachers[{last}].model 'lab/missing-teacher': it is not a folder here, the Hub at" in lines[0]
        assert not (tmp_path / "out" / "store").exists()


def test_shipped_configs_validate(tmp_path, monkeypatch, tiny_suite):
    """The shipped configs load where `magpie-teach tiny --output outputs/models` was run; without those models
    the error names the key and the missing folder (a path that cannot be a Hub id is not sent to the Hub)."""
    from magpie_teach.errors import ConfigError
    from magpie_teach.generation.config import load_generate_config
    from tests.conftest import REPO

    configs = sorted((REPO / "pipelines" / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    (tmp_path / "src").symlink_to(REPO / "src")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"teachers\[0\]\.model: 'outputs/models/tiny-llama-s' is not a folder here"):
        load_generate_config(str(configs[0]))
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "models").symlink_to(Path(tiny_suite.base_small).parent)
    for path in configs:
        config = load_generate_config(str(path))
        assert config.teachers and all(Path(t.model).is_absolute() for t in config.teachers)


@pytest.mark.slow
def test_magpie_instructions_then_teachers(tmp_path, tiny_suite):
    out = tmp_path / "out"
    config = {
        "output_dir": str(out),
        "instructions": {
            # 5 rows in batches of 3: distilabel's own MagpieGenerator never finishes a partial last batch
            "magpie": {"model": tiny_suite.base_small, "template": "chatml", "num_rows": 5, "max_new_tokens": 12}
        },
        "teachers": [{"name": "small", "model": tiny_suite.base_small, "sampling": {"max_new_tokens": 8}}],
        "batch_size": 3,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    dry = subprocess.run(
        [sys.executable, "-m", "magpie_teach.cli", "generate", str(path), "--dry-run"], capture_output=True, text=True
    )
    assert (
        dry.returncode == 0 and "'magpie_to_generate': 5" in dry.stdout and not (out / "instructions.parquet").exists()
    )
    finish(generate(path))
    instructions = pd.read_parquet(out / "instructions.parquet")
    assert len(instructions) == 5 and set(instructions["magpie_model"]) == {tiny_suite.base_small}
    assert (instructions["magpie_template"] == "chatml").all()
    responses = pd.read_parquet(out / "responses.parquet")
    summary = __import__("json").loads((out / "summary.json").read_text())
    kept = summary["counts"]["instructions_used"]
    assert kept == 5 - summary["counts"]["dropped_empty"] - summary["counts"].get("dropped_duplicate", 0)
    assert len(responses) == kept and set(responses["instruction"]) <= set(instructions["instruction"])
    # a rerun reuses the generated instructions and has nothing left to do
    again = finish(generate(path))
    assert "small: 0 instruction(s) to generate" in again
    pd.testing.assert_frame_equal(pd.read_parquet(out / "instructions.parquet"), instructions)
    # the run's manifest lists what push publishes of both kinds, Magpie's instructions with the responses
    from magpie_teach.artefacts import content_digest, verify_run

    manifest = verify_run(out, "push")
    assert manifest["kind"] == "generate" and manifest["complete"]
    for name in ("instructions.parquet", "responses.parquet", "generate_config.yaml", "summary.json"):
        assert manifest["files"][name] == content_digest(out / name), name


def test_instructions_need_exactly_one_source(tmp_path, tiny_suite):
    from magpie_teach.config import from_dict
    from magpie_teach.errors import ConfigError
    from magpie_teach.generation.config import GenerateConfig

    teacher = [{"name": "t", "model": tiny_suite.base_small}]
    with pytest.raises(ConfigError, match="exactly one of path"):
        from_dict(GenerateConfig, {"output_dir": "o", "instructions": {}, "teachers": teacher})
    with pytest.raises(ConfigError, match="exactly one of path"):
        from_dict(
            GenerateConfig,
            {"output_dir": "o", "instructions": {"path": "x", "magpie": {"model": "m"}}, "teachers": teacher},
        )


def test_progress_bars_follow_the_store(tmp_path, capsys):
    from magpie_teach.batch_store import BatchStore
    from magpie_teach.steps.pipelines import StoreProgress

    store = BatchStore(tmp_path / "store")
    with StoreProgress(store, {"a": 4}, interval=0.05, show=True):
        for i in range(3):
            store.write("a", pd.DataFrame({"id": [str(i)], "teacher": ["a"], "generation_index": [0]}))
            time.sleep(0.1)
    err = capsys.readouterr().err
    assert "a: " in err and "3/4" in err


def test_instruction_filters_are_counted(tmp_path, tiny_suite, sample_path):
    from magpie_teach.generation.config import load_generate_config
    from magpie_teach.generation.run import load_instructions

    path = write_config(tmp_path / "c.yaml", tiny_suite, sample_path, tmp_path / "out")
    values = yaml.safe_load(path.read_text())
    values["instructions"].update(min_chars=30, max_chars=60, sample=5, seed=1)
    path.write_text(yaml.safe_dump(values))
    instructions, counts = load_instructions(load_generate_config(str(path)))
    texts = pd.read_json(sample_path, lines=True)["instruction"]  # reference computed here
    in_range = texts[(texts.str.len() >= 30) & (texts.str.len() <= 60)]
    assert counts["dropped_by_length"] == len(texts) - len(in_range)
    assert counts["dropped_duplicate"] == len(in_range) - in_range.nunique()
    assert counts["dropped_by_sample"] == in_range.nunique() - 5 and len(instructions) == 5
    assert set(instructions["instruction"]) <= set(in_range)


@pytest.fixture
def ray_head(tmp_path):
    with local_ray_head(tmp_path) as address:
        yield address


@pytest.mark.slow
def test_the_same_pipeline_on_a_ray_cluster_gives_the_same_rows(tmp_path, ray_head):
    """The README's commands as written: tiny models, the shipped config on this machine, then the shipped Ray
    config (address auto, resolved through $RAY_ADDRESS as on a cluster node): the same rows."""
    from tests.conftest import REPO

    (tmp_path / "pipelines").symlink_to(REPO / "pipelines")
    (tmp_path / "src").symlink_to(REPO / "src")
    # DISTILABEL_LOG_LEVEL=INFO: distilabel's per-batch lines, which Ray prefixes with the actor's class
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ray_head, "DISTILABEL_LOG_LEVEL": "INFO"}

    def cli(*argv: str) -> str:
        from tests.readme_commands import run_readme_command

        result = run_readme_command(list(argv), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:]
        return result.stdout

    cli("tiny", "--output", "outputs/models")
    cli("generate", "pipelines/configs/tiny_cpu.yaml")
    output = cli("generate", "pipelines/configs/tiny_cpu_ray.yaml")
    assert "_StepWrapperRay" in output  # the steps ran as Ray actors
    local = pd.read_parquet(tmp_path / "outputs" / "generate-tiny" / "responses.parquet")
    on_ray = pd.read_parquet(tmp_path / "outputs" / "generate-tiny-ray" / "responses.parquet")
    assert set(on_ray["teacher"]) == {"tiny-greedy", "tiny-sampled"} and len(on_ray) == 48
    pd.testing.assert_frame_equal(  # the sampled teacher too: its seed is applied per batch, and batches are the same
        on_ray.sort_values(KEY)[[*KEY, "response"]].reset_index(drop=True),
        local.sort_values(KEY)[[*KEY, "response"]].reset_index(drop=True),
    )


@pytest.mark.slow
def test_scoring_in_the_pipeline_gives_the_numbers_of_rank_and_resumes(tmp_path, tiny_suite, sample_path):
    """A `scoring:` block: reward, compatibility per base model and CAR inside `generate` (distilabel steps over
    the engine) give the same per-example scores and ranking as `magpie-teach rank` run afterwards on the
    same responses; best-of-N output (num_generations 2) is scored per generation."""
    import json

    out = tmp_path / "out"
    values = yaml.safe_load(write_config(tmp_path / "c.yaml", tiny_suite, sample_path, out).read_text())
    values["instructions"]["sample"] = 8
    values["teachers"][1].update(num_generations=2, sampling={"max_new_tokens": 16, "temperature": 1.0, "seed": 3})
    values["scoring"] = {
        "reward_model": tiny_suite.reward,
        "base_models": [tiny_suite.base_small, tiny_suite.base_large],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    printed = finish(generate(path))
    assert "p_best" in printed and "wrote " + str(out / "rank") in printed
    assert printed.index("instruction(s) to generate") < printed.index("rows/s")  # the plan, then the progress
    assert "Untracked error" not in printed  # distilabel's citation scraping of a step's references (bs4, network)
    # one sentence per base model: 8 instructions are below the minimum a decision needs, and it says so
    assert sum("but nothing is decided: 8 instruction(s) are too few" in line for line in printed.splitlines()) == 2
    scored = pd.read_parquet(out / "rank" / "scores.parquet")
    responses = pd.read_parquet(out / "responses.parquet")
    assert len(responses) == 8 + 16  # 8 greedy + 8 x 2 sampled generations
    failed = set(responses.loc[responses["status"] != "ok", "id"])  # an instruction with a failed row is dropped
    kept = responses[~responses["id"].isin(failed)]
    assert len(scored) == 2 * len(kept) and len(kept) >= 12  # 2 base models
    assert sorted(scored.groupby("teacher")["generation_index"].max()) == [0, 1]
    # generate's generation-cap flag travels into the scores (rank's below carries it the same way: equal frames)
    index = ["id", "teacher", "generation_index"]
    capped = kept.set_index(index)["hit_max_new_tokens"]
    assert (
        capped.any()
        and (scored.set_index(index)["hit_max_new_tokens"] == capped.reindex(scored.set_index(index).index)).all()
    )
    ranking = pd.read_csv(out / "rank" / "ranking.csv").set_index(["teacher", "base_model"])
    per_teacher = kept.groupby("teacher")["hit_max_new_tokens"].sum()
    assert (ranking["n_hit_max_new_tokens"] == ranking.index.get_level_values("teacher").map(per_teacher)).all()

    reference = tmp_path / "rank"
    result = subprocess.run(
        [sys.executable, "-m", "magpie_teach.cli", "rank", "--data", str(out / "responses.parquet"),
         "--base-model", tiny_suite.base_small, "--base-model", tiny_suite.base_large,
         "--reward-model", tiny_suite.reward, "--drop-invalid", "--output", str(reference)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    key = ["base_model", "teacher", "id", "generation_index"]
    mine = scored.sort_values(key).reset_index(drop=True)
    theirs = pd.read_parquet(reference / "scores.parquet").sort_values(key).reset_index(drop=True)
    assert list(mine.columns) == list(theirs.columns)
    pd.testing.assert_frame_equal(mine, theirs, check_exact=False, rtol=1e-4, atol=1e-5)
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "rank" / "ranking.csv"), pd.read_csv(reference / "ranking.csv"), rtol=1e-4, atol=1e-5
    )
    # one resume store: `rank` after `generate` scored nothing again (generate's scoring is rank's executor)
    reused = json.loads((reference / "summary.json").read_text())["work"]
    assert reused and all(stage["scored"] == 0 and stage["from_cache"] for stage in reused.values())
    # resumable: drop what the cache holds of one base model's losses, rerun: only those are scored again
    cache = Path(os.environ["MAGPIE_TEACH_CACHE"])
    large = [part for part in cache.glob("compat/*/part-*.parquet")
             if json.loads((part.parent / "scorer.json").read_text())["model"] == tiny_suite.base_large]  # fmt: skip
    assert large
    for part in large:
        part.unlink()
    finish(generate(path))
    work = json.loads((out / "rank" / "summary.json").read_text())["work"]
    assert work["compat tiny-llama-l"] == {"scored": len(kept), "from_cache": 0}
    assert all(stage["scored"] == 0 for name, stage in work.items() if name != "compat tiny-llama-l")
    again = pd.read_parquet(out / "rank" / "scores.parquet").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(again, mine, check_exact=False, rtol=1e-4, atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scoring"]["counts"]["rows_kept"] == len(kept)
    assert summary["scoring"]["counts"].get("failed_generation", 0) == (responses["status"] != "ok").sum()


def test_best_of_n_rows_need_a_generation_index_per_response(sample_rows):
    from magpie_teach.data import validate_long
    from magpie_teach.errors import DataError

    rows = sample_rows[sample_rows["teacher"] == sample_rows["teacher"].iloc[0]].head(3)
    twice = pd.concat([rows.assign(generation_index=0), rows.assign(generation_index=1)], ignore_index=True)
    kept, _ = validate_long(twice)
    assert len(kept) == 6
    with pytest.raises(DataError, match=r"duplicate \(id, teacher, generation_index\)"):
        validate_long(pd.concat([twice, twice.head(1)], ignore_index=True))
    with pytest.raises(DataError, match="generation_index"):
        validate_long(twice.assign(generation_index=[0, 1, 2, -1, 1, 2]))


@pytest.mark.slow
def test_multi_turn_magpie_with_weighted_categories_answered_and_scored_in_context(tmp_path, tiny_suite):
    """Magpie with two turns and categories: the teachers answer the last user turn after the earlier turns,
    the scoring stage scores that answer in context, and select writes the whole conversation."""
    import json

    from magpie_teach.selection.select import SelectConfig, select

    out = tmp_path / "out"
    categories = {
        "math": {"prompt": "You help with arithmetic.", "weight": 3},
        "code": {"prompt": "You help with code."},
    }
    config = {
        "output_dir": str(out),
        "instructions": {"magpie": {"model": tiny_suite.base_small, "num_rows": 6, "max_new_tokens": 8, "n_turns": 2,
                                    "categories": categories, "seed": 1}},
        "teachers": [{"name": "small", "model": tiny_suite.base_small,
                      "sampling": {"max_new_tokens": 8, "temperature": 0.0}}],
        "scoring": {"reward_model": tiny_suite.reward, "base_models": [tiny_suite.base_medium]},
        "batch_size": 1,  # one prompt a batch: no padding, so a plain greedy generate gives the same tokens
    }  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    finish(generate(path))
    instructions = pd.read_parquet(out / "instructions.parquet")
    assert len(instructions) == 6 and set(instructions["category"]) <= {"math", "code"}
    complete = instructions.dropna(subset=["instruction"])
    for context in complete["context"]:
        assert [m["role"] for m in json.loads(context)] == [
            "user",
            "assistant",
        ]  # turn 1; turn 2's user text is the instruction
    settings = json.loads(instructions["magpie_settings"].iloc[0])
    assert settings["n_turns"] == 2 and settings["categories"]["math"]["weight"] == 3
    responses = pd.read_parquet(out / "responses.parquet")
    assert set(responses["context"]) <= set(complete["context"])
    # the teacher answered the last user turn after the earlier turns: a plain greedy generate on the whole
    # conversation (context + instruction) gives the same text
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_suite.base_small)
    model = AutoModelForCausalLM.from_pretrained(tiny_suite.base_small).eval()
    answered = responses[responses["status"] == "ok"]
    assert len(answered) >= 3
    for row in answered.itertuples():
        messages = [*json.loads(row.context), {"role": "user", "content": row.instruction}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
        assert row.response == tokenizer.decode(new, skip_special_tokens=True), row.id
    scores = pd.read_parquet(out / "rank" / "scores.parquet")
    ok = responses[responses["status"] == "ok"]
    assert len(scores) == len(ok) and scores["context"].notna().all()
    # random tiny teachers never stop before their cap: keep those rows, they are what is under test here
    result = select(
        SelectConfig(scores=str(out / "rank"), output_dir=str(tmp_path / "sft"), teacher="small", keep_capped=True)
    )
    first = pd.read_parquet(result.output_dir / "data" / "train-00000-of-00001.parquet").iloc[0]
    messages = [dict(m) for m in first["messages"]]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[:2] == json.loads(scores.set_index("id").loc[first["id"], "context"])


def test_magpie_category_weights_are_normalised_and_checked():
    from magpie_teach.config import from_dict
    from magpie_teach.errors import ConfigError
    from magpie_teach.generation.config import MagpieConfig

    spec = from_dict(
        MagpieConfig, {"model": "m", "categories": {"math": {"prompt": "M", "weight": 3}, "code": {"prompt": "C"}}}
    )
    assert spec.system_prompts() == {"math": ("M", 0.75), "code": ("C", 0.25)}
    with pytest.raises(ConfigError, match=r"categories\.code\.weight"):
        from_dict(MagpieConfig, {"model": "m", "categories": {"code": {"prompt": "C", "weight": 0}}}).validate()
    with pytest.raises(ConfigError, match=r"categories\.code\.promt: unknown key; did you mean 'prompt'"):
        from_dict(MagpieConfig, {"model": "m", "categories": {"code": {"promt": "C"}}})
    with pytest.raises(ConfigError, match="not both"):
        from_dict(
            MagpieConfig, {"model": "m", "system_prompt": "S", "categories": {"code": {"prompt": "C"}}}
        ).validate()


@pytest.mark.slow
def test_a_failing_step_fails_the_run_loudly_and_keeps_what_finished(tmp_path, tiny_suite, sample_path):
    """A teacher whose model cannot load: the run exits non-zero naming the rows left missing, the batches
    already finished stay in the store (another teacher's, here from an earlier run of the same folder), no
    responses.parquet with holes is written, and once the model is fixed a rerun generates only what is missing."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    out = tmp_path / "out"
    values = yaml.safe_load(write_config(tmp_path / "c.yaml", tiny_suite, sample_path, out).read_text())
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**values, "teachers": values["teachers"][:1]}))
    finish(generate(path))  # the first teacher's batches, finished
    kept = {p: pd.read_parquet(p) for p in batches(out)}
    assert set(pd.concat(kept.values())["teacher"]) == {"small"}
    (out / "responses.parquet").unlink()

    values["teachers"][1]["model"] = str(broken)
    path.write_text(yaml.safe_dump(values))
    process = generate(path)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0, output[-3000:]
    assert "missing" in output and "medium" in output, output[-3000:]
    assert not (out / "responses.parquet").exists()
    assert all(p.exists() for p in kept)  # what finished is kept
    # the model fixed, a rerun generates only what is missing: the broken teacher's rows
    values["teachers"][1]["model"] = tiny_suite.base_medium
    path.write_text(yaml.safe_dump(values))
    finish(generate(path))
    assert all(p.exists() for p in kept)
    new = pd.concat(pd.read_parquet(p) for p in batches(out) - set(kept))
    assert set(new["teacher"]) == {"medium"} and new["id"].nunique() == 24
    assert len(pd.read_parquet(out / "responses.parquet")) == 48


@pytest.mark.slow
def test_kill_9_of_the_main_process_leaves_no_process_of_the_run(tmp_path, tiny_suite, sample_path):
    import psutil

    out = tmp_path / "out"
    process = generate(write_config(tmp_path / "c.yaml", tiny_suite, sample_path, out))
    deadline = time.monotonic() + 240
    while not batches(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before its first batch was stored"
    run = psutil.Process(process.pid).children(recursive=True)
    assert len(run) >= 3  # distilabel's step workers and the watcher
    os.kill(process.pid, signal.SIGKILL)  # the main PID only, as kill -9 PID or the OOM killer does
    process.wait()
    _, alive = psutil.wait_procs(run, timeout=30)
    assert not alive, [(p.pid, p.name()) for p in alive]


def test_each_replica_of_a_teacher_runs_in_a_process_that_sees_only_its_planned_gpus(tmp_path, tiny_suite,
                                                                                  sample_path):  # fmt: skip
    """The plan reaches the replicas' own processes: distilabel's two replicas of one step each set
    CUDA_VISIBLE_DEVICES to their share before loading (here the CPU build ignores it), and the rows are complete.
    A process of its own (forked steps of a process that has run torch hang in its thread pool), with the plan
    given in place of this machine's GPUs."""
    values = yaml.safe_load(write_config(tmp_path / "c.yaml", tiny_suite, sample_path, tmp_path / "out").read_text())
    values["teachers"] = [{**values["teachers"][0], "replicas": 2}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    code = ("from magpie_teach.generation import run\n"
            "from magpie_teach.generation.config import load_generate_config\n"
            f"config = load_generate_config({str(tmp_path / 'c.yaml')!r})\n"
            "run.gpu_plan = lambda config, teachers: {'small': ['3', '5,6']}\n"
            "print('failure', run.run_pipeline(config, run.plan(config)))\n"
            "print('rows', len(run.response_store(config).read()))")  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "300"}
    )  # fmt: skip (distilabel's log lines unwrapped)
    assert result.returncode == 0, result.stderr[-3000:]
    said = "".join((result.stdout + result.stderr).split())
    assert "generate_0-replica-0:onGPU(s)3" in said and "generate_0-replica-1:onGPU(s)5,6" in said, said[-3000:]
    assert "failureNone" in said and "rows24" in said


def test_after_this_process_has_used_cuda_the_steps_start_as_new_processes_and_the_run_completes(
    tmp_path, tiny_suite, sample_path, monkeypatch
):
    """probe on a GPU scores a round in its own process (CUDA initialised), then runs the next round's teachers: a
    forked step could not use CUDA, so they are spawned. Here CUDA is said to be initialised; the pool starts
    under spawn, the run completes, and the start method is restored after it."""
    import multiprocessing

    from distilabel.pipeline import local

    from magpie_teach.generation import run
    from magpie_teach.generation.config import load_generate_config
    from magpie_teach.steps import pipelines

    config = load_generate_config(str(write_config(tmp_path / "c.yaml", tiny_suite, sample_path, tmp_path / "out")))
    seen = []
    pool = local._NoDaemonPool.__init__

    def record(self, *args, **kwargs):
        seen.append(multiprocessing.get_start_method())
        pool(self, *args, **kwargs)

    monkeypatch.setattr(local._NoDaemonPool, "__init__", record)
    monkeypatch.setattr(pipelines, "cuda_initialised", lambda: True)
    before, context = multiprocessing.get_start_method(), local._NoDaemonContext
    assert run.run_pipeline(config, run.plan(config)) is None
    assert seen == ["spawn"] and multiprocessing.get_start_method() == before
    assert local._NoDaemonContext is context
    rows = run.response_store(config).read()
    assert len(rows) == 48 and (rows["status"] == "ok").all()
