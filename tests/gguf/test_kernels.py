"""GGUF types on the fast CPU kernels: which kernel each gets (and why the others refuse), and
the C++ kernels' answers (cpu_avx512, cpu_avx2: each where this CPU runs it) for weights with
float offsets within their float64 error budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from anyquant.errors import UnsupportedError
from anyquant.quant.formats.gguf_blocks import BLOCK_TYPES, decode_rows
from anyquant.quant.kernels.avx2 import Avx2WeightOnlyKernel
from anyquant.quant.kernels.avx512 import Avx512WeightOnlyKernel, RepackedWeightOnlyKernel
from anyquant.quant.kernels.reference import ReferenceKernel
from anyquant.quant.registry import choose_kernel
from anyquant.quant.weight import QuantWeight
from tests.gguf.fixtures import random_blocks
from tests.helpers.cpu_kernels import expected_kernel, kernel_param
from tests.kernels.test_avx512_kernel import BUDGET, float64_linear, rel_err

CPU = torch.device("cpu")
FAST = ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
KERNELS = [
    kernel_param(cls, probe=BLOCK_TYPES["Q4_K"].spec, kind="linear")
    for cls in (Avx512WeightOnlyKernel, Avx2WeightOnlyKernel)
]


def gguf_weight(kind: str, n: int, k: int, seed: int = 0) -> QuantWeight:
    raw = random_blocks(kind, n, k, np.random.default_rng(seed))
    codes, scale, offset = decode_rows(BLOCK_TYPES[kind], torch.from_numpy(raw))
    return QuantWeight(BLOCK_TYPES[kind].spec, (n, k), codes, scale, offset=offset).validate(kind)


@pytest.mark.parametrize("kind", FAST)
def test_fast_types_get_a_cpp_kernel(kind: str) -> None:
    choice = choose_kernel(BLOCK_TYPES[kind].spec, "linear", CPU, (256, 512), torch.bfloat16)
    want = expected_kernel("cpu_avx512", "", "cpu_avx2")
    if not want:
        pytest.skip("neither cpu_avx512 nor cpu_avx2 runs on this CPU")
    assert choice.name == want, choice.rejected


def test_torch_kernels_refuse_offsets_with_the_reason() -> None:
    """The pure-torch int4 op has integer zero points only: it must refuse, never drop the offsets."""
    with pytest.raises(UnsupportedError, match="cpu_int4: float offsets per group"):
        choose_kernel(BLOCK_TYPES["Q4_K"].spec, "linear", CPU, (256, 512), torch.bfloat16, prefer="cpu_int4")


@pytest.mark.parametrize("cls", KERNELS)
@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q2_K", "Q4_1", "Q5_1", "Q6_K", "Q3_K", "IQ4_XS"])
def test_cpp_kernels_match_float64(kind: str, cls: type[RepackedWeightOnlyKernel]) -> None:
    n, k = 72, 512
    w = gguf_weight(kind, n, k)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(n, generator=gen)
    for dtype in (torch.bfloat16, torch.float32):
        kernel = cls((n, k), dtype)
        kernel.load(w)
        reference = ReferenceKernel((n, k), dtype)
        reference.load(w)
        for t in (1, 3, 64, 300):
            x = torch.randn(t, k, generator=gen).to(dtype)
            b = bias.to(dtype) if t % 2 else None
            y = kernel(x, b)
            truth = float64_linear(x, w, b, dtype)
            err = rel_err(y, truth)
            assert y.dtype == dtype and err <= BUDGET[dtype], f"{kind} T={t} {dtype}: {err:.2e}"
            if dtype == torch.bfloat16:
                assert err <= 1.5 * rel_err(reference(x, b), truth) + 1e-4, f"{kind} T={t}: {err:.2e}"
