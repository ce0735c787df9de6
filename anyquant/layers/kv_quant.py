"""The int8 KV cache's row format: one home for how a cached key or value row is quantized.

`--kv-cache-dtype int8` stores each cached row (one token, one KV head) as `width` int8 codes
followed by the row's scale: the 4 bytes of a float32, in the CPU's byte order. So an int8 cache
is an ordinary int8 tensor [.., slots, width + SCALE_BYTES]; every path that stores, gathers,
saves or passes a cache moves the codes and their scale together, and nothing beside the cache
tensor has to be threaded through the engine.

Quantization is symmetric per row: scale = amax / 127 (float32), code = round-half-to-even of
x / scale, clamped to [-127, 127]; an all-zero row stores scale 0 and codes 0. A row with a
non-finite value stores a NaN scale and zero codes, so it reads back as NaN and the engine's
numeric guard reports it instead of attending over a silently wrong row. Dequantized,
x ~ code * scale, an error of at most scale / 2 = amax / 254 per value. The C++ decode kernel
(quant/kernels/csrc) stores rows with the same arithmetic, so both paths write the same bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The dtype names `kv_cache_dtype` accepts besides "auto" (the compute dtype), and the cache
# tensor's dtype for each.
QUANTIZED_KV_DTYPES = {"int8": torch.int8}
KV_CACHE_DTYPES = ("auto", *QUANTIZED_KV_DTYPES)
SCALE_BYTES = 4  # the float32 scale after each row's codes
CODE_MAX = 127


def cache_dtype(kv_cache_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The cache tensor's dtype for the `kv_cache_dtype` option ("auto": the compute dtype)."""
    if kv_cache_dtype == "auto":
        return compute_dtype
    if kv_cache_dtype not in QUANTIZED_KV_DTYPES:
        raise ValueError(
            f"kv_cache_dtype {kv_cache_dtype!r} is not supported; choose one of {', '.join(KV_CACHE_DTYPES)}"
        )
    return QUANTIZED_KV_DTYPES[kv_cache_dtype]


def is_quantized_dtype(cache_dtype: torch.dtype) -> bool:
    """Whether a cache of this dtype holds int8 rows in this format (the compute dtypes are floats)."""
    return cache_dtype == torch.int8


def is_quantized(cache: Tensor) -> bool:
    """Whether a cache tensor holds int8 rows in this format."""
    return is_quantized_dtype(cache.dtype)


def stored_width(width: int, cache_dtype: torch.dtype) -> int:
    """The last dim of a cache that holds rows of `width` values."""
    return width + SCALE_BYTES if cache_dtype == torch.int8 else width


def row_width(cache: Tensor) -> int:
    """The values per row a cache holds (its last dim less the scale of an int8 cache)."""
    return cache.shape[-1] - SCALE_BYTES if is_quantized(cache) else cache.shape[-1]


def quantize_rows(x: Tensor) -> Tensor:
    """x [..., width] (any float dtype) -> int8 [..., width + SCALE_BYTES]: codes, then the scale."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    finite = torch.isfinite(amax)
    scale = torch.where(finite, amax / CODE_MAX, torch.full_like(amax, float("nan")))
    safe = torch.where(finite & (amax > 0), scale, torch.ones_like(scale))
    codes = torch.where(finite, torch.round(xf / safe), torch.zeros_like(xf))
    codes = codes.clamp_(-CODE_MAX, CODE_MAX).to(torch.int8)
    return torch.cat([codes, scale.contiguous().view(torch.int8)], dim=-1)


def dequantize_rows(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """int8 rows [..., width + SCALE_BYTES] -> [..., width] in `dtype` (code * scale in float32)."""
    width = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., width:].contiguous().view(torch.float32)  # [..., 1]
    return (rows[..., :width].float() * scale).to(dtype)
