"""Rotary embedding from cached tables against the rotation written out in float64."""

from __future__ import annotations

import pytest
import torch

from anyquant.layers.rotary import RotaryEmbedding

PARAMS = {"rope_theta": 10000.0, "rope_type": "default"}


def _reference(x: torch.Tensor, positions: torch.Tensor, dim: int, interleaved: bool) -> torch.Tensor:
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angle = positions.double()[:, None, None] * inv  # [T, 1, dim/2]
    x = x.double()
    first, second = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : dim // 2], x[..., dim // 2 :])
    a = first * angle.cos() - second * angle.sin()
    b = second * angle.cos() + first * angle.sin()
    return torch.stack((a, b), dim=-1).flatten(-2) if interleaved else torch.cat((a, b), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotation_matches_float64_and_tables_grow(interleaved: bool) -> None:
    rotary = RotaryEmbedding(16, PARAMS, max_position=64, interleaved=interleaved)
    g = torch.Generator().manual_seed(0)
    for positions in (torch.tensor([0, 1, 2, 7]), torch.tensor([5000, 9000])):  # the second grows the tables
        x = torch.randn(len(positions), 3, 16, generator=g)
        cos, sin = rotary.cos_sin(positions)
        got = rotary.rotate(x, cos, sin)
        assert torch.allclose(
            got.double(),
            _reference(x, positions, 16, interleaved),
            atol=2e-3 if positions.max() > 4096 else 1e-5,
        )
    assert rotary._cos.shape[0] > 9000


def test_rotation_in_bfloat16_stays_in_bfloat16() -> None:
    rotary = RotaryEmbedding(8, PARAMS, max_position=32)
    positions = torch.arange(5)
    cos, sin = rotary.cos_sin(positions, torch.bfloat16)
    x = torch.randn(5, 2, 8)
    got = rotary.rotate(x.bfloat16(), cos, sin)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), _reference(x, positions, 8, False), atol=5e-2)
