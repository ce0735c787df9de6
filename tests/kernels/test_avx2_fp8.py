"""fp8 weights on the AVX2 kernel (cpu_avx2): the decoders of csrc/gemv_avx2.h against torch's own
fp8 -> fp32 conversion for every byte, and every path (vector, rows, tile) against float64 and the
reference kernel for e4m3fn and e5m2, per-tensor, per-channel and 128x128 block scales, with and
without fp8 activations. The AVX2 kernel class is tested directly, so the tests also run on
AVX-512 machines (where cpu_avx512 is the one chosen); they skip with the reason without AVX2.

Budgets as tests/kernels/test_avx2_kernel.py's: relative L2 error against float64 of the same
dequantized weights and the same activations (after the reference's own fp8 fake quantization
where the spec quantizes them): bfloat16 4e-3 and never worse than the reference kernel by more
than 1.5x; float32 2e-6.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from anyquant.quant.kernels.avx2 import Avx2WeightOnlyKernel
from anyquant.quant.kernels.reference import ReferenceKernel
from anyquant.quant.reference import dequantize
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.helpers.errors import rel_err
from tests.helpers.quant_weights import float64_linear, random_weight

F32, BF16 = torch.float32, torch.bfloat16
CPU = torch.device("cpu")
BUDGET = {BF16: 4e-3, F32: 2e-6}
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
PATHS = ("gemv", "rows", "tiled")

UNAVAILABLE = Avx2WeightOnlyKernel.cannot_run(QuantSpec("fp8_e4m3", "channel"), "linear", CPU, (64, 64), BF16)
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"cpu_avx2 cannot run here: {UNAVAILABLE}")


def _specs() -> list[QuantSpec]:
    specs = []
    for weight in FP8_DTYPES:
        act_token = ActQuant(weight, dynamic=True)
        act_group = ActQuant(weight, True, "group", 128)
        act_static = ActQuant(weight, dynamic=False, granularity="tensor")
        specs += [
            QuantSpec(weight, "tensor"),
            QuantSpec(weight, "channel"),
            QuantSpec(weight, "block", block_shape=(128, 128)),
            QuantSpec(weight, "channel", act=act_token),
            QuantSpec(weight, "block", block_shape=(128, 128), act=act_group),
            QuantSpec(weight, "tensor", act=act_static),
        ]
    return specs


SPECS = _specs()
# N, K not multiples of 128 (the blocks' edges are ragged), nor of 16 / 8 (the layout's padding).
N, K = 200, 328
TOKENS = (1, 2, 3, 4, 7, 16, 64, 300, 512)


def every_code_weight(weight: str, codes: Tensor) -> QuantWeight:
    """A circulant [len, len] weight of `codes` (every row and column holds each once), scale 1."""
    size = codes.numel()
    index = (torch.arange(size).view(-1, 1) + torch.arange(size).view(1, -1)) % size
    data = codes[index].view(FP8_DTYPES[weight])
    return QuantWeight(QuantSpec(weight, "tensor"), (size, size), data, torch.tensor(1.0)).validate("codes")


def forced(kernel: Avx2WeightOnlyKernel, path: str) -> Avx2WeightOnlyKernel:
    kernel.path = lambda rows: path  # type: ignore[method-assign]
    return kernel


@pytest.mark.parametrize("weight", list(FP8_DTYPES))
def test_every_code_decodes_exactly(weight: str) -> None:
    """All 256 bytes (NaN and e5m2's infinities included) dequantized bit for bit as torch converts
    them; the finite ones through every path's products with one-hot rows of x (each output one
    weight times 1.0, so any decoding error shows), both compute dtypes."""
    every = torch.arange(256, dtype=torch.uint8)
    want = every.view(FP8_DTYPES[weight]).float()
    w = every_code_weight(weight, every)
    for dtype in (BF16, F32):
        kernel = Avx2WeightOnlyKernel(w.shape, dtype)
        kernel.load(w)
        got = kernel.dequantized(F32)
        nan = want.isnan()
        assert int(nan.sum()) == (2 if weight == "fp8_e4m3" else 6)
        assert torch.equal(got[0].isnan(), nan), f"{weight} {dtype}"  # row 0 holds the codes in order
        assert torch.equal(got[0][~nan].view(torch.int32), want[~nan].view(torch.int32)), f"{weight} {dtype}"
        torch.testing.assert_close(got, dequantize(w, F32), rtol=0, atol=0, equal_nan=True)
    finite = every[every.view(FP8_DTYPES[weight]).float().isfinite()]
    w = every_code_weight(weight, finite)
    truth = dequantize(w, torch.float64)
    assert torch.equal(truth[:, 0], finite.view(FP8_DTYPES[weight]).double())
    for dtype in (BF16, F32):
        for path in PATHS:
            kernel = forced(Avx2WeightOnlyKernel(w.shape, dtype), path)
            kernel.load(w)
            eye = torch.eye(finite.numel(), dtype=dtype)
            assert torch.equal(kernel(eye).double(), truth.T), f"{weight} {dtype} {path}"


@pytest.mark.parametrize("weight", list(FP8_DTYPES))
def test_nan_and_inf_codes_propagate_like_the_reference(weight: str) -> None:
    """Weights holding NaN (and e5m2's +-inf) codes among finite ones: every path's outputs are NaN
    (or inf) exactly where the reference kernel's are, the finite ones close to it."""
    dtype8 = FP8_DTYPES[weight]
    gen = torch.Generator().manual_seed(9)
    data = (torch.randn(40, 72, generator=gen) * 4).to(dtype8).view(torch.uint8)
    special = torch.arange(256, dtype=torch.uint8)
    special = special[~special.view(dtype8).float().isfinite()]
    for i, code in enumerate(special.tolist()):
        data[3 * i + 1, (7 * i) % 72] = code  # a few rows hold one special code each
    w = QuantWeight(
        QuantSpec(weight, "channel"), (40, 72), data.view(dtype8), torch.rand(40, generator=gen) + 0.5
    )
    w = w.validate("special")
    for dtype in (BF16, F32):
        reference = ReferenceKernel((40, 72), dtype)
        reference.load(w)
        x = torch.randn(5, 72, generator=gen).abs().to(dtype) + 0.1  # no zero inputs: inf * x stays inf
        want = reference(x)
        assert want.isnan().any() and not want.isnan().all()
        for path in PATHS:
            kernel = forced(Avx2WeightOnlyKernel((40, 72), dtype), path)
            kernel.load(w)
            got = kernel(x)
            assert torch.equal(got.isnan(), want.isnan()), f"{weight} {dtype} {path}"
            assert torch.equal(got.isinf(), want.isinf()), f"{weight} {dtype} {path}"
            fine = want.isfinite()
            assert torch.equal(got[~fine].nan_to_num(), want[~fine].nan_to_num())
            # bf16: the reference rounds each weight to bf16, these paths do not
            assert rel_err(got[fine], want[fine]) <= (1e-2 if dtype == BF16 else 1e-5), (
                f"{weight} {dtype} {path}"
            )


@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.describe)
def test_matches_float64_and_the_reference(spec: QuantSpec) -> None:
    gen = torch.Generator().manual_seed(11)
    w = random_weight(spec, N, K, seed=len(spec.describe()))
    bias = torch.randn(N, generator=gen)
    for dtype in (BF16, F32):
        kernel = Avx2WeightOnlyKernel((N, K), dtype)
        kernel.load(w)
        reference = ReferenceKernel((N, K), dtype)
        reference.load(w)
        paths = set()
        for t in TOKENS:
            x = torch.randn(t, K, generator=gen).to(dtype)
            b = bias.to(dtype) if t % 2 else None
            paths.add(kernel.path(t))
            y = kernel(x, b)
            assert y.dtype == dtype and y.shape == (t, N)
            truth = float64_linear(x, w, b)
            err = rel_err(y, truth)
            where = f"{spec.describe()} T={t} {dtype} ({kernel.path(t)})"
            assert err <= BUDGET[dtype], f"{where}: {err:.2e}"
            if dtype == BF16:
                assert err <= 1.5 * rel_err(reference(x, b), truth) + 1e-4, f"{where}: {err:.2e}"
        assert paths == ({"gemv", "rows"} if dtype == BF16 else {"gemv", "tiled"}), paths


@pytest.mark.parametrize("spec", [s for s in SPECS if s.act is None], ids=QuantSpec.describe)
def test_every_path_multiplies_the_reference_weights(spec: QuantSpec) -> None:
    """The rows kernel and the tile path form the reference's fp32 weights bit for bit (x the
    identity returns W.T; `dequantized` the same), both compute dtypes; the vector path applies
    the scale once per span, so it is held to float64 instead, at every row count it can take."""
    w = random_weight(spec, N, K, seed=3)
    eye = torch.eye(K)
    for dtype in (BF16, F32):
        want = dequantize(w, dtype)
        for path in ("rows", "tiled"):
            kernel = forced(Avx2WeightOnlyKernel((N, K), dtype), path)
            kernel.load(w)
            assert torch.equal(kernel(eye.to(dtype)), want.T), f"{spec.describe()} {dtype} {path}"
            assert torch.equal(kernel.dequantized(dtype), want), spec.describe()
        gen = torch.Generator().manual_seed(2)
        vector = forced(Avx2WeightOnlyKernel((N, K), dtype), "gemv")
        vector.load(w)
        for t in (1, 5, 9, 64):
            x = torch.randn(t, K, generator=gen).to(dtype)
            err = rel_err(vector(x), float64_linear(x, w, None))
            assert err <= (4e-3 if dtype == BF16 else 2e-6), f"{spec.describe()} {dtype} T={t}: {err:.2e}"
