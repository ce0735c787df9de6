"""The AVX2 few-rows kernel (avx2_few_rows_mm, path "fewrows": batched decode of 2.._FEW_ROWS_MAX
rows) against float64, and which rows and formats take it.

It decodes int4 in place (code * 2^e) against x prescaled by 2^-e, so a wrong power of two, a
wrong input order or a lost row group shows as a large error here, and its sums of x (for zero
points and the code offset) must be those of the unscaled x. Budgets as tests/kernels/test_avx2_kernel.py:
bf16 compute 4e-3 relative L2 against float64 and never worse than the reference kernel by more
than 1.5x; fp32 x (the op called directly: fp32 compute takes the tile path) 2e-6.
"""

from __future__ import annotations

import pytest
import torch

from anyquant.quant.kernels import avx2, cpu_ext
from anyquant.quant.kernels.avx2 import Avx2DenseLmHeadKernel, Avx2WeightOnlyKernel
from anyquant.quant.kernels.avx512_moe import FusedExperts
from anyquant.quant.kernels.reference import ReferenceKernel
from anyquant.quant.reference import dequantize
from anyquant.quant.spec import QuantSpec
from tests.helpers.errors import rel_err
from tests.helpers.quant_weights import float64_linear, random_weight
from tests.kernels.test_avx512_moe import EXPERTS, HIDDEN, float64_moe, make_experts

F32, BF16 = torch.float32, torch.bfloat16
CPU = torch.device("cpu")

# Every weight the kernel runs: int4 layouts (uint4 groups 32 / 64 / 128, zero points, act-order,
# per channel, GGUF-style float offsets, uint3, uint2) and 8-bit (int8, uint8 with zero points).
SPECS = [
    QuantSpec("uint4", "group", group_size=32),
    QuantSpec("uint4", "group", group_size=64, has_zero=True),
    QuantSpec("uint4", "group", group_size=128),
    QuantSpec("uint4", "group", group_size=128, has_zero=True, act_order=True),
    QuantSpec("uint4", "channel", has_zero=True),
    QuantSpec("uint4", "group", group_size=32, has_offset=True),
    QuantSpec("uint3", "group", group_size=64),
    QuantSpec("uint2", "group", group_size=32, has_zero=True),
    QuantSpec("int8", "channel"),
    QuantSpec("int8", "group", group_size=128),
    QuantSpec("uint8", "group", group_size=64, has_zero=True),
]
# (N, K): N not a multiple of 16 (nor of 8), K not a multiple of the group (a short last group and
# spans shorter than the group), one K of several 128-input spans.
SHAPES = [(200, 96), (73, 328), (40, 520)]
ROWS = range(2, avx2._FEW_ROWS_MAX + 1)

UNAVAILABLE = Avx2WeightOnlyKernel.cannot_run(SPECS[0], "linear", CPU, (64, 64), BF16)
needs_kernel = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"cpu_avx2 cannot run here: {UNAVAILABLE}")


def _op_args(kernel: Avx2WeightOnlyKernel, x: torch.Tensor) -> tuple[object, ...]:
    return (
        x,
        kernel.packed,
        kernel.scale,
        kernel.zz,
        kernel.lut,
        None,
        kernel.fmt,
        kernel.group,
        kernel.shape[0],
    )


@needs_kernel
@pytest.mark.parametrize("spec", [SPECS[2], SPECS[5], SPECS[8]], ids=QuantSpec.describe)
def test_rows_and_formats_take_the_few_rows_path(spec: QuantSpec) -> None:
    """bf16 compute: one row keeps the vector kernel, 2.._FEW_ROWS_MAX rows the few-rows kernel
    (through its own op), more the rows kernel; fp32 compute keeps the tile path, fp8 the vector."""
    kernel = Avx2WeightOnlyKernel((73, 328), BF16)
    kernel.load(random_weight(spec, 73, 328, seed=1))
    assert [kernel.path(t) for t in (1, 2, 8, avx2._FEW_ROWS_MAX, avx2._FEW_ROWS_MAX + 1)] == [
        "gemv",
        "fewrows",
        "fewrows",
        "fewrows",
        "rows",
    ]
    x = torch.randn(5, 328).to(BF16)
    padded = torch.nn.functional.pad(x, (0, kernel.k_pad - 328))
    direct = cpu_ext.ops().avx2_few_rows_mm(*_op_args(kernel, padded))
    if spec.has_offset:
        assert not torch.equal(kernel(x), direct)  # the offsets are added in Python, on top
    else:
        assert torch.equal(kernel(x), direct)
    fp32 = Avx2WeightOnlyKernel((73, 328), F32)
    fp32.load(random_weight(spec, 73, 328, seed=1))
    assert {fp32.path(t) for t in ROWS} == {"tiled"}
    fp8 = Avx2WeightOnlyKernel((73, 328), BF16)
    fp8.load(random_weight(QuantSpec("fp8_e4m3", "channel"), 73, 328, seed=1))
    assert {fp8.path(t) for t in ROWS} == {"gemv"} | (
        {"rows"} if avx2._GEMV_MAX_ROWS < avx2._FEW_ROWS_MAX else set()
    )


@needs_kernel
@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.describe)
def test_matches_float64_at_every_row_count(spec: QuantSpec) -> None:
    gen = torch.Generator().manual_seed(7)
    for n, k in SHAPES:
        w = random_weight(spec, n, k, seed=n + k)
        bias = torch.randn(n, generator=gen)
        kernel = Avx2WeightOnlyKernel((n, k), BF16)
        kernel.load(w)
        reference = ReferenceKernel((n, k), BF16)
        reference.load(w)
        # GGUF-style offsets are added in Python to the op's bf16 output (any path): that rounding
        # of the codes' part, before the offsets cancel most of it, costs up to ~2x the reference's
        # error (which adds the offsets to each weight), on every path alike
        budget, ratio = (1e-2, 2.0) if spec.has_offset else (4e-3, 1.5)
        for t in ROWS:
            assert kernel.path(t) == "fewrows"
            x = torch.randn(t, k, generator=gen).to(BF16)
            b = bias.to(BF16) if t % 2 else None
            y = kernel(x, b)
            assert y.dtype == BF16 and y.shape == (t, n)
            truth = float64_linear(x, w, b)
            where = f"{spec.describe()} {n}x{k} T={t}"
            err = rel_err(y, truth)
            assert err <= budget, f"{where}: {err:.2e}"
            assert err <= ratio * rel_err(reference(x, b), truth) + 1e-4, f"{where}: {err:.2e}"


@needs_kernel
@pytest.mark.parametrize("spec", [SPECS[1], SPECS[3], SPECS[9], SPECS[10]], ids=QuantSpec.describe)
def test_fp32_x_matches_float64(spec: QuantSpec) -> None:
    """fp32 rows of x (the op called directly; the int4 copy of x is prescaled, not the caller's)."""
    gen = torch.Generator().manual_seed(11)
    n, k = 73, 328
    w = random_weight(spec, n, k, seed=2)
    kernel = Avx2WeightOnlyKernel((n, k), F32)
    kernel.load(w)
    kernel.path = lambda rows: "fewrows"  # type: ignore[method-assign]  # fp32 compute takes the tile path
    for t in (2, 5, 6, 7, 13, avx2._FEW_ROWS_MAX):
        x = torch.randn(t, k, generator=gen)
        before = x.clone()
        y = kernel(x)
        assert torch.equal(x, before)
        err = rel_err(y, float64_linear(x, w))
        assert err <= 2e-6, f"{spec.describe()} T={t}: {err:.2e}"


@needs_kernel
def test_rows_of_very_different_magnitudes() -> None:
    """The prescaled x (down to 2^-24 of x) keeps every bit for rows from 1e-20 to 1e20: each row
    is as accurate, relative to its own size, as a row of ordinary activations."""
    spec = SPECS[1]
    n, k = 40, 520
    w = random_weight(spec, n, k, seed=4)
    kernel = Avx2WeightOnlyKernel((n, k), F32)
    kernel.load(w)
    kernel.path = lambda rows: "fewrows"  # type: ignore[method-assign]
    magnitude = torch.tensor([1e-20, 1e-10, 1.0, 1e10, 1e20, 1.0]).unsqueeze(1)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(5)) * magnitude
    y = kernel(x)
    truth = float64_linear(x, w)
    for row in range(6):
        err = rel_err(y[row], truth[row])
        assert err <= 2e-6, f"row {row} (|x| ~ {magnitude[row].item():.0e}): {err:.2e}"


@needs_kernel
def test_the_op_refuses_other_formats_and_too_many_rows() -> None:
    kernel = Avx2WeightOnlyKernel((73, 328), BF16)
    kernel.load(random_weight(QuantSpec("fp8_e5m2", "channel"), 73, 328, seed=1))
    x = torch.randn(3, kernel.k_pad).to(BF16)
    with pytest.raises(RuntimeError, match="avx2_few_rows_mm runs int4, 8-bit and bf16 words"):
        cpu_ext.ops().avx2_few_rows_mm(*_op_args(kernel, x))
    kernel = Avx2WeightOnlyKernel((73, 328), BF16)
    kernel.load(random_weight(SPECS[0], 73, 328, seed=1))
    x = torch.randn(avx2._FEW_ROWS_MAX + 1, kernel.k_pad).to(BF16)
    with pytest.raises(RuntimeError, match="at most"):
        cpu_ext.ops().avx2_few_rows_mm(*_op_args(kernel, x))


@needs_kernel
def test_lm_head_takes_the_few_rows_path_and_matches_float64() -> None:
    """The bf16 head: the vector kernel below _HEAD_FEW_ROWS_MIN rows, the few-rows kernel from
    there to _FEW_ROWS_MAX, F.linear's own accuracy at every row count (words exact in fp32)."""
    head = Avx2DenseLmHeadKernel((200, 100), BF16)
    assert [head.path(t) for t in range(1, avx2._FEW_ROWS_MAX + 2)] == (
        ["gemv"] * (avx2._HEAD_FEW_ROWS_MIN - 1)
        + ["fewrows"] * (avx2._FEW_ROWS_MAX - avx2._HEAD_FEW_ROWS_MIN + 1)
        + ["rows"]
    )
    gen = torch.Generator().manual_seed(9)
    for n, k in ((200, 100), (73, 328)):
        w = (torch.randn(n, k, generator=gen) * 0.02).to(BF16)
        head = Avx2DenseLmHeadKernel((n, k), BF16)
        head.load(w)
        head.path = lambda rows: "fewrows"  # type: ignore[method-assign]  # every row count
        for t in range(1, avx2._FEW_ROWS_MAX + 1):
            x = torch.randn(t, k, generator=gen).to(BF16)
            b = torch.randn(n, generator=gen).to(BF16) if t % 2 else None
            truth = x.double() @ w.double().T + (b.double() if b is not None else 0)
            err = rel_err(head(x, b), truth)
            assert err <= 1.5 * rel_err(torch.nn.functional.linear(x, w, b), truth) + 1e-4, (n, k, t, err)


@needs_kernel
@pytest.mark.parametrize(
    "spec",
    [QuantSpec("uint4", "group", group_size=40, has_zero=True, act_order=True), SPECS[8], SPECS[10]],
    ids=QuantSpec.describe,
)
def test_fused_moe_with_few_rows_per_expert_matches_float64(spec: QuantSpec) -> None:
    """The fused MoE call runs the few-rows kernel per expert at 2.._FEW_ROWS_MAX rows (int4 on a
    prescaled copy in the thread's scratch): every token routed to one expert gives that expert
    exactly `tokens` rows, a second slot spreads a few over the others."""
    gen = torch.Generator().manual_seed(13)
    experts = make_experts(spec, BF16, kernel_class=Avx2WeightOnlyKernel)
    fused = FusedExperts([tuple(k for _, k in row) for row in experts])
    assert fused.op_name == "moe_experts_avx2"
    dense = [[dequantize(w, torch.float64) for w, _ in row] for row in experts]
    for tokens in (2, 3, 4, 6, 8, 12, avx2._FEW_ROWS_MAX):
        x = torch.randn(tokens, HIDDEN, generator=gen).to(BF16)
        ids = torch.stack(
            [torch.full((tokens,), 3), torch.randint(0, EXPERTS, (tokens,), generator=gen)], dim=1
        )
        ids[:, 1] = torch.where(ids[:, 1] == 3, 4, ids[:, 1])
        weights = torch.rand(tokens, 2, generator=gen)
        err = rel_err(fused(x, weights, ids), float64_moe(x, weights, ids, dense))
        assert err <= 4e-3, f"{spec.describe()} T={tokens}: {err:.2e}"
