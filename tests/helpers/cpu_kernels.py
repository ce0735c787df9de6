"""Which CPU kernel a test should expect: the AVX-512 kernels where this CPU has the instructions,
else the kernel a CPU without them gets. CI runs on whatever x86-64 machine it is given, so a test
naming a kernel names both."""

from __future__ import annotations

from anyquant.quant.kernels import avx512


def has_avx512_bf16() -> bool:
    return avx512._cpu_reason() is None


def expected_kernel(avx512_name: str, otherwise: str) -> str:
    """`avx512_name` where the AVX512_BF16 kernels run on this CPU, else `otherwise`."""
    return avx512_name if has_avx512_bf16() else otherwise
