"""What every int8-activation kernel (`Int8ActivationKernel`: cpu_avx512_vnni, cpu_avx2_a8) must
do, checked on the kernel class a test file names: the specs they serve (`SPECS`), the result
against float64 (`check_matches_float64`), a given amax (`check_given_amax_is_used`) and non-finite
inputs (`check_non_finite_inputs_stay_visible`). The kernels share the contract (and the weight
layout, csrc/vnni.h's), so one set of checks keeps them from drifting apart.

Error budget (relative L2 error against float64 of the reference's own definition: activations
fake-quantized by `fake_quantize_activations` in fp32, times the float64 dequantized weight): the
kernels quantize activations exactly as the reference does (the same fp32 division, round half to
even, clamp), sum the code x activation products exactly in integers and apply the scales in fp32,
so the only errors are fp32 scaling (~1e-7) and the output's rounding to the compute dtype:
bfloat16 4e-3 (2^-9 per element, ~1.7e-3 as an L2 ratio), float32 1e-5."""

from __future__ import annotations

import torch

from anyquant.quant.kernels.avx512_vnni import Int8ActivationKernel
from anyquant.quant.reference import activation_amax
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.helpers.errors import rel_err
from tests.helpers.quant_weights import float64_linear, random_weight

F32, BF16 = torch.float32, torch.bfloat16
BUDGET = {BF16: 4e-3, F32: 1e-5}
TOKEN = ActQuant("int8", dynamic=True)
STATIC = ActQuant("int8", dynamic=False, granularity="tensor")

SPECS = [
    QuantSpec("uint4", "group", group_size=32, act=TOKEN),
    QuantSpec("uint4", "group", group_size=64, has_zero=True, act=TOKEN),
    QuantSpec("uint4", "group", group_size=128, act=TOKEN),
    QuantSpec("uint4", "group", group_size=128, has_zero=True, act_order=True, act=TOKEN),
    QuantSpec("uint4", "channel", has_zero=True, act=TOKEN),
    QuantSpec("uint4", "group", group_size=32, has_offset=True, act=TOKEN),
    QuantSpec("uint4", "group", group_size=64, act=STATIC),
    QuantSpec("uint3", "group", group_size=64, act=TOKEN),
    QuantSpec("uint2", "group", group_size=32, has_zero=True, act=TOKEN),
    QuantSpec("int8", "channel", act=TOKEN),
    QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True, scale_divisor=127.5)),
    QuantSpec("int8", "group", group_size=128, act=ActQuant("int8", True, "tensor")),
    QuantSpec("int8", "tensor", act=STATIC),
    QuantSpec("uint8", "group", group_size=64, has_zero=True, act=TOKEN),
]
# One row to the 4-row tiles and beyond, past a 64-row panel, prompts.
TOKENS = (1, 2, 3, 4, 7, 16, 64, 300, 512)


def loaded(cls: type[Int8ActivationKernel], w: QuantWeight, dtype: torch.dtype) -> Int8ActivationKernel:
    kernel = cls(tuple(w.shape), dtype)
    kernel.load(w)
    return kernel


def check_matches_float64(
    cls: type[Int8ActivationKernel], spec: QuantSpec, shapes: list[tuple[int, int]]
) -> None:
    """Every (N, K) of `shapes`, both compute dtypes, every row count of TOKENS, with and without
    bias, one token with outliers: within BUDGET of float64."""
    gen = torch.Generator().manual_seed(3)
    for n, k in shapes:
        w = random_weight(spec, n, k, seed=n + k)
        bias = torch.randn(n, generator=gen)
        for dtype in (BF16, F32):
            kernel = loaded(cls, w, dtype)
            for t in TOKENS:
                x = torch.randn(t, k, generator=gen).to(dtype)
                x[0, : k // 3] *= 10  # a token with outliers: its scale differs from the others'
                b = bias.to(dtype) if t % 2 else None
                y = kernel(x, b)
                assert y.dtype == dtype and y.shape == (t, n)
                err = rel_err(y, float64_linear(x, w, b))
                assert err <= BUDGET[dtype], f"{spec.describe()} {n}x{k} T={t} {dtype}: {err:.2e}"


def check_given_amax_is_used(cls: type[Int8ActivationKernel], act: ActQuant) -> None:
    """Under tensor parallelism a rank quantizes with the amax over every rank's slice."""
    spec = QuantSpec("uint4", "group", group_size=32, act=act)
    w = random_weight(spec, 48, 96, seed=4)
    kernel = loaded(cls, w, F32)
    assert kernel.dynamic_act == act
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
    amax = activation_amax(x, act) * 3
    got = kernel(x, None, act_amax=amax)
    assert rel_err(got, float64_linear(x, w, None, amax)) <= BUDGET[F32]
    assert rel_err(got, float64_linear(x, w, None)) > 1e-3  # the test can tell the two apart


def check_non_finite_inputs_stay_visible(cls: type[Int8ActivationKernel]) -> None:
    """A row with inf or NaN gives a non-finite output row (as the reference does), not quantized
    garbage that would hide an overflow from the engine's checks; other rows are unaffected."""
    w = random_weight(SPECS[0], 48, 96, seed=3)
    kernel = loaded(cls, w, BF16)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(5)).to(BF16)
    x[0, 7], x[2, 50] = float("inf"), float("nan")
    y = kernel(x)
    assert not y[0].isfinite().any() and not y[2].isfinite().any()
    assert rel_err(y[1:2], float64_linear(x[1:2], w, None)) <= BUDGET[BF16]
