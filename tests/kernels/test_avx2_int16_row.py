"""One row of int4 at bf16 compute on AVX2 (csrc/gemv_avx2.h, gemv_one_row_x16): x converted per
span of inputs to 16-bit fixed point (step s = 2^(floor(log2 max|x|) - 14), x16 = round(x / s)) and
integer dot products with the codes. The linear layers' one-row path and the fused MoE's one-token
experts take it; fp32 compute keeps the fp32 kernel.

The kernel's output is, up to fp32 rounding, the float64 product of the weights with the rounded
x: `fixed16` below rounds x as the header comment states, from that definition alone, and each
test checks the kernel against float64 on that x (tight) and on the given x (the stated budget:
bf16 output rounding plus at most s / 2 per input times |w| without its float offsets). Inputs
with very different magnitudes per span (1e-6 .. 1e4, all-zero spans, one huge outlier) and an x
whose two large inputs cancel exactly (so the rounded small ones decide the output) make the
checks able to fail: an 8-bit x, a wrong step, a wrong pair order or a switched-off path (the fp32
kernel, bf16-accurate for x itself) all land far outside them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from anyquant.quant.kernels import cpu_ext
from anyquant.quant.kernels.avx2 import Avx2WeightOnlyKernel
from anyquant.quant.kernels.avx512_moe import FusedExperts
from anyquant.quant.reference import dequantize
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.helpers.errors import rel_err
from tests.helpers.quant_weights import float64_linear, random_weight
from tests.kernels.test_avx512_moe import EXPERTS, HIDDEN, INTER, expert_weight, float64_moe, make_experts

F32, BF16 = torch.float32, torch.bfloat16
CPU = torch.device("cpu")

# The int4 weights one row runs (uint2/3 are packed as int4 nibbles): groups 32 / 64 / 128, sym
# (code shift 8) and asym (zero points), act-order, per channel, GGUF-style float offsets.
SPECS = [
    QuantSpec("uint4", "group", group_size=32),
    QuantSpec("uint4", "group", group_size=64, has_zero=True),
    QuantSpec("uint4", "group", group_size=128),
    QuantSpec("uint4", "group", group_size=128, has_zero=True),
    QuantSpec("uint4", "group", group_size=128, has_zero=True, act_order=True),
    QuantSpec("uint4", "channel", has_zero=True),
    QuantSpec("uint4", "group", group_size=32, has_offset=True),
    QuantSpec("uint3", "group", group_size=64),
    QuantSpec("uint2", "group", group_size=32, has_zero=True),
]
# N not a multiple of 16 (nor 8); K not a multiple of 64 / 128 (short last groups, padding).
SHAPES = [(200, 96), (73, 328), (40, 520), (1000, 2056)]

UNAVAILABLE = Avx2WeightOnlyKernel.cannot_run(SPECS[0], "linear", CPU, (64, 64), BF16)
needs_kernel = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"cpu_avx2 cannot run here: {UNAVAILABLE}")


def flush_span(group: int) -> int:
    """The layout's span (gemv.h): the largest multiple of 8 dividing the group, at most 128."""
    return next(s for s in range(min(group, 128), 7, -8) if group % s == 0 or s == 8)


def fixed16(x: Tensor, span: int) -> tuple[Tensor, Tensor]:
    """x [rows, kp] as the kernel's 16-bit fixed point, in float64 (x16 * s), and each input's
    rounding bound s / 2. Per span: s = 2^(e - 14), 2^e <= max|x| < 2^(e + 1); round half to even."""
    rows, kp = x.shape
    v = x.double().reshape(rows, kp // span, span)
    top = v.abs().amax(-1, keepdim=True)
    _, exponent = torch.frexp(top)  # top = m * 2^exponent, m in [0.5, 1): e = exponent - 1
    s = torch.where(top > 0, torch.pow(2.0, (exponent - 15).double()), torch.zeros_like(top))
    q = torch.where(s > 0, torch.round(v / torch.where(s > 0, s, 1.0)).clamp(-32767, 32767) * s, 0.0)
    return q.reshape(rows, kp), (s / 2).expand_as(v).reshape(rows, kp)


def rounded_x(kernel: Avx2WeightOnlyKernel, x: Tensor) -> tuple[Tensor, Tensor]:
    """x rounded as the kernel rounds it (spans over the packed, act-order-permuted, padded
    columns), back in x's own column order, and each input's bound s / 2."""
    k = x.shape[1]
    perm = kernel.perm if kernel.perm is not None else torch.arange(k)
    xp = torch.nn.functional.pad(x.double()[:, perm], (0, kernel.k_pad - k))
    q, bound = fixed16(xp, flush_span(kernel.group))
    out_q, out_b = torch.empty_like(x, dtype=torch.float64), torch.empty_like(x, dtype=torch.float64)
    out_q[:, perm], out_b[:, perm] = q[:, :k], bound[:, :k]
    return out_q, out_b


def codes_part(w: QuantWeight) -> Tensor:
    """The float64 weight less its GGUF float offsets (code * scale: the offsets are added against
    x's own sums)."""
    dense = dequantize(w, torch.float64)
    if w.offset is None:
        return dense
    group = w.spec.group_size or w.shape[1]
    return dense - w.offset.double().repeat_interleave(group, dim=1)[:, : w.shape[1]]


def odd_magnitudes(k: int, gen: torch.Generator) -> Tensor:
    """One row of bf16 x whose 16-input runs have magnitudes 1e-6 .. 1e4, with an all-zero run
    and one huge outlier."""
    runs = -(-k // 16)
    magnitude = 10.0 ** (torch.rand(runs, generator=gen) * 10 - 6)
    magnitude[runs // 2] = 0.0
    x = torch.randn(k, generator=gen) * magnitude.repeat_interleave(16)[:k]
    x[k // 3] = 3e4
    return x.to(BF16).unsqueeze(0)


def check_against_float64(
    kernel: Avx2WeightOnlyKernel, w: QuantWeight, x: Tensor, b: Tensor | None, where: str
) -> None:
    """Element by element: against float64 on the rounded x (bf16 output rounding and fp32 slack),
    and against float64 on x within the stated budget."""
    y = kernel(x, b).double()
    xq, bound = rounded_x(kernel, x)
    wc = codes_part(w)
    truth = float64_linear(x, w, b)
    truth_q = truth + (xq - x.double()) @ wc.T
    # fp32 sums of the flushes: terms up to 15 * scale * |x| per input
    slack = 2.0**-18 * 16 * float(w.scale.abs().max()) * x.double().abs().sum(1, keepdim=True) + 1e-30
    rounding = 2.0**-8 * truth_q.abs()
    if w.offset is not None:  # the op's bf16 output (codes and bias) and the offsets' part round apart
        offsets = truth - x.double() @ wc.T - (b.double() if b is not None else 0)
        rounding = rounding + 2.0**-8 * ((truth_q - offsets).abs() + offsets.abs())
    assert (y - truth_q).abs().le(rounding + slack).all(), (
        f"{where}: {float(((y - truth_q).abs() - rounding).max()):.3e} over bf16 rounding"
    )
    budget = bound @ wc.abs().T
    assert (y - truth).abs().le(rounding * (1 + 2.0**-7) + budget * 1.01 + slack).all(), where


@needs_kernel
@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.describe)
def test_one_row_matches_float64_on_the_rounded_x(spec: QuantSpec) -> None:
    gen = torch.Generator().manual_seed(3)
    for n, k in SHAPES:
        w = random_weight(spec, n, k, seed=n + k)
        kernel = Avx2WeightOnlyKernel((n, k), BF16)
        kernel.load(w)
        assert kernel.path(1) == "gemv"
        bias = torch.randn(n, generator=gen).to(BF16)
        for i, x in enumerate([torch.randn(1, k, generator=gen).to(BF16), odd_magnitudes(k, gen)]):
            check_against_float64(kernel, w, x, bias if i else None, f"{spec.describe()} {n}x{k} x{i}")


def cancelling_pair(spec: QuantSpec, n: int, k: int, big: float) -> tuple[QuantWeight, Tensor]:
    """A weight whose columns 0 and 1 are equal and an x with +big, -big there: those cancel
    exactly, so the output is the small inputs' part, which the 16-bit x rounds to steps of
    big * 2^-14 (the fp32 kernel keeps them to 2^-24 of the sums)."""
    w = random_weight(spec, n, k, seed=5)
    data = w.data.clone()
    data[:, 1] = data[:, 0]
    w = dataclasses.replace(w, data=data)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(6))
    x[0, 0], x[0, 1] = big, -big
    return w, x.to(BF16)


@needs_kernel
@pytest.mark.parametrize("spec", [SPECS[1], SPECS[2]], ids=QuantSpec.describe)
def test_one_row_takes_the_16_bit_path(spec: QuantSpec) -> None:
    """The pin: with inputs of 1 next to a cancelling pair of 2^11, the 16-bit x rounds the small
    ones to 1/8 steps: the output is that of the rounded x (to bf16), far from x's own, which
    the fp32 kernel (the same op on fp32 x) reproduces."""
    n, k = 200, 328
    w, x = cancelling_pair(spec, n, k, 2.0**11)
    kernel = Avx2WeightOnlyKernel((n, k), BF16)
    kernel.load(w)
    y = kernel(x)
    xq, _ = rounded_x(kernel, x)
    truth, truth_q = float64_linear(x, w), float64_linear(xq, w)
    near, far = rel_err(y, truth_q), rel_err(y, truth)
    assert near <= 4e-3 and far >= 5 * near and rel_err(truth_q, truth) >= 1e-2, (near, far)
    fp32_x = torch.nn.functional.pad(x.float(), (0, kernel.k_pad - k))
    op = cpu_ext.ops().avx2_gemv(
        fp32_x, kernel.packed, kernel.scale, kernel.zz, kernel.lut, None, kernel.fmt, kernel.group, n
    )
    assert rel_err(op, truth) <= 1e-3  # fp32 x keeps the fp32 kernel (x16: ~3e-2 here)


@needs_kernel
def test_two_rows_keep_the_fp32_sums() -> None:
    """Only one row takes the 16-bit x: the same x repeated over 2..8 rows (the few-rows and vector
    kernels on fp32 x) keeps x's own output."""
    n, k = 200, 328
    w, x = cancelling_pair(SPECS[2], n, k, 2.0**11)
    kernel = Avx2WeightOnlyKernel((n, k), BF16)
    kernel.load(w)
    truth = float64_linear(x, w)
    for t in (2, 5, 8):
        assert rel_err(kernel(x.expand(t, k).contiguous())[t - 1], truth[0]) <= 4e-3


def fused_experts(spec: QuantSpec, dead_column: int | None = None) -> tuple[FusedExperts, list[list[Tensor]]]:
    """The fused call over make_experts' weights (test_avx512_moe), and their float64 weights;
    with `dead_column`, gate and up weigh that input by exactly 0 (symmetric codes: code 8)."""
    if dead_column is None:
        experts = make_experts(spec, BF16, kernel_class=Avx2WeightOnlyKernel)
    else:
        assert spec.is_uint and not spec.has_zero and not spec.act_order
        experts = []
        for e in range(EXPERTS):
            row = []
            for i, (n, k) in enumerate(((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))):
                w = expert_weight(spec, n, k, 3 * e + i)
                if i < 2:
                    data = w.data.clone()
                    data[:, dead_column] = 1 << (spec.bits - 1)
                    w = dataclasses.replace(w, data=data)
                kernel = Avx2WeightOnlyKernel((n, k), BF16)
                kernel.load(w)
                row.append((w, kernel))
            experts.append(row)
    fused = FusedExperts([tuple(k for _, k in row) for row in experts])
    assert fused.op_name == "moe_experts_avx2"
    return fused, [[dequantize(w, torch.float64) for w, _ in row] for row in experts]


@needs_kernel
@pytest.mark.parametrize(
    "spec",
    [SPECS[0], SPECS[3], QuantSpec("uint4", "group", group_size=40, has_zero=True, act_order=True), SPECS[6]],
    ids=QuantSpec.describe,
)
def test_fused_moe_one_token_within_budget(spec: QuantSpec) -> None:
    """One token: every expert runs one row (x and the fp32 h as 16-bit fixed point). Its fp32
    output is within ~2^-15 of float64 (h rounded to 2^-15 of each span's largest value:
    measured ~5e-5 relative, the fp32 kernel ~2e-7); an 8-bit x, 256x coarser, would be ~1e-2."""
    gen = torch.Generator().manual_seed(17)
    fused, dense = fused_experts(spec)
    x = torch.randn(1, HIDDEN, generator=gen).to(BF16)
    for _ in range(4):
        ids = torch.randperm(EXPERTS, generator=gen)[:2].unsqueeze(0)
        weights = torch.rand(1, 2, generator=gen)
        err = rel_err(fused(x, weights, ids), float64_moe(x, weights, ids, dense))
        assert err <= 2e-4, f"{spec.describe()}: {err:.2e}"


@needs_kernel
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2]], ids=QuantSpec.describe)
def test_fused_moe_one_token_takes_the_16_bit_path(spec: QuantSpec) -> None:
    """The pin for the fused call: an input of 2^11 that gate and up weigh by 0 rounds the other
    inputs of its span to 1/8 steps, which then decide the output; float64 on that rounded x (and
    h rounded the same way) matches the call, float64 on x itself (the fp32 kernel's) does not."""
    fused, dense = fused_experts(spec, dead_column=5)
    x = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(19))
    x[0, 5] = 2.0**11
    x = x.to(BF16)
    ids, weights = torch.tensor([[2, 7]]), torch.tensor([[0.6, 0.3]])
    y = fused(x, weights, ids)
    truth = float64_moe(x, weights, ids, dense)
    group = spec.group_size or 0
    span = flush_span(group)
    kp13, kp2 = fused.k_pad, -(-INTER // group) * group
    xq, _ = fixed16(torch.nn.functional.pad(x.double(), (0, kp13 - HIDDEN)), span)
    emulated = torch.zeros_like(truth)
    for j in range(2):
        gate, up, down = dense[int(ids[0, j])]
        h = torch.nn.functional.silu(gate @ xq[0, :HIDDEN]) * (up @ xq[0, :HIDDEN])
        hq, _ = fixed16(torch.nn.functional.pad(h.unsqueeze(0), (0, kp2 - INTER)), span)
        emulated[0] += float(weights[0, j]) * (down @ hq[0, :INTER])
    near, far = rel_err(y, emulated), rel_err(y, truth)
    assert far >= 3e-3 and near <= 0.05 * far, (near, far)
