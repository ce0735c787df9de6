"""The int4 / int8 vector path of cpu_avx512 (csrc/gemv.h): repacked layouts and offset decoders.

The few-row bf16 path decodes int4 codes c as the bf16 value 128 + c (no table lookup) and removes
136 * scale * sum(x) per span of at most 128 inputs; 8-bit codes as two such nibbles (u + 2176,
2304 removed). Its fp32 sums carry larger terms than the exact decoders' (c - 8, u - 128), so the
budget here is stricter than the bf16 output's: the kernel's error
against float64 must stay within 0.1 % of the error that rounding the float64 result to bf16 alone
makes (what a perfect fp32 sum would give; measured: equal to 4 digits), for random activations and
for activations with a large common mean (the offsets' sums add up, the case the flush every 128
inputs bounds), at 1 and 2 threads.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from anyquant.quant.kernels.avx512 import Avx512WeightOnlyKernel
from anyquant.quant.reference import dequantize
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.helpers.errors import rel_err
from tests.helpers.quant_weights import avx512_gemm_folds, random_weight

BF16, F32 = torch.bfloat16, torch.float32
CPU = torch.device("cpu")
TOKENS = (1, 2, 3, 4, 7, 16, 64, 300)  # > 4 rows: the exact decoder of the prompt path
SPECS = [
    QuantSpec("uint4", "group", group_size=32),
    QuantSpec("uint4", "group", group_size=64, has_zero=True),
    QuantSpec("uint4", "group", group_size=128),
    QuantSpec("uint4", "group", group_size=128, has_zero=True),
    QuantSpec("uint4", "channel", has_zero=True),  # one group over all of K: flushed per span
    QuantSpec("uint3", "group", group_size=64),
    QuantSpec("int8", "channel"),
    QuantSpec("int8", "group", group_size=128),
    QuantSpec("uint8", "group", group_size=64, has_zero=True),
]
# (N, K): N not a multiple of 16; K not a multiple of the group; K = 1000 per channel is a group
# of 1000 (spans of 40); 4864 per channel (spans of 128).
SHAPES = [(40, 328), (130, 1000), (24, 4864)]

UNAVAILABLE = Avx512WeightOnlyKernel.cannot_run(SPECS[0], "linear", CPU, (64, 64), BF16)
needs_kernel = pytest.mark.skipif(
    UNAVAILABLE is not None, reason=f"cpu_avx512 cannot run here: {UNAVAILABLE}"
)


def activations(kind: str, t: int, k: int, gen: torch.Generator) -> Tensor:
    x = torch.randn(t, k, generator=gen)
    if kind == "common mean":  # every input of a row ~8: the offsets' sums add up
        x = 8.0 + 0.1 * x
    return x.to(BF16)


@needs_kernel
@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.describe)
def test_bf16_vector_path_is_as_good_as_rounding_float64(spec: QuantSpec, threads: int) -> None:
    gen = torch.Generator().manual_seed(11)
    for n, k in SHAPES:
        w = random_weight(spec, n, k, seed=n * k)
        kernel = Avx512WeightOnlyKernel((n, k), BF16)
        kernel.load(w)
        dense = dequantize(w, torch.float64)
        dense_bf16 = dequantize(w, BF16).double()  # the folded GEMM's weights (many rows, small groups)
        for kind in ("random", "common mean"):
            for t in TOKENS:
                x = activations(kind, t, k, gen)
                truth = x.double() @ (dense_bf16 if avx512_gemm_folds(spec, t) else dense).T
                y = kernel(x)
                assert y.dtype == BF16 and y.shape == (t, n)
                floor = rel_err(truth.to(BF16), truth)  # rounding the exact result to bf16
                err = rel_err(y, truth)
                where = f"{spec.describe()} {n}x{k} T={t} {kind} x, {threads} threads"
                assert err <= 1.001 * floor + 1e-7, f"{where}: {err:.3e} against bf16 rounding {floor:.3e}"


@needs_kernel
@pytest.mark.parametrize("spec", [SPECS[4], SPECS[6]], ids=QuantSpec.describe)
def test_fp32_keeps_fp32_accuracy_with_a_common_mean(spec: QuantSpec, threads: int) -> None:
    """fp32 compute keeps the exact decoders: the offsets' large sums would cost fp32 accuracy."""
    gen = torch.Generator().manual_seed(12)
    w = random_weight(spec, 40, 4864, seed=3)
    kernel = Avx512WeightOnlyKernel((40, 4864), F32)
    kernel.load(w)
    for t in (1, 2, 3):
        x = 3.0 + 0.1 * torch.randn(t, 4864, generator=gen)
        truth = x.double() @ dequantize(w, torch.float64).T
        assert rel_err(kernel(x), truth) <= 2e-6


def test_int4_layout_is_the_documented_one() -> None:
    """gemv.h's int4 layout, which the repack writes and the decoders read: per block of 16 rows
    and 8 inputs, 64 bytes = 32 little-endian words; word 2i+t holds in nibble j the code of
    (row i, input k + 2j + t)."""
    n, k = 32, 24
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    spec = QuantSpec("uint4", "group", group_size=8)
    w = QuantWeight(spec, (n, k), codes, torch.ones(n, k // 8)).validate("layout")
    kernel = Avx512WeightOnlyKernel((n, k), BF16)
    if UNAVAILABLE is not None:
        pytest.skip(f"cpu_avx512 cannot run here: {UNAVAILABLE}")
    kernel.load(w)
    packed = kernel.packed.reshape(n // 16, k // 8, 64)
    for b in range(n // 16):
        for c in range(k // 8):
            words = packed[b, c].view(torch.int16).int() & 0xFFFF
            for i in range(16):
                for t in range(2):
                    for j in range(4):
                        got = (int(words[2 * i + t]) >> (4 * j)) & 0xF
                        assert got == int(codes[16 * b + i, 8 * c + 2 * j + t]), (b, c, i, t, j)


def test_int8_layout_is_the_documented_one() -> None:
    """gemv.h's 8-bit layout for int8 / uint8: per block of 16 rows and 4 inputs, 64 bytes = 32
    words; byte h of word 2i+t holds u(row i, input k + 2h + t), u = code + 128 (int8) or code."""
    if UNAVAILABLE is not None:
        pytest.skip(f"cpu_avx512 cannot run here: {UNAVAILABLE}")
    n, k = 32, 16
    gen = torch.Generator().manual_seed(0)
    for name in ("int8", "uint8"):
        codes = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
        data = codes.view(torch.int8) if name == "int8" else codes
        w = QuantWeight(QuantSpec(name, "channel"), (n, k), data, torch.ones(n)).validate("layout")
        kernel = Avx512WeightOnlyKernel((n, k), BF16)
        kernel.load(w)
        u = codes ^ 0x80 if name == "int8" else codes
        packed = kernel.packed.reshape(n // 16, k // 4, 64)
        for b in range(n // 16):
            for c in range(k // 4):
                for i in range(16):
                    for t in range(2):
                        for h in range(2):
                            got = int(packed[b, c, 2 * (2 * i + t) + h])
                            assert got == int(u[16 * b + i, 4 * c + 2 * h + t]), (name, b, c, i, t, h)
