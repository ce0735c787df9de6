"""The shared test-vector generator of formats.md §12.0, plus tiny helpers for format tests.

Written from the spec text only (no anyquant code), so expected values computed from it are
independent of the code under test.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyquant.loading.checkpoint import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS, TensorIndex, TensorInfo


def hcode(n: int, k: int, maxq: int) -> int:
    """formats.md §12.0 hash code; all arithmetic on unsigned 32-bit integers."""
    h = (n * 0x9E3779B1 + k * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    h ^= h >> 12
    return h & maxq


def scale(n: int, g: int) -> float:
    return (1 + (5 * n + 3 * g) % 7) / 32


def zero_awq(n: int, g: int) -> int:
    return (5 * n + 7 * g) % 16


def zero_gptq_asym(n: int, g: int) -> int:
    return 1 + (5 * n + 7 * g) % 15


def words(values: list[int]) -> Tensor:
    """Unsigned 32-bit literals -> the int32 bit patterns safetensors stores."""
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32)


def word_rows(rows: list[list[int]]) -> Tensor:
    return torch.stack([words(r) for r in rows])


def checksums(w: Tensor) -> tuple[float, float]:
    """(S1, S2) of §12.0 for a dense [N, K] weight: sum W and sum W * (1 + n + 2k), in float64."""
    n, k = w.shape
    w = w.double()
    weight = (
        1 + torch.arange(n, dtype=torch.float64)[:, None] + 2 * torch.arange(k, dtype=torch.float64)[None]
    )
    return float(w.sum()), float((w * weight).sum())


def index_of(tensors: dict[str, Tensor]) -> TensorIndex:
    """A headers-only index describing `tensors` (no file behind it)."""
    infos = []
    for name, t in tensors.items():
        dtype = TORCH_TO_SAFETENSORS[t.dtype]
        nbytes = t.numel() * SAFETENSORS_DTYPES[dtype][1]
        infos.append(TensorInfo(name, "x.safetensors", dtype, tuple(t.shape), (0, nbytes)))
    return TensorIndex(infos)


def index_of_shapes(entries: dict[str, tuple[str, tuple[int, ...]]]) -> TensorIndex:
    """A headers-only index from name -> (safetensors dtype, shape)."""
    infos = []
    for name, (dtype, shape) in entries.items():
        numel = 1
        for d in shape:
            numel *= d
        infos.append(
            TensorInfo(name, "x.safetensors", dtype, shape, (0, numel * SAFETENSORS_DTYPES[dtype][1]))
        )
    return TensorIndex(infos)
