"""Instruction features for the router (:mod:`magpie_teach.scoring.route`): the base model's own view of an
instruction, before any teacher answers it.

The instruction is rendered as the user turn of the base model's chat template with the generation prompt (what
the student sees before it answers), cut at ``max_length`` tokens; the base model's last hidden states over its
tokens are averaged, and the average is projected onto :data:`DIMENSIONS` fixed directions (a Gaussian matrix drawn
from :data:`PROJECTION_SEED` for the model's hidden size, scaled by 1/sqrt(DIMENSIONS): distances between
instructions are kept up to a small distortion, Johnson-Lindenstrauss) so that every base model's features are the
same small size, cheap to cache and to fit a ridge head on. The features come from the same forward pass family as
the compatibility loss, so a router built on them is student-aware at no extra model.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach.scoring.compatibility import DEFAULT_WINDOW, _pad_id
from magpie_teach.settings import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_LENGTH

DIMENSIONS = 64
PROJECTION_SEED = 0
RULE = f"mean-last-hidden/gauss{DIMENSIONS}-seed{PROJECTION_SEED}/v1"
"""What the features are, part of their score-cache identity: a change of any of it is a new cache."""
COLUMNS = [f"f{i}" for i in range(DIMENSIONS)]


def projection(hidden_size: int) -> np.ndarray:
    """The fixed (hidden_size x DIMENSIONS) projection, the same for every run and machine."""
    rng = np.random.default_rng([PROJECTION_SEED, hidden_size])
    return (rng.standard_normal((hidden_size, DIMENSIONS)) / np.sqrt(DIMENSIONS)).astype(np.float32)


def prompt_ids(tokenizer: Any, instruction: str, max_length: int) -> tuple[list[int], bool]:
    """The instruction as the student sees it (its chat template's user turn and generation prompt), cut at
    MAX_LENGTH tokens; and whether it was cut."""
    from magpie_teach.chat import _render

    ids = list(_render(tokenizer, [{"role": "user", "content": instruction}], tokenize=True,
                       add_generation_prompt=True, return_dict=False))  # fmt: skip
    return ids[:max_length], len(ids) > max_length


def score_instruction_features(
    model: Any,
    tokenizer: Any,
    instructions: Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    window: int = DEFAULT_WINDOW,
    on_window: Callable[[int, pd.DataFrame], None] | None = None,
    show_progress: bool | None = None,
    desc: str = "features",
) -> pd.DataFrame:
    """One row per instruction: ``f0`` .. ``f63`` (float32), ``n_tokens`` and ``truncated``. WINDOW instructions are
    tokenized at a time and batched by length within ``batch_tokens`` padded tokens (padding never enters an
    average); ``on_window(start, rows)`` is called as each window ends (the score cache stores them there, so a
    killed run resumes from its last window)."""
    import torch

    from magpie_teach.progress import Progress
    from magpie_teach.scoring.batching import windows

    device = next(model.parameters()).device
    matrix = torch.from_numpy(projection(model.config.hidden_size)).to(device)
    progress = Progress(len(instructions), desc, show=show_progress)
    frames, start = [], 0
    for chunk in windows(instructions, window):
        encoded = [prompt_ids(tokenizer, text, max_length) for text in chunk]
        frame = pd.DataFrame(_pooled(model, _pad_id(tokenizer), matrix, [ids for ids, _ in encoded], batch_tokens,
                                     progress, desc), columns=COLUMNS)  # fmt: skip
        frame["n_tokens"] = np.asarray([len(ids) for ids, _ in encoded], dtype=np.int64)
        frame["truncated"] = np.array([cut for _, cut in encoded], dtype=bool)
        if on_window is not None:
            on_window(start, frame)
        frames.append(frame)
        start += len(chunk)
    progress.close()
    if not frames:
        return pd.DataFrame({**{c: np.empty(0, np.float32) for c in COLUMNS}, "n_tokens": np.empty(0, np.int64),
                             "truncated": np.empty(0, bool)})  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def _pooled(model: Any, pad: int, matrix: Any, encoded: list[list[int]], batch_tokens: int, progress: Any,
            desc: str) -> np.ndarray:  # fmt: skip
    """The projected mean of the last hidden states over each prompt of ENCODED, batched by length; a batch that
    runs out of GPU memory is run again in halves."""
    import torch

    from magpie_teach.scoring.batching import plan_batches, run_halving

    device = matrix.device
    lengths = [len(ids) for ids in encoded]
    out = np.zeros((len(encoded), DIMENSIONS), dtype=np.float32)

    def run(batch: list[int]) -> None:
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.tensor(encoded[i])
            mask[row, : lengths[i]] = 1
        ids, mask = ids.to(device), mask.to(device)
        # .to(device): a model split over GPUs (device_map) ends its backbone on its last GPU
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state.to(device, torch.float32)
        pooled = (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        out[batch] = (pooled @ matrix).cpu().numpy()
        progress.update(len(batch))

    with torch.inference_mode():
        for batch in plan_batches(lengths, batch_tokens):
            run_halving(batch, run, lambda rows: len(rows) * max(lengths[i] for i in rows), desc)
    return out
