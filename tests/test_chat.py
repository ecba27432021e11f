import json

import numpy as np
import pytest

from magpie_teach.chat import (
    DEFAULT_CHAT_TEMPLATE,
    has_generation_markers,
    resolve_chat_template,
    tokenize_conversation,
    unconditioned,
)
from magpie_teach.modeling import load_tokenizer

PLAIN_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_generation_markers_mark_content_and_end_of_turn(tiny_suite):
    tokenizer = load_tokenizer(tiny_suite.base_small)
    assert has_generation_markers(resolve_chat_template(tokenizer))
    example = tokenize_conversation(tokenizer, "Why is the sky blue?", "Rayleigh scattering.")
    marked = tokenizer.decode(example.input_ids[example.loss_mask])
    assert marked == "Rayleigh scattering.<|im_end|>"
    prompt = tokenizer.decode(example.input_ids[~example.loss_mask])
    assert prompt.startswith("<|endoftext|><|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n")
    assert example.n_response_tokens == int(example.loss_mask.sum())
    assert not example.truncated


def test_tokenizer_without_template_gets_the_documented_default(tiny_suite):
    tokenizer = load_tokenizer(tiny_suite.reference)  # saved with chat_template=None
    assert resolve_chat_template(tokenizer) == DEFAULT_CHAT_TEMPLATE
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE


def test_template_without_markers_scores_everything_after_the_generation_prompt(tiny_suite):
    tokenizer = load_tokenizer(tiny_suite.base_small)
    tokenizer.chat_template = PLAIN_CHATML
    example = tokenize_conversation(tokenizer, "Name a prime.", "Seven.")
    # independent reference: everything rendered after the generation prompt
    assert tokenizer.decode(example.input_ids[example.loss_mask]) == "Seven.<|im_end|>\n"


def test_truncation_is_reported(tiny_suite):
    tokenizer = load_tokenizer(tiny_suite.base_small)
    full = tokenize_conversation(tokenizer, "Explain recursion.", "A function that calls itself " * 20)
    cut = tokenize_conversation(tokenizer, "Explain recursion.", "A function that calls itself " * 20, max_length=30)
    assert cut.truncated and not full.truncated
    assert len(cut.input_ids) == 30
    assert cut.n_response_tokens == full.n_response_tokens
    assert cut.loss_mask.sum() < full.loss_mask.sum()
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[:30])


def test_unconditioned_scores_every_token_after_the_start_token():
    example = unconditioned(np.array([5, 6, 7]), start_id=1)
    assert example.input_ids.tolist() == [1, 5, 6, 7]
    assert example.loss_mask.tolist() == [False, True, True, True]


def test_template_that_does_not_prefix_the_prompt_is_an_error(tiny_suite):
    from magpie_teach.errors import ConfigError

    tokenizer = load_tokenizer(tiny_suite.base_small)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    )
    with pytest.raises(ConfigError, match="prefix"):
        tokenize_conversation(tokenizer, "a", "b")


def test_a_multi_turn_conversation_scores_only_the_last_answer(tiny_suite):
    """With earlier turns as context, the response tokens are exactly the last answer's (the earlier
    assistant turn is marked by the template too, and must not count)."""
    import json

    from magpie_teach.chat import prepare_tokenizer, tokenize_conversation
    from magpie_teach.modeling import load_tokenizer

    tokenizer = prepare_tokenizer(load_tokenizer(tiny_suite.base_small))
    context = json.dumps(
        [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    )
    single = tokenize_conversation(tokenizer, "Name a colour.", "Blue is a colour.")
    multi = tokenize_conversation(tokenizer, "Name a colour.", "Blue is a colour.", context=context)
    assert multi.n_response_tokens == single.n_response_tokens
    assert multi.input_ids[multi.loss_mask].tolist() == single.input_ids[single.loss_mask].tolist()
    assert len(multi.input_ids) > len(single.input_ids)


def test_a_conversation_exactly_max_length_long_is_not_truncated_and_one_token_longer_is(tiny_suite):
    tokenizer = load_tokenizer(tiny_suite.base_small)
    full = tokenize_conversation(tokenizer, "Explain recursion.", "A function that calls itself.")
    n = len(full.input_ids)
    at = tokenize_conversation(tokenizer, "Explain recursion.", "A function that calls itself.", max_length=n)
    assert not at.truncated and len(at.input_ids) == n
    np.testing.assert_array_equal(at.loss_mask, full.loss_mask)
    below = tokenize_conversation(tokenizer, "Explain recursion.", "A function that calls itself.", max_length=n - 1)
    assert below.truncated and len(below.input_ids) == n - 1 and below.n_response_tokens == full.n_response_tokens
    assert full.input_ids.dtype == np.int64 and full.loss_mask.dtype == bool and not full.loss_mask[0]


def test_unconditioned_counts_its_tokens_before_the_cut_and_cuts_only_past_max_length():
    whole = unconditioned(np.array([5, 6, 7]), start_id=1, max_length=4)
    assert (whole.n_response_tokens, whole.truncated, whole.input_ids.tolist()) == (3, False, [1, 5, 6, 7])
    cut = unconditioned(np.array([5, 6, 7]), start_id=1, max_length=3)
    assert (cut.n_response_tokens, cut.truncated, cut.input_ids.tolist()) == (3, True, [1, 5, 6])
    assert cut.loss_mask.tolist() == [False, True, True] and cut.loss_mask.dtype == bool
    assert cut.input_ids.dtype == np.int64 and type(cut.truncated) is bool


def test_a_tokenizer_not_prepared_is_scored_with_the_template_scoring_resolves(tiny_suite, tmp_path):
    """A tokenizer as `AutoTokenizer` gives it, its own template without markers (Qwen2.5's, which TRL patches):
    the tokens and mask are those of the prepared tokenizer, which carries TRL's marked version."""
    from transformers import AutoTokenizer

    from tests.test_chat_templates import tokenizer_dir

    folder = tokenizer_dir(tiny_suite, tmp_path, "qwen2_5")
    raw = AutoTokenizer.from_pretrained(folder)
    assert not has_generation_markers(raw.chat_template)
    prepared = load_tokenizer(str(folder))
    context = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    for kwargs in ({}, {"context": context}):
        mine = tokenize_conversation(raw, "Name a prime.", "Seven is prime.", **kwargs)
        theirs = tokenize_conversation(prepared, "Name a prime.", "Seven is prime.", **kwargs)
        assert mine.input_ids.tolist() == theirs.input_ids.tolist()
        assert mine.loss_mask.tolist() == theirs.loss_mask.tolist() and mine.n_response_tokens > 0
    # a tokenizer with no template at all: scored with the documented default, earlier turns included
    bare = AutoTokenizer.from_pretrained(tiny_suite.reference)
    assert bare.chat_template is None
    default = load_tokenizer(tiny_suite.reference)
    for kwargs in ({}, {"context": context}):
        mine = tokenize_conversation(bare, "Name a prime.", "Seven is prime.", **kwargs)
        theirs = tokenize_conversation(default, "Name a prime.", "Seven is prime.", **kwargs)
        assert mine.input_ids.tolist() == theirs.input_ids.tolist()
        assert mine.loss_mask.tolist() == theirs.loss_mask.tolist() and mine.n_response_tokens > 0


MARKED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)


def test_a_marked_template_that_renders_the_earlier_turns_otherwise_alone_is_an_error(tiny_suite):
    from magpie_teach.errors import ConfigError

    tokenizer = load_tokenizer(tiny_suite.base_small)
    tokenizer.chat_template = "{% if add_generation_prompt %}>> {% endif %}" + MARKED
    context = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    tokenize_conversation(tokenizer, "a", "b c")  # one turn: the marks alone decide
    with pytest.raises(ConfigError) as err:
        tokenize_conversation(tokenizer, "a", "b c", context=context)
    assert str(err.value) == (
        "The chat template does not render the earlier turns as a prefix of the conversation, so the last "
        "response's tokens cannot be located."
    )


def test_a_response_marked_from_the_first_token_is_scored_from_the_second(tiny_suite):
    """Nothing precedes the first token, so it cannot be scored, even when the template marks it."""
    tokenizer = load_tokenizer(tiny_suite.base_small)
    tokenizer.chat_template = MARKED
    example = tokenize_conversation(tokenizer, "", "Seven is prime.")
    ids = tokenizer("Seven is prime.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert example.input_ids.tolist() == ids
    assert example.loss_mask.tolist() == [False] + [True] * (len(ids) - 1)
    assert example.n_response_tokens == len(ids) - 1


def test_without_markers_the_ids_are_the_rendered_text_tokenized_without_special_tokens_and_errors_are_exact(
    tiny_suite,
):
    """The plain path tokenizes the rendered conversation as is (no BOS added on top of the template's); a response
    that renders to nothing, and a generation prompt that is no prefix, are DataError/ConfigError with these words."""
    from tokenizers.processors import TemplateProcessing

    from magpie_teach.errors import ConfigError, DataError

    tokenizer = load_tokenizer(tiny_suite.base_small)
    tokenizer.chat_template = PLAIN_CHATML
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")  # a tokenizer that adds a BOS, as Llama's does
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", start)]
    )
    example = tokenize_conversation(tokenizer, "Name a prime.", "Seven.")
    text = "<|im_start|>user\nName a prime.<|im_end|>\n<|im_start|>assistant\nSeven.<|im_end|>\n"
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert example.input_ids.tolist() == expected and example.input_ids.dtype == np.int64
    assert tokenizer(text)["input_ids"] == [start, *expected]  # it does add one when asked to
    assert example.n_response_tokens == int(example.loss_mask.sum()) > 0

    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the response adds nothing
    instruction = "Say nothing at all, please, and be quick about it, because time is short. " * 2
    with pytest.raises(DataError) as err:
        tokenize_conversation(tokenizer, instruction, "")
    assert str(err.value) == f"The response renders to no tokens (instruction {instruction[:60]!r})."
    tokenizer.chat_template = "{% for m in messages %}{% endfor %}"  # the whole conversation renders to nothing
    with pytest.raises(DataError, match="^The response renders to no tokens"):
        tokenize_conversation(tokenizer, "a", "b")
    # a one-token response that is the whole rendering: its only token is the first, which nothing predicts
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    assert len(tokenizer("a", add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(DataError, match="^The response renders to no tokens"):
        tokenize_conversation(tokenizer, "q", "a")

    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    )
    with pytest.raises(ConfigError) as err:
        tokenize_conversation(tokenizer, "a", "b")
    assert str(err.value) == (
        "The chat template does not render the generation prompt as a prefix of the conversation, so the response "
        "tokens cannot be located; use a template with {% generation %} markers."
    )


def test_a_template_that_refuses_a_conversation_is_one_error_naming_the_tokenizer_and_the_roles(tiny_suite):
    from magpie_teach.errors import ConfigError

    tokenizer = load_tokenizer(tiny_suite.base_small)
    refuse = "{{ raise_exception('no ' + messages[0]['role'] + ' here') }}"
    tokenizer.chat_template = refuse
    with pytest.raises(ConfigError) as err:
        tokenize_conversation(tokenizer, "Hi?", "Hello.", system="Be brief.")
    assert str(err.value) == (
        f"the chat template of {tiny_suite.base_small} refuses a conversation with roles "
        "['system', 'user']: no system here (this template has no system role: leave the system prompt out)"
    )
    with pytest.raises(ConfigError) as err:
        tokenize_conversation(tokenizer, "Hi?", "Hello.")
    assert str(err.value) == (
        f"the chat template of {tiny_suite.base_small} refuses a conversation with roles ['user']: no user here"
    )
    tokenizer.name_or_path = ""
    with pytest.raises(ConfigError, match="^the chat template of this tokenizer refuses"):
        tokenize_conversation(tokenizer, "Hi?", "Hello.")


def test_earlier_turns_are_read_from_json_or_a_list_and_anything_else_is_one_error_showing_the_value():
    from magpie_teach.chat import build_messages, parse_context
    from magpie_teach.errors import DataError

    for empty in (None, float("nan"), "", "  ", [], "[]"):
        assert parse_context(empty) is None
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]
    expected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "5"}]
    assert parse_context(json.dumps(turns)) == expected
    assert parse_context(np.array(turns, dtype=object)) == expected  # a parquet list column, read back
    for bad in (1.5, 7, "{not json", '{"role": "user", "content": "hi"}', [{"role": "user"}], ["hi"], "x" * 100):
        with pytest.raises(DataError) as err:
            parse_context(bad)
        assert str(err.value) == f"context: expected a list of {{role, content}} messages, got {str(bad)[:80]!r}"
    assert build_messages(
        "q?", "a.", system="be brief", context=turns[:1] + [{"role": "assistant", "content": "hello"}]
    ) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "q?"},
        {"role": "assistant", "content": "a."},
    ]
    assert build_messages("q?") == [{"role": "user", "content": "q?"}]


def test_prepare_tokenizer_sets_the_resolved_template_and_a_missing_pad_token_to_eos(tiny_suite):
    from transformers import AutoTokenizer

    from magpie_teach.chat import prepare_tokenizer, resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_suite.reference)  # no chat template: the default is set
    tokenizer.pad_token = None
    resolved = resolve_chat_template(tokenizer)
    assert resolved == DEFAULT_CHAT_TEMPLATE != tokenizer.chat_template
    assert prepare_tokenizer(tokenizer) is tokenizer
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.chat_template == resolved
    tokenizer.pad_token = "<|im_start|>"  # a pad token of its own is kept
    assert prepare_tokenizer(tokenizer).pad_token == "<|im_start|>" != tokenizer.eos_token


def test_the_context_token_is_bos_else_eos_and_a_tokenizer_with_neither_is_one_error(tiny_suite):
    from transformers import AutoTokenizer

    from magpie_teach.chat import context_token_id
    from magpie_teach.errors import ConfigError

    tokenizer = AutoTokenizer.from_pretrained(tiny_suite.reference)
    tokenizer.bos_token, tokenizer.eos_token = "<|im_start|>", "<|im_end|>"
    assert context_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_start|>")
    tokenizer.bos_token = None
    assert context_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.eos_token = None
    with pytest.raises(ConfigError) as err:
        context_token_id(tokenizer)
    assert str(err.value) == f"Tokenizer {tokenizer.name_or_path!r} has neither a BOS nor an EOS token."


def test_of_several_named_chat_templates_the_default_one_is_used(tiny_suite):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_suite.reference)
    tokenizer.chat_template = {"default": DEFAULT_CHAT_TEMPLATE, "tool_use": PLAIN_CHATML}
    assert resolve_chat_template(tokenizer) == DEFAULT_CHAT_TEMPLATE
    tokenizer.chat_template = {"tool_use": DEFAULT_CHAT_TEMPLATE}  # no default: the documented fallback
    assert resolve_chat_template(tokenizer) == DEFAULT_CHAT_TEMPLATE
    tokenizer.chat_template = {"default": PLAIN_CHATML}
    assert resolve_chat_template(tokenizer) != DEFAULT_CHAT_TEMPLATE


def test_trls_training_version_of_a_template_is_asked_once_and_none_is_kept_for_a_template_it_cannot_patch(
    tiny_suite, monkeypatch
):
    """With an empty cache: Qwen2.5's template gets TRL's marked version, remembered per template; a Mistral-like
    template TRL has no version of is remembered as None, and scoring then uses the template itself."""
    from trl.chat_template_utils import get_training_chat_template

    import magpie_teach.chat as chat
    from tests.test_chat_templates import MISTRAL_LIKE, trl_template

    monkeypatch.setattr(chat, "_TRAINING", {})
    tokenizer = load_tokenizer(tiny_suite.base_small)
    qwen = trl_template("qwen2_5")
    tokenizer.chat_template = qwen
    expected = get_training_chat_template(tokenizer)
    assert expected is not None and has_generation_markers(expected)
    assert resolve_chat_template(tokenizer) == expected
    assert chat._TRAINING == {qwen: expected}
    assert chat.training_template(tokenizer, qwen) == expected
    tokenizer.chat_template = MISTRAL_LIKE
    assert resolve_chat_template(tokenizer) == MISTRAL_LIKE
    assert chat._TRAINING == {qwen: expected, MISTRAL_LIKE: None}
    assert chat.training_template(tokenizer, MISTRAL_LIKE) is None
