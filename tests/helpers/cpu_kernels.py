"""Which CPU kernel a test should expect: the AVX-512 kernels where this CPU has the instructions,
else the AVX2 kernels where it has AVX2 + FMA, else the kernel a CPU without them gets. CI runs on
whatever x86-64 machine it is given, so a test naming a kernel names each."""

from __future__ import annotations

from anyquant.quant.kernels import avx2, avx512


def has_avx512_bf16() -> bool:
    return avx512._cpu_reason() is None


def has_avx2() -> bool:
    return avx2._cpu_reason() is None


def expected_kernel(avx512_name: str, otherwise: str, avx2_name: str | None = None) -> str:
    """`avx512_name` where the AVX512_BF16 kernels run on this CPU, else `avx2_name` (when the layer
    has an AVX2 kernel) where the AVX2 kernels run, else `otherwise`."""
    if has_avx512_bf16():
        return avx512_name
    if avx2_name is not None and has_avx2():
        return avx2_name
    return otherwise
