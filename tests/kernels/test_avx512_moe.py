"""The fused MoE call (FusedExperts) against float64 and the per-expert path, on both instruction
sets: `moe_experts` over cpu_avx512 experts (AVX512_BF16 CPUs) and `moe_experts_avx2` over cpu_avx2
experts (AVX2 + FMA CPUs); each test runs for every ISA this CPU has and skips the others with the
reason. Both take int2-8 and fp8 weights and fp8 activations; int8 activations (W8A8 twins) are
AVX-512 only.

The float64 truth: the same quantized weights dequantized in float64, the same (compute-dtype)
activations, out[t] = sum_j w[t, j] * down(silu(gate(x[t])) * up(x[t])) over the chosen experts.
Budgets (relative L2 error): bfloat16 4e-3, and never worse than the per-expert path (which rounds
every projection's output to bf16) by more than 1.5x; float32 2e-6 (AVX-512: x and h are split
into three exact bf16 parts; AVX2: fp32 FMA over the reference's fp32 weights; so only summation
order differs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from anyquant.quant.kernels.avx2 import Avx2WeightOnlyKernel
from anyquant.quant.kernels.avx512 import Avx512WeightOnlyKernel, RepackedWeightOnlyKernel
from anyquant.quant.kernels.avx512_moe import FusedExperts, cannot_fuse, fuse, fusion_from_plan
from anyquant.quant.reference import dequantize, fake_quantize_activations
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.helpers.cpu_kernels import kernel_param
from tests.helpers.errors import rel_err
from tests.helpers.quant_weights import random_weight
from tests.helpers.threads import at_thread_counts

F32, BF16 = torch.float32, torch.bfloat16
CPU = torch.device("cpu")
BUDGET = {BF16: 4e-3, F32: 2e-6}
SPECS = [
    QuantSpec("uint4", "group", group_size=32),
    QuantSpec("uint4", "group", group_size=64, has_zero=True),
    QuantSpec("uint4", "channel", has_zero=True),
    QuantSpec("uint3", "group", group_size=32),
    QuantSpec("uint2", "group", group_size=32, has_zero=True),
    QuantSpec("int8", "channel"),
    QuantSpec("uint8", "group", group_size=64, has_zero=True),
    QuantSpec("fp8_e4m3", "tensor"),
    QuantSpec("fp8_e4m3", "block", block_shape=(128, 128)),
    QuantSpec("fp8_e5m2", "channel"),
]
# E = 11 experts (a multiple of nothing), hidden 200 and intermediate 88: neither a multiple of
# 16 rows nor of the groups, so every padding path runs.
EXPERTS, HIDDEN, INTER = 11, 200, 88

UNAVAILABLE = Avx512WeightOnlyKernel.cannot_run(SPECS[0], "experts", CPU, (64, 64), BF16)
needs_kernel = pytest.mark.skipif(
    UNAVAILABLE is not None, reason=f"cpu_avx512 cannot run here: {UNAVAILABLE}"
)
KernelClass = type[RepackedWeightOnlyKernel]
ISAS: list[KernelClass] = [Avx512WeightOnlyKernel, Avx2WeightOnlyKernel]
OPS = {Avx512WeightOnlyKernel: "moe_experts", Avx2WeightOnlyKernel: "moe_experts_avx2"}


def isa_param(cls: KernelClass, *values: object) -> object:
    """A pytest param of `cls` (and `values`), skipped with the reason where its kernel cannot run."""
    return kernel_param(cls, *values, probe=SPECS[0], kind="experts")


EVERY_ISA = [isa_param(cls) for cls in ISAS]


# Fused since act-order orders and float offsets are passed to the call: GPTQ act-order (group 32:
# gate and up share their expert's g_idx, as GPTQ tools write them; group 40: each projection has
# its own, as anyquant's own quantizer writes them) and GGUF-style float offsets per group
# (code * scale + offset).
FUSED_EXTRA = [
    QuantSpec("uint4", "group", group_size=32, act_order=True),
    QuantSpec("uint4", "group", group_size=40, has_zero=True, act_order=True),
    QuantSpec("uint4", "group", group_size=32, has_offset=True),
    QuantSpec("uint8", "group", group_size=64, has_offset=True),
]


def expert_weight(spec: QuantSpec, n: int, k: int, seed: int, like: QuantWeight | None = None) -> QuantWeight:
    """random_weight, with float offsets where the spec has them, and `like`'s act-order g_idx."""
    w = random_weight(replace(spec, has_offset=False), n, k, seed=seed)
    if spec.has_offset:
        gen = torch.Generator().manual_seed(seed + 1000)
        w = replace(w, spec=spec, offset=0.02 * torch.randn(w.scale.shape, generator=gen))
    if like is not None and spec.act_order:
        w = replace(w, group_index=like.group_index)
    return w.validate("random")


def make_experts(
    spec: QuantSpec, dtype: torch.dtype, seed: int = 0, kernel_class: KernelClass = Avx512WeightOnlyKernel
) -> list[list[tuple[QuantWeight, Tensor]]]:
    """Per expert: [(weight, kernel)] for gate, up, down, on `kernel_class`."""
    experts = []
    for e in range(EXPERTS):
        row: list[tuple[QuantWeight, Tensor]] = []
        for i, (n, k) in enumerate(((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))):
            shared = i == 1 and spec.act_order and spec.group_size == 32
            w = expert_weight(spec, n, k, seed + 3 * e + i, like=row[0][0] if shared else None)
            kernel = kernel_class((n, k), dtype)
            kernel.load(w)
            row.append((w, kernel))
        experts.append(row)
    return experts


def float64_moe(
    x: Tensor,
    weights: Tensor,
    ids: Tensor,
    dense: list[list[Tensor]],
    quantized: list[list[QuantWeight]] | None = None,
) -> Tensor:
    """Slots with id -1 (an expert another rank holds) contribute nothing. With `quantized` weights
    whose spec quantizes activations, x and h pass the reference's activation quantization."""

    def act_q(v: Tensor, w: QuantWeight | None) -> Tensor:
        if w is None or w.spec.act is None:
            return v
        return fake_quantize_activations(v.float().unsqueeze(0), w.spec.act, w.input_scale)[0].double()

    xd = x.double()
    out = torch.zeros(x.shape[0], HIDDEN, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gate, up, down = dense[e]
            ws = quantized[e] if quantized is not None else [None, None, None]
            xt = act_q(xd[t], ws[0])
            h = torch.nn.functional.silu(gate @ xt) * (up @ xt)
            out[t] += float(weights[t, j]) * (down @ act_q(h, ws[2]))
    return out


def per_expert(x: Tensor, weights: Tensor, ids: Tensor, kernels: list[list[Tensor]]) -> Tensor:
    """What the per-expert path computes: each projection rounded to the compute dtype."""
    out = torch.zeros(x.shape[0], HIDDEN)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            gate, up, down = kernels[int(ids[t, j])]
            xt = x[t : t + 1]
            h = torch.nn.functional.silu(gate(xt)) * up(xt)
            out[t] += float(weights[t, j]) * down(h)[0].float()
    return out


def routings(tokens: int, gen: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """(weights, ids) for top-k 1, 2 and 8: random experts, only a few experts used (most receive no
    token), and every token on one expert (that expert gets all of them)."""
    out = []
    for k in (1, 2, 8):
        scores = torch.rand(tokens, EXPERTS, generator=gen)
        ids = scores.topk(k, dim=-1).indices
        out.append((torch.rand(tokens, k, generator=gen), ids))
    few = torch.rand(tokens, 2, generator=gen)
    few_ids = torch.stack([torch.full((tokens,), 3), torch.randint(8, 10, (tokens,), generator=gen)], dim=1)
    out.append((few, few_ids))
    return out


@pytest.mark.parametrize(
    ("kernel_class", "spec"),
    [isa_param(cls, spec) for cls in ISAS for spec in SPECS + FUSED_EXTRA],
)
def test_fused_matches_float64(kernel_class: KernelClass, spec: QuantSpec) -> None:
    gen = torch.Generator().manual_seed(7)
    for dtype in (BF16, F32):
        experts = make_experts(spec, dtype, kernel_class=kernel_class)
        dense = [[dequantize(w, torch.float64) for w, _ in row] for row in experts]
        kernels = [[k for _, k in row] for row in experts]
        assert cannot_fuse([tuple(ks) for ks in kernels], "silu") is None
        fused = FusedExperts([tuple(ks) for ks in kernels])
        assert fused.op_name == OPS[kernel_class]
        for tokens in (1, 3, 17, 70):
            x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
            for weights, ids in routings(tokens, gen):
                y = fused(x, weights, ids)
                assert y.dtype == F32 and y.shape == (tokens, HIDDEN)
                truth = float64_moe(x, weights, ids, dense)
                err = rel_err(y, truth)
                where = f"{spec.describe()} {dtype} T={tokens} k={ids.shape[1]}"
                assert err <= BUDGET[dtype], f"{where}: {err:.2e}"
                if dtype == BF16 and tokens <= 17:
                    # The experts' own kernels read the stacked weights now: still their results.
                    assert err <= 1.5 * rel_err(per_expert(x, weights, ids, kernels), truth) + 1e-4, where


# fp8 activations: dynamic per token, per group (FP8 block checkpoints) and static per tensor.
FP8_ACT = [
    QuantSpec("fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True)),
    QuantSpec("fp8_e4m3", "block", block_shape=(128, 128), act=ActQuant("fp8_e4m3", True, "group", 128)),
    QuantSpec("fp8_e4m3", "tensor", act=ActQuant("fp8_e4m3", dynamic=False, granularity="tensor")),
]


@pytest.mark.parametrize(("kernel_class", "spec"), [isa_param(cls, spec) for cls in ISAS for spec in FP8_ACT])
def test_fused_fp8_activations(kernel_class: KernelClass, spec: QuantSpec) -> None:
    """Against float64 with the reference's activation quantization of x and h. float32 compute
    quantizes the same values (only summation order differs); bfloat16 rounds h, so a value near an
    fp8 rounding boundary may round the other way: the budget is the per-expert path's (which
    rounds more: up to 4e-2 here), and the fused call must never be much worse than it."""
    gen = torch.Generator().manual_seed(5)
    for dtype in (BF16, F32):
        experts = make_experts(spec, dtype, kernel_class=kernel_class)
        dense = [[dequantize(w, torch.float64) for w, _ in row] for row in experts]
        quantized = [[w for w, _ in row] for row in experts]
        kernels = [[k for _, k in row] for row in experts]
        assert cannot_fuse([tuple(ks) for ks in kernels], "silu") is None
        fused = FusedExperts([tuple(ks) for ks in kernels])
        assert fused.op_name == OPS[kernel_class]
        for tokens in (1, 17):
            x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
            for weights, ids in routings(tokens, gen):
                truth = float64_moe(x, weights, ids, dense, quantized)
                err = rel_err(fused(x, weights, ids), truth)
                where = f"{spec.describe()} {dtype} T={tokens} k={ids.shape[1]}"
                assert err <= (5e-2 if dtype == BF16 else 1e-5), f"{where}: {err:.2e}"
                assert err <= 1.5 * rel_err(per_expert(x, weights, ids, kernels), truth) + 5e-3, where


@pytest.mark.parametrize("kernel_class", EVERY_ISA)
def test_no_tokens_and_bad_ids(kernel_class: KernelClass) -> None:
    experts = make_experts(SPECS[0], BF16, kernel_class=kernel_class)
    fused = FusedExperts([tuple(k for _, k in row) for row in experts])
    empty = fused(torch.zeros(0, HIDDEN, dtype=BF16), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int64))
    assert empty.shape == (0, HIDDEN)
    with pytest.raises(RuntimeError, match=r"expert id 11 outside \[0, 11\)"):
        fused(torch.zeros(1, HIDDEN, dtype=BF16), torch.ones(1, 1), torch.tensor([[11]]))
    with pytest.raises(RuntimeError, match=r"expert id -2 outside"):
        fused(torch.zeros(1, HIDDEN, dtype=BF16), torch.ones(1, 1), torch.tensor([[-2]]))


@pytest.mark.parametrize("kernel_class", EVERY_ISA)
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_slots_held_elsewhere_are_skipped(kernel_class: KernelClass, dtype: torch.dtype) -> None:
    """Expert parallelism passes -1 for experts another rank holds: those slots add nothing,
    including tokens with no slot here at all and calls where no slot is held."""
    experts = make_experts(SPECS[1], dtype, kernel_class=kernel_class)
    dense = [[dequantize(w, torch.float64) for w, _ in row] for row in experts]
    fused = FusedExperts([tuple(k for _, k in row) for row in experts])
    check_slots_held_elsewhere(
        fused, dtype, lambda x, weights, ids: float64_moe(x, weights, ids, dense), BUDGET[dtype]
    )


def check_slots_held_elsewhere(
    fused: torch.nn.Module,
    dtype: torch.dtype,
    truth: Callable[[Tensor, Tensor, Tensor], Tensor],
    budget: float,
) -> None:
    """A fused call (bf16 or int8) given expert ids with -1 for the experts 6..10 another rank
    holds: within `budget` of `truth(x, weights, ids)`, zeros for tokens with no slot here, and
    zeros when no slot at all is held."""
    gen = torch.Generator().manual_seed(3)
    for tokens, k in ((1, 8), (5, 2), (40, 1), (33, 8)):
        x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
        weights = torch.rand(tokens, k, generator=gen)
        ids = torch.rand(tokens, EXPERTS, generator=gen).topk(k, dim=-1).indices
        ids = torch.where(ids >= 6, -1, ids)  # experts 6..10 live on another rank
        y = fused(x, weights, ids)
        assert rel_err(y, truth(x, weights, ids)) <= budget, (tokens, k)
        nowhere = (ids < 0).all(dim=1)
        assert torch.equal(y[nowhere], torch.zeros_like(y[nowhere]))
    none = fused(x, weights, torch.full_like(ids, -1))
    assert torch.equal(none, torch.zeros_like(none))


@pytest.mark.parametrize(
    ("kernel_class", "spec"), [isa_param(cls, spec) for cls in ISAS for spec in (SPECS[1], FUSED_EXTRA[2])]
)
def test_fused_result_does_not_depend_on_the_thread_count(kernel_class: KernelClass, spec: QuantSpec) -> None:
    """Each thread owns a range of output columns of the down projection and adds the experts in
    id order, 64 pair rows at a time: the same operations per output element at any thread count
    (bit for bit), including experts that receive more than one pass of rows (150 tokens on
    expert 3), thread ranges that start inside an expert's gate / up blocks, and one token (the
    few-row path: one kernel call per run of blocks)."""
    gen = torch.Generator().manual_seed(11)
    for dtype in (BF16, F32):
        experts = make_experts(spec, dtype, kernel_class=kernel_class)
        dense = [[dequantize(w, torch.float64) for w, _ in row] for row in experts]
        fused = FusedExperts([tuple(k for _, k in row) for row in experts])
        for tokens in (1, 150):
            x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
            _same_at_every_thread_count(fused, x, routings(tokens, gen)[2:], dense, BUDGET[dtype])


def _same_at_every_thread_count(
    fused: FusedExperts,
    x: Tensor,
    cases: list[tuple[Tensor, Tensor]],
    dense: list[list[Tensor]],
    budget: float,
) -> None:
    for weights, ids in cases:  # top-8, and two experts for every token
        results = at_thread_counts(lambda: fused(x, weights, ids))  # noqa: B023 (called at once)
        assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
        assert rel_err(results[0], float64_moe(x, weights, ids, dense)) <= budget


@needs_kernel
def test_what_cannot_be_fused_is_named() -> None:
    def kernels(spec: QuantSpec) -> list[tuple[Avx512WeightOnlyKernel, ...]]:
        return [tuple(k for _, k in row) for row in make_experts(spec, BF16)]

    assert "activation gelu" in str(cannot_fuse(kernels(SPECS[0]), "gelu"))
    per_tensor = QuantSpec(
        "fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True, granularity="tensor")
    )
    assert "per-tensor dynamic scales" in str(cannot_fuse(kernels(per_tensor), "silu"))
    static = QuantSpec("fp8_e4m3", "tensor", act=ActQuant("fp8_e4m3", dynamic=False, granularity="tensor"))
    rows = kernels(static)
    rows[3][1].input_scale = rows[3][1].input_scale * 2
    assert "input scales that differ by expert" in str(cannot_fuse(rows, "silu"))
    mixed = kernels(SPECS[0])
    mixed[4] = kernels(SPECS[5])[4]
    assert "expert 4 is int8" in str(cannot_fuse(mixed, "silu"))
    assert "no kernel" in str(cannot_fuse([(None, None, None)], "silu"))


@pytest.mark.parametrize("kernel_class", [isa_param(Avx2WeightOnlyKernel)])
def test_avx2_experts_fuse_to_the_avx2_call(kernel_class: KernelClass) -> None:
    """cpu_avx2 experts get `moe_experts_avx2` from `fuse` (what the layer calls at load), and what
    it cannot take is named as for the AVX-512 call."""

    def kernels(spec: QuantSpec) -> list[tuple[RepackedWeightOnlyKernel, ...]]:
        return [tuple(k for _, k in row) for row in make_experts(spec, BF16, kernel_class=kernel_class)]

    rows = kernels(SPECS[1])
    fused, reason = fuse(rows, "silu")
    assert reason is None and isinstance(fused, FusedExperts) and fused.op_name == "moe_experts_avx2"
    assert "activation gelu" in str(cannot_fuse(rows, "gelu"))
    mixed = kernels(SPECS[0])
    mixed[4] = kernels(SPECS[5])[4]
    assert "expert 4 is int8" in str(cannot_fuse(mixed, "silu"))
    assert "expert 2 runs on no kernel" in str(cannot_fuse([*rows[:2], (None, None, None)], "silu"))
    per_tensor = QuantSpec(
        "fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True, granularity="tensor")
    )
    assert "per-tensor dynamic scales" in str(cannot_fuse(kernels(per_tensor), "silu"))
    static = kernels(
        QuantSpec("fp8_e4m3", "tensor", act=ActQuant("fp8_e4m3", dynamic=False, granularity="tensor"))
    )
    assert cannot_fuse(static, "silu") is None
    static[3][1].input_scale = static[3][1].input_scale * 2
    assert "input scales that differ by expert" in str(cannot_fuse(static, "silu"))
    # e4m3fn: an expert with a NaN code decodes with the NaN fix, the others without: not one call.
    fp8 = kernels(SPECS[7])
    w = random_weight(SPECS[7], INTER, HIDDEN, seed=1)
    codes = w.data.view(torch.uint8).clone()
    codes[0, 0] = 0x7F
    nan_gate = Avx2WeightOnlyKernel((INTER, HIDDEN), BF16)
    nan_gate.load(replace(w, data=codes.view(w.data.dtype)))
    fp8[5] = (nan_gate, *fp8[5][1:])
    assert "expert 5's codes are packed as format" in str(cannot_fuse(fp8, "silu"))


def test_inspect_names_the_avx2_call() -> None:
    """From the plan alone (any CPU): cpu_avx2 experts fuse, named as the AVX2 call, fp8 ones with
    fp8 activations too; int8 activations would not (the AVX2 call takes fp8 activations only)."""
    from anyquant.quant.kernels.avx512_moe import FUSED_CALLS

    assert fusion_from_plan({"cpu_avx2"}, {SPECS[1]}, "silu", False) is None
    assert FUSED_CALLS["cpu_avx2"].startswith("moe_experts_avx2")
    fp8 = QuantSpec("fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True))
    assert fusion_from_plan({"cpu_avx2"}, {fp8}, "silu", False) is None
    int8 = QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True))
    assert "fp8 activations only" in str(fusion_from_plan({"cpu_avx2"}, {int8}, "silu", False))
    assert "not cpu_avx512" in str(fusion_from_plan({"cpu_fp8_dequant"}, {fp8}, "silu", False))


@pytest.mark.parametrize("kernel_class", EVERY_ISA)
def test_fused_op_has_a_shape_only_implementation(kernel_class: KernelClass) -> None:
    """The compiled decode step traces the call through its fake: same shapes and dtype as the op
    (torch.library.opcheck runs both, under fake tensors and AOT autograd)."""
    from anyquant.layers.custom_ops import register_extension_fakes
    from anyquant.quant.kernels import cpu_ext

    register_extension_fakes()
    fused = FusedExperts(
        [tuple(k for _, k in row) for row in make_experts(SPECS[1], BF16, kernel_class=kernel_class)]
    )
    gen = torch.Generator().manual_seed(4)
    x = torch.nn.functional.pad(torch.randn(5, HIDDEN, generator=gen), (0, fused.k_pad - HIDDEN)).to(BF16)
    ids = torch.rand(5, EXPERTS, generator=gen).topk(2, dim=-1).indices
    args = (
        x,
        ids,
        torch.rand(5, 2, generator=gen),
        fused.w13,
        fused.s13,
        fused.z13,
        fused.w2,
        fused.s2,
        fused.z2,
    )
    args += (fused.lut, fused.fmt, fused.group13, fused.group2, fused.inter, fused.hidden)
    op = getattr(torch.ops.anyquant_cpu, fused.op_name)
    assert cpu_ext.ops() is not None
    torch.library.opcheck(
        op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    )


W8A8 = [
    QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True)),
    QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True, scale_divisor=127.5)),
    QuantSpec("int8", "tensor", act=ActQuant("int8", dynamic=False, granularity="tensor")),
]


@needs_kernel
@pytest.mark.parametrize("spec", W8A8, ids=lambda s: f"{s.describe()} /{s.act.scale_divisor}")
def test_w8a8_int8_experts_are_fused(spec: QuantSpec) -> None:
    """W8A8 int8 experts (cpu_w8a8_int8: exact int32 GEMMs, one expert at a time) run fused on
    AVX-512 twins over the same codes: against float64 with the reference's activation
    quantization, and the int8 per-expert path itself."""
    from anyquant.quant.kernels.avx512_moe import weight_only_twins
    from anyquant.quant.kernels.torch_cpu import CpuW8A8Int8Kernel

    if CpuW8A8Int8Kernel.cannot_run(spec, "experts", CPU, (INTER, HIDDEN), BF16) is not None:
        pytest.skip("cpu_w8a8_int8 cannot run here")
    gen = torch.Generator().manual_seed(9)
    for dtype in (BF16, F32):
        weights_q, int8 = [], []
        for e in range(EXPERTS):
            row_w, row_k = [], []
            for i, (n, k) in enumerate(((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))):
                w = random_weight(spec, n, k, seed=3 * e + i)
                kernel = CpuW8A8Int8Kernel((n, k), dtype)
                kernel.load(w)
                row_w.append(w)
                row_k.append(kernel)
            weights_q.append(row_w)
            int8.append(tuple(row_k))
        twins = weight_only_twins(int8)
        assert twins is not None and cannot_fuse(twins, "silu") is None
        fused = FusedExperts(twins)
        dense = [[dequantize(w, torch.float64) for w in row] for row in weights_q]
        for tokens in (1, 17):
            x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
            for weights, ids in routings(tokens, gen):
                truth = float64_moe(x, weights, ids, dense, weights_q)
                err = rel_err(fused(x, weights, ids), truth)
                where = f"{spec.describe()} {dtype} T={tokens} k={ids.shape[1]}"
                assert err <= (3e-2 if dtype == BF16 else 1e-5), f"{where}: {err:.2e}"
                ref = rel_err(per_expert(x, weights, ids, [list(ks) for ks in int8]), truth)
                assert err <= 1.5 * ref + 5e-3, f"{where}: {err:.2e} vs per-expert {ref:.2e}"


def test_w8a8_twins_only_for_int8_gemm_experts() -> None:
    from anyquant.quant.kernels.avx512_moe import weight_only_twins

    assert weight_only_twins([]) is None
    assert weight_only_twins([tuple(k for _, k in make_experts(SPECS[0], BF16)[0])]) is None
