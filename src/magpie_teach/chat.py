"""THE chat-template decision, shared by compatibility scoring and SFT training.

The template is TRL's decision, made by TRL's own code, so that the compatibility loss scores
exactly the tokens TRL's assistant-only SFT trains on:

* a tokenizer without a template (a base model such as GPT-2 or a pre-trained Llama) gets
  :data:`DEFAULT_CHAT_TEMPLATE`, ChatML with the assistant turn wrapped in ``{% generation %}``;
* a template with ``{% generation %}`` markers is used as it is;
* a template without markers that TRL can patch (Llama 3, Qwen2.5, Qwen3, Gemma, Gemma 3, Phi-3,
  Phi-3.5, DeepSeek, GLM-4, ...: ``trl.chat_template_utils.get_training_chat_template``) is replaced by
  TRL's training version of it, the template ``SFTTrainer`` swaps in under ``assistant_only_loss``;
* any other template is used as it is, with the rule below for templates without markers, and a
  notice saying so (``train`` then refuses ``assistant_only_loss``: TRL could not mask it).

Response tokens, i.e. the tokens SFT trains on and the compatibility loss averages over:

* the template marks the assistant turn with ``{% generation %}``: exactly the marked tokens (the
  content and the end-of-turn token);
* otherwise: every token rendered after the generation prompt (the prompt rendered with
  ``add_generation_prompt=True`` must be a prefix of the full conversation; a token counts as a
  response token when its first character lies at or after the end of that prefix).
"""

import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from magpie_teach.errors import ConfigError, DataError

DEFAULT_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif -%}"
)
"""ChatML with generation markers, for tokenizers that ship no chat template."""

MASK_RULE = "assistant-only/1"
"""The version of how a conversation is rendered and masked for scoring (:func:`tokenize_conversation`,
:func:`unconditioned`): part of every cached score's identity, so raise it whenever a change here can change a
score, and every cached score is recomputed."""

_GENERATION_RE = re.compile(r"{%-?\s*generation\s*-?%}")
logger = logging.getLogger(__name__)


def resolve_chat_template(tokenizer: Any) -> str:
    """Returns the chat template used for ``tokenizer`` in scoring and training alike (see the module docstring)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is used
        template = template.get("default")
    if not (isinstance(template, str) and template.strip()):
        return DEFAULT_CHAT_TEMPLATE
    if has_generation_markers(template):
        return template
    training = training_template(tokenizer, template)
    if training is None:
        _notice_unpatched(getattr(tokenizer, "name_or_path", "") or "this tokenizer", template)
        return template
    return training


_TRAINING: dict[str, str | None] = {}


def training_template(tokenizer: Any, template: str) -> str | None:
    """TRL's training version of TEMPLATE, the tokenizer's own (with ``{% generation %}`` markers), or None when
    TRL has none for it. Decided by ``trl.chat_template_utils.get_training_chat_template``, once per template."""
    if template not in _TRAINING:
        from trl.chat_template_utils import get_training_chat_template

        try:
            _TRAINING[template] = get_training_chat_template(tokenizer)
        except ValueError:  # TRL: "patching is not supported for this template"
            _TRAINING[template] = None
    return _TRAINING[template]


@functools.cache
def _notice_unpatched(name: str, template: str) -> None:
    digest = hashlib.sha1(template.encode()).hexdigest()[:8]
    logger.warning(
        "%s: TRL has no training version of this chat template (sha1 %s), so the compatibility loss scores every "
        "token after the generation prompt, as TRL's prompt-completion SFT trains on (assistant_only_loss is "
        "refused for it).",
        name,
        digest,
    )


def has_generation_markers(template: str) -> bool:
    """Whether a chat template marks the assistant turn with ``{% generation %}``."""
    return bool(_GENERATION_RE.search(template))


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Sets the resolved chat template on ``tokenizer`` (in place) and a pad token if it has none."""
    tokenizer.chat_template = resolve_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def parse_context(value: Any) -> list[dict[str, str]] | None:
    """The earlier turns of a multi-turn row (its ``context`` column: JSON text or a list of messages), or None."""
    import json

    if (
        value is None
        or (isinstance(value, float) and value != value)
        or (isinstance(value, str) and not value.strip())
    ):
        return None
    turns = value
    if isinstance(value, str):
        try:
            turns = json.loads(value)
        except json.JSONDecodeError:
            turns = None
    # a list as JSON gives it, or as a parquet column of lists reads back (an array of dicts)
    if not isinstance(turns, (list, tuple, np.ndarray)) or not all(
        isinstance(t, dict) and {"role", "content"} <= set(t) for t in turns
    ):
        raise DataError(f"context: expected a list of {{role, content}} messages, got {str(value)[:80]!r}")
    return [{"role": str(t["role"]), "content": str(t["content"])} for t in turns] or None


def build_messages(
    instruction: str, response: str | None = None, system: str | None = None, context: Any = None
) -> list[dict[str, str]]:
    """The conversation for one (instruction, response) pair, in the `messages` format TRL reads; ``context``
    (earlier turns, see :func:`parse_context`) goes before the instruction."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += parse_context(context) or []
    messages.append({"role": "user", "content": instruction})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


@dataclass
class TokenizedExample:
    """One rendered conversation. ``loss_mask[t]`` is True where token t is a response token."""

    input_ids: np.ndarray  # int64 [T]
    loss_mask: np.ndarray  # bool [T]
    n_response_tokens: int  # before truncation
    truncated: bool


def tokenize_conversation(
    tokenizer: Any,
    instruction: str,
    response: str,
    max_length: int | None = None,
    system: str | None = None,
    context: Any = None,
) -> TokenizedExample:
    """Renders and tokenizes one conversation, marking the response tokens (see the module docstring).

    With ``context`` (earlier turns), only the last assistant turn counts as response tokens.

    Sequences longer than ``max_length`` are cut at the right, as SFT truncation does; the cut is
    reported through ``truncated`` and never hidden.
    """
    template = resolve_chat_template(tokenizer)
    messages = build_messages(instruction, response, system, context)
    if has_generation_markers(template):
        enc = _render(
            tokenizer,
            messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        mask = np.asarray(enc["assistant_masks"], dtype=bool)
        if len(messages) > 2 + bool(system):  # earlier assistant turns are marked too: keep only the last one
            prompt = _render(
                tokenizer,
                messages[:-1],
                chat_template=template,
                tokenize=True,
                add_generation_prompt=True,
                return_dict=True,
            )["input_ids"]
            if list(ids[: len(prompt)]) != list(prompt):
                raise ConfigError(
                    "The chat template does not render the earlier turns as a prefix of the conversation, so the "
                    "last response's tokens cannot be located."
                )
            mask[: len(prompt)] = False
    else:
        prompt = _render(tokenizer, messages[:-1], chat_template=template, tokenize=False, add_generation_prompt=True)
        full = _render(tokenizer, messages, chat_template=template, tokenize=False)
        if not full.startswith(prompt):
            raise ConfigError(
                "The chat template does not render the generation prompt as a prefix of the conversation, so the "
                "response tokens cannot be located; use a template with {% generation %} markers."
            )
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        starts = np.asarray([start for start, _ in enc["offset_mapping"]], dtype=np.int64)
        mask = starts >= len(prompt)
    if len(ids) and mask[0]:
        mask[0] = False  # the first token has no context to be predicted from
    n_response = int(mask.sum())
    if n_response == 0:
        raise DataError(f"The response renders to no tokens (instruction {instruction[:60]!r}).")
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedExample(ids, mask, n_response, bool(truncated))


def _render(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> Any:
    """``tokenizer.apply_chat_template`` with a template's own refusal (e.g. Gemma's "System role not supported")
    as a ConfigError naming the tokenizer."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except jinja2.TemplateError as err:
        roles = [m["role"] for m in messages]
        raise ConfigError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'this tokenizer'} refuses a conversation "
            f"with roles {roles}: {err}"
            + (" (this template has no system role: leave the system prompt out)" if "system" in roles else "")
        ) from None


def context_token_id(tokenizer: Any) -> int:
    """The token that stands before unconditioned text: BOS, else EOS (GPT-2's `<|endoftext|>`)."""
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise ConfigError(f"Tokenizer {tokenizer.name_or_path!r} has neither a BOS nor an EOS token.")
    return int(token_id)


def unconditioned(token_ids: np.ndarray, start_id: int, max_length: int | None = None) -> TokenizedExample:
    """``token_ids`` with only ``start_id`` as context, every one of them scored (for L(y) and L(x))."""
    ids = np.concatenate([[start_id], np.asarray(token_ids, dtype=np.int64)])
    mask = np.ones(len(ids), dtype=bool)
    mask[0] = False
    n = len(ids) - 1
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedExample(ids, mask, n, bool(truncated))
