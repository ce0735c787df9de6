"""The C++ AVX2 + FMA kernels (cpu_avx2, cpu_avx2_lm_head) against float64, their refusals and
their choice on CPUs without AVX512_BF16.

Error budgets (relative L2 error against a float64 dequantize + matmul of the same quantized weight
and the same compute-dtype activations), as for cpu_avx512:
- bfloat16: the vector and few-rows paths multiply the exact codes by the bf16 inputs in fp32 and round only
  the output; the rows kernel multiplies the reference's fp32 weights in fp32. Budget 4e-3, and
  never worse than the reference kernel's own error by more than 1.5x.
- float32: the tile path at every row count, at::mm over the reference's fp32 weights (the rows
  kernel, checked on its own below, the same weights): only rounding of the products and
  summation order differ. Budget 2e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anyquant.layers import custom_ops
from anyquant.quant.kernels import avx2, avx512, cpu_ext
from anyquant.quant.kernels.avx2 import Avx2DenseLmHeadKernel, Avx2WeightOnlyKernel
from anyquant.quant.kernels.reference import ReferenceKernel
from anyquant.quant.reference import dequantize
from anyquant.quant.registry import choose_kernel
from anyquant.quant.spec import ActQuant, LayerKind, QuantSpec
from tests.helpers.errors import rel_err
from tests.helpers.quant_weights import float64_linear, random_weight
from tests.helpers.repacked_kernels import INTEGER_SPECS, check_dense_lm_head_matches_float64

F32, BF16 = torch.float32, torch.bfloat16
CPU = torch.device("cpu")
BUDGET = {BF16: 4e-3, F32: 2e-6}

SPECS = INTEGER_SPECS
# (N, K): out not a multiple of 16 (nor of 8), in not a multiple of the group (a short last group).
SHAPES = [(200, 96), (73, 328)]
# The vector path at one row, the few-rows kernel around its 6-row groups to its last row count (16);
# the rows kernel beyond, around its 6-row register tiles and 64-row panels.
TOKENS = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 65, 130)

UNAVAILABLE = Avx2WeightOnlyKernel.cannot_run(SPECS[0], "linear", CPU, (64, 64), BF16)
needs_kernel = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"cpu_avx2 cannot run here: {UNAVAILABLE}")


@needs_kernel
@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.describe)
def test_matches_float64(spec: QuantSpec) -> None:
    gen = torch.Generator().manual_seed(3)
    for n, k in SHAPES:
        w = random_weight(spec, n, k, seed=n + k)
        bias = torch.randn(n, generator=gen)
        for dtype in (BF16, F32):
            kernel = Avx2WeightOnlyKernel((n, k), dtype)
            kernel.load(w)
            reference = ReferenceKernel((n, k), dtype)
            reference.load(w)
            paths = set()
            for t in TOKENS:
                x = torch.randn(t, k, generator=gen).to(dtype)
                b = bias.to(dtype) if t % 2 else None
                paths.add(kernel.path(t))
                y = kernel(x, b)
                assert y.dtype == dtype and y.shape == (t, n)
                truth = float64_linear(x, w, b)
                err = rel_err(y, truth)
                where = f"{spec.describe()} {n}x{k} T={t} {dtype} ({kernel.path(t)})"
                assert err <= BUDGET[dtype], f"{where}: {err:.2e}"
                if dtype == BF16:
                    assert err <= 1.5 * rel_err(reference(x, b), truth) + 1e-4, f"{where}: {err:.2e}"
            assert paths == ({"gemv", "fewrows", "rows"} if dtype == BF16 else {"tiled"}), paths


@needs_kernel
def test_rows_kernel_multiplies_the_reference_weights() -> None:
    """The rows kernel's weights are the reference's, bit for bit, in both dtypes (fp32 compute
    runs it only when told to): with x the identity (one product with 1.0 per output) it returns
    W.T exactly, through chunks of inputs that split groups (K = 328 > the 256-input chunk) and
    act-order's permutation; `dequantized` (the whole layer at once) gives the same weights."""
    for spec in (SPECS[1], SPECS[3], SPECS[4], SPECS[6], SPECS[7], SPECS[10]):
        w = random_weight(spec, 73, 328, seed=5)
        for dtype in (BF16, F32):
            kernel = Avx2WeightOnlyKernel((73, 328), dtype)
            kernel.load(w)
            kernel.path = lambda rows: "rows"  # type: ignore[method-assign]  # fp32 takes the tile path
            want = dequantize(w, dtype)
            assert torch.equal(kernel(torch.eye(328, dtype=dtype)), want.T), spec.describe()
            if kernel.perm is not None:
                want = want[:, kernel.perm]
            assert torch.equal(kernel.dequantized(dtype), want), spec.describe()


@needs_kernel
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3], SPECS[10]], ids=QuantSpec.describe)
def test_rows_kernel_on_long_prompts(spec: QuantSpec) -> None:
    """Prompt chunks of many 64-row panels (700 rows: ten and a short one; 2048), bf16 x widened
    by the rows kernel a panel at a time and fp32 x read in place, against float64: K long and
    not a multiple of the 256-input chunk nor of the group (a short last group), N not of 16."""
    gen = torch.Generator().manual_seed(11)
    for n, k, t in ((40, 1000, 700), (24, 4856, 2048)):
        w = random_weight(spec, n, k, seed=n + k)
        bias = torch.randn(n, generator=gen)
        x = torch.randn(t, k, generator=gen)
        for dtype in (BF16, F32):
            kernel = Avx2WeightOnlyKernel((n, k), dtype)
            kernel.load(w)
            kernel.path = lambda rows: "rows"  # type: ignore[method-assign]  # fp32 takes the tile path
            xd, bd = x.to(dtype), bias.to(dtype)
            y = kernel(xd, bd)
            truth = float64_linear(xd, w, bd)
            # per row: a panel read from the wrong rows spoils whole rows, not the overall norm
            err = ((y.double() - truth).norm(dim=1) / truth.norm(dim=1)).max().item()
            budget = BUDGET[dtype] if dtype == BF16 else 1e-5  # fp32: K up to 4856 products summed
            assert err <= budget, f"{spec.describe()} {n}x{k} T={t} {dtype}: {err:.2e}"


@needs_kernel
def test_zero_rows_and_experts_kind() -> None:
    assert Avx2WeightOnlyKernel.cannot_run(SPECS[0], "experts", CPU, (64, 96), BF16) is None
    kernel = Avx2WeightOnlyKernel((64, 96), BF16)
    kernel.load(random_weight(SPECS[0], 64, 96, seed=1))
    assert kernel(torch.empty(0, 96, dtype=BF16)).shape == (0, 64)


@needs_kernel
def test_dense_lm_head_matches_float64_and_reads_tied_rows() -> None:
    check_dense_lm_head_matches_float64(Avx2DenseLmHeadKernel, ((200, 100), (73, 328)), TOKENS)


@pytest.mark.parametrize(
    ("spec", "kind", "dtype", "words"),
    [
        (
            QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True)),
            "linear",
            BF16,
            "activations are quantized",
        ),
        (QuantSpec("uint4", "group", group_size=32), "router", F32, "MoE routers"),
        (None, "linear", BF16, "unquantized"),
    ],
)
def test_cannot_run_says_why(spec: QuantSpec | None, kind: LayerKind, dtype: torch.dtype, words: str) -> None:
    reason = Avx2WeightOnlyKernel.cannot_run(spec, kind, CPU, (64, 64), dtype)
    assert reason is not None and words in reason, reason


@pytest.mark.parametrize(
    ("spec", "kind", "dtype", "words"),
    [
        (SPECS[0], "lm_head", BF16, "quantized (cpu_avx2 runs"),
        (None, "linear", BF16, "only the unquantized LM head"),
        (None, "lm_head", F32, "only bfloat16"),
    ],
)
def test_dense_lm_head_cannot_run_says_why(
    spec: QuantSpec | None, kind: LayerKind, dtype: torch.dtype, words: str
) -> None:
    reason = Avx2DenseLmHeadKernel.cannot_run(spec, kind, CPU, (64, 64), dtype)
    assert reason is not None and words in reason, reason


def test_cpu_reason_matches_the_extension() -> None:
    """The Python check of the CPU's flags agrees with the compiler's own (__builtin_cpu_supports)."""
    if cpu_ext.unavailable_reason() is not None:
        pytest.skip(f"no extension: {cpu_ext.unavailable_reason()}")
    assert (avx2._cpu_reason() is None) == bool(cpu_ext.ops().avx2_supported())


@needs_kernel
def test_chosen_where_avx512_cannot_run() -> None:
    """Below cpu_avx512 and above the pure-torch kernels: an AVX2-only CPU gets cpu_avx2 for every
    integer and fp8 spec (fp8 also with fp8 activations) and cpu_avx2_lm_head for the bf16 head."""
    fast = avx512._cpu_reason() is None
    fp8 = [
        QuantSpec("fp8_e4m3", "channel"),
        QuantSpec("fp8_e5m2", "tensor"),
        QuantSpec("fp8_e4m3", "block", block_shape=(128, 128), act=ActQuant("fp8_e4m3", True, "group", 128)),
    ]
    for spec in SPECS + fp8:
        for kind in ("linear", "experts", "lm_head"):
            choice = choose_kernel(spec, kind, CPU, (200, 328), BF16)
            assert choice.name == ("cpu_avx512" if fast else "cpu_avx2"), choice.rejected
    head = choose_kernel(None, "lm_head", CPU, (1000, 64), BF16).name
    assert head == ("cpu_avx512_lm_head" if fast else "cpu_avx2_lm_head")
    assert choose_kernel(None, "lm_head", CPU, (1000, 64), F32).name == "dense"


def test_fallback_serves_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the instructions the pure-torch kernel serves, and says why."""
    monkeypatch.setattr(avx512, "_cpu_reason", lambda: "CPU lacks AVX-512 (F/BW/VL/DQ)")
    monkeypatch.setattr(avx2, "_cpu_reason", lambda: "CPU lacks AVX2")
    choice = choose_kernel(SPECS[0], "linear", CPU, (256, 512), BF16)
    assert choice.name == "cpu_int4"
    assert ("cpu_avx2", "CPU lacks AVX2") in choice.rejected


@needs_kernel
def test_read_bytes_reads_every_byte() -> None:
    """The roofline benchmarks' streaming read: the checksum of every 64-bit word, whichever ISA."""
    data = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    words = data.view(torch.int64).view(-1, 8).numpy()
    want = int(np.bitwise_xor.reduce(words, axis=0).sum())
    assert int(cpu_ext.ops().read_bytes(data)) == want


@needs_kernel
def test_shape_only_fakes_agree_with_the_ops() -> None:
    """The captured step traces the ops through their fakes (layers/custom_ops.py): each fake's
    output matches the op's own in shape, dtype and device, on both sides of the row threshold."""
    custom_ops.register_extension_fakes()
    kernel = Avx2WeightOnlyKernel((73, 328), BF16)
    kernel.load(random_weight(SPECS[1], 73, 328, seed=2))
    ops = cpu_ext.ops()
    for rows in (3, avx2._GEMV_MAX_ROWS + 1):
        for dtype in (BF16, F32):
            x = torch.randn(rows, kernel.k_pad).to(dtype)
            args = (x, kernel.packed, kernel.scale, kernel.zz, kernel.lut, None, kernel.fmt, kernel.group, 73)
            for op in (ops.avx2_gemv, ops.avx2_few_rows_mm, ops.avx2_rows_mm):
                torch.library.opcheck(op, args, test_utils="test_faketensor")
