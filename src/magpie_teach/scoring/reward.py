"""Reward: a sequence-classification reward model's score of each (instruction, response) pair.

The conversation is rendered with the reward model's own chat template (the project default when
it has none), right-padded in length-sorted batches; the model pools at the last non-padding
token, so a row's score does not depend on the rows batched with it.
"""

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach.chat import build_messages, resolve_chat_template
from magpie_teach.errors import ConfigError
from magpie_teach.scoring.batching import plan_batches, run_halving, windows
from magpie_teach.scoring.compatibility import DEFAULT_WINDOW
from magpie_teach.settings import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_LENGTH

logger = logging.getLogger(__name__)


def score_reward(
    model: Any,
    tokenizer: Any,
    instructions: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    window: int = DEFAULT_WINDOW,
    show_progress: bool | None = None,
    contexts: Sequence[Any] | None = None,
    on_window: Callable[[int, pd.DataFrame], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores each pair with an ``AutoModelForSequenceClassification`` reward model with one output;
    ``on_window(start, rows)`` gets each finished window's ``reward`` and ``truncated`` (the score cache).

    Returns:
        (rewards, truncated): float64 scores and a flag per pair for conversations cut at ``max_length``.
    """
    import torch

    from magpie_teach.progress import Progress

    if model.config.num_labels != 1:
        raise ConfigError(f"The reward model has {model.config.num_labels} outputs; one is needed.")
    if model.config.pad_token_id is None:  # pooling finds the last non-pad token; it needs a pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    pad_id = model.config.pad_token_id
    vocabulary = model.get_input_embeddings().num_embeddings
    template = resolve_chat_template(tokenizer)
    device = next(model.parameters()).device
    rewards = np.zeros(len(instructions), dtype=np.float64)
    truncated = np.zeros(len(instructions), dtype=bool)
    progress = Progress(len(instructions), "reward", show=show_progress)
    offset = 0
    contexts = contexts if contexts is not None else [None] * len(instructions)
    for chunk in windows(zip(instructions, responses, contexts), window):
        texts = [
            tokenizer.apply_chat_template(build_messages(x, y, context=c), chat_template=template, tokenize=False)
            for x, y, c in chunk
        ]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        for i, seq in enumerate(ids):
            if len(seq) > max_length:
                ids[i], truncated[offset + i] = seq[:max_length], True

        def run(batch: list[int], ids: list[list[int]] = ids, offset: int = offset) -> None:
            width = max(len(ids[i]) for i in batch)
            model.config.pad_token_id = _absent_id(pad_id, [ids[i] for i in batch], vocabulary)
            input_ids = torch.full((len(batch), width), model.config.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                attention[row, : len(ids[i])] = 1
            with torch.inference_mode():
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            rewards[[offset + i for i in batch]] = logits[:, 0].float().cpu().numpy()

        for batch in plan_batches([len(s) for s in ids], batch_tokens):
            run_halving(batch, run, lambda rows, ids=ids: len(rows) * max(len(ids[i]) for i in rows), "reward")
        if on_window is not None:
            done = slice(offset, offset + len(chunk))
            on_window(offset, pd.DataFrame({"reward": rewards[done], "truncated": truncated[done]}))
        offset += len(chunk)
        progress.update(len(chunk))
    progress.close()
    if truncated.any():
        logger.warning(
            "reward: %d of %d conversations were cut at max_length=%d", truncated.sum(), len(truncated), max_length
        )
    return rewards, truncated


def _absent_id(pad_id: int, batch: list[list[int]], vocabulary: int) -> int:
    """A padding id that no row of BATCH holds: the model pools at the last token that is not its pad id, so a pad
    id that also ends a conversation (a reward model whose pad is its EOS, under a template that ends a turn with
    EOS) would be read one token early. PAD_ID itself when it is absent; else the highest id that is (right padding
    under causal attention: what the padding holds never reaches a real token)."""
    used = set().union(*map(set, batch))
    if pad_id not in used:
        return pad_id
    return next(candidate for candidate in range(vocabulary - 1, -1, -1) if candidate not in used)
