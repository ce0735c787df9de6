"""Running a call at a chosen torch intra-op thread count (the C++ kernels split work by it)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count at `n` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def at_thread_counts(call: Callable[[], T], counts: Sequence[int] = (1, 2, 3)) -> list[T]:
    """`call()`'s result at each thread count, in order."""
    results = []
    for n in counts:
        with torch_threads(n):
            results.append(call())
    return results
