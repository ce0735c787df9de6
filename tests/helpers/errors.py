"""How far a result is from its reference, for the kernel tests."""

from __future__ import annotations

from torch import Tensor


def rel_err(y: Tensor, ref: Tensor) -> float:
    """Relative L2 error of y against ref, computed in float64."""
    ref = ref.double()
    return float((y.double() - ref).norm() / ref.norm())
