"""Which CPU kernel a test should expect: the AVX-512 kernels where this CPU has the instructions,
else the AVX2 kernels where it has AVX2 + FMA, else the kernel a CPU without them gets. CI runs on
whatever x86-64 machine it is given, so a test naming a kernel names each; a test run for every
kernel class of an instruction-set family takes them as `kernel_param`s, each skipped with its
reason where this CPU cannot run it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from anyquant.quant.kernels import avx2, avx512
from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.spec import LayerKind, QuantSpec


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


def kernel_param(cls: type[LinearKernel], *values: object, probe: QuantSpec, kind: LayerKind) -> Any:
    """A pytest param of `cls` (and `values`), skipped with the reason where `cls` cannot serve a
    `kind` layer of spec `probe` on this CPU; its id is the kernel's name and the values' spec."""
    reason = cls.cannot_run(probe, kind, torch.device("cpu"), (64, 64), torch.bfloat16)
    spec = next((v for v in values if isinstance(v, QuantSpec)), None)
    ids = "-".join([cls.name] + ([spec.describe()] if spec is not None else []))
    mark = pytest.mark.skipif(reason is not None, reason=f"{cls.name} cannot run here: {reason}")
    return pytest.param(cls, *values, marks=mark, id=ids)
