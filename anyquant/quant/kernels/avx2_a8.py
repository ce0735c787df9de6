"""AVX2 kernel for int8 activations (`cpu_avx2_a8`): W4A8 / W8A8 on x86-64 CPUs without AVX-512.

The specs, the packed layout and the numerics of cpu_avx512_vnni (avx512_vnni.py, which holds
the shared `Int8ActivationKernel`): uint2/3/4 groups with or without zero points or GGUF float
offsets, int8 and uint8 weights; activations quantized per call to int8 with one scale per row of
x (dynamic) or per tensor (static, symmetric), exactly as the reference's
`fake_quantize_activations` does; int32 dot products exact, scales applied once in fp32. Only
the instructions differ (csrc/a8_avx2.h): vpmaddubsw on the 4-bit codes, vpmaddwd on int16
copies of 8-bit ones.

Why: on AVX2 the weight-only kernel (cpu_avx2) runs prompts at most at the fp32 FMA peak, 16
multiply-adds per cycle per core; vpmaddubsw does 32 per instruction at the same issue rate, so
many rows (prompts, large batches) compute up to ~2-3x faster (benchmarks/RESULTS.md). Where the
CPU has AVX512-VNNI, cpu_avx512_vnni ranks above this kernel. A MoE layer's routed experts on this
kernel run as one fused call, `moe_experts_avx2_a8` (avx512_moe_vnni.py's FusedInt8Experts).
"""

from __future__ import annotations

from anyquant.quant.kernels.avx2 import _cpu_reason
from anyquant.quant.kernels.avx512_vnni import Int8ActivationKernel
from anyquant.quant.registry import register_kernel


@register_kernel
class Avx2Int8ActivationKernel(Int8ActivationKernel):
    """Integer weights x int8 activations with AVX2 integer multiply-adds; see the module docstring.
    One op at every row count: it picks between streaming the blocks (up to 4 rows) and unpacking
    them once per 64 rows inside (csrc/a8_avx2.h), so a captured step traces the same call for
    every bucket and the kernel needs no `path`."""

    name = "cpu_avx2_a8"
    priority = 65  # below cpu_avx512_vnni (70), above cpu_w8a8_int8 and the other pure-torch kernels (50)
    op_name = "avx2_a8_linear"

    @classmethod
    def cpu_reason(cls) -> str | None:
        return _cpu_reason()
