"""Length-sorted, token-budgeted batches over a stream of variable-length sequences."""

import gc
import logging
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import TypeVar

from magpie_teach.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def plan_batches(
    lengths: list[int], batch_tokens: int, max_batch_size: int | None = None, max_padding: float = 0.05
) -> list[list[int]]:
    """Groups indices into batches of similar length, longest first.

    A batch's padded size (``len(batch) * its longest length``) stays within ``batch_tokens`` and
    its padding within ``max_padding`` of that size; a sequence longer than the budget goes alone.
    Sorting keeps padding small; longest-first makes an out-of-memory error show up on the first
    batch, not after an hour.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        if current:
            longest = lengths[current[0]]
            padded = (len(current) + 1) * longest
            full = max_batch_size is not None and len(current) >= max_batch_size
            if full or padded > batch_tokens or 1 - (real + lengths[i]) / padded > max_padding:
                batches.append(current)
                current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches


def windows(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive chunks of ``size`` items, so that memory stays flat however many items there are."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def run_halving(batch: list[int], run: Callable[[list[int]], None], tokens: Callable[[list[int]], int],
                what: str) -> None:  # fmt: skip
    """``run(batch)``; when it runs out of GPU memory (a long batch, memory another process took), the batch's
    halves in turn, down to single rows: a run goes on at a smaller batch instead of failing the whole data set (and
    failing again on the same batch when rerun). A single row that does not fit is a ConfigError naming its size.
    ``tokens(rows)``: the padded tokens of rows, for the messages."""
    import torch

    try:
        run(batch)
        return
    except torch.OutOfMemoryError:
        if len(batch) == 1:
            raise ConfigError(
                f"{what}: one conversation of {tokens(batch)} tokens does not fit in the GPU's memory; lower "
                "--max-length, use --dtype bfloat16, or a GPU with more memory"
            ) from None
    gc.collect()  # the failed forward's tensors are unreferenced once the exception is gone
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    logger.warning("%s: out of GPU memory on a batch of %d rows (%d padded tokens): scoring it in halves; a lower "
                   "--batch-tokens avoids the retries", what, len(batch), tokens(batch))  # fmt: skip
    half = len(batch) // 2
    run_halving(batch[:half], run, tokens, what)
    run_halving(batch[half:], run, tokens, what)
