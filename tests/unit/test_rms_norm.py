"""RMSNorm against a float64 reference, whole and a slice of rows at a time (large inputs)."""

from __future__ import annotations

import pytest
import torch

from anyquant.layers import norm as norm_module
from anyquant.layers.norm import RMSNorm


def float64_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("shape", [(7, 64), (300, 4, 32), (1, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sliced_norm_equals_the_whole_one_and_float64(
    shape: tuple[int, ...], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-6)
    norm.weight.data = torch.rand(shape[-1], generator=gen) + 0.5
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    x_view = x.transpose(0, 1).contiguous().transpose(0, 1) if x.dim() == 3 else x  # a strided input
    whole = norm(x_view, torch.float32)
    monkeypatch.setattr(norm_module, "_SLICE_ELEMENTS", 100)  # slices of 1 to 3 rows
    sliced = norm(x_view, torch.float32)
    assert torch.equal(whole, sliced)
    assert norm(x_view).dtype == dtype and torch.equal(norm(x_view), whole.to(dtype))
    truth = float64_rms_norm(x, norm.weight, 1e-6)
    assert float((sliced.double() - truth).norm() / truth.norm()) < 1e-6
