"""The reference kernel against an independent float64 dequantize-then-matmul and formats.md §12.

The oracle below is written again from the formulas of formats.md (§0.3, §4.5, §8) and never
calls anyquant's dequantizer; the §12 vectors build QuantWeights by hand from the spec's
generator and compare against the literal values printed in the spec.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from anyquant.quant.kernels.reference import ReferenceKernel
from anyquant.quant.spec import FP8_MAX, ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.helpers.quant_weights import random_weight
from tests.helpers.spec_vectors import checksums, hcode
from tests.helpers.spec_vectors import scale as spec_scale

# Max relative L2 error of the reference kernel vs the float64 oracle, per compute dtype.
REFERENCE_BUDGET = {
    # fp32: one rounding of each weight to fp32 and an fp32 matmul (error ~ sqrt(K) ulps).
    torch.float32: 5e-6,
    # bf16 / fp16: weights, activations and the output are each rounded once to 8 / 11 bits.
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}

_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


# --- formats.md §12.0 vectors (the generator: tests/helpers/spec_vectors.py) ------------------------


GPTQ_DESCACT_GIDX = [3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 1, 2, 2, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # fmt: skip


def vector_weight(
    n: int, k: int, g: int, zero_fn: object | None, gidx: list[int] | None = None
) -> QuantWeight:
    """A uint4 QuantWeight with code(n,k) = hcode(n,k,15), scale(n,g) and zero_fn(n,g) of §12.0."""
    ng = -(-k // g)
    codes = torch.tensor([[hcode(i, j, 15) for j in range(k)] for i in range(n)], dtype=torch.uint8)
    scales = torch.tensor([[spec_scale(i, j) for j in range(ng)] for i in range(n)], dtype=torch.float32)
    zero = None
    if callable(zero_fn):
        zero = torch.tensor([[zero_fn(i, j) for j in range(ng)] for i in range(n)], dtype=torch.int32)
    spec = QuantSpec("uint4", "group", group_size=g, has_zero=zero is not None, act_order=gidx is not None)
    group_index = torch.tensor(gidx, dtype=torch.int32) if gidx is not None else None
    return QuantWeight(spec, (n, k), codes, scales, zero, group_index).validate("vector")


def gptq_descact_weight(asym: bool) -> QuantWeight:
    """formats.md §12.3 GPTQ-{sym,asym}-descact: K = 32, N = 8, G = 8, the real GPTQ g_idx."""
    zero_fn = (lambda n, g: 1 + (5 * n + 7 * g) % 15) if asym else None
    return vector_weight(8, 32, 8, zero_fn, GPTQ_DESCACT_GIDX)


# Literal values of formats.md §12.3 (desc_act variants): W[0,:], W[:,0], (S1, S2).
_SYM_ROW0 = [-0.28125, -0.65625, 0.46875, -0.65625, -0.75, 0.0, -0.1875, -0.46875, -0.21875, -0.21875, -1.3125, -1.3125, 0.0, 0.0, 0.5, -1.3125, 0.21875, 0.0, 0.125, -0.625, 0.5, -0.875, 0.5, -0.09375, -0.625, 0.1875, -0.03125, -0.1875, -0.15625, -0.09375, 0.15625, -0.125]  # fmt: skip
_ASYM_ROW0 = [-0.1875, -0.5625, 0.5625, -0.5625, -0.65625, 0.09375, -0.09375, -0.375, -1.75, -1.75, -2.84375, -2.84375, -1.53125, -1.53125, 0.5, -2.84375, -1.3125, 0.0, 0.125, -0.625, 0.5, -0.875, 0.5, 0.125, -0.625, 0.40625, 0.1875, 0.03125, 0.0625, 0.125, 0.375, 0.09375]  # fmt: skip
GPTQ_DESCACT_EXPECTED = {
    False: (
        _SYM_ROW0,
        [-0.28125, -0.1875, -1.3125, -0.25, -0.0625, 1.09375, 0.0, -0.46875],
        (-21.28125, -467.78125),
    ),
    True: (
        _ASYM_ROW0,
        [-0.1875, -0.3125, -0.1875, -0.125, -0.3125, 2.40625, 0.15625, -0.84375],
        (-2.78125, 109.34375),
    ),
}


def dense_through(kernel_cls: type, w: QuantWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense weight a kernel applies, recovered by multiplying the identity: y = I @ W.T."""
    kernel = kernel_cls(w.shape, dtype)
    kernel.load(w)
    return kernel(torch.eye(w.shape[1], dtype=dtype)).T.double()


# --- the float64 oracle ---------------------------------------------------------------------------


def oracle_dequantize(w: QuantWeight) -> Tensor:
    """W[n, k] = (code - zero) * scale in float64 (formats.md §0.3), per granularity."""
    spec, (n, k) = w.spec, w.shape
    rows, cols = torch.arange(n)[:, None], torch.arange(k)[None, :]
    if spec.is_float:
        values = w.data.double()
    else:
        values = w.data.to(torch.int64).double()
    if spec.granularity == "tensor":
        scale = w.scale.double().reshape(()).expand(n, k)
        zero = w.zero.double().reshape(()).expand(n, k) if w.zero is not None else None
    elif spec.granularity == "channel":
        scale = w.scale.double()[:, None].expand(n, k)
        zero = w.zero.double()[:, None].expand(n, k) if w.zero is not None else None
    elif spec.granularity == "group":
        group = w.group_index.long()[None, :] if w.group_index is not None else cols // spec.group_size
        scale = w.scale.double()[rows, group]
        zero = w.zero.double()[rows, group] if w.zero is not None else None
    else:
        bn, bk = spec.block_shape
        scale = w.scale.double()[rows // bn, cols // bk]
        zero = None
    if zero is None:
        zero = torch.full((n, k), float(spec.implicit_zero), dtype=torch.float64)
    return (values - zero) * scale


def oracle_activations(
    x: Tensor, act: ActQuant, input_scale: Tensor | None, input_zero: Tensor | None
) -> Tensor:
    """formats.md §4.5: quantize-dequantize x [T, K] in float64 (scales from amax / divisor).

    The divisor is qmax (127, 448) unless the spec names another (compressed-tensors: 127.5)."""
    x = x.double()
    qmax = 127.0 if act.type == "int8" else FP8_MAX[act.type]
    divisor = act.scale_divisor or qmax
    zero = 0.0
    if not act.dynamic:
        scale = input_scale.double().reshape(1, 1)
        if input_zero is not None:
            zero = float(input_zero.reshape(()))
    elif act.granularity == "tensor":
        scale = x.abs().max().clamp(min=1e-10).reshape(1, 1) / divisor
    elif act.granularity == "token":
        scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-10) / divisor
    else:
        t, k = x.shape
        g = act.group_size
        padded = torch.zeros(t, -(-k // g) * g, dtype=x.dtype)
        padded[:, :k] = x.abs()
        amax = padded.reshape(t, -1, g).amax(dim=2)  # [T, groups]; zero padding never wins
        scale = amax.clamp(min=1e-10)[:, torch.arange(k) // g] / divisor
    # W8A8 kernels divide in fp32 (formats.md §8); doing the same here keeps values that sit
    # within an fp32 ulp of a rounding boundary on the same code as every fp32 implementation.
    ratio = (x.float() / scale.float()).double()
    if act.type == "int8":
        q = (torch.round(ratio) + zero).clamp(-128, 127) - zero
    else:
        q = ratio.clamp(-qmax, qmax).to(_FP8[act.type]).double()
    return q * scale.float().double()


def oracle_linear(x: Tensor, w: QuantWeight) -> Tensor:
    xq = x.double()
    if w.spec.act is not None:
        xq = oracle_activations(x, w.spec.act, w.input_scale, w.input_zero)
    return xq @ oracle_dequantize(w).T


SPECS = [
    QuantSpec("uint4", "group", group_size=32),
    QuantSpec("uint4", "group", group_size=128, has_zero=True),
    QuantSpec("uint4", "group", group_size=64, has_zero=True, act_order=True),
    QuantSpec("uint4", "channel", has_zero=True),
    QuantSpec("uint3", "group", group_size=32, has_zero=True),
    QuantSpec("uint8", "group", group_size=128),
    QuantSpec("int8", "channel"),
    QuantSpec("int8", "tensor"),
    QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True)),
    QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True, scale_divisor=127.5)),
    QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=False, granularity="tensor", symmetric=False)),
    QuantSpec("fp8_e4m3", "tensor", act=ActQuant("fp8_e4m3", dynamic=False, granularity="tensor")),
    QuantSpec("fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True)),
    QuantSpec("fp8_e4m3", "block", block_shape=(64, 32), act=ActQuant("fp8_e4m3", True, "group", 32)),
    QuantSpec("fp8_e5m2", "channel"),
]
SHAPES = [(200, 96), (64, 1056)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.describe)
def test_reference_matches_float64_oracle(
    spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype
) -> None:
    n, k = shape
    w = random_weight(spec, n, k, seed=n + k)
    kernel = ReferenceKernel(shape, dtype)
    kernel.load(w)
    budget = REFERENCE_BUDGET[dtype]
    gen = torch.Generator().manual_seed(k)
    for tokens in (1, 7, 64):
        x = torch.randn(tokens, k, generator=gen).to(dtype)
        y = kernel(x)
        assert y.dtype == dtype and y.shape == (tokens, n)
        want = oracle_linear(x, w)
        err = float((y.double() - want).norm() / want.norm())
        assert err <= budget, f"{spec.describe()} {shape} T={tokens} {dtype}: {err:.2e} > {budget:.0e}"


def test_awq_gemm_vector() -> None:
    """formats.md §12.1 (AWQ-GEMM canonical weight): K = 16, N = 32, G = 8, zero (5n + 7g) % 16."""
    w = vector_weight(32, 16, 8, lambda n, g: (5 * n + 7 * g) % 16)
    dense = dense_through(ReferenceKernel, w)
    assert dense[0].tolist() == [0.15625, 0.03125, 0.40625, 0.03125, 0.0, 0.25, 0.1875, 0.09375, 0.0, 0.0, -0.625, -0.625, 0.125, 0.125, 0.625, -0.625]  # fmt: skip
    assert dense[:, 0].tolist() == [0.15625, -0.5625, -1.125, -0.5625, 0.65625, 0.625, -0.5625, 0.0, -1.5, -0.5, 0.8125, 1.3125, -0.78125, 0.1875, -0.09375, -1.125, 0.0, -0.1875, 1.09375, -2.03125, -0.375, 0.09375, -1.875, 1.125, -0.4375, -2.40625, 2.03125, -0.28125, -0.15625, 2.0625, 0.125, 0.0]  # fmt: skip
    assert checksums(dense) == (-22.09375, -949.625)


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_gptq_descact_vector(asym: bool) -> None:
    """formats.md §12.3 GPTQ desc_act: columns map to groups through the real GPTQ g_idx."""
    row0, col0, sums = GPTQ_DESCACT_EXPECTED[asym]
    dense = dense_through(ReferenceKernel, gptq_descact_weight(asym))
    assert dense[0].tolist() == row0
    assert dense[:, 0].tolist() == col0
    assert checksums(dense) == sums


def identity_int8(
    k: int, act: ActQuant, input_scale: float | None = None, input_zero: int | None = None
) -> ReferenceKernel:
    """A W8A8 layer whose weight is the identity (scale 1), so y is the fake-quantized x."""
    spec = QuantSpec("int8", "channel", act=act)
    w = QuantWeight(
        spec,
        (k, k),
        torch.eye(k, dtype=torch.int8),
        torch.ones(k),
        input_scale=torch.tensor([input_scale]) if input_scale is not None else None,
        input_zero=torch.tensor([input_zero], dtype=torch.int32) if input_zero is not None else None,
    ).validate("identity")
    kernel = ReferenceKernel((k, k), torch.float32)
    kernel.load(w)
    return kernel


def test_int8_dynamic_rounds_half_to_even_and_clamps() -> None:
    # amax 127 makes the per-token scale exactly 1, so x / scale hits the .5 ties exactly.
    kernel = identity_int8(6, ActQuant("int8", dynamic=True))
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.0], [0.0] * 6])
    y = kernel(x)
    assert y[0].tolist() == [0.0, 2.0, 2.0, 0.0, -2.0, 127.0]
    assert y[1].tolist() == [0.0] * 6  # an all-zero token: no NaN from 0 / 0


def test_int8_static_zero_point_and_clamp() -> None:
    # x_q = clamp(round(x / 0.5) + 3, -128, 127); x_hat = (x_q - 3) * 0.5 (formats.md §4.5).
    kernel = identity_int8(4, ActQuant("int8", dynamic=False, granularity="tensor", symmetric=False), 0.5, 3)
    x = torch.tensor([[1.0, -0.75, 100.0, -100.0]])
    # round(-1.5) = -2 (half to even); 200 + 3 clamps to 127 -> 62; -200 + 3 clamps to -128 -> -65.5
    assert kernel(x)[0].tolist() == [1.0, -1.0, 62.0, -65.5]
