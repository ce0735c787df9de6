"""The fast CPU kernels against the reference kernel, their rejections, and their packed memory.

Error budgets: max relative L2 error ||y - y_ref|| / ||y_ref|| of each kernel against the
reference kernel on the same input, one entry per kernel x compute dtype. They measure the
kernel, not quantization quality (both sides use the same quantized weight).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from anyquant.errors import UnsupportedError
from anyquant.quant.kernels import torch_cpu
from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.kernels.reference import ReferenceKernel
from anyquant.quant.reference import fake_quantize_activations
from anyquant.quant.registry import choose_kernel, kernel_classes
from anyquant.quant.spec import ActQuant, LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.conftest import REPO
from tests.helpers.errors import rel_err
from tests.helpers.quant_weights import random_weight
from tests.helpers.spec_vectors import checksums
from tests.kernels.test_reference_kernel import GPTQ_DESCACT_EXPECTED, dense_through, gptq_descact_weight

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

ERROR_BUDGET: dict[tuple[str, torch.dtype], float] = {
    # float32: every kernel forms the same fp32 weights as the reference ((code - zero) * scale,
    # one rounding) or, for W8A8, the same integer products scaled once; only the summation
    # order of the matmul differs (chunks of rows, integer accumulation): ~4e-7 measured.
    ("cpu_int4", F32): 1e-6,
    ("cpu_int8_weight", F32): 1e-6,
    ("cpu_w8a8_int8", F32): 1e-6,
    ("cpu_fp8_dequant", F32): 1e-6,
    # bfloat16. The unpacking paths (T > 64 for int4, T > 32 for int8, always for fp8) form the
    # reference's own bf16 weights; only a different GEMM (row chunks, K padded to whole fp8
    # blocks) flips an occasional output by one bf16 ulp: up to 6e-5 measured (fp8, K = 1056
    # padded to 1152). The fused ops set the int4/int8 budgets:
    # int4 (T <= 64) rounds each group's scale and zero offset (8 - z) * scale to bf16 and then
    # uses the fp32 weights it forms, where the reference rounds every weight to bf16: two
    # independent 2^-9 roundings per weight, 4.2e-3 measured.
    ("cpu_int4", BF16): 8e-3,
    # int8 (T <= 32) rounds the per-row scale to bf16 instead of every weight: 3.9e-3 measured.
    ("cpu_int8_weight", BF16): 8e-3,
    # W8A8 sums exact integer products and scales once in fp32, while the bf16 reference
    # rounds the fake-quantized activations and the weights to bf16 first (the reference's
    # own error, 3.5e-3 measured).
    ("cpu_w8a8_int8", BF16): 7e-3,
    ("cpu_fp8_dequant", BF16): 2e-4,
    # float16: the unpacking paths always (torch's fused ops are scalar loops for fp16 on x86):
    # the reference's fp16 weights, different GEMM summation order (4e-5 measured). W8A8: the
    # reference's fp16 rounding of activations and weights (2^-11), 4.5e-4 measured.
    ("cpu_int4", F16): 1e-4,
    ("cpu_int8_weight", F16): 1e-4,
    ("cpu_w8a8_int8", F16): 1e-3,
    ("cpu_fp8_dequant", F16): 1e-4,
}

# (N, K): group-aligned, and out/in features that are not multiples of 128 (or of 16 / 64).
SHAPES = [(256, 256), (200, 96), (136, 320), (64, 1056)]
TOKENS = (1, 7, 64, 300)  # 1, 7, 64 take the fused int4 op in bf16; 300 the unpacking path
DTYPES = [F32, BF16, F16]

KERNEL_SPECS: dict[str, list[QuantSpec]] = {
    "cpu_int4": [
        QuantSpec("uint4", "group", group_size=32),
        QuantSpec("uint4", "group", group_size=64, has_zero=True),
        QuantSpec("uint4", "group", group_size=128, has_zero=True),
        QuantSpec("uint4", "group", group_size=128, act_order=True),
        QuantSpec("uint4", "group", group_size=32, has_zero=True, act_order=True),
        QuantSpec("uint4", "group", group_size=16, has_zero=True),  # no fused op: unpacking only
        QuantSpec("uint4", "channel", has_zero=True),
        QuantSpec("uint3", "group", group_size=64, has_zero=True),
        QuantSpec("uint2", "group", group_size=128),
    ],
    "cpu_int8_weight": [
        QuantSpec("int8", "channel"),
        QuantSpec("int8", "tensor"),
        QuantSpec("uint8", "channel"),
    ],
    "cpu_w8a8_int8": [
        QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True)),
        QuantSpec("int8", "tensor", act=ActQuant("int8", dynamic=True, granularity="tensor")),
        QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True, scale_divisor=127.5)),
        QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=False, granularity="tensor")),
        QuantSpec("int8", "channel", act=ActQuant("int8", False, "tensor", symmetric=False)),
    ],
    "cpu_fp8_dequant": [
        QuantSpec("fp8_e4m3", "tensor"),
        QuantSpec("fp8_e4m3", "tensor", act=ActQuant("fp8_e4m3", dynamic=False, granularity="tensor")),
        QuantSpec("fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True)),
        QuantSpec("fp8_e4m3", "block", block_shape=(128, 128), act=ActQuant("fp8_e4m3", True, "group", 128)),
        QuantSpec("fp8_e5m2", "block", block_shape=(64, 32)),
    ],
}
CPU = torch.device("cpu")


def kernel_class(name: str) -> type[LinearKernel]:
    return next(cls for cls in kernel_classes() if cls.name == name)


def build(cls: type[LinearKernel], w: QuantWeight, dtype: torch.dtype) -> LinearKernel:
    kernel = cls(w.shape, dtype)
    kernel.load(w)
    return kernel


def grid() -> list[tuple[str, QuantSpec, tuple[int, int]]]:
    cases = []
    for name, specs in KERNEL_SPECS.items():
        for i, spec in enumerate(specs):
            # Every spec on two shapes (rotating), so every shape meets every kernel.
            cases += [(name, spec, SHAPES[i % 4]), (name, spec, SHAPES[(i + 1 + i // 4) % 4])]
    return cases


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("name", "spec", "shape"), grid(), ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v)
)
def test_kernel_matches_reference(
    name: str, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype
) -> None:
    cls = kernel_class(name)
    reason = cls.cannot_run(spec, "linear", CPU, shape, dtype)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    n, k = shape
    w = random_weight(spec, n, k, seed=3 * n + k)
    fast, ref = build(cls, w, dtype), build(ReferenceKernel, w, dtype)
    budget = ERROR_BUDGET[(name, dtype)]
    gen = torch.Generator().manual_seed(n)
    bias = torch.randn(n, generator=gen).to(dtype) * 0.1
    for tokens in TOKENS:
        x = torch.randn(tokens, k, generator=gen).to(dtype)
        # Every path of every kernel meets a bias and no bias somewhere across the dtypes.
        b = bias if tokens in {F32: (1, 64), BF16: (7, 300), F16: (1, 300)}[dtype] else None
        y = fast(x, b)
        assert y.shape == (tokens, n) and y.dtype == dtype and y.is_contiguous()
        err = rel_err(y, ref(x, b))
        assert err <= budget, f"{name} {spec.describe()} {shape} T={tokens} {dtype}: {err:.2e} > {budget:.0e}"


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_int4_gptq_descact_vector_is_exact(asym: bool) -> None:
    """formats.md §12.3 desc_act: the act-order permutation reproduces the spec's W exactly."""
    row0, col0, sums = GPTQ_DESCACT_EXPECTED[asym]
    dense = dense_through(kernel_class("cpu_int4"), gptq_descact_weight(asym))
    assert dense[0].tolist() == row0
    assert dense[:, 0].tolist() == col0
    assert checksums(dense) == sums


def test_int4_rejects_act_order_that_is_not_a_permutation_of_groups() -> None:
    spec = QuantSpec("uint4", "group", group_size=32, act_order=True)
    w = random_weight(spec, 64, 128, seed=0)
    w.group_index = torch.tensor([0] * 40 + [1] * 24 + [2] * 32 + [3] * 32, dtype=torch.int32)
    kernel = kernel_class("cpu_int4")((64, 128), BF16)
    with pytest.raises(UnsupportedError, match="puts 40 input channels in group 0"):
        kernel.load(w)


W8A8 = QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True))
U4 = QuantSpec("uint4", "group", group_size=128)


def rejected(
    name: str,
    spec: QuantSpec | None,
    words: str,
    kind: str = "linear",
    device: str = "cpu",
    shape: tuple[int, int] = (64, 64),
    dtype: torch.dtype = F32,
) -> object:
    """One cannot_run case: the reason must contain `words`."""
    return pytest.param(name, spec, kind, torch.device(device), shape, dtype, words, id=f"{name}-{words}")


REJECTIONS = [
    rejected("cpu_int4", U4, "CPU only", device="meta"),
    rejected("cpu_int4", None, "unquantized"),
    rejected("cpu_int4", U4, "routers keep", kind="router"),
    rejected("cpu_int4", U4, "not matrix multiplications", kind="embedding"),
    rejected("cpu_int4", U4, "float64", dtype=torch.float64),
    rejected("cpu_int4", U4, "no weights", shape=(0, 64)),
    rejected("cpu_int4", QuantSpec("uint8", "group", group_size=128), "uint8"),
    rejected(
        "cpu_int4", QuantSpec("uint4", "group", group_size=32, act=ActQuant("int8", True)), "weight-only"
    ),
    rejected("cpu_int8_weight", U4, "uint4"),
    rejected("cpu_int8_weight", QuantSpec("uint8", "channel", has_zero=True), "asymmetric"),
    rejected("cpu_int8_weight", QuantSpec("int8", "group", group_size=128), "one scale per output channel"),
    rejected("cpu_int8_weight", W8A8, "weight-only"),
    rejected("cpu_w8a8_int8", QuantSpec("int8", "channel"), "not quantized"),
    rejected("cpu_w8a8_int8", QuantSpec("int8", "tensor", act=ActQuant("fp8_e4m3", True)), "fp8_e4m3"),
    rejected("cpu_w8a8_int8", QuantSpec("uint8", "channel", act=ActQuant("int8", True)), "symmetric int8"),
    rejected(
        "cpu_w8a8_int8",
        QuantSpec("int8", "group", group_size=64, act=ActQuant("int8", True)),
        "per-channel or per-tensor",
    ),
    rejected(
        "cpu_w8a8_int8",
        QuantSpec("int8", "channel", act=ActQuant("int8", True, "group", 32)),
        "per-group activation",
    ),
    rejected("cpu_w8a8_int8", W8A8, "int32 accumulator", shape=(64, 1 << 17)),
    rejected("cpu_fp8_dequant", QuantSpec("int8", "channel"), "fp8 weights"),
    rejected("cpu_fp8_dequant", QuantSpec("fp8_e4m3", "channel"), "CPU only", kind="lm_head", device="cuda"),
]


@pytest.mark.parametrize(("name", "spec", "kind", "device", "shape", "dtype", "words"), REJECTIONS)
def test_cannot_run_says_why(
    name: str,
    spec: QuantSpec | None,
    kind: LayerKind,
    device: torch.device,
    shape: tuple[int, int],
    dtype: torch.dtype,
    words: str,
) -> None:
    reason = kernel_class(name).cannot_run(spec, kind, device, shape, dtype)
    assert reason is not None and words in reason, reason


@pytest.mark.parametrize(
    ("spec", "dtype", "expected"),
    [
        (QuantSpec("uint4", "group", group_size=128, has_zero=True), BF16, "cpu_int4"),
        (QuantSpec("uint4", "group", group_size=128, act_order=True), F32, "cpu_int4"),
        (QuantSpec("int8", "channel"), BF16, "cpu_int8_weight"),
        (QuantSpec("fp8_e4m3", "block", block_shape=(128, 128)), BF16, "cpu_fp8_dequant"),
        (QuantSpec("uint8", "group", group_size=128, has_zero=True), BF16, "reference"),
    ],
)
@pytest.mark.parametrize("kind", ["linear", "experts"])
def test_choose_kernel_prefers_fast_kernels(
    spec: QuantSpec, dtype: torch.dtype, expected: str, kind: LayerKind
) -> None:
    """A routed expert's projection is a plain [N, K] linear: the same kernel serves it. The C++
    kernels (tests/kernels/test_avx512_kernel.py, test_avx2_kernel.py) outrank these where they can
    run, AVX-512 first; the pure-torch choice is what serves when they cannot."""
    choice = choose_kernel(spec, kind, CPU, (256, 512), dtype)
    fast = [
        name
        for name in ("cpu_avx512", "cpu_avx2")
        if kernel_class(name).cannot_run(spec, kind, CPU, (256, 512), dtype) is None
    ]
    if fast:
        assert choice.name == fast[0], choice.rejected
        choice = choose_kernel(spec, kind, CPU, (256, 512), dtype, prefer=expected)
    assert choice.name == expected, choice.rejected


def test_choose_kernel_w8a8() -> None:
    reason = kernel_class("cpu_w8a8_int8").cannot_run(W8A8, "linear", CPU, (256, 512), BF16)
    if reason is not None:
        pytest.skip(reason)
    # The AVX512-VNNI kernel (tests/kernels/test_avx512_vnni.py) outranks it where it can run.
    vnni = kernel_class("cpu_avx512_vnni").cannot_run(W8A8, "linear", CPU, (256, 512), BF16) is None
    expected = "cpu_avx512_vnni" if vnni else "cpu_w8a8_int8"
    assert choose_kernel(W8A8, "linear", CPU, (256, 512), BF16).name == expected


@pytest.mark.parametrize(
    ("name", "spec", "max_bytes_per_weight"),
    [
        # 4-bit codes (0.5 B) + fp32 scale/zero and the op's bf16 scale/offset per group of 32.
        ("cpu_int4", QuantSpec("uint4", "group", group_size=32, has_zero=True), 0.5 + 16 / 32),
        ("cpu_int8_weight", QuantSpec("int8", "channel"), 1.05),
        ("cpu_fp8_dequant", QuantSpec("fp8_e4m3", "block", block_shape=(128, 128)), 1.05),
    ],
)
def test_load_keeps_only_packed_weights(name: str, spec: QuantSpec, max_bytes_per_weight: float) -> None:
    w = random_weight(spec, 256, 512, seed=1)
    kernel = build(kernel_class(name), w, BF16)
    held = sum(b.numel() * b.element_size() for b in kernel.buffers())
    assert held <= max_bytes_per_weight * 256 * 512, held
    assert not any(isinstance(v, QuantWeight) for v in vars(kernel).values())


@pytest.mark.parametrize("name", list(KERNEL_SPECS))
def test_zero_tokens(name: str) -> None:
    spec = KERNEL_SPECS[name][0]
    cls = kernel_class(name)
    if (reason := cls.cannot_run(spec, "linear", CPU, (64, 96), BF16)) is not None:
        pytest.skip(reason)
    kernel = build(cls, random_weight(spec, 64, 96, seed=2), BF16)
    assert kernel(torch.empty(0, 96, dtype=BF16)).shape == (0, 64)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_lookup_matches_torch_cast(fp8: torch.dtype) -> None:
    # Every ordered pair of bit patterns (the lookup takes two codes at a time), plus an odd count.
    pairs = torch.cartesian_prod(torch.arange(256), torch.arange(256)).to(torch.uint8).view(fp8)
    for codes in (pairs, pairs.reshape(-1)[:255].reshape(15, 17)):
        want = codes.float()  # torch's own fp8 cast defines the values
        got = torch_cpu._fp8_to_float32(codes)
        assert got.shape == codes.shape
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())  # infinities included
        assert torch.equal(torch.signbit(got), torch.signbit(want))  # -0.0 too


@pytest.mark.parametrize(
    "act",
    [
        ActQuant("int8", dynamic=True),
        ActQuant("int8", dynamic=True, granularity="tensor"),
        ActQuant("int8", dynamic=True, scale_divisor=127.5),  # compressed-tensors' divisor
        ActQuant("int8", dynamic=False, granularity="tensor"),
        ActQuant("int8", dynamic=False, granularity="tensor", symmetric=False),
    ],
    ids=lambda act: f"{act.describe()} /{act.scale_divisor or 127}",
)
def test_w8a8_activation_codes_equal_reference_fake_quant(act: ActQuant) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(33, 200, generator=gen) * 2
    x[3] = 0.0  # an all-zero token
    x[4, 7] = 1e3  # clipped by the static scale
    scale = None if act.dynamic else torch.tensor([0.02])
    zero = torch.tensor([5], dtype=torch.int32) if not act.symmetric else None
    token = act.granularity == "token"
    q, s, z = torch_cpu._quantize_int8_activations(x, token, scale, zero, act.scale_divisor or 127.0)
    dequant = (q.float() - (z if z is not None else 0.0)) * s
    assert torch.equal(dequant, fake_quantize_activations(x, act, scale, zero))


_OTHER_ISA_CHECK = """
import torch
from anyquant.quant.kernels import torch_cpu
from anyquant.quant.kernels.reference import ReferenceKernel
from anyquant.quant.spec import QuantSpec
from tests.helpers.quant_weights import random_weight

print(torch.backends.cpu.get_cpu_capability(), torch_cpu._int4pack_layout())
cases = [
    (torch_cpu.CpuInt4Kernel, QuantSpec("uint4", "group", group_size=32, has_zero=True)),
    (torch_cpu.CpuInt4Kernel, QuantSpec("uint3", "channel")),
    (torch_cpu.CpuInt8WeightKernel, QuantSpec("int8", "channel")),
]
for cls, spec in cases:
    w = random_weight(spec, 200, 96, seed=0)
    for dtype in (torch.float32, torch.bfloat16):
        fast, ref = cls(w.shape, dtype), ReferenceKernel(w.shape, dtype)
        fast.load(w)
        ref.load(w)
        for tokens in (3, 65):
            x = torch.randn(tokens, 96).to(dtype)
            err = float((fast(x).double() - ref(x).double()).norm() / ref(x).double().norm())
            assert err < (1e-6 if dtype == torch.float32 else 8e-3), (spec, dtype, tokens, err)
"""


@pytest.mark.parametrize(("isa", "layout"), [("avx2", "(32, True)"), ("default", "(32, False)")])
def test_kernels_on_other_isas(isa: str, layout: str) -> None:
    """torch packs int4 per ISA (AVX512: 64-row split blocks, AVX2: 32-row split, scalar: 32-row
    pairs) and has per-ISA fused kernels; ATEN_CPU_CAPABILITY makes this CPU use the others."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("needs an x86 CPU with AVX2")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa}
    done = subprocess.run(
        [sys.executable, "-c", _OTHER_ISA_CHECK],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert layout in done.stdout
