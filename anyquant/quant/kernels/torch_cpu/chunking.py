"""What the pure-torch CPU kernels share: padding of inputs and outputs, and the chunked
dequantize-then-matmul path (`_chunked_linear`) with its scratch buffers."""

from __future__ import annotations

import math
import platform
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from anyquant.quant.kernels.base import LinearKernel

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Weights dequantized per chunk of output rows in the dequantize-then-matmul path: small enough
# that a chunk (fp32) stays in L2, large enough that the per-op overhead is amortized.
_CHUNK_ELEMENTS = 1 << 18


class TorchCpuKernel(LinearKernel):
    """What the kernels of this package share in `cannot_run`: CPU only, float compute dtypes,
    and no float offsets (GGUF minimums), which none of these torch ops applies."""

    device_types = ("cpu",)
    compute_dtypes = _FLOAT_DTYPES
    applies_offsets = False


def _fused_ops_vectorized() -> bool:
    """Whether torch's int4/int8 weight-only mm ops have a vectorized bfloat16 path on this CPU."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _finish(y: Tensor, n: int, bias: Tensor | None) -> Tensor:
    """Drop padded output columns and add the bias (None when the matmul already added it)."""
    if y.shape[1] != n:
        y = y[:, :n].contiguous()
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def _padded_bias(bias: Tensor | None, n_pad: int, dtype: torch.dtype) -> Tensor | None:
    if bias is None:
        return None
    bias = bias.to(dtype)
    return F.pad(bias, (0, n_pad - bias.shape[0])) if bias.shape[0] < n_pad else bias


def _pad_columns(x: Tensor, k_pad: int) -> Tensor:
    """x [T, K] -> [T, k_pad] with zero columns; zero inputs make padded weights contribute nothing."""
    if x.shape[1] == k_pad:
        return x.contiguous()
    return F.pad(x, (0, k_pad - x.shape[1]))


def _aligned(x: Tensor) -> Tensor:
    """The fused int8 op loads rows of x with aligned vector loads; copy a misaligned view."""
    return x if x.data_ptr() % 64 == 0 else x.clone()


class _Scratch:
    """Flat buffers reused by every chunk of one call.

    A fresh allocation of a megabyte-sized chunk page-faults on first touch; reusing one buffer
    per role across the chunks of a call avoids most of that. One Scratch per call, never shared.
    """

    def __init__(self) -> None:
        self._flat: dict[str, Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        size = math.prod(shape)
        flat = self._flat.get(role)
        if flat is None or flat.numel() < size or flat.dtype != dtype:
            flat = self._flat[role] = torch.empty(size, dtype=dtype)
        return flat[:size].view(shape)


def _chunked_linear(
    x: Tensor,
    n_rows: int,
    rows_per_chunk: int,
    dense_rows: Callable[[int, int, _Scratch], Tensor],
    bias: Tensor | None,
) -> Tensor:
    """x [T, K] @ W.T + bias -> [T, n_rows]; dense_rows(r0, r1, scratch) gives W[r0:r1] in x's dtype.

    Only one chunk of dequantized rows exists at a time, so the layer keeps its packed size. The
    bias (padded to n_rows) is added inside the matmul, so the output is rounded once.
    """
    out = x.new_empty(x.shape[0], n_rows)
    scratch = _Scratch()
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        out[:, r0:r1] = F.linear(x, dense_rows(r0, r1, scratch), None if bias is None else bias[r0:r1])
    return out


def _round_to(w: Tensor, dtype: torch.dtype, scratch: _Scratch) -> Tensor:
    """The fp32 chunk `w` rounded once to `dtype` (itself for float32)."""
    if dtype == torch.float32:
        return w
    return scratch.get("rounded", tuple(w.shape), dtype).copy_(w)
