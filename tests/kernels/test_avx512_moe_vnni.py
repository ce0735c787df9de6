"""The fused MoE call on int8 activations (FusedInt8Experts) against float64, on both instruction
sets: `moe_experts_vnni` over cpu_avx512_vnni experts (AVX512-VNNI CPUs) and `moe_experts_avx2_a8`
over cpu_avx2_a8 experts (AVX2 CPUs); each test runs for every ISA this CPU has and skips the
others with the reason.

The float64 truth applies the reference's activation quantization (`fake_quantize_activations`,
int8 per token or static per tensor) to x and to h, with the same quantized weights dequantized in
float64. The call's only departure from that definition is h's rounding before it is quantized
(fp32 here; float64 rounded to fp32 there), so a code flips by one where h sits on a rounding
boundary: budget 2e-3 relative L2 (measured: 1e-7 without a flip, up to 6e-4 with one).
Against the per-expert path (the experts' own kernels, the same block kernels and int32 sums):
in float32 the two differ only in h's silu (torch's against the call's fp32 formula), measured
0 to 1e-7, budget 2e-3 (again a flipped code); in bfloat16 the per-expert path rounds every
projection's output and h to bf16 (~1e-2 from float64), so the fused call must be at least about
as close to float64 (1.5x its error + 1e-3).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor

from anyquant.quant.kernels.avx2_a8 import Avx2Int8ActivationKernel
from anyquant.quant.kernels.avx512_moe import FUSED_CALLS, fuse, fusion_from_plan
from anyquant.quant.kernels.avx512_moe_vnni import INT8_OPS, FusedInt8Experts, cannot_fuse_int8
from anyquant.quant.kernels.avx512_vnni import Avx512VnniKernel, Int8ActivationKernel
from anyquant.quant.reference import dequantize
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.helpers.cpu_kernels import kernel_param
from tests.helpers.errors import rel_err
from tests.helpers.threads import at_thread_counts
from tests.kernels.test_avx512_moe import (
    EXPERTS,
    HIDDEN,
    INTER,
    check_slots_held_elsewhere,
    expert_weight,
    float64_moe,
    per_expert,
    routings,
)

F32, BF16 = torch.float32, torch.bfloat16
CPU = torch.device("cpu")
TOKEN = ActQuant("int8", dynamic=True)  # what activation_dtype="int8" gives weight-only layers
W4A8 = [
    QuantSpec("uint4", "group", group_size=32, act=TOKEN),
    QuantSpec("uint4", "group", group_size=64, has_zero=True, act=TOKEN),
    QuantSpec("uint4", "group", group_size=128, act=TOKEN),
    QuantSpec("uint4", "channel", has_zero=True, act=TOKEN),
    QuantSpec("uint3", "group", group_size=32, act=TOKEN),
    QuantSpec("uint2", "group", group_size=32, has_zero=True, act=TOKEN),
    QuantSpec("uint4", "group", group_size=32, act_order=True, act=TOKEN),
    QuantSpec("uint4", "group", group_size=40, has_zero=True, act_order=True, act=TOKEN),
    QuantSpec("uint4", "group", group_size=32, has_offset=True, act=TOKEN),
    QuantSpec("uint4", "group", group_size=64, act=ActQuant("int8", dynamic=False, granularity="tensor")),
]
W8A8 = [
    QuantSpec("int8", "channel", act=TOKEN),
    QuantSpec("uint8", "group", group_size=64, has_zero=True, act=TOKEN),
    QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True, scale_divisor=127.5)),
    QuantSpec("int8", "tensor", act=ActQuant("int8", dynamic=False, granularity="tensor")),
]
BUDGET = 2e-3

KernelClass = type[Int8ActivationKernel]
ISAS: list[KernelClass] = [Avx512VnniKernel, Avx2Int8ActivationKernel]


def isa_param(cls: KernelClass, *values: object) -> object:
    """A pytest param of `cls` (and `values`), skipped with the reason where its kernel cannot run."""
    return kernel_param(cls, *values, probe=W4A8[0], kind="experts")


EVERY_ISA = [isa_param(cls) for cls in ISAS]


def make_experts(
    spec: QuantSpec, dtype: torch.dtype, kernel_class: KernelClass, seed: int = 0
) -> tuple[list[list[QuantWeight]], list[tuple]]:
    """Per expert: the (gate, up, down) weights and their `kernel_class` kernels."""
    weights, kernels = [], []
    for e in range(EXPERTS):
        row_w: list[QuantWeight] = []
        row_k = []
        for i, (n, k) in enumerate(((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))):
            shared = i == 1 and spec.act_order and spec.group_size == 32  # gate and up share g_idx
            w = expert_weight(spec, n, k, seed + 3 * e + i, like=row_w[0] if shared else None)
            kernel = kernel_class((n, k), dtype)
            kernel.load(w)
            row_w.append(w)
            row_k.append(kernel)
        weights.append(row_w)
        kernels.append(tuple(row_k))
    return weights, kernels


def check(
    kernel_class: KernelClass, spec: QuantSpec, dtype: torch.dtype, token_counts: tuple[int, ...], seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    weights_q, kernels = make_experts(spec, dtype, kernel_class)
    dense = [[dequantize(w, torch.float64) for w in row] for row in weights_q]
    fused, reason = fuse(kernels, "silu")
    assert reason is None and isinstance(fused, FusedInt8Experts)
    assert fused.op_name == INT8_OPS[kernel_class]
    for tokens in token_counts:
        x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
        cases = routings(tokens, gen)
        for weights, ids in cases if tokens <= 70 else cases[2:]:  # 512: top-8, and two experts
            y = fused(x, weights, ids)
            assert y.dtype == F32 and y.shape == (tokens, HIDDEN)
            truth = float64_moe(x, weights, ids, dense, weights_q)
            err = rel_err(y, truth)
            where = f"{spec.describe()} {dtype} T={tokens} k={ids.shape[1]}"
            assert err <= BUDGET, f"{where}: {err:.2e}"
            if tokens <= 17:  # the experts' own kernels read the stacked weights now
                mine = per_expert(x, weights, ids, [list(k) for k in kernels])
                ref = rel_err(mine, truth)
                assert err <= 1.5 * ref + 1e-3, f"{where}: {err:.2e} vs per-expert {ref:.2e}"
                if dtype == F32:
                    assert rel_err(y, mine) <= BUDGET, f"{where}: {rel_err(y, mine):.2e} from per-expert"


@pytest.mark.parametrize(("kernel_class", "spec"), [isa_param(c, s) for c in ISAS for s in W4A8 + W8A8])
def test_fused_int8_matches_float64(kernel_class: KernelClass, spec: QuantSpec) -> None:
    """Few rows per expert (1 and 3 tokens: the register-unpack kernels) and many (70 tokens, all on
    one expert in the last routing, and 512: the unpacked-block tiles, more than one pass of 64
    pair rows), top-k 1 / 2 / 8 (most experts get no token at k = 1 and in the two-expert routing),
    bf16 and fp32."""
    check(kernel_class, spec, BF16, (1, 3, 70, 512), seed=7)
    check(kernel_class, spec, F32, (1, 17), seed=8)


@pytest.mark.parametrize("kernel_class", EVERY_ISA)
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_slots_held_elsewhere_are_skipped(kernel_class: KernelClass, dtype: torch.dtype) -> None:
    weights_q, kernels = make_experts(W4A8[1], dtype, kernel_class)
    dense = [[dequantize(w, torch.float64) for w in row] for row in weights_q]
    fused = FusedInt8Experts(kernels)
    check_slots_held_elsewhere(
        fused, dtype, lambda x, weights, ids: float64_moe(x, weights, ids, dense, weights_q), BUDGET
    )
    empty = fused(
        torch.zeros(0, HIDDEN, dtype=dtype), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int64)
    )
    assert empty.shape == (0, HIDDEN)
    with pytest.raises(RuntimeError, match=r"expert id 11 outside \[0, 11\)"):
        fused(torch.zeros(1, HIDDEN, dtype=dtype), torch.ones(1, 1), torch.tensor([[11]]))


@pytest.mark.parametrize(
    ("kernel_class", "spec"), [isa_param(c, s) for c in ISAS for s in (W4A8[0], W4A8[7], W8A8[1])]
)
def test_result_does_not_depend_on_the_thread_count(kernel_class: KernelClass, spec: QuantSpec) -> None:
    """Exact int32 sums and one owner per output column: bit for bit at 1, 2 and 3 threads, at one
    token (runs of blocks) and at 150 (experts with more than one pass of 64 pair rows)."""
    gen = torch.Generator().manual_seed(11)
    _, kernels = make_experts(spec, BF16, kernel_class)
    fused = FusedInt8Experts(kernels)
    for tokens in (1, 150):
        x = torch.randn(tokens, HIDDEN, generator=gen).to(BF16)
        for weights, ids in routings(tokens, gen)[2:]:
            results = at_thread_counts(lambda: fused(x, weights, ids))  # noqa: B023 (called at once)
            assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("kernel_class", EVERY_ISA)
def test_non_finite_input_gives_nan_rows(kernel_class: KernelClass) -> None:
    _, kernels = make_experts(W4A8[0], BF16, kernel_class)
    fused = FusedInt8Experts(kernels)
    x = torch.randn(3, HIDDEN).to(BF16)
    x[1, 5] = float("inf")
    y = fused(x, torch.ones(3, 1), torch.tensor([[0], [0], [1]]))
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()


@pytest.mark.parametrize("kernel_class", EVERY_ISA)
def test_what_cannot_be_fused_is_named(kernel_class: KernelClass) -> None:
    _, kernels = make_experts(W4A8[0], BF16, kernel_class)
    assert "activation gelu" in str(cannot_fuse_int8(kernels, "gelu"))
    _, other = make_experts(W4A8[1], BF16, kernel_class)
    mixed = list(kernels)
    mixed[4] = other[4]
    assert "expert 4 is uint4" in str(cannot_fuse_int8(mixed, "silu"))
    assert "expert 2 runs on no kernel" in str(cannot_fuse_int8([*kernels[:2], (None, None, None)], "silu"))
    # Per-tensor dynamic scales (the per-expert kernels run them): the scale of x would span
    # every token of the call, not each expert's. The per-expert path keeps them.
    per_tensor = replace(W4A8[0], act=ActQuant("int8", dynamic=True, granularity="tensor"))
    _, tensor_kernels = make_experts(per_tensor, BF16, kernel_class)
    assert "per-tensor dynamic scales" in str(cannot_fuse_int8(tensor_kernels, "silu"))
    fused, reason = fuse(tensor_kernels, "silu")
    assert fused is None and "per-tensor dynamic scales" in str(reason)
    static = W8A8[3]
    _, static_kernels = make_experts(static, BF16, kernel_class)
    static_kernels[2][1].static_scale *= 2
    assert "input scales that differ by expert" in str(cannot_fuse_int8(static_kernels, "silu"))
    # inspect's prediction from the plan alone names the int8 call's refusal the same way.
    name = kernel_class.name
    assert "per-tensor dynamic" in str(fusion_from_plan({name}, {per_tensor}, "silu", False))
    assert fusion_from_plan({name}, {W4A8[0]}, "silu", False) is None


def test_inspect_names_each_int8_call() -> None:
    """From the plan alone (any CPU): int8-activation experts fuse, each kernel to its own call."""
    for cls in ISAS:
        assert fusion_from_plan({cls.name}, {W4A8[0]}, "silu", False) is None
        assert fusion_from_plan({cls.name}, {W8A8[3]}, "silu", False) is None
        assert FUSED_CALLS[cls.name].startswith(INT8_OPS[cls])
    assert "AVX2" in FUSED_CALLS[Avx2Int8ActivationKernel.name]


@pytest.mark.parametrize("kernel_class", EVERY_ISA)
def test_fused_op_has_a_shape_only_implementation(kernel_class: KernelClass) -> None:
    """The compiled decode step traces the call through its fake: same shapes and dtype as the op
    (torch.library.opcheck runs both, under fake tensors and AOT autograd)."""
    from anyquant.layers.custom_ops import register_extension_fakes

    register_extension_fakes()
    _, kernels = make_experts(W4A8[1], BF16, kernel_class)
    fused = FusedInt8Experts(kernels)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, HIDDEN, generator=gen).to(BF16)
    ids = torch.rand(5, EXPERTS, generator=gen).topk(2, dim=-1).indices
    stacked: tuple[Tensor | int | None, ...] = (fused.w13, fused.s13, fused.z13, fused.o13)
    stacked += (fused.w2, fused.s2, fused.z2, fused.o2, fused.fmt, fused.zconst)
    stacked += (fused.group13, fused.group2, fused.inter, fused.hidden)
    op = getattr(torch.ops.anyquant_cpu, fused.op_name)
    torch.library.opcheck(
        op,
        (x, ids, torch.rand(5, 2, generator=gen), *stacked),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
