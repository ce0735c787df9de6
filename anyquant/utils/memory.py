"""Handing freed heap memory back to the operating system (glibc), for loops of large temporaries.

glibc keeps freed blocks below its adaptive mmap threshold (up to 32 MiB) in the heap, and when
long-lived tensors are allocated between the temporaries (a loader's repacked weights, a
quantizer's outputs) the freed space cannot be returned from the top of the heap: resident memory
then only grows, by the temporaries of every layer, although nothing is live. `malloc_trim(0)`
returns every free page. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim
    return trim


def return_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc `malloc_trim(0)`)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
