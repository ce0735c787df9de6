"""Which implementation a decode step's paged attention runs, and the call into the C++ kernel.

The C++ kernel (`anyquant_cpu::paged_decode_attention`, quant/kernels/csrc/cpu_attention.cpp)
attends one query row per sequence for all the step's sequences in one call, reading K/V in place
through the block tables: GQA without repeating K/V, an online softmax in fp32, bf16 dot products
(vdpbf16ps) for bf16 queries on a bf16 cache and fp32 arithmetic otherwise, sliding windows, and
key and value widths that differ (latent attention's absorbed decode: 576 / 512). It runs on
AVX-512 where the CPU has it, else on AVX2 + FMA (fp32 arithmetic in 8-wide vectors); the library
says which (`kernel_isa`), and the kernel is named after it (`cpu_avx512` / `cpu_avx2`). An int8
cache (layers/kv_quant.py's rows: codes, then the row's scale) runs the AVX2 kernel on every CPU
that has AVX2 + FMA, AVX-512 ones included; its widths are the values per row (`row_width`, the
last dim less the scale's bytes). It serves a decode step where `decode_kernel_reason` returns
None; elsewhere (a CPU with neither ISA, a float16 cache, widths not a multiple of 16, the
extension not built, or `set_decode_kernel("torch")`) the pure-torch path of layers/attention.py
runs. The choice is per (dtypes, widths), so it is made once and cached, not re-checked per layer.

A decode step (every sequence decodes one token), captured (engine/capture.py) or eager
(engine/kv_cache.py's `PagedAttention`), calls `anyquant_cpu::paged_decode_step` per layer
instead: the same kernel with the layer's K/V store in front of it, on the step's block tables,
context lengths and slots as tensors checked once per step (`check_decode_step`), so that no
Python runs between the compiled graph and the kernel, and an eager layer is one call instead of
two stores, a plan lookup and the kernel. Both steps take it where `step_kernel_reason` returns
None (once per captured model, once per eager step).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

from anyquant.layers import kv_quant

# "auto": the C++ kernel wherever it can run; "torch": always the pure-torch path.
KERNEL_ENV = "ANYQUANT_DECODE_ATTENTION"
_CHOICES = ("auto", "torch")
_KERNEL_DTYPES = (torch.bfloat16, torch.float32)  # the queries' dtypes, and the float caches'
_CACHE_DTYPES = (*_KERNEL_DTYPES, torch.int8)  # int8: layers/kv_quant.py's rows


class _Setting:
    mode: str = os.environ.get(KERNEL_ENV, "auto") or "auto"


def set_decode_kernel(mode: str) -> None:
    """ "auto" (default; also from the ANYQUANT_DECODE_ATTENTION environment variable) or "torch".
    A captured decode step keeps the choice made when it was captured (`step_kernel_reason`)."""
    if mode not in _CHOICES:
        raise ValueError(f"{KERNEL_ENV}: expected one of {list(_CHOICES)}, got {mode!r}")
    _Setting.mode = mode


def decode_kernel_mode() -> str:
    return _Setting.mode


def decode_kernel_reason(q: Tensor, key_cache: Tensor, value_cache: Tensor) -> str | None:
    """Why a decode step with these queries and caches runs the pure-torch path, or None when the
    C++ kernel runs it."""
    if _Setting.mode not in _CHOICES:
        raise ValueError(f"{KERNEL_ENV}: expected one of {list(_CHOICES)}, got {_Setting.mode!r}")
    if _Setting.mode == "torch":
        return f"{KERNEL_ENV}=torch"
    return _reason(
        q.device.type,
        q.dtype,
        key_cache.dtype,
        value_cache.dtype,
        kv_quant.row_width(key_cache),
        kv_quant.row_width(value_cache),
    )


@functools.cache
def _reason(
    device: str, q_dtype: torch.dtype, k_dtype: torch.dtype, v_dtype: torch.dtype, dk: int, dv: int
) -> str | None:
    """`dk` / `dv`: values per row (an int8 cache's are its last dim less the scale's bytes)."""
    if device != "cpu":
        return f"the C++ decode attention runs on CPU, not {device}"
    if q_dtype not in _KERNEL_DTYPES or k_dtype not in _CACHE_DTYPES or k_dtype != v_dtype:
        return (
            "the C++ decode attention takes bfloat16 / float32 queries on bfloat16 / float32 / int8 caches "
            f"(keys and values alike), got q {q_dtype}, cache {k_dtype} / {v_dtype}"
        )
    if dk % 16 or dv % 16:
        return f"the C++ decode attention needs key / value widths that are multiples of 16, got {dk} / {dv}"
    return _cpu_reason(k_dtype == torch.int8)


def step_kernel_reason(
    dtype: torch.dtype, k_dim: int, v_dim: int, device: str = "cpu", cache_dtype: torch.dtype | None = None
) -> str | None:
    """Why a decode step in the compute dtype `dtype` (the queries', and the new keys' / values')
    on a cache of `cache_dtype` (default: `dtype`; torch.int8 for an int8 cache) holding rows of
    `k_dim` / `v_dim` values (an int8 cache's `kv_quant.row_width`, not its last dim) on `device`
    cannot call `paged_decode_step` per layer, or None. The one answer for
    both steps: a captured step asks once, when it is captured (then a later `set_decode_kernel`
    does not change it; otherwise it runs the pure-torch attention behind
    `anyquant::paged_decode_attention`), an eager step of decoding sequences asks once per step
    (engine/kv_cache.py; otherwise it stores and attends through layers/attention.py)."""
    if _Setting.mode not in _CHOICES:
        raise ValueError(f"{KERNEL_ENV}: expected one of {list(_CHOICES)}, got {_Setting.mode!r}")
    if _Setting.mode == "torch":
        return f"{KERNEL_ENV}=torch"
    cache = dtype if cache_dtype is None else cache_dtype
    return _reason(device, dtype, cache, cache, k_dim, v_dim)


@functools.cache
def kernel_isa(int8_cache: bool = False) -> str | None:
    """The instruction set the C++ kernel runs on this CPU for a float cache ("avx512" or "avx2")
    or an int8 cache ("avx2", AVX-512 CPUs included), or None where it cannot run: the library's
    own choice (cpu_attention.cpp), so the name cannot disagree with it."""
    from anyquant.quant.kernels import cpu_ext

    if cpu_ext.unavailable_reason() is not None:
        return None
    return str(cpu_ext.ops().attention_isa(int8_cache)) or None


@functools.cache
def _cpu_reason(int8_cache: bool = False) -> str | None:
    from anyquant.quant.kernels import cpu_ext

    reason = cpu_ext.unavailable_reason()
    if reason is None and kernel_isa(int8_cache) is None:
        if int8_cache:
            return "the C++ decode attention on an int8 cache needs AVX2 + FMA + F16C, which this CPU lacks"
        return "CPU lacks AVX-512 (F/BW/VL/DQ) and AVX2 + FMA + F16C"
    return reason


def describe_decode_attention(
    device: torch.device,
    dtype: torch.dtype,
    k_dim: int,
    v_dim: int,
    cache_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """For `inspect`: what a decode step's attention runs in the compute dtype `dtype` on a cache of
    `cache_dtype` (default: `dtype`; torch.int8 for an int8 cache) holding rows of `k_dim` / `v_dim`
    values, and why not the C++ kernel."""
    cache = dtype if cache_dtype is None else cache_dtype
    if _Setting.mode == "torch":
        reason: str | None = f"{KERNEL_ENV}=torch"
    else:
        reason = _reason(device.type, dtype, cache, cache, k_dim, v_dim)
    if reason is None:
        kernel = f"cpu_{kernel_isa(cache == torch.int8)} (anyquant_cpu::paged_decode_attention)"
    else:
        kernel = "torch"
    return {"kernel": kernel, "reason": reason}


def paged_decode(
    q: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    page_size: int,
    scale: float,
    window: int | None,
) -> Tensor:
    """q [B, H, Dk] (one row per sequence) against the cache [Hkv, slots, D*] (int8: [Hkv, slots,
    D* + kv_quant.SCALE_BYTES]) through each sequence's block table [B, P] and key count [B] ->
    [B, H * Dv]."""
    from anyquant.quant.kernels import cpu_ext

    out = cpu_ext.ops().paged_decode_attention(
        q, key_cache, value_cache, block_tables, context_lens, page_size, scale, window or 0
    )
    return out.view(q.shape[0], -1)


def paged_decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_cache: Tensor,
    value_cache: Tensor | None,
    slot_mapping: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    page_size: int,
    scale: float,
    window: int | None,
) -> Tensor:
    """One layer of a captured decode step in one C++ call: store k [B, Hkv, Dk] / v [B, Hkv, Dv]
    at `slot_mapping` [B] (-1: a padding row, not stored; `value_cache` None: the value is the
    key's prefix, stored with it; int8 caches: each row quantized as `kv_quant.quantize_rows`
    does, to the same bytes, and a value cache required), then q [B, H, Dk] -> [B, H * Dv]
    through `block_tables` [B, P] and `context_lens` [B] (0 for a padding row), which
    `check_decode_step` checked for the step."""
    from anyquant.quant.kernels import cpu_ext

    return cpu_ext.ops().paged_decode_step(
        q,
        k,
        v,
        key_cache,
        value_cache,
        slot_mapping,
        block_tables,
        context_lens,
        page_size,
        scale,
        window or 0,
    )


def check_decode_step(
    slot_mapping: Tensor, block_tables: Tensor, context_lens: Tensor, page_size: int, slots: int
) -> None:
    """Once per step, before `paged_decode_step`'s layers read the cache through them: the slots
    lie in the cache (or are -1), every context fits its block table, every page id it reaches
    is a page of the cache (a clear error naming the tensor otherwise)."""
    from anyquant.quant.kernels import cpu_ext

    cpu_ext.ops().check_decode_step(slot_mapping, block_tables, context_lens, page_size, slots)
