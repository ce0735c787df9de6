"""Weights in transparent huge pages (Linux): the memory a decode step streams, 2 MiB at a time.

A batch-1 decode step reads every weight once per token (hundreds of MB for a 0.5B model). In
4 KiB pages the hardware prefetchers stop at each page boundary and every page takes a TLB entry;
in 2 MiB pages neither happens. Measured on the Zen 4 machine of benchmarks/RESULTS.md: torch's
own allocator with huge pages (`THP_MEM_ALLOC_ENABLE=1`, read once when torch starts and applied
to every large allocation of the process) made batch-1 decode ~10 % faster. Here only the
tensors the kernels stream move, once, after loading, whatever the environment says.

`relocate(slots)` copies the named buffers of modules into one `HugePageArena`: a private
anonymous mapping (a shared one would be shmem, which THP leaves alone), 2 MiB-aligned and advised
MADV_HUGEPAGE, filled back to back (64-byte aligned) so that small tensors share huge pages and
at most one huge page is partly used. The mapping lives as long as any tensor placed in it.
Where huge pages cannot be had (not Linux, THP "never", no `madvise` in this Python) nothing
moves and `unavailable_reason()` says why.
"""

from __future__ import annotations

import functools
import logging
import mmap
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from anyquant.utils.memory import return_freed_memory

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # x86-64 / arm64 with 4 KiB base pages: a PMD-sized transparent huge page
_ALIGN = 64  # each tensor starts on a cache line
_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Tensors below this size are left where they are (norm weights, tables): not worth a copy.
MIN_BYTES = 4096
# Return the freed originals to the OS every this many bytes moved (they may sit in glibc's heap).
_TRIM_EVERY_BYTES = 64 << 20


def thp_mode(path: Path | None = None) -> str | None:
    """The kernel's THP mode ("always", "madvise", "never"), or None where it cannot be read."""
    try:
        text = (path or _THP_ENABLED).read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


@functools.cache
def unavailable_reason() -> str | None:
    """Why weights cannot be placed in transparent huge pages in this process, or None."""
    if not sys.platform.startswith("linux"):
        return f"transparent huge pages are a Linux feature, not {sys.platform}'s"
    if not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap.mmap, "madvise"):
        return "this Python's mmap has no madvise(MADV_HUGEPAGE)"
    mode = thp_mode()
    if mode is None:
        return f"{_THP_ENABLED} cannot be read (no transparent huge pages in this kernel)"
    if mode == "never":
        return f"transparent huge pages are disabled ({_THP_ENABLED}: never)"
    return None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class HugePageArena:
    """`nbytes` of 2 MiB-aligned memory advised for huge pages; `place` copies tensors into it.

    Pages are touched (and backed) only as tensors are copied in, so an arena sized generously
    costs address space, not memory."""

    def __init__(self, nbytes: int) -> None:
        size = _round_up(max(nbytes, 1), HUGE_PAGE)
        # MAP_PRIVATE: Python's default for anonymous maps is MAP_SHARED (shmem, no THP).
        mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive
        start = (-whole.data_ptr()) % HUGE_PAGE
        mapping.madvise(mmap.MADV_HUGEPAGE, start, size)
        self._memory = whole[start : start + size]
        self.used = 0

    @property
    def capacity(self) -> int:
        return self._memory.numel()

    def place(self, tensor: Tensor) -> Tensor:
        """A contiguous copy of `tensor` (same shape, dtype, values) in the arena."""
        offset = _round_up(self.used, _ALIGN)
        end = offset + tensor.nbytes
        if end > self.capacity:
            raise ValueError(f"arena of {self.capacity} bytes cannot hold {tensor.nbytes} more at {offset}")
        out = self._memory[offset:end].view(tensor.dtype).view(tensor.shape)
        out.copy_(tensor)
        self.used = end
        return out


def _movable(tensor: Tensor | None) -> bool:
    """A CPU tensor that owns its whole storage: moving it frees the original. (A view into a
    larger tensor, e.g. one expert of stacked MoE weights, would keep that alive: left alone.)"""
    return (
        tensor is not None
        and tensor.device.type == "cpu"
        and tensor.nbytes >= MIN_BYTES
        and tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.nbytes
    )


def _movable_size(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.nbytes


def relocate(slots: Iterable[tuple[nn.Module, str]]) -> int:
    """Move each `module.<name>` buffer into one huge-page arena, in the order given (the order a
    step reads them); returns the bytes moved (0 where huge pages are unavailable). The caller
    must hold no other reference to the buffers, or their old copies stay alive beside the new."""
    if unavailable_reason() is not None:
        return 0
    chosen = [(m, name) for m, name in slots if _movable(m._buffers.get(name))]
    if not chosen:
        return 0
    sizes = [_movable_size(m._buffers.get(name)) for m, name in chosen]
    total = sum(_round_up(size, _ALIGN) for size in sizes)
    try:
        arena = HugePageArena(total)
    except OSError as error:  # no address space left, or madvise refused: stay as loaded
        log.info("weights stay in base pages: mapping %d bytes for huge pages failed: %s", total, error)
        return 0
    since_trim = 0
    for module, name in chosen:
        old = module._buffers[name]
        assert old is not None
        module._buffers[name] = arena.place(old)
        since_trim += old.nbytes
        del old
        if since_trim >= _TRIM_EVERY_BYTES:
            return_freed_memory()
            since_trim = 0
    return_freed_memory()
    return arena.used
