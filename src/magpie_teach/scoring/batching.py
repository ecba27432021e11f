"""Length-sorted, token-budgeted batches over a stream of variable-length sequences."""

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

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
