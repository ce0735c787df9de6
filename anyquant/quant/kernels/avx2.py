"""AVX2 + FMA weight-only kernels from the C++ extension, for x86-64 CPUs without AVX-512.

The same repacked layout as cpu_avx512 (packed at load by avx512.py's RepackedWeightOnlyKernel
and RepackedLmHeadKernel: this module adds no packing), read by csrc/gemv_avx2.h 256 bits at a
time. Paths per call (`path`):
  - the vector kernel ("gemv", few rows: bf16 compute, and fp32 for fp8): streams the packed weights once, decodes
    the codes in registers to fp32 and multiplies with fp32 FMA, rows of x 4 at a time (bf16 x
    widened exactly); one row of int4 instead multiplies the codes by x as 16-bit fixed point per
    span of inputs with integer dot products (an error of at most 2^-15 of the span's largest
    |x| per input, next to bf16's output rounding; gemv_avx2.h states the budget);
  - the few-rows kernel ("fewrows", bf16 compute, int4 and 8-bit at 2.._FEW_ROWS_MAX rows, the
    bf16 LM head from _HEAD_FEW_ROWS_MIN: batched decode): every weight decoded once per group of
    up to 6 rows, 12 accumulators in registers; int4 decoded in place (code * 2^e, no shifts)
    against x prescaled by 2^-e;
  - the rows kernel ("rows", bf16 compute beyond those rows: prompts; fp8 beyond 8 rows): per block
    of 16 outputs, chunks of 256 inputs dequantized once into an L1-resident fp32 scratch (exactly
    the reference's fp32 weights) that every row of x then runs over, 6 rows at a time in
    registers, the result rounded to bf16. The vector kernel decodes again for every 4 rows, which
    beyond 8 rows costs more than the scratch's stores and loads;
  - the tile path ("tiled", fp32 compute at every row count; fp8 beyond 8 rows only, the vector
    kernel below that, fp8 having no code offsets): tiles of 16 * `_TILE_BLOCKS` output
    rows dequantized to fp32 (the reference's fp32 weights) and multiplied by at::mm, so fp32
    logits equal a dense fp32 model of the dequantized weights bit for bit (GGUF round trips and
    dequantized twins are checked that way). The rows kernel beats it at every row count measured
    (benchmarks/RESULTS.md) but sums in another order.
Weights: uint2/3/4, int8, uint8 (GPTQ act-order, zero points, GGUF float offsets) and fp8
e4m3fn / e5m2 with per-tensor, per-channel, group or block (e.g. 128x128) scales, all three paths
in both compute dtypes. fp8 codes are decoded exactly by arithmetic and F16C (gemv_avx2.h), so
the extension calls name which fp8 (`_fp8_format`). fp8 activations are the reference's own fake
quantization before the call, as for cpu_avx512; integer weights with quantized activations are
refused (RepackedWeightOnlyKernel.rejects).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from anyquant.quant.kernels import cpu_ext
from anyquant.quant.kernels.avx512 import (
    _DECODED,
    _FP8,
    _INT4,
    _INT8,
    RepackedLmHeadKernel,
    RepackedWeightOnlyKernel,
)
from anyquant.quant.registry import register_kernel
from anyquant.quant.weight import QuantWeight

# Up to this many rows of x the vector kernel (bf16 compute), beyond it the rows kernel. Measured
# on Zen 3 (one thread, int4 g128, the Qwen2.5-0.5B qkv, o, gate/up and down shapes,
# benchmarks/linear_kernels.py's forced-path engines): the vector kernel is 1.1-1.2x the rows
# kernel at 4 rows and level with it at 8 (the rows kernel pays a fixed dequantization per call);
# the rows kernel is 1.1-1.25x the vector kernel at 12-16 rows and 1.3-1.7x at 32-512.
_GEMV_MAX_ROWS = 8
# The few-rows kernel (bf16 compute): every weight decoded once per group of up to 6 rows, int4 in
# place against x prescaled by powers of two (csrc/gemv_avx2.h, kFewRowsMax: the same bound). It
# takes 2.._FEW_ROWS_MAX rows of int4 and 8-bit weights (fp8 keeps the vector kernel, its F16C
# decode unchanged), the bf16 LM head from _HEAD_FEW_ROWS_MIN rows (below that the head streams
# 272 MB at 1-3 rows and the vector kernel is as fast). Measured on Zen 3, one thread, int4 g128 on
# the Qwen2.5-0.5B shapes: 1.2-1.6x the vector kernel at 2-8 rows and 1.1-1.2x the rows kernel at
# 12-16 (benchmarks/RESULTS.md); one row keeps gemv_one_row.
_FEW_ROWS_MAX = 16
_FEW_ROWS_FORMATS = (_INT4, _INT8)
_HEAD_FEW_ROWS_MIN = 4
# The AVX2 calls' codes for the fp8 layout (csrc/gemv_avx2.h, Avx2Fp8): gemv.h's kFp8 bytes, the
# type named because the AVX2 decoders compute values from the bits rather than from the table.
_FP8_E4M3, _FP8_E5M2, _FP8_E4M3_FINITE = 4, 5, 6
_FP8_FORMATS = (_FP8_E4M3, _FP8_E5M2, _FP8_E4M3_FINITE)
# One row of int4 at bf16 compute runs on x as 16-bit fixed point with integer dot products
# (csrc/gemv_avx2.h, gemv_one_row_x16), in linear layers and the fused MoE's one-token experts.
# With this environment variable set the ops take the fp32 kernel before it instead: the
# benchmarks' A/B switch (benchmarks/linear_kernels.py, moe_cpu.py), read by the C++ ops per call.
INT4_ROW_FP32_ENV = "ANYQUANT_AVX2_INT4_ROW_FP32"


def _fp8_format(weight: str, codes: Tensor) -> int:
    """The AVX2 code for fp8 `codes`: e4m3fn without NaN codes (magnitude 0x7F; no real checkpoint
    has them) skips the decoder's NaN fix, 3 of its ~19 vector operations per 32 weights."""
    if weight == "fp8_e5m2":
        return _FP8_E5M2
    has_nan = bool(((codes.view(torch.uint8) & 0x7F) == 0x7F).any())
    return _FP8_E4M3 if has_nan else _FP8_E4M3_FINITE


_TILE_BLOCKS = 16


@functools.cache
def _cpu_reason() -> str | None:
    """Why this CPU cannot run the AVX2 kernels' instructions, or None. FMA and F16C are asked of
    the compiled library (the compiler's own CPU check, `avx2_supported`), not read here again."""
    if not torch.cpu._is_avx2_supported():
        return "CPU lacks AVX2"
    if cpu_ext.unavailable_reason() is not None:
        return None  # the kernels' `cannot_run` reports why the library is unavailable
    return None if cpu_ext.ops().avx2_supported() else "CPU lacks FMA or F16C"


@register_kernel
class Avx2WeightOnlyKernel(RepackedWeightOnlyKernel):
    """uint2/3/4, int8, uint8 and fp8 weights (fp8 also with fp8 activations) on AVX2 + FMA CPUs
    (the ones without AVX512_BF16).

    Numerics: the vector path multiplies the codes (exact in fp32; fp8 values exactly, e4m3fn as
    2^-8 of its value with 2^8 folded into the scale) by the activations in fp32 and applies
    scale, zero point and the codes' offset once per span of at most 128 inputs, so no weight is
    rounded (for bf16 compute closer to float64 than the reference, which rounds each weight to
    bf16); one row of int4 rounds x instead, to 16-bit fixed point per span (at most 2^-15 of the
    span's largest |x|); the rows kernel and the tile path multiply the reference's fp32 weights.
    """

    name = "cpu_avx2"
    priority = 55  # below cpu_avx512 (60), above the pure-torch CPU kernels (50)

    @classmethod
    def cpu_reason(cls) -> str | None:
        return _cpu_reason()

    def load(self, weight: QuantWeight | Tensor) -> None:
        super().load(weight)
        if self.fmt == _FP8:  # the same bytes; the AVX2 decoders compute the value from the bits
            assert isinstance(weight, QuantWeight)
            self.fmt = _fp8_format(self.spec.weight, weight.data)

    def _codes_times_scales(self, x: Tensor, bias: Tensor | None) -> Tensor:
        n, path, ops = self.shape[0], self.path(x.shape[0]), cpu_ext.ops()
        if path == "tiled":
            return ops.avx2_tiled_mm(
                x, self.packed, self.scale, self.zz, self.lut, bias, self.fmt, self.group, n, _TILE_BLOCKS
            )
        op = {"gemv": ops.avx2_gemv, "fewrows": ops.avx2_few_rows_mm, "rows": ops.avx2_rows_mm}[path]
        return op(x, self.packed, self.scale, self.zz, self.lut, bias, self.fmt, self.group, n)

    def path(self, rows: int) -> str:
        """Which of the extension's paths `rows` rows of x take: "gemv", "fewrows", "rows" or "tiled"."""
        # fp32 x: the vector kernel's code offsets (int8: u = code + 128) cancel against the sum of
        # x, and fp32 products round, so outlier activations cost accuracy (4e-4 on a GGUF Q6_K
        # model); the tile path multiplies the reference's fp32 weights with at::mm, the sums of
        # a dense fp32 F.linear.
        # fp8 codes carry no offset (no zero points, no code shift): there the vector kernel's fp32
        # sums are a dense fp32 dot product's, each weight exact (measured on Zen 3, one thread, one
        # row: 2.4-3.1x a dense fp32 F.linear, the tile path 0.64-0.78x; benchmarks/RESULTS.md).
        if self.compute_dtype == torch.float32:
            without_offsets = self.fmt in _FP8_FORMATS and self.zz is None and self.offset_t is None
            return "gemv" if without_offsets and rows <= _GEMV_MAX_ROWS else "tiled"
        if 2 <= rows <= _FEW_ROWS_MAX and self.fmt in _FEW_ROWS_FORMATS:
            return "fewrows"
        return "gemv" if rows <= _GEMV_MAX_ROWS else "rows"

    def _dequantize_op(self, dtype: torch.dtype) -> Tensor:
        return cpu_ext.ops().avx2_dequantize(
            self.packed, self.scale, self.zz, self.lut, self.fmt, self.group, self.shape[0], dtype
        )


@register_kernel
class Avx2DenseLmHeadKernel(RepackedLmHeadKernel):
    """The bf16 LM head on AVX2 CPUs: the words widened to fp32 in registers (a shift and a mask
    per pair of inputs) and fp32 FMA (the few-rows kernel from _HEAD_FEW_ROWS_MIN rows); beyond
    _FEW_ROWS_MAX rows through the rows kernel's fp32 scratch."""

    name = "cpu_avx2_lm_head"
    priority = 105  # below cpu_avx512_lm_head (110), above the dense kernel (100)
    quantized_kernel = "cpu_avx2"

    @classmethod
    def cpu_reason(cls) -> str | None:
        return _cpu_reason()

    def path(self, rows: int) -> str:
        """Which of the extension's paths `rows` rows of x take: "gemv", "fewrows" or "rows"."""
        if _HEAD_FEW_ROWS_MIN <= rows <= _FEW_ROWS_MAX:
            return "fewrows"
        return "gemv" if rows <= _GEMV_MAX_ROWS else "rows"

    def _product(self, x: Tensor, bias: Tensor | None) -> Tensor:
        ops = cpu_ext.ops()
        op = {"gemv": ops.avx2_gemv, "fewrows": ops.avx2_few_rows_mm, "rows": ops.avx2_rows_mm}[
            self.path(x.shape[0])
        ]
        return op(x, self.packed, self.scale, None, self.lut, bias, _DECODED, self.k_pad, self.shape[0])
