"""The register-blocked GEMM of cpu_avx512 (csrc/gemm_tile.h), the bf16 path for more than 4 rows.

Its edges against a float64 dequantize + matmul of the same weight: panels of 64 outputs cut short
(N not a multiple of 64 or of 16), K-blocks and segments cut by K (K not a multiple of the group,
per-channel segments up to 512 inputs), row tiles of 6 cut short and row chunks of 256 crossed,
the first / last groups of a row, bias, zero points, the LM head's dense bf16 words read in place.
Numerics: exact weight values times bf16 x summed in fp32 and rounded once to bf16, so the budget is
the vector path's: within 0.1 % of the error that rounding the float64 result to bf16 makes. Groups
of at most 64 over at least 64 rows fold the scales into the decoded panel (gemm_tile.h,
gemm_folds): the weights are then the reference kernel's, bf16((v - zz) * scale), and the budget
is the same rounding around the float64 product of those bf16 weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from anyquant.quant.kernels import cpu_ext
from anyquant.quant.kernels.avx512 import Avx512DenseLmHeadKernel, Avx512WeightOnlyKernel
from anyquant.quant.reference import dequantize
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.helpers.errors import rel_err
from tests.helpers.quant_weights import avx512_gemm_folds, random_weight

BF16, F32 = torch.bfloat16, torch.float32
CPU = torch.device("cpu")
SPECS = [
    QuantSpec("uint4", "group", group_size=128),
    QuantSpec("uint4", "group", group_size=32, has_zero=True),  # four segments per K-block
    QuantSpec("uint4", "channel", has_zero=True),  # long segments, zero points per segment sum
    QuantSpec("int8", "channel"),
    QuantSpec("uint8", "group", group_size=64, has_zero=True),
    QuantSpec("fp8_e4m3", "channel"),
    QuantSpec("fp8_e4m3", "block", block_shape=(128, 128)),
]
# (N, K): 72 = one full panel + a panel of one block cut to 8 outputs; 200 = 3 panels + 2 blocks of
# 16 and 8; 16 / 40 one / three blocks. K = 328 is 2 groups of 128 + a 72-input group; per
# channel, segments of 512 inputs with a shorter last one: 1000 = 512 + 488, 1040 = 2 * 512 + 16,
# 536 = 512 + 24.
SHAPES = [(72, 328), (200, 1000), (16, 1040), (40, 536)]
# 5: one tile of 5; 6 / 7 / 11: full tiles and tails; 300: crosses the 256-row chunk.
TOKENS = (5, 6, 7, 11, 300)

UNAVAILABLE = Avx512WeightOnlyKernel.cannot_run(SPECS[0], "linear", CPU, (64, 64), BF16)
needs_kernel = pytest.mark.skipif(
    UNAVAILABLE is not None, reason=f"cpu_avx512 cannot run here: {UNAVAILABLE}"
)


def assert_as_good_as_rounding(y: Tensor, truth: Tensor, where: str) -> None:
    assert y.dtype == BF16 and y.shape == truth.shape, where
    floor = rel_err(truth.to(BF16), truth)
    err = rel_err(y, truth)
    assert err <= 1.001 * floor + 1e-7, f"{where}: {err:.3e} against bf16 rounding {floor:.3e}"


@needs_kernel
@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.describe)
def test_gemm_edges_match_float64(spec: QuantSpec, threads: int) -> None:
    gen = torch.Generator().manual_seed(21)
    for n, k in SHAPES:
        w = random_weight(spec, n, k, seed=n + k)
        kernel = Avx512WeightOnlyKernel((n, k), BF16)
        kernel.load(w)
        dense = dequantize(w, torch.float64)
        dense_bf16 = dequantize(w, BF16).double()  # what the reference kernel multiplies
        for t in TOKENS:
            assert kernel.path(t) == "gemm"
            x = (torch.randn(t, k, generator=gen) + (3.0 if t % 2 else 0.0)).to(BF16)  # odd t: a common mean
            bias = torch.randn(n, generator=gen).to(BF16) if t != 6 else None
            weights = dense_bf16 if avx512_gemm_folds(spec, t) else dense
            truth = x.double() @ weights.T + (bias.double() if bias is not None else 0.0)
            where = f"{spec.describe()} {n}x{k} T={t} bias={bias is not None}, {threads} threads"
            assert_as_good_as_rounding(kernel(x, bias), truth, where)


@needs_kernel
def test_gemm_sees_every_output_and_input(threads: int) -> None:
    """One-hot weights: output j of row r is exactly x[r, k_j] * scale_j, so a lost or shifted
    column, input, segment or row shows as a wrong value rather than as a small error."""
    n, k, t = 200, 1000, 13
    spec = QuantSpec("int8", "channel")
    cols = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(5))
    codes = torch.zeros(n, k, dtype=torch.int8)
    codes[torch.arange(n), cols] = 1
    scale = torch.arange(1, n + 1, dtype=F32) / 64
    w = QuantWeight(spec, (n, k), codes, scale).validate("one-hot")
    kernel = Avx512WeightOnlyKernel((n, k), BF16)
    kernel.load(w)
    x = torch.randint(-100, 100, (t, k), generator=torch.Generator().manual_seed(6)).to(BF16)
    expected = (x.float()[:, cols] * scale).to(BF16)
    assert torch.equal(kernel(x), expected)


@needs_kernel
def test_dense_lm_head_many_rows_reads_words_in_place(threads: int) -> None:
    gen = torch.Generator().manual_seed(22)
    for n, k in ((200, 1000), (72, 328)):
        w = (torch.randn(n, k, generator=gen) * 0.02).to(BF16)
        kernel = Avx512DenseLmHeadKernel((n, k), BF16)
        kernel.load(w)
        for t in (5, 11, 300):
            x = torch.randn(t, k, generator=gen).to(BF16)
            truth = x.double() @ w.double().T
            assert_as_good_as_rounding(kernel(x), truth, f"lm_head {n}x{k} T={t}")


@needs_kernel
def test_gemm_refuses_fp32_x() -> None:
    kernel = Avx512WeightOnlyKernel((32, 64), BF16)
    kernel.load(random_weight(SPECS[0], 32, 64))
    args = (kernel.packed, kernel.scale, kernel.zz, kernel.lut, None, kernel.fmt, kernel.group, 32)
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu_ext.ops().gemm(torch.zeros(8, 128), *args)
