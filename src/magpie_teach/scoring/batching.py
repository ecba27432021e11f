"""Length-sorted, token-budgeted batches over a stream of variable-length sequences."""

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


def plan_batches(lengths: list[int], batch_tokens: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Groups indices into batches of similar length, longest first.

    A batch's padded size (``len(batch) * its longest length``) stays within ``batch_tokens``; a
    sequence longer than the budget goes alone. Sorting keeps padding small; longest-first makes an
    out-of-memory error show up on the first batch, not after an hour.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or (len(current) + 1) * longest > batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def windows(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive chunks of ``size`` items, so that memory stays flat however many items there are."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
