"""Real chat templates: the compatibility loss scores exactly the tokens TRL's SFT trains on, family by family.

Each family's original template (as its Hub tokenizers carry it; TRL ships the originals in
``trl/chat_templates``) is put on a tiny tokenizer. The reference mask comes from TRL itself: an
``SFTTrainer`` built with ``assistant_only_loss`` on the unmodified tokenizer (TRL swaps its training
template in), or, for a template TRL cannot patch, with prompt-completion data.
"""

import logging
import shutil
from importlib import resources
from pathlib import Path

import pytest

from magpie_teach.chat import has_generation_markers, tokenize_conversation
from magpie_teach.errors import ConfigError
from magpie_teach.modeling import load_tokenizer
from tests.test_train import _trained_on as trained_on

CONVERSATIONS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name two primes.", "Two and three.\nBoth are prime."),
]
# a Mistral-style template: TRL ships no training version of it
MISTRAL_LIKE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
PATCHED = ["llama3", "qwen2_5", "qwen3", "gemma", "gemma3", "phi3", "phi3_5"]
UNPATCHED = ["llama3_2", "mistral_like"]


def trl_template(name: str) -> str:
    return (resources.files("trl") / "chat_templates" / f"{name}.jinja").read_text()


def tokenizer_dir(tiny_suite, tmp_path: Path, name: str) -> Path:
    from transformers import AutoTokenizer

    folder = tmp_path / name
    shutil.copytree(tiny_suite.base_small, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = MISTRAL_LIKE if name == "mistral_like" else trl_template(name)
    tokenizer.save_pretrained(folder)
    return folder


def trl_masks(folder: Path, tmp_path: Path, assistant_only: bool) -> list[tuple[list[int], list[bool]]]:
    """(input_ids, trained-on mask) per conversation, as TRL's SFTTrainer prepares them."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder)  # unmodified: TRL makes its own decision
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    if assistant_only:
        rows = [{"messages": [{"role": "user", "content": x}, {"role": "assistant", "content": y}]}
                for x, y in CONVERSATIONS]  # fmt: skip
    else:
        rows = [{"prompt": [{"role": "user", "content": x}], "completion": [{"role": "assistant", "content": y}]}
                for x, y in CONVERSATIONS]  # fmt: skip
    args = SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=assistant_only, max_length=512,
                     report_to="none", use_cpu=True)  # fmt: skip
    trainer = SFTTrainer(model=str(folder), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)  # fmt: skip
    return [(list(row["input_ids"]), trained_on(row)) for row in trainer.train_dataset]


@pytest.mark.parametrize("family", PATCHED)
def test_scored_tokens_are_trls_assistant_only_tokens(tiny_suite, tmp_path, family):
    folder = tokenizer_dir(tiny_suite, tmp_path, family)
    tokenizer = load_tokenizer(str(folder))
    assert has_generation_markers(tokenizer.chat_template)  # TRL's training version, with markers
    reference = trl_masks(folder, tmp_path, assistant_only=True)
    for (instruction, response), (ids, mask) in zip(CONVERSATIONS, reference):
        ours = tokenize_conversation(tokenizer, instruction, response)
        assert ours.input_ids.tolist() == ids
        assert ours.loss_mask.tolist() == mask
        assert response.split("\n")[0] in tokenizer.decode(ours.input_ids[ours.loss_mask])
        assert instruction not in tokenizer.decode(ours.input_ids[ours.loss_mask])


@pytest.mark.parametrize("family", UNPATCHED)
def test_a_template_trl_cannot_patch_scores_the_completion_with_a_notice(tiny_suite, tmp_path, family, caplog):
    folder = tokenizer_dir(tiny_suite, tmp_path, family)
    with caplog.at_level(logging.WARNING, logger="magpie_teach.chat"):
        tokenizer = load_tokenizer(str(folder))
    assert not has_generation_markers(tokenizer.chat_template)
    assert any("TRL has no training version" in r.message and str(folder) in r.message for r in caplog.records)
    reference = trl_masks(folder, tmp_path, assistant_only=False)
    for (instruction, response), (ids, mask) in zip(CONVERSATIONS, reference):
        ours = tokenize_conversation(tokenizer, instruction, response)
        assert ours.input_ids.tolist() == ids
        assert ours.loss_mask.tolist() == mask


def test_train_accepts_assistant_only_loss_for_a_template_trl_patches(tiny_suite, tmp_path):
    """`train`'s own trainer (build_trainer) masks the tokens scoring scores, with Qwen2.5's original template."""
    import pandas as pd

    from magpie_teach.selection.select import SelectConfig, select
    from magpie_teach.training.sft import build_trainer, parse_recipe, resolve_recipe

    folder = tokenizer_dir(tiny_suite, tmp_path, "qwen2_5")
    rows = pd.DataFrame([{"id": str(i), "instruction": x, "response": y, "teacher": "t", "base_model": "b",
                          "reward": 1.0, "compat_loss": 1.0, "n_tokens_full": 5, "truncated": False}
                         for i, (x, y) in enumerate(CONVERSATIONS)])  # fmt: skip
    (tmp_path / "scores").mkdir()
    rows.to_parquet(tmp_path / "scores" / "scores.parquet")
    data = select(SelectConfig(scores=str(tmp_path / "scores"), output_dir=str(tmp_path / "sft"), teacher="t"))
    args = parse_recipe(str(resolve_recipe("tiny/sft/config_cpu.yaml")), ["--model_name_or_path", str(folder), "--dataset_name", str(data.output_dir),
                                 "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert args[1].assistant_only_loss is None  # the recipe's auto
    trainer, _ = build_trainer(*args)
    assert trainer.args.assistant_only_loss is True  # TRL's training version of the template has the markers
    tokenizer = load_tokenizer(str(folder))
    by_ids = {tuple(r["input_ids"]): trained_on(r) for r in trainer.train_dataset}
    for instruction, response in CONVERSATIONS:
        ours = tokenize_conversation(tokenizer, instruction, response)
        assert by_ids[tuple(ours.input_ids.tolist())] == ours.loss_mask.tolist()


def test_a_system_message_the_template_refuses_is_a_clear_error(tiny_suite, tmp_path):
    folder = tokenizer_dir(tiny_suite, tmp_path, "gemma")
    tokenizer = load_tokenizer(str(folder))
    with pytest.raises(ConfigError, match=r"refuses a conversation with roles \['system', 'user', 'assistant'\]"):
        tokenize_conversation(tokenizer, "Hi?", "Hello.", system="Be brief.")
