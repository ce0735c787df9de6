"""The per-step non-finite check and greedy choice (`finite_rows_and_argmax`) against torch's own
element-wise definitions."""

from __future__ import annotations

import torch

from anyquant.engine.numerics import finite_rows_and_argmax


def test_rows_with_inf_or_nan_are_flagged_and_huge_finite_rows_are_not() -> None:
    logits = torch.randn(6, 50)
    logits[1, 3] = float("inf")
    logits[2, 7] = float("nan")
    logits[3, 0], logits[3, 1] = float("inf"), float("-inf")  # the sum is NaN
    logits[4, :] = 3e38  # finite, but the row's sum overflows to inf
    logits[5, 9] = float("-inf")
    finite, top = finite_rows_and_argmax(logits)
    assert finite == torch.isfinite(logits).all(dim=-1).tolist() == [True, False, False, False, True, False]
    assert top == logits.argmax(dim=-1).tolist()
