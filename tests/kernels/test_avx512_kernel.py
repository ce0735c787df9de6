"""The C++ AVX512_BF16 kernel (cpu_avx512) against float64, its rejections, its build and its choice.

Error budgets (relative L2 error ||y - y64|| / ||y64|| against a float64 dequantize + matmul of the
same quantized weight and the same (compute-dtype) activations):
- bfloat16: the vector path multiplies exact weight values (code - offset) by the bf16 inputs in
  fp32 and rounds only the output to bf16 (2^-9 relative, ~1.7e-3 measured as an L2 ratio); the
  fp32 tile path rounds each weight to bf16 as the reference does (~2e-3). Budget 4e-3, and never
  worse than the reference kernel's own error by more than 1.5x.
- float32: the vector path splits x into three bf16 parts (24 significant bits) and accumulates in
  fp32; the tile path forms the reference's fp32 weights. Only summation order differs: up to
  ~8e-7 measured. Budget 2e-6.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import Tensor

from anyquant.quant.kernels import avx2, avx512, cpu_ext
from anyquant.quant.kernels.avx512 import Avx512DenseLmHeadKernel, Avx512WeightOnlyKernel
from anyquant.quant.kernels.reference import ReferenceKernel
from anyquant.quant.reference import dequantize, fake_quantize_activations
from anyquant.quant.registry import choose_kernel
from anyquant.quant.spec import ActQuant, LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.conftest import REPO
from tests.helpers.errors import rel_err
from tests.helpers.quant_weights import random_weight
from tests.helpers.repacked_kernels import INTEGER_SPECS, check_dense_lm_head_matches_float64

F32, BF16 = torch.float32, torch.bfloat16
CPU = torch.device("cpu")
BUDGET = {BF16: 4e-3, F32: 2e-6}

SPECS = [
    *INTEGER_SPECS,
    QuantSpec("fp8_e4m3", "tensor"),
    QuantSpec("fp8_e4m3", "channel"),
    QuantSpec("fp8_e4m3", "block", block_shape=(128, 128)),
    QuantSpec("fp8_e5m2", "channel"),
    QuantSpec("fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True)),
    QuantSpec("fp8_e4m3", "block", block_shape=(128, 128), act=ActQuant("fp8_e4m3", True, "group", 128)),
]
# (N, K): out not a multiple of 16 / 64, in not a multiple of the group (a short last group).
SHAPES = [(200, 96), (72, 328)]
TOKENS = (1, 2, 3, 4, 7, 16, 64, 300, 512)

UNAVAILABLE = Avx512WeightOnlyKernel.cannot_run(SPECS[0], "linear", CPU, (64, 64), BF16)
needs_kernel = pytest.mark.skipif(
    UNAVAILABLE is not None, reason=f"cpu_avx512 cannot run here: {UNAVAILABLE}"
)


def float64_linear(x: Tensor, w: QuantWeight, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The kernel's inputs (activations fake-quantized by the reference, in the compute dtype) x W."""
    xq = x if w.spec.act is None else fake_quantize_activations(x, w.spec.act).to(dtype)
    y = xq.double() @ dequantize(w, torch.float64).T
    return y + bias.double() if bias is not None else y


@needs_kernel
@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.describe)
def test_matches_float64(spec: QuantSpec) -> None:
    gen = torch.Generator().manual_seed(3)
    for n, k in SHAPES:
        w = random_weight(spec, n, k, seed=n + k)
        bias = torch.randn(n, generator=gen)
        for dtype in (BF16, F32):
            kernel = Avx512WeightOnlyKernel((n, k), dtype)
            kernel.load(w)
            reference = ReferenceKernel((n, k), dtype)
            reference.load(w)
            for t in TOKENS:
                x = torch.randn(t, k, generator=gen).to(dtype)
                b = bias.to(dtype) if t % 2 else None
                y = kernel(x, b)
                assert y.dtype == dtype and y.shape == (t, n)
                truth = float64_linear(x, w, b, dtype)
                err = rel_err(y, truth)
                where = f"{spec.describe()} {n}x{k} T={t} {dtype}"
                assert err <= BUDGET[dtype], f"{where}: {err:.2e}"
                if dtype == BF16:
                    assert err <= 1.5 * rel_err(reference(x, b), truth) + 1e-4, f"{where}: {err:.2e}"


@needs_kernel
def test_tile_path_forms_the_reference_weights() -> None:
    """The weights the tile path multiplies are the reference's, bit for bit, in both dtypes."""
    for spec in (SPECS[1], SPECS[3], SPECS[6], SPECS[10], SPECS[13]):
        w = random_weight(spec, 72, 328, seed=5)
        for dtype in (BF16, F32):
            kernel = Avx512WeightOnlyKernel((72, 328), dtype)
            kernel.load(w)
            want = dequantize(w, dtype)
            if kernel.perm is not None:
                want = want[:, kernel.perm]
            assert torch.equal(kernel.dequantized(dtype), want), spec.describe()


@needs_kernel
def test_nan_and_extreme_fp8_codes_decode_like_torch() -> None:
    """Every fp8 byte (NaN, subnormals, the largest values) goes through the kernel's table."""
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        name = "fp8_e4m3" if fp8 == torch.float8_e4m3fn else "fp8_e5m2"
        spec = QuantSpec(name, "tensor")
        data = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).reshape(16, 16)
        w = QuantWeight(spec, (16, 16), data, torch.tensor(1.0)).validate("all codes")
        kernel = Avx512WeightOnlyKernel((16, 16), F32)
        kernel.load(w)
        got, want = kernel.dequantized(F32), data.float()
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


@needs_kernel
def test_zero_rows_and_experts_kind() -> None:
    spec = SPECS[0]
    assert Avx512WeightOnlyKernel.cannot_run(spec, "experts", CPU, (64, 96), BF16) is None
    kernel = Avx512WeightOnlyKernel((64, 96), BF16)
    kernel.load(random_weight(spec, 64, 96, seed=1))
    assert kernel(torch.empty(0, 96, dtype=BF16)).shape == (0, 64)


@needs_kernel
def test_packed_memory() -> None:
    """int4 keeps half a byte per weight plus fp32 scales (and zero points) per group of 16 rows."""
    w = random_weight(QuantSpec("uint4", "group", group_size=32, has_zero=True), 256, 512, seed=1)
    kernel = Avx512WeightOnlyKernel((256, 512), BF16)
    kernel.load(w)
    held = sum(b.numel() * b.element_size() for b in kernel.buffers())
    assert held <= (0.5 + 8 / 32) * 256 * 512 + 1024, held


def test_cpu_reason_matches_cpuinfo() -> None:
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if not flags:
        pytest.skip("no /proc/cpuinfo flags")
    has = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= flags
    assert (avx512._cpu_reason() is None) == has, avx512._cpu_reason()


@pytest.mark.parametrize(
    ("spec", "kind", "device", "dtype", "words"),
    [
        (SPECS[0], "linear", "meta", BF16, "CPU only"),
        (None, "linear", "cpu", BF16, "unquantized"),
        (SPECS[0], "embedding", "cpu", BF16, "embedding layers"),
        (SPECS[0], "router", "cpu", F32, "MoE routers keep the reference kernel"),
        (SPECS[0], "linear", "cpu", torch.float16, "not bfloat16 or float32"),
        (
            QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True)),
            "linear",
            "cpu",
            BF16,
            "weight-only",
        ),
        (QuantSpec("fp8_e4m3", "block", block_shape=(128, 100)), "linear", "cpu", BF16, "multiple of 8"),
    ],
)
def test_cannot_run_says_why(
    spec: QuantSpec | None, kind: LayerKind, device: str, dtype: torch.dtype, words: str
) -> None:
    reason = Avx512WeightOnlyKernel.cannot_run(spec, kind, torch.device(device), (64, 64), dtype)
    assert reason is not None and words in reason, reason


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("cpu", "CPU lacks avx512_bf16 (vdpbf16ps)"),
        ("ext", "C++ extension unavailable: x.cpp:1: error: boom"),
    ],
)
def test_fallback_serves_with_the_reason(monkeypatch: pytest.MonkeyPatch, where: str, reason: str) -> None:
    """Without the instructions or the library the pure-torch kernel serves, and says why."""
    monkeypatch.setattr(avx2, "_cpu_reason", lambda: "CPU lacks AVX2")  # not the AVX2 kernel either
    if where == "cpu":
        monkeypatch.setattr(avx512, "_cpu_reason", lambda: reason)
    else:
        monkeypatch.setattr(avx512, "_cpu_reason", lambda: None)
        monkeypatch.setattr(cpu_ext, "unavailable_reason", lambda: reason)
    choice = choose_kernel(SPECS[2], "linear", CPU, (256, 512), BF16)
    assert choice.name == "cpu_int4"
    assert ("cpu_avx512", reason) in choice.rejected


def test_failed_build_is_a_one_line_reason(tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "broken.cpp"
    source.write_text("int broken( {\n")
    reason = cpu_ext.build_library("anyquant_broken_test", [source], tmp_path / "build")
    assert reason is not None and reason.startswith("C++ extension unavailable: ") and "error" in reason, (
        reason
    )
    assert "\n" not in reason


def test_import_anyquant_does_not_build_or_load_the_extension() -> None:
    code = (
        "import sys, anyquant, anyquant.quant.registry as r; r.kernel_classes(); "
        "import torch; assert 'anyquant.quant.kernels.cpu_ext' in sys.modules; "
        "assert not any('anyquant_cpu' in str(l) for l in torch.ops.loaded_libraries); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@needs_kernel
@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.describe)
@pytest.mark.parametrize("kind", ["linear", "experts", "lm_head"])
def test_this_machine_runs_the_fast_path(spec: QuantSpec, kind: LayerKind) -> None:
    """On an AVX512_BF16 CPU every weight-only spec here gets cpu_avx512, on the path pinned below."""
    for dtype in (BF16, F32):
        choice = choose_kernel(spec, kind, CPU, (200, 328), dtype)
        assert choice.name == "cpu_avx512", choice.rejected
    kernel = Avx512WeightOnlyKernel((200, 328), BF16)
    kernel32 = Avx512WeightOnlyKernel((200, 328), F32)
    assert [kernel.path(t) for t in (1, 4, 5, 64, 512)] == ["gemv", "gemv", "gemm", "gemm", "gemm"]
    assert [kernel32.path(t) for t in (1, 2, 3, 64, 512)] == ["gemv", "gemv", "tiled", "tiled", "tiled"]


def test_dense_lm_head_names_its_path_by_rows() -> None:
    """The captured step groups its buckets by `path(rows)` (engine/capture.py): the LM head's
    answer must be the op it calls, which needs no AVX-512 to check."""
    head = Avx512DenseLmHeadKernel((200, 328), BF16)
    assert [head.path(t) for t in (1, 4, 5, 64, 512)] == ["gemv", "gemv", "gemm", "gemm", "gemm"]


@needs_kernel
def test_dense_lm_head_matches_float64_and_reads_tied_rows() -> None:
    check_dense_lm_head_matches_float64(Avx512DenseLmHeadKernel, ((200, 100), (72, 328)), TOKENS)


@pytest.mark.parametrize(
    ("spec", "kind", "dtype", "words"),
    [
        (SPECS[0], "lm_head", BF16, "quantized"),
        (None, "linear", BF16, "only the unquantized LM head"),
        (None, "lm_head", F32, "only bfloat16"),
    ],
)
def test_dense_lm_head_cannot_run_says_why(
    spec: QuantSpec | None, kind: LayerKind, dtype: torch.dtype, words: str
) -> None:
    reason = Avx512DenseLmHeadKernel.cannot_run(spec, kind, CPU, (64, 64), dtype)
    assert reason is not None and words in reason, reason


@needs_kernel
def test_this_machine_runs_the_dense_lm_head_fast_path() -> None:
    assert choose_kernel(None, "lm_head", CPU, (1000, 64), BF16).name == "cpu_avx512_lm_head"
    assert choose_kernel(None, "lm_head", CPU, (1000, 64), F32).name == "dense"
    assert choose_kernel(None, "linear", CPU, (1000, 64), BF16).name == "dense"
