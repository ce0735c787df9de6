"""The dense kernel: one row (the matrix-vector path for 16-bit weights) and many rows give the
float64 product of the rounded weight to the dtype's precision, with and without bias."""

from __future__ import annotations

import pytest
import torch

from anyquant.quant.kernels.dense import DenseKernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_kernel_matches_float64(dtype: torch.dtype, rows: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 64, generator=g)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    bias = torch.randn(300, generator=g).to(dtype) if with_bias else None
    kernel = DenseKernel((300, 64), dtype)
    kernel.load(w)
    y = kernel(x, bias)
    expected = x.double() @ w.to(dtype).double().T + (bias.double() if bias is not None else 0.0)
    assert y.dtype == dtype and y.shape == (rows, 300)
    rel = float((y.double() - expected).norm() / expected.norm())
    assert rel < {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
