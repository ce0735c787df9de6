"""The AVX512-VNNI kernel (cpu_avx512_vnni): integer weights x int8 activations against float64.

Error budget (relative L2 error against float64 of the reference's own definition: activations
fake-quantized by `fake_quantize_activations` in fp32, times the float64 dequantized weight):
the kernel quantizes activations exactly like the reference (same fp32 division, round half to
even, clamp), sums code x activation products exactly in int32 and applies the scales in fp32,
so the only errors are fp32 scaling (~1e-7) and the output's rounding to the compute dtype:
bfloat16 4e-3 (2^-9 per element, ~1.7e-3 as an L2 ratio), float32 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from anyquant.quant.kernels import avx512_vnni
from anyquant.quant.kernels.avx2_a8 import Avx2Int8ActivationKernel
from anyquant.quant.kernels.avx512_vnni import Avx512VnniKernel, Int8ActivationKernel
from anyquant.quant.reference import activation_amax
from anyquant.quant.registry import choose_kernel, kernel_classes
from anyquant.quant.spec import ActQuant, LayerKind, QuantSpec
from tests.helpers.errors import rel_err
from tests.helpers.quant_weights import float64_linear, random_weight

F32, BF16 = torch.float32, torch.bfloat16
CPU = torch.device("cpu")
BUDGET = {BF16: 4e-3, F32: 1e-5}
TOKEN = ActQuant("int8", dynamic=True)

SPECS = [
    QuantSpec("uint4", "group", group_size=32, act=TOKEN),
    QuantSpec("uint4", "group", group_size=64, has_zero=True, act=TOKEN),
    QuantSpec("uint4", "group", group_size=128, act=TOKEN),
    QuantSpec("uint4", "group", group_size=128, has_zero=True, act_order=True, act=TOKEN),
    QuantSpec("uint4", "channel", has_zero=True, act=TOKEN),
    QuantSpec("uint4", "group", group_size=32, has_offset=True, act=TOKEN),
    QuantSpec("uint3", "group", group_size=64, act=TOKEN),
    QuantSpec("uint2", "group", group_size=32, has_zero=True, act=TOKEN),
    QuantSpec("int8", "channel", act=TOKEN),
    QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True, scale_divisor=127.5)),
    QuantSpec("int8", "group", group_size=128, act=ActQuant("int8", True, "tensor")),
    QuantSpec("int8", "tensor", act=ActQuant("int8", dynamic=False, granularity="tensor")),
    QuantSpec("uint8", "group", group_size=64, has_zero=True, act=TOKEN),
]
# (N, K): out not a multiple of 16 / 64, in not a multiple of the group (a short last group).
SHAPES = [(200, 96), (72, 328)]
TOKENS = (1, 2, 3, 4, 7, 16, 64, 300, 512)

UNAVAILABLE = Avx512VnniKernel.cannot_run(SPECS[0], "linear", CPU, (64, 64), BF16)
needs_kernel = pytest.mark.skipif(
    UNAVAILABLE is not None, reason=f"cpu_avx512_vnni cannot run here: {UNAVAILABLE}"
)


@needs_kernel
@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.describe)
def test_matches_float64(spec: QuantSpec) -> None:
    gen = torch.Generator().manual_seed(3)
    for n, k in SHAPES:
        w = random_weight(spec, n, k, seed=n + k)
        bias = torch.randn(n, generator=gen)
        for dtype in (BF16, F32):
            kernel = Avx512VnniKernel((n, k), dtype)
            kernel.load(w)
            for t in TOKENS:
                x = torch.randn(t, k, generator=gen).to(dtype)
                x[0, : k // 3] *= 10  # a token with outliers: its scale differs from the others'
                b = bias.to(dtype) if t % 2 else None
                y = kernel(x, b)
                assert y.dtype == dtype and y.shape == (t, n)
                err = rel_err(y, float64_linear(x, w, b))
                assert err <= BUDGET[dtype], f"{spec.describe()} {n}x{k} T={t} {dtype}: {err:.2e}"


@needs_kernel
def test_w8a8_equals_the_int_mm_kernel() -> None:
    """An independent W8A8 implementation (oneDNN's int8 GEMM through torch._int_mm): both sum
    exact int32 products, so in fp32 they agree to fp32 rounding."""
    spec = QuantSpec("int8", "channel", act=TOKEN)
    other = next(cls for cls in kernel_classes() if cls.name == "cpu_w8a8_int8")
    if other.cannot_run(spec, "linear", CPU, (72, 328), F32) is not None:
        pytest.skip("cpu_w8a8_int8 cannot run here")
    w = random_weight(spec, 72, 328, seed=2)
    ours, theirs = Avx512VnniKernel((72, 328), F32), other((72, 328), F32)
    ours.load(w)
    theirs.load(w)
    x = torch.randn(37, 328, generator=torch.Generator().manual_seed(1))
    assert rel_err(ours(x), theirs(x).double()) < 1e-6


@needs_kernel
@pytest.mark.parametrize("act", [TOKEN, ActQuant("int8", True, "tensor")], ids=ActQuant.describe)
def test_given_amax_is_used(act: ActQuant) -> None:
    """Under tensor parallelism a rank quantizes with the amax over every rank's slice."""
    spec = QuantSpec("uint4", "group", group_size=32, act=act)
    w = random_weight(spec, 48, 96, seed=4)
    kernel = Avx512VnniKernel((48, 96), F32)
    kernel.load(w)
    assert kernel.dynamic_act == act
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
    amax = activation_amax(x, act) * 3
    got = kernel(x, None, act_amax=amax)
    assert rel_err(got, float64_linear(x, w, None, amax)) <= BUDGET[F32]
    assert rel_err(got, float64_linear(x, w, None)) > 1e-3  # the test can tell the two apart


@needs_kernel
def test_non_finite_inputs_stay_visible() -> None:
    """A row with inf or NaN gives a non-finite output row (as the reference does), not quantized
    garbage that would hide an overflow from the engine's checks; other rows are unaffected."""
    spec = QuantSpec("uint4", "group", group_size=32, act=TOKEN)
    w = random_weight(spec, 48, 96, seed=3)
    kernel = Avx512VnniKernel((48, 96), BF16)
    kernel.load(w)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(5)).to(BF16)
    x[0, 7], x[2, 50] = float("inf"), float("nan")
    y = kernel(x)
    assert not y[0].isfinite().any() and not y[2].isfinite().any()
    assert rel_err(y[1:2], float64_linear(x[1:2], w, None)) <= BUDGET[BF16]


@needs_kernel
def test_zero_rows_and_packed_memory() -> None:
    spec = QuantSpec("uint4", "group", group_size=32, has_zero=True, act=TOKEN)
    kernel = Avx512VnniKernel((256, 512), BF16)
    kernel.load(random_weight(spec, 256, 512, seed=1))
    assert kernel(torch.empty(0, 512, dtype=BF16)).shape == (0, 256)
    held = sum(b.numel() * b.element_size() for b in kernel.buffers())
    assert held <= (0.5 + 8 / 32) * 256 * 512 + 1024, held  # nibbles + fp32 scale + int32 zero


@pytest.mark.parametrize(
    ("spec", "kind", "device", "dtype", "words"),
    [
        (SPECS[0], "linear", "meta", BF16, "CPU only"),
        (None, "linear", "cpu", BF16, "unquantized"),
        (SPECS[0], "embedding", "cpu", BF16, "embedding layers"),
        (SPECS[0], "linear", "cpu", torch.float16, "not bfloat16 or float32"),
        (QuantSpec("uint4", "group", group_size=128), "linear", "cpu", BF16, "activation_dtype='int8'"),
        (QuantSpec("fp8_e4m3", "channel", act=TOKEN), "linear", "cpu", BF16, "fp8_e4m3"),
        (QuantSpec("int8", "channel", act=ActQuant("fp8_e4m3", True)), "linear", "cpu", BF16, "are fp8_e4m3"),
        (
            QuantSpec("int8", "channel", act=ActQuant("int8", True, "group", 32)),
            "linear",
            "cpu",
            BF16,
            "per-group",
        ),
        (
            QuantSpec("int8", "channel", act=ActQuant("int8", False, "tensor", symmetric=False)),
            "linear",
            "cpu",
            BF16,
            "symmetric",
        ),
        (QuantSpec("int8", "block", block_shape=(128, 128), act=TOKEN), "linear", "cpu", BF16, "block-wise"),
    ],
)
@pytest.mark.parametrize("kernel", [Avx512VnniKernel, Avx2Int8ActivationKernel], ids=lambda k: k.name)
def test_cannot_run_says_why(
    kernel: type[Int8ActivationKernel],
    spec: QuantSpec | None,
    kind: LayerKind,
    device: str,
    dtype: torch.dtype,
    words: str,
) -> None:
    """The spec checks both int8-activation kernels share (Int8ActivationKernel), on any CPU."""
    reason = kernel.cannot_run(spec, kind, torch.device(device), (64, 64), dtype)
    assert reason is not None and words in reason, reason


def test_channel_scales_over_very_long_rows_are_refused() -> None:
    reason = Avx512VnniKernel.cannot_run(SPECS[8], "linear", CPU, (64, 40000), BF16)
    assert reason is not None and "overflow" in reason, reason


def test_without_vnni_the_next_kernel_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(avx512_vnni, "_cpu_reason", lambda: "CPU lacks AVX512-VNNI (vpdpbusd)")
    choice = choose_kernel(SPECS[8], "linear", CPU, (256, 512), BF16)
    assert choice.name != "cpu_avx512_vnni"
    assert ("cpu_avx512_vnni", "CPU lacks AVX512-VNNI (vpdpbusd)") in choice.rejected


@needs_kernel
@pytest.mark.parametrize(
    ("spec", "kind", "expected"),
    [
        (QuantSpec("uint4", "group", group_size=128), "linear", "cpu_avx512"),
        (QuantSpec("uint4", "group", group_size=128, act=TOKEN), "linear", "cpu_avx512_vnni"),
        (QuantSpec("uint4", "group", group_size=32, has_zero=True, act=TOKEN), "experts", "cpu_avx512_vnni"),
        (QuantSpec("int8", "channel"), "lm_head", "cpu_avx512"),
        (QuantSpec("int8", "channel", act=TOKEN), "linear", "cpu_avx512_vnni"),
        (QuantSpec("int8", "channel", act=TOKEN), "lm_head", "cpu_avx512_vnni"),
        (QuantSpec("int8", "tensor", act=ActQuant("int8", False, "tensor")), "linear", "cpu_avx512_vnni"),
        (
            QuantSpec("int8", "tensor", act=ActQuant("int8", False, "tensor", symmetric=False)),
            "linear",
            "cpu_w8a8_int8",
        ),
        (QuantSpec("fp8_e4m3", "channel"), "linear", "cpu_avx512"),
        (None, "lm_head", "cpu_avx512_lm_head"),
    ],
)
def test_this_machine_gets_the_fast_kernel(spec: QuantSpec | None, kind: LayerKind, expected: str) -> None:
    """Which kernel each spec gets on an AVX512-VNNI + AVX512_BF16 CPU, at every row count (the
    kernel picks its in-register path up to 4 rows and its unpacked-block path above, inside)."""
    assert choose_kernel(spec, kind, CPU, (200, 328), BF16).name == expected
