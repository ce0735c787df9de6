"""The AVX2 int8-activation kernel (cpu_avx2_a8): integer weights x int8 activations against float64,
its int16 sums at their extremes, its refusals and its choice on CPUs with and without VNNI.

The checks every int8-activation kernel passes, and their error budget (the kernel sums the code x
activation products exactly: int16 partial sums that cannot saturate, then int32), are
tests/helpers/int8_activation_kernels.py's. Where the CPU has AVX512-VNNI, the registry picks
cpu_avx512_vnni and these tests run this kernel by its class.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from anyquant.layers import custom_ops
from anyquant.quant.kernels import avx2_a8, avx512_vnni, cpu_ext
from anyquant.quant.kernels.avx2_a8 import Avx2Int8ActivationKernel
from anyquant.quant.kernels.avx512_vnni import Avx512VnniKernel, Int8ActivationKernel
from anyquant.quant.reference import fake_quantize_activations
from anyquant.quant.registry import choose_kernel
from anyquant.quant.spec import ActQuant, LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.helpers import int8_activation_kernels
from tests.helpers.errors import rel_err
from tests.helpers.int8_activation_kernels import (
    BF16,
    BUDGET,
    F32,
    SPECS,
    STATIC,
    TOKEN,
    check_given_amax_is_used,
    check_matches_float64,
    check_non_finite_inputs_stay_visible,
)
from tests.helpers.quant_weights import float64_linear, random_weight

CPU = torch.device("cpu")

# (N, K): N not a multiple of the 16-row blocks (nor of 8), K not a multiple of 64 / 128 nor of
# the group (a short last group).
SHAPES = [(200, 96), (72, 328), (37, 200)]

UNAVAILABLE = Avx2Int8ActivationKernel.cannot_run(SPECS[0], "linear", CPU, (64, 64), BF16)
needs_kernel = pytest.mark.skipif(
    UNAVAILABLE is not None, reason=f"cpu_avx2_a8 cannot run here: {UNAVAILABLE}"
)


def loaded(w: QuantWeight, dtype: torch.dtype) -> Int8ActivationKernel:
    return int8_activation_kernels.loaded(Avx2Int8ActivationKernel, w, dtype)


@needs_kernel
@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.describe)
def test_matches_float64(spec: QuantSpec) -> None:
    check_matches_float64(Avx2Int8ActivationKernel, spec, SHAPES)


def extreme_weight(spec: QuantSpec, n: int, k: int, code: int, zero: int | None) -> QuantWeight:
    """Every code `code`, scale 1 (per group or channel), zero point `zero`: the largest sums."""
    shape = (n, -(-k // spec.group_size)) if spec.granularity == "group" else (n,)
    dtype = torch.int8 if spec.weight == "int8" else torch.uint8
    data = torch.full((n, k), code, dtype=dtype)
    zeros = torch.full(shape, zero, dtype=torch.int32) if zero is not None else None
    assert spec.act is not None
    input_scale = None if spec.act.dynamic else torch.tensor([1.0])
    w = QuantWeight(spec, (n, k), data, torch.ones(shape), zeros, None, input_scale)
    return w.validate("extreme")


@needs_kernel
@pytest.mark.parametrize(
    ("weight", "code", "zero"),
    [
        (QuantSpec("uint4", "group", group_size=128, has_zero=True), 15, 0),
        (QuantSpec("uint4", "group", group_size=32, has_zero=True), 0, 15),
        (QuantSpec("uint4", "channel", has_zero=True), 15, 0),
        (QuantSpec("uint4", "group", group_size=64), 0, None),
        (QuantSpec("uint8", "channel", has_zero=True), 255, 0),
        (QuantSpec("int8", "channel"), -128, None),
        (QuantSpec("int8", "group", group_size=64), 127, None),
    ],
    ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v),
)
@pytest.mark.parametrize("act", [TOKEN, STATIC], ids=ActQuant.describe)
def test_extreme_codes_and_activations_do_not_saturate(
    weight: QuantSpec, code: int, zero: int | None, act: ActQuant
) -> None:
    """Weights all at one end of their range times activations all at +-127 (dynamic: every |x|
    equal) or at -128 / 127 (static scale 1, x clamped): the int16 pair sums (4-bit codes) and the
    int16 operands (8-bit codes) sit at their limits; float64 says what the sums must be."""
    spec = dataclasses.replace(weight, act=act)
    n, k = 40, 520  # more than one 32-input int16 span, a short last group
    w = extreme_weight(spec, n, k, code, zero)
    for dtype in (BF16, F32):
        kernel = loaded(w, dtype)
        for t in (1, 5, 70):
            signs = torch.ones(t, k)
            signs[1::2] = -1  # every other row all negative
            signs[:, 3::7] *= -1  # and mixed signs within rows
            x = (signs * (300.0 if act is STATIC else 2.0)).to(dtype)
            codes = fake_quantize_activations(x, act, w.input_scale) / (1.0 if act is STATIC else 2 / 127)
            assert set(codes.round().unique().tolist()) <= (
                {-128.0, 127.0} if act is STATIC else {-127.0, 127.0}
            )
            truth = float64_linear(x, w, None)
            err = rel_err(kernel(x), truth)
            assert err <= BUDGET[dtype], f"{spec.describe()} code {code} T={t} {dtype}: {err:.2e}"
        # All activations at the negative end: the int16 sums of 4-bit codes at -30720 per span.
        x = torch.full((3, k), -300.0 if act is STATIC else -2.0).to(dtype)
        assert rel_err(kernel(x), float64_linear(x, w, None)) <= BUDGET[dtype]


@needs_kernel
@pytest.mark.parametrize("act", [TOKEN, ActQuant("int8", True, "tensor")], ids=ActQuant.describe)
def test_given_amax_is_used(act: ActQuant) -> None:
    check_given_amax_is_used(Avx2Int8ActivationKernel, act)


@needs_kernel
def test_non_finite_inputs_stay_visible() -> None:
    check_non_finite_inputs_stay_visible(Avx2Int8ActivationKernel)


@needs_kernel
def test_zero_rows_and_the_fake() -> None:
    """No rows give an empty output; the captured step traces the op through its shape-only fake
    (layers/custom_ops.py), whose output matches the op's in shape, dtype and device."""
    kernel = loaded(random_weight(SPECS[1], 72, 328, seed=1), BF16)
    assert kernel(torch.empty(0, 328, dtype=BF16)).shape == (0, 72)
    custom_ops.register_extension_fakes()
    for spec in (SPECS[1], SPECS[9]):
        for dtype in (BF16, F32):
            kernel = loaded(random_weight(spec, 72, 328, seed=1), dtype)
            for rows in (3, 70):
                x = torch.randn(rows, 328).to(dtype)
                args = (x, kernel.packed, kernel.scale, kernel.zero, kernel.zconst, kernel.offset, None)
                args += (kernel.fmt, kernel.group, 72, kernel.divisor, kernel.static_scale, None)
                torch.library.opcheck(cpu_ext.ops().avx2_a8_linear, args, test_utils="test_faketensor")


def test_without_avx2_the_next_kernel_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(avx2_a8, "_cpu_reason", lambda: "CPU lacks AVX2")
    monkeypatch.setattr(avx512_vnni, "_cpu_reason", lambda: "CPU lacks AVX512-VNNI (vpdpbusd)")
    reason = Avx2Int8ActivationKernel.cannot_run(SPECS[9], "linear", CPU, (256, 512), BF16)
    assert reason == "CPU lacks AVX2"
    choice = choose_kernel(SPECS[9], "linear", CPU, (256, 512), BF16)
    assert choice.name not in ("cpu_avx2_a8", "cpu_avx512_vnni")
    assert ("cpu_avx2_a8", "CPU lacks AVX2") in choice.rejected


def _int8_activation_kernel() -> str:
    """The kernel int8-activation specs get here: VNNI where the CPU has it, else this one."""
    if Avx512VnniKernel.cannot_run(SPECS[0], "linear", CPU, (64, 64), BF16) is None:
        return "cpu_avx512_vnni"
    return "cpu_avx2_a8"


@needs_kernel
@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        (QuantSpec("uint4", "group", group_size=128, act=TOKEN), "linear"),
        (QuantSpec("uint4", "group", group_size=32, has_zero=True, act=TOKEN), "experts"),
        (QuantSpec("uint4", "group", group_size=64, act=STATIC), "linear"),
        (QuantSpec("int8", "channel", act=TOKEN), "linear"),
        (QuantSpec("int8", "channel", act=TOKEN), "lm_head"),
        (QuantSpec("int8", "tensor", act=STATIC), "linear"),
    ],
)
def test_int8_activation_specs_get_an_integer_kernel(spec: QuantSpec, kind: LayerKind) -> None:
    """On an AVX2 CPU without AVX512-VNNI every int8-activation spec the kernel serves gets it, at
    every row count (one path inside); where VNNI is present, cpu_avx512_vnni outranks it."""
    choice = choose_kernel(spec, kind, CPU, (200, 328), BF16)
    assert choice.name == _int8_activation_kernel(), choice.rejected


@needs_kernel
@pytest.mark.skipif(_int8_activation_kernel() != "cpu_avx2_a8", reason="this CPU runs cpu_avx512_vnni")
def test_moe_experts_on_int8_activations_run_fused_and_equal_the_reference() -> None:
    """A MoE checkpoint loaded with int8 activations on an AVX2 CPU: the routed experts are
    cpu_avx2_a8 kernels, run as one `moe_experts_avx2_a8` call per layer, and in float32 the model
    equals the reference kernels running the same definition (budget 1e-4, as
    tests/loading/test_moe_int8_activations.py)."""
    from pathlib import Path

    from anyquant import LLM
    from anyquant.layers.moe import SparseMoE

    path = (
        Path(__file__).resolve().parents[1]
        / "fixtures"
        / "third_party_moe"
        / "qwen3moe-w4a16-g32-asym-gptq-llmc"
    )
    fast = LLM(path, dtype="float32", activation_dtype="int8")
    blocks = [m for m in fast.model.modules() if isinstance(m, SparseMoE)]
    assert blocks and all(
        getattr(m.fused, "op_name", m.fused_reason) == "moe_experts_avx2_a8" for m in blocks
    )
    kernels = {m.kernel.name for m in fast.model.modules() if getattr(m, "kernel", None) is not None}
    assert "cpu_avx2_a8" in kernels, kernels
    reference = LLM(path, dtype="float32", activation_dtype="int8", kernel="reference")
    ids = [5, 99, 300, 17, 4, 100, 250, 7]
    got, want = fast.logits(ids), reference.logits(ids)
    assert rel_err(got, want) < 1e-4, rel_err(got, want)
