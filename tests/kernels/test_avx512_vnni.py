"""The AVX512-VNNI kernel (cpu_avx512_vnni): integer weights x int8 activations against float64,
its refusals and its choice. The checks every int8-activation kernel passes, and their error
budget (the kernel sums the code x activation products exactly in int32), are
tests/helpers/int8_activation_kernels.py's.
"""

from __future__ import annotations

import pytest
import torch

from anyquant.quant.kernels import avx512_vnni
from anyquant.quant.kernels.avx2_a8 import Avx2Int8ActivationKernel
from anyquant.quant.kernels.avx512_vnni import Avx512VnniKernel, Int8ActivationKernel
from anyquant.quant.registry import choose_kernel, kernel_classes
from anyquant.quant.spec import ActQuant, LayerKind, QuantSpec
from tests.helpers.errors import rel_err
from tests.helpers.int8_activation_kernels import (
    BF16,
    F32,
    SPECS,
    TOKEN,
    check_given_amax_is_used,
    check_matches_float64,
    check_non_finite_inputs_stay_visible,
)
from tests.helpers.quant_weights import random_weight

CPU = torch.device("cpu")

# (N, K): out not a multiple of 16 / 64, in not a multiple of the group (a short last group).
SHAPES = [(200, 96), (72, 328)]

UNAVAILABLE = Avx512VnniKernel.cannot_run(SPECS[0], "linear", CPU, (64, 64), BF16)
needs_kernel = pytest.mark.skipif(
    UNAVAILABLE is not None, reason=f"cpu_avx512_vnni cannot run here: {UNAVAILABLE}"
)


@needs_kernel
@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.describe)
def test_matches_float64(spec: QuantSpec) -> None:
    check_matches_float64(Avx512VnniKernel, spec, SHAPES)


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
    check_given_amax_is_used(Avx512VnniKernel, act)


@needs_kernel
def test_non_finite_inputs_stay_visible() -> None:
    check_non_finite_inputs_stay_visible(Avx512VnniKernel)


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
    reason = Avx512VnniKernel.cannot_run(SPECS[9], "linear", CPU, (64, 40000), BF16)
    assert reason is not None and "overflow" in reason, reason


def test_without_vnni_the_next_kernel_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(avx512_vnni, "_cpu_reason", lambda: "CPU lacks AVX512-VNNI (vpdpbusd)")
    choice = choose_kernel(SPECS[9], "linear", CPU, (256, 512), BF16)
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
