"""The CUDA kernels without a GPU: the capability table's choices and reasons for simulated devices
(a T4, an A100, an L4, an H100), and the math of every part that has a CPU implementation, held to
the reference (`torch._int_mm` and `torch._scaled_mm` run on CPU too; cuda_dequant is plain torch;
tinygemm's operands are decoded here by the op's documented formula). The ops themselves on a GPU:
tests/cuda/."""

from __future__ import annotations

import pytest
import torch

from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.kernels.cuda import (
    CudaDequantKernel,
    CudaFp8ScaledMMKernel,
    CudaInt4TinygemmKernel,
    CudaW8A8Int8Kernel,
)
from anyquant.quant.kernels.cuda.int4_tinygemm import tinygemm_operands
from anyquant.quant.kernels.cuda.self_check import self_check
from anyquant.quant.reference import dequantize, expand_to_columns, reference_linear
from anyquant.quant.registry import choose_kernel
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.utils.devices import simulated_cuda
from tests.helpers.quant_weights import random_weight

CUDA = torch.device("cuda")
T4, A100, L4, H100 = (7, 5), (8, 0), (8, 9), (9, 0)
W4 = QuantSpec("uint4", "group", group_size=128, has_zero=True)
W4_SYM_ACTORDER = QuantSpec("uint4", "group", group_size=32, act_order=True)
W8A8 = QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True))
W8A16 = QuantSpec("int8", "channel")
FP8_DYN = QuantSpec("fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True))
FP8_TENSOR = QuantSpec("fp8_e4m3", "tensor", act=ActQuant("fp8_e4m3", dynamic=False, granularity="tensor"))
FP8_BLOCK = QuantSpec(
    "fp8_e4m3", "block", block_shape=(32, 32), act=ActQuant("fp8_e4m3", True, "group", group_size=32)
)
GGUF_Q4_1 = QuantSpec("uint4", "group", group_size=32, has_offset=True)


def _choose(spec: QuantSpec | None, capability: tuple[int, int], dtype: torch.dtype, shape=(256, 512)):  # type: ignore[no-untyped-def]
    with simulated_cuda(capability, "GPU"):
        return choose_kernel(spec, "linear", CUDA, shape, dtype)


@pytest.mark.parametrize(
    ("spec", "capability", "dtype", "kernel"),
    [
        (W4, H100, torch.bfloat16, "cuda_int4_tinygemm"),
        (W4, A100, torch.bfloat16, "cuda_int4_tinygemm"),
        (W4_SYM_ACTORDER, A100, torch.bfloat16, "cuda_int4_tinygemm"),
        (W4, T4, torch.float16, "cuda_dequant"),  # the T4 case: fp16, no tinygemm
        (W4, H100, torch.float16, "cuda_dequant"),
        (W8A8, T4, torch.float16, "cuda_w8a8_int8"),
        (W8A8, (7, 0), torch.float16, "cuda_dequant"),
        (W8A16, H100, torch.bfloat16, "cuda_dequant"),
        (FP8_DYN, H100, torch.bfloat16, "cuda_fp8_scaled_mm"),
        (FP8_DYN, L4, torch.bfloat16, "cuda_dequant"),  # row-wise scales need sm90
        (FP8_DYN, H100, torch.float16, "cuda_dequant"),  # row-wise output is bf16 only
        (FP8_TENSOR, L4, torch.float16, "cuda_fp8_scaled_mm"),
        (FP8_TENSOR, A100, torch.bfloat16, "cuda_dequant"),
        (FP8_BLOCK, H100, torch.bfloat16, "cuda_dequant"),
        (GGUF_Q4_1, H100, torch.bfloat16, "reference"),
        (None, T4, torch.float16, "dense"),
    ],
)
def test_capability_table_picks(spec: QuantSpec | None, capability, dtype, kernel) -> None:  # type: ignore[no-untyped-def]
    assert _choose(spec, capability, dtype).name == kernel


def test_rejections_are_sentences_with_the_numbers() -> None:
    reasons = dict(_choose(W4, T4, torch.float16).rejected)
    assert reasons["cuda_int4_tinygemm"] == "compute dtype torch.float16 is not bfloat16"
    reasons = dict(_choose(W4, (7, 5), torch.bfloat16).rejected)
    assert reasons["cuda_int4_tinygemm"] == (
        "needs compute capability 8.0 or newer (tinygemm runs on bf16 tensor cores); "
        "GPU (compute capability 7.5, simulated)"
    )
    reasons = dict(_choose(FP8_DYN, L4, torch.bfloat16).rejected)
    assert (
        "row-wise fp8 scales (per-token or per-channel) need compute capability 9.0"
        in reasons["cuda_fp8_scaled_mm"]
    )
    reasons = dict(_choose(FP8_BLOCK, H100, torch.bfloat16).rejected)
    assert reasons["cuda_fp8_scaled_mm"].startswith("block weight scales")
    reasons = dict(_choose(QuantSpec("uint4", "group", group_size=48), H100, torch.bfloat16).rejected)
    assert reasons["cuda_int4_tinygemm"].startswith("group size 48 is not a multiple of 32")
    reasons = dict(_choose(GGUF_Q4_1, H100, torch.bfloat16).rejected)
    assert (
        reasons["cuda_dequant"] == "float offsets per group (GGUF minimums) are not applied by cuda_dequant"
    )


def test_cuda_kernels_never_serve_cpu_layers() -> None:
    choice = choose_kernel(W4, "linear", torch.device("cpu"), (256, 512), torch.bfloat16)
    reasons = dict(choice.rejected)
    assert not choice.name.startswith("cuda_")
    assert reasons.get("cuda_int4_tinygemm", "runs on cuda only").startswith("runs on cuda only")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given without a GPU")
def test_without_a_gpu_cuda_kernels_say_why() -> None:
    reason = CudaInt4TinygemmKernel.cannot_run(W4, "linear", CUDA, (256, 512), torch.bfloat16)
    assert reason is not None and ("CPU-only build" in reason or "sees no GPU" in reason)


def _on_cpu(cls: type[LinearKernel], spec: QuantSpec, n: int, k: int, dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    """A CUDA kernel loaded on CPU tensors (its capability check bypassed): its math, not its op."""
    weight = random_weight(spec, n, k, seed)
    kernel = cls((n, k), dtype)
    kernel.load(weight)
    return kernel, weight


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    "spec",
    [
        W8A8,
        QuantSpec("int8", "tensor", act=ActQuant("int8", dynamic=True, granularity="tensor")),
        QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=False, granularity="tensor")),
        QuantSpec("int8", "channel", act=ActQuant("int8", False, "tensor", symmetric=False)),
    ],
    ids=["token", "tensor", "static", "static-asym"],
)
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_w8a8_int8_matches_reference(spec: QuantSpec, tokens: int) -> None:
    # Awkward sizes: K and N padded to multiples of 8, rows to more than 16.
    kernel, weight = _on_cpu(CudaW8A8Int8Kernel, spec, 50, 90, torch.float32)
    x = torch.randn(tokens, 90, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(50)
    got = kernel(x, bias)
    assert got.shape == (tokens, 50) and got.dtype == torch.float32
    # int32 accumulation is exact; only the fp32 application of the scales differs.
    assert _rel(got, reference_linear(x, weight, bias)) < 1e-5


@pytest.mark.parametrize(
    ("spec", "dtype", "budget"),
    [
        (FP8_TENSOR, torch.float32, 1e-5),
        (QuantSpec("fp8_e4m3", "tensor", act=ActQuant("fp8_e4m3", True, "tensor")), torch.float32, 1e-5),
        # Row-wise: bf16 output (2^-9 relative per value).
        (FP8_DYN, torch.bfloat16, 8e-3),
    ],
    ids=["static-tensor", "dynamic-tensor", "rowwise"],
)
def test_fp8_scaled_mm_matches_reference(spec: QuantSpec, dtype: torch.dtype, budget: float) -> None:
    kernel, weight = _on_cpu(CudaFp8ScaledMMKernel, spec, 40, 72, dtype)
    x = torch.randn(7, 72, generator=torch.Generator().manual_seed(2)) * 2
    got = kernel(x.to(dtype))
    assert got.shape == (7, 40) and got.dtype == dtype
    assert _rel(got, reference_linear(x.to(dtype), weight, None, torch.float32)) < budget


@pytest.mark.parametrize(
    "spec",
    [
        W4,
        W4_SYM_ACTORDER,
        QuantSpec("uint3", "channel"),
        QuantSpec("uint4", "channel", has_zero=True),
        QuantSpec("uint8", "group", group_size=32, has_zero=True),
        W8A16,
        QuantSpec("int8", "tensor"),
        W8A8,
        QuantSpec("fp8_e4m3", "channel"),
        FP8_BLOCK,
        QuantSpec("fp8_e5m2", "tensor", act=ActQuant("fp8_e4m3", False, "tensor")),
    ],
    ids=lambda s: s.describe().replace(" ", "-"),
)
def test_dequant_fallback_matches_reference(spec: QuantSpec) -> None:
    # 70 x 171: odd K (two codes per byte need padding), partial groups and blocks.
    kernel, weight = _on_cpu(CudaDequantKernel, spec, 70, 171, torch.float32)
    x = torch.randn(9, 171, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(70)
    assert isinstance(kernel, CudaDequantKernel)
    assert torch.equal(
        kernel.dense()[:, torch.argsort(kernel.perm)] if kernel.perm is not None else kernel.dense(),
        dequantize(weight),
    )
    assert _rel(kernel(x, bias), reference_linear(x, weight, bias)) < 1e-5


def _tinygemm_dequant(codes_u8: torch.Tensor, sz: torch.Tensor, op_group: int) -> torch.Tensor:
    """tinygemm's documented weight formula, written here: (q - 8) * scale + zero, with q from
    [N, K/2] bytes holding column 2j in the high nibble and 2j + 1 in the low one."""
    high, low = (codes_u8 >> 4).int(), (codes_u8 & 15).int()
    q = torch.stack((high, low), dim=-1).reshape(codes_u8.shape[0], -1)  # [N, K]
    scale = sz[..., 0].float().t().repeat_interleave(op_group, dim=1)  # [N, K]
    zero = sz[..., 1].float().t().repeat_interleave(op_group, dim=1)
    return (q - 8).float() * scale + zero


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("uint4", "group", group_size=32),
        QuantSpec("uint4", "group", group_size=128, has_zero=True),
        W4_SYM_ACTORDER,
        QuantSpec("uint4", "channel"),
        QuantSpec("uint2", "group", group_size=64, has_zero=True),
        QuantSpec("uint4", "group", group_size=96),
    ],
    ids=lambda s: s.describe().replace(" ", "-"),
)
def test_tinygemm_operands_decode_to_the_reference(spec: QuantSpec) -> None:
    n, k = 40, 172  # K not a multiple of any group or tile: padded
    weight = random_weight(spec, n, k, seed=4)
    ops = tinygemm_operands(weight)
    assert ops.k_pad % 128 == 0 and ops.n_pad % 8 == 0 and ops.codes_u8.dtype == torch.uint8
    assert ops.scales_and_zeros.shape == (ops.k_pad // ops.op_group, ops.n_pad, 2)
    got = _tinygemm_dequant(ops.codes_u8, ops.scales_and_zeros, ops.op_group)[:n, :k]
    if ops.perm is not None:
        got = got[:, torch.argsort(ops.perm)]
    want = dequantize(weight)
    ng = weight.scale.reshape(n, -1).shape[1]
    scale = weight.scale.reshape(n, ng)
    if spec.granularity == "group":
        scale = expand_to_columns(scale, spec, k, weight.group_index)
    # Scales are rounded to bf16 (unit roundoff 2^-8) and the zero term (8 - z) * s once more: at
    # most 2^-8 * (|q - 8| + |8 - z|) <= 2^-8 * 16 scales per weight.
    assert bool(((got - want).abs() <= 2**-8 * 16 * scale.abs() + 1e-12).all())
    if spec.has_zero:  # the bf16 rounding is really there (so the bound above is not vacuous)
        assert not torch.equal(got, want)
    else:  # symmetric: zero points sit at 8, so only the scale's rounding is left
        assert bool(((got - want).abs() <= 2**-8 * 8 * scale.abs() + 1e-12).all())
    # Padded rows decode to exact zeros (scale 0); padded columns meet zero inputs.
    assert bool((_tinygemm_dequant(ops.codes_u8, ops.scales_and_zeros, ops.op_group)[n:] == 0).all())


@pytest.mark.parametrize(
    ("kernel", "spec", "dtype"),
    [
        (CudaDequantKernel, W4_SYM_ACTORDER, torch.float32),
        (CudaDequantKernel, FP8_BLOCK, torch.bfloat16),
        (
            CudaW8A8Int8Kernel,
            QuantSpec("int8", "channel", act=ActQuant("int8", False, "tensor", symmetric=False)),
            torch.float16,
        ),
        (CudaFp8ScaledMMKernel, FP8_TENSOR, torch.float32),
        (CudaFp8ScaledMMKernel, FP8_DYN, torch.bfloat16),
    ],
)
def test_self_check_passes_correct_kernels(
    kernel: type[LinearKernel], spec: QuantSpec, dtype: torch.dtype
) -> None:
    # On CPU tensors (the ops' CPU implementations): the check's own plumbing, for every spec form.
    assert self_check(kernel, spec, dtype, torch.device("cpu")) is None


class _WrongLayout(CudaDequantKernel):
    """A kernel whose packing went wrong (as a changed torch op layout would): columns swapped."""

    name = "test_wrong_layout"

    def dense(self) -> torch.Tensor:
        return super().dense().flip(1)


class _Crashing(CudaDequantKernel):
    name = "test_crashing"

    def load(self, weight):  # type: ignore[no-untyped-def]
        raise RuntimeError("expected mat2 to be column-major\nmore lines")


def test_self_check_refuses_wrong_or_failing_kernels() -> None:
    cpu = torch.device("cpu")
    reason = self_check(_WrongLayout, W4, torch.float32, cpu)
    assert (
        reason is not None
        and reason.startswith("failed its self-check on this device")
        and "relative error" in reason
    )
    reason = self_check(_Crashing, W4, torch.float32, cpu)
    assert reason is not None and reason.endswith("RuntimeError: expected mat2 to be column-major")
