"""Real TRL SFT steps on tiny models; bad recipes and data stop before training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from magpie_teach.errors import ConfigError, DataError
from magpie_teach.selection.select import SelectConfig, select
from magpie_teach.training.sft import parse_recipe, train

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "sft" / "config_cpu.yaml")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, sample_rows):
    scores = sample_rows.assign(base_model="tiny", reward=1.0, compat_loss=2.0, n_tokens_full=10, truncated=False)
    folder = tmp_path_factory.mktemp("sft")
    scores.to_parquet(folder / "scores.parquet")
    return str(
        select(
            SelectConfig(scores=str(folder), output_dir=str(folder / "data"), teacher="tiny-teacher-terse")
        ).output_dir
    )


def _args(tiny_suite, data, out, *extra):
    return parse_recipe(
        RECIPE,
        ["--model_name_or_path", tiny_suite.base_small, "--dataset_name", data, "--output_dir", str(out), *extra],
    )


def test_trains_saves_and_names_the_data_in_the_model_card(tiny_suite, sft_data, tmp_path):
    result = train(*_args(tiny_suite, sft_data, tmp_path / "student"))
    assert result.train_tokens > 0 and result.train_tokens == result.total_tokens
    assert result.steps == 6 and result.resumed_from is None
    assert (tmp_path / "student" / "model.safetensors").exists()
    card = (tmp_path / "student" / "README.md").read_text()
    assert sft_data in card and result.dataset_revision in card and result.dataset_revision.startswith("sha1:")
    state = json.loads((tmp_path / "student" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "student")  # loads like any Hub model


def test_resumes_from_the_last_checkpoint(tiny_suite, sft_data, tmp_path, caplog):
    first = train(*_args(tiny_suite, sft_data, tmp_path / "s", "--max_steps", "3"))
    assert (tmp_path / "s" / "checkpoint-3").exists()
    with caplog.at_level("WARNING", logger="magpie_teach.training.sft"):
        second = train(*_args(tiny_suite, sft_data, tmp_path / "s", "--max_steps", "6"))
    assert any("Resuming from" in r.message and "checkpoint-3" in r.message for r in caplog.records)
    state = json.loads((tmp_path / "s" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # what the resumed run reports is its own work: steps 4-6 and their tokens, not the first run's as well
    assert second.steps == 3 and second.resumed_from.endswith("checkpoint-3")
    assert second.total_tokens == state["num_input_tokens_seen"]
    assert second.train_tokens == state["num_input_tokens_seen"] - first.total_tokens > 0
    assert "trained 3 step(s)" in second.sentence() and "resumed from checkpoint-3" in second.sentence()
    again = train(*_args(tiny_suite, sft_data, tmp_path / "s", "--max_steps", "6"))  # nothing left to train
    assert again.steps == 0 and again.train_tokens == 0 and "tokens/s" not in again.sentence()


def _trained_on(row: dict) -> list[bool]:
    """The tokens a prepared TRL row puts in the loss: its labels not -100 (or, in older TRL, its masks)."""
    if "labels" in row:
        return [label != -100 for label in row["labels"]]
    return [bool(m) for m in row.get("assistant_masks") or row["completion_mask"]]


def _assert_trains_on_the_scored_tokens(trainer, dataset, tokenizer, rows=5):
    from magpie_teach.chat import tokenize_conversation

    by_ids = {tuple(row["input_ids"]): _trained_on(row) for row in trainer.train_dataset}
    for i in range(rows):
        messages = dataset[i]["messages"]
        ours = tokenize_conversation(tokenizer, messages[0]["content"], messages[1]["content"])
        assert by_ids[tuple(ours.input_ids.tolist())] == ours.loss_mask.tolist()


def test_trl_trains_on_exactly_the_tokens_the_compatibility_loss_scores(tiny_suite, sft_data, tmp_path):
    """The trainer `train()` runs (built by the same `build_trainer`) masks exactly the scored tokens."""
    from magpie_teach.modeling import load_tokenizer
    from magpie_teach.training.sft import build_trainer, load_sft_dataset

    args = _args(tiny_suite, sft_data, tmp_path / "x")
    assert args[1].assistant_only_loss is None  # the recipe's auto
    trainer, _ = build_trainer(*args)
    assert trainer.args.assistant_only_loss is True  # the tiny template marks the assistant turn
    _assert_trains_on_the_scored_tokens(trainer, load_sft_dataset(args[0])[0], load_tokenizer(tiny_suite.base_small))


def test_unknown_recipe_key_is_named_with_a_suggestion(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(Path(RECIPE).read_text() + "learning_rat: 0.1\n")
    with pytest.raises(
        ConfigError, match=r"r.yaml: unknown key\(s\) 'learning_rat' \(did you mean 'learning_rate'\?\)"
    ):
        parse_recipe(str(recipe))
    with pytest.raises(ConfigError, match=r"command line: unknown key\(s\) 'max_step'"):
        parse_recipe(RECIPE, ["--dataset_name", "x", "--model_name_or_path", "y", "--max_step", "3"])


def test_data_without_messages_is_refused(tiny_suite, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["hello"]}).to_parquet(str(tmp_path / "d" / "train.parquet"))
    with pytest.raises(DataError, match="no 'messages' column"):
        train(*_args(tiny_suite, str(tmp_path / "d"), tmp_path / "o"))


def test_a_template_trl_cannot_patch_trains_on_the_tokens_after_the_generation_prompt(tiny_suite, sft_data, tmp_path):
    """A plain ChatML template (no markers, no TRL training version): assistant_only_loss true is refused; false,
    or the CPU recipe's auto, puts exactly the tokens the compatibility loss scores in the loss."""
    from transformers import AutoTokenizer

    from magpie_teach.modeling import load_tokenizer
    from magpie_teach.training.sft import build_trainer, load_sft_dataset

    model_dir = tmp_path / "plain"
    subprocess.run(["cp", "-r", tiny_suite.base_small, str(model_dir)], check=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    tokenizer.save_pretrained(model_dir)
    base = ["--model_name_or_path", str(model_dir), "--dataset_name", sft_data, "--output_dir"]
    args = parse_recipe(RECIPE, [*base, str(tmp_path / "o"), "--assistant_only_loss", "true"])
    with pytest.raises(ConfigError, match="has none and TRL has no training version"):
        train(*args)
    scoring = load_tokenizer(str(model_dir))
    for setting in (["--assistant_only_loss", "false"], [], ["--assistant_only_loss=auto"]):  # [] is the recipe's auto
        args = parse_recipe(RECIPE, [*base, str(tmp_path / "o2"), *setting, "--max_steps", "2"])
        trainer, _ = build_trainer(*args)
        assert trainer.args.assistant_only_loss is False, setting
        _assert_trains_on_the_scored_tokens(trainer, load_sft_dataset(args[0])[0], scoring)
    assert train(*args).train_tokens > 0


@pytest.mark.slow
def test_runs_under_accelerate_launch_with_two_processes(tiny_suite, sft_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29591", "-m", "magpie_teach.cli",
         "train", RECIPE, "--model_name_or_path", tiny_suite.base_small, "--dataset_name", sft_data, "--output_dir", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained 6 step(s) on") == 2  # both ranks finished
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    # 24 rows, 2 processes x batch 4 = 8 rows a step: 3 steps an epoch, so 6 steps are 2 epochs
    assert state["epoch"] == pytest.approx(2.0)
    assert (out / "model.safetensors").exists()
    assert len(pd.read_parquet(Path(sft_data) / "data" / "train-00000-of-00001.parquet")) == 24


PAPER_BASE_MODELS = {  # the paper's five base models (PAPER.md), by their Hub ids
    "Qwen2-1.5B": "Qwen/Qwen2-1.5B",
    "Gemma-2-2B": "google/gemma-2-2b",
    "Qwen2.5-3B": "Qwen/Qwen2.5-3B",
    "Llama-3.2-3B": "meta-llama/Llama-3.2-3B",
    "Llama-3.1-Minitron-4B": "nvidia/Llama-3.1-Minitron-4B-Width-Base",
}


@pytest.mark.parametrize("name", sorted(PAPER_BASE_MODELS))
def test_paper_recipes_parse_with_the_papers_settings(name):
    data_args, training_args, model_args = parse_recipe(
        f"recipes/{name}/sft/config_magpie.yaml",
        ["--dataset_name", "org/data", "--bf16", "false"],  # no bf16 on CI's CPU
    )
    assert training_args.learning_rate == 2e-5 and training_args.num_train_epochs == 2
    assert training_args.warmup_steps == 100 and training_args.max_length == 4096
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * 4 == 32
    assert data_args.global_batch_size == 32  # so 1 GPU (validate) or 8 train on the paper's batch too
    assert training_args.lr_scheduler_type.value == "cosine"
    assert model_args.model_name_or_path == PAPER_BASE_MODELS[name]


def test_recipe_value_errors_are_config_errors():
    with pytest.raises(ConfigError, match="config_cpu.yaml: .*logging_steps"):
        parse_recipe(RECIPE, ["--dataset_name", "d", "--model_name_or_path", "m", "--logging_steps", "0"])


def test_unknown_recipe_lists_the_shipped_ones():
    from magpie_teach.training.sft import resolve_recipe

    assert resolve_recipe("tiny/sft/config_cpu.yaml").is_file()
    with pytest.raises(ConfigError, match="shipped recipes: .*tiny/sft/config_cpu.yaml"):
        resolve_recipe("recipes/nope.yaml")


def test_bfloat16_recipe_weights_are_trained_as_float32_master_weights_except_under_deepspeed(
    tiny_suite, sft_data, tmp_path, capsys
):
    """The paper's recipes say dtype: bfloat16: held as the trained weights, AdamW's small updates round away. The
    trainer's model holds float32 weights (and says so); DeepSpeed, which keeps float32 master weights itself,
    keeps the recipe's dtype."""
    import torch

    from magpie_teach.training.sft import build_trainer, master_weights_dtype

    trainer, _ = build_trainer(*_args(tiny_suite, sft_data, tmp_path / "x", "--dtype", "bfloat16"))
    assert trainer.model.dtype == torch.float32
    assert "weights held in float32" in capsys.readouterr().err
    assert master_weights_dtype("bfloat16", deepspeed=True) == "bfloat16"
    assert master_weights_dtype("float32", deepspeed=False) == "float32"


def test_global_batch_size_sets_the_accumulation_for_the_number_of_processes(tiny_suite, sft_data, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    """The paper's batch of 32 examples per step whatever the number of GPUs: on one process the accumulation
    grows (the paper recipes on one GPU trained with a batch of 8 before); a batch the processes cannot share is
    an error."""
    from magpie_teach.training.sft import accumulation_steps, build_trainer

    trainer, _ = build_trainer(*_args(tiny_suite, sft_data, tmp_path / "x", "--global_batch_size", "8"))
    assert trainer.args.gradient_accumulation_steps == 2  # 8 / (4 per device x 1 process)
    assert accumulation_steps(32, 1, 4) == 8 and accumulation_steps(32, 1, 1) == 32
    with pytest.raises(
        ConfigError, match="global_batch_size 12 is not a multiple of per_device_train_batch_size 4 x 2"
    ):
        accumulation_steps(12, 4, 2)
