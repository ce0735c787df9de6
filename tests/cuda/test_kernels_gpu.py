"""The CUDA kernels on a GPU against the reference (float32 dequantize-then-matmul on the CPU), per
spec and compute dtype, and the capability table's choice for the GPU at hand.

Budgets (relative L2 of the output): float32 compute 1e-5 where the kernel computes in float32;
bfloat16 1e-2 and float16 2e-3 (one rounding of inputs and outputs to the 16-bit type, fp32
accumulation); fp8 / int8 activation schemes the same (the codes equal the reference's)."""

from __future__ import annotations

import pytest
import torch

from anyquant.quant.kernels.base import precheck
from anyquant.quant.kernels.cuda import (
    CudaDequantKernel,
    CudaFp8ScaledMMKernel,
    CudaInt4TinygemmKernel,
    CudaW8A8Int8Kernel,
)
from anyquant.quant.kernels.cuda.base import CudaKernel
from anyquant.quant.kernels.cuda.self_check import self_check
from anyquant.quant.reference import reference_linear
from anyquant.quant.registry import choose_kernel
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import weight_to_device
from anyquant.utils.devices import cuda_properties
from tests.cuda import DEVICE
from tests.helpers.quant_weights import random_weight

CUDA = DEVICE
BUDGET = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
SHAPES = [(1, 896, 896), (7, 4864, 896), (64, 896, 4864), (5, 200, 172)]  # (tokens, out, in)


def _props():  # type: ignore[no-untyped-def]
    return cuda_properties(CUDA)


def _check(cls: type[CudaKernel], spec: QuantSpec, dtype: torch.dtype, budget: float | None = None) -> None:
    if CUDA.type != "cuda":
        pytest.skip("the CUDA ops themselves (their CPU math: tests/kernels/test_cuda_kernels.py)")
    # Skipped only where the table rules the kernel out by capability or dtype; its self-check on
    # this GPU must pass (a failing one would make the table fall back silently in real use).
    reason = precheck(cls, spec, "linear", CUDA, (256, 512), dtype) or cls.rejects_on(
        spec, (256, 512), dtype, _props()
    )
    if reason is not None:
        pytest.skip(f"{cls.name} is not for this GPU / dtype: {reason}")
    assert self_check(cls, spec, dtype, CUDA) is None
    for t, n, k in SHAPES:
        weight = random_weight(spec, n, k, seed=n + k)
        kernel = cls((n, k), dtype)
        kernel.load(weight_to_device(weight, CUDA))
        kernel.to(CUDA)
        x = torch.randn(t, k, generator=torch.Generator().manual_seed(t)).to(dtype)
        bias = torch.randn(n)
        got = kernel(x.to(CUDA), bias.to(CUDA).to(dtype))
        assert got.device.type == DEVICE.type and got.dtype == dtype and got.shape == (t, n)
        want = reference_linear(x, weight, bias.to(dtype), torch.float32)  # CPU, fp32
        err = float((got.cpu().double() - want.double()).norm() / want.double().norm())
        assert err < (budget or BUDGET[dtype]), f"{cls.name} {spec.describe()} {dtype} {(t, n, k)}: {err:.2e}"


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("uint4", "group", group_size=128),
        QuantSpec("uint4", "group", group_size=32, has_zero=True),
        QuantSpec("uint4", "group", group_size=64, act_order=True),
        QuantSpec("uint4", "channel"),
    ],
    ids=lambda s: s.describe().replace(" ", "-"),
)
def test_int4_tinygemm(spec: QuantSpec) -> None:
    # Asymmetric groups carry one more bf16 rounding of (8 - z) * s (int4_tinygemm.py).
    _check(CudaInt4TinygemmKernel, spec, torch.bfloat16, 2e-2 if spec.has_zero else None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True)),
        QuantSpec("int8", "channel", act=ActQuant("int8", False, "tensor", symmetric=False)),
    ],
    ids=["dynamic-token", "static-asym"],
)
def test_w8a8_int8(spec: QuantSpec, dtype: torch.dtype) -> None:
    _check(CudaW8A8Int8Kernel, spec, dtype)


@pytest.mark.parametrize(
    ("spec", "dtype"),
    [
        (QuantSpec("fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True)), torch.bfloat16),
        (QuantSpec("fp8_e4m3", "tensor", act=ActQuant("fp8_e4m3", False, "tensor")), torch.float16),
        (QuantSpec("fp8_e4m3", "tensor", act=ActQuant("fp8_e4m3", True, "tensor")), torch.bfloat16),
    ],
    ids=["rowwise", "static-tensor", "dynamic-tensor"],
)
def test_fp8_scaled_mm(spec: QuantSpec, dtype: torch.dtype) -> None:
    _check(CudaFp8ScaledMMKernel, spec, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("uint4", "group", group_size=128, has_zero=True),
        QuantSpec("uint4", "group", group_size=32, act_order=True),
        QuantSpec("int8", "channel"),
        QuantSpec("uint8", "group", group_size=64, has_zero=True),
        QuantSpec(
            "fp8_e4m3",
            "block",
            block_shape=(128, 128),
            act=ActQuant("fp8_e4m3", True, "group", group_size=128),
        ),
        QuantSpec("fp8_e4m3", "channel"),
    ],
    ids=lambda s: s.describe().replace(" ", "-"),
)
def test_dequant_fallback(spec: QuantSpec, dtype: torch.dtype) -> None:
    _check(CudaDequantKernel, spec, dtype)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the table's choice for a real GPU")
def test_table_choice_matches_this_gpu() -> None:
    props = _props()
    w4 = QuantSpec("uint4", "group", group_size=128)
    chosen = choose_kernel(w4, "linear", CUDA, (896, 896), torch.bfloat16).name
    assert chosen == ("cuda_int4_tinygemm" if props.has_bf16 else "cuda_dequant")
    assert choose_kernel(w4, "linear", CUDA, (896, 896), torch.float16).name == "cuda_dequant"
    fp8 = QuantSpec("fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True))
    chosen = choose_kernel(fp8, "linear", CUDA, (896, 896), torch.bfloat16).name
    assert chosen == ("cuda_fp8_scaled_mm" if props.capability >= (9, 0) else "cuda_dequant")
