"""What the repacked CPU kernels of every instruction set are checked over: the integer
weight-only specs that both `RepackedWeightOnlyKernel`s (cpu_avx512, cpu_avx2) serve
(`INTEGER_SPECS`), and the dense bf16 LM head (`RepackedLmHeadKernel`: cpu_avx512_lm_head,
cpu_avx2_lm_head) against float64 (`check_dense_lm_head_matches_float64`). One list and one check,
so that the two families are held to the same cases."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from anyquant.quant.kernels.avx512 import RepackedLmHeadKernel
from anyquant.quant.spec import QuantSpec
from tests.helpers.errors import rel_err

BF16 = torch.bfloat16

# Groups of 32 / 64 / 128 with and without zero points, act-order, per channel, 3 and 2 bits,
# int8 per channel and per group, uint8 per channel and per group with zero points.
INTEGER_SPECS = [
    QuantSpec("uint4", "group", group_size=32),
    QuantSpec("uint4", "group", group_size=64, has_zero=True),
    QuantSpec("uint4", "group", group_size=128),
    QuantSpec("uint4", "group", group_size=128, has_zero=True, act_order=True),
    QuantSpec("uint4", "channel", has_zero=True),
    QuantSpec("uint3", "group", group_size=64),
    QuantSpec("uint2", "group", group_size=32, has_zero=True),
    QuantSpec("int8", "channel"),
    QuantSpec("int8", "group", group_size=128),
    QuantSpec("uint8", "channel"),
    QuantSpec("uint8", "group", group_size=64, has_zero=True),
]


def check_dense_lm_head_matches_float64(
    cls: type[RepackedLmHeadKernel], shapes: Sequence[tuple[int, int]], tokens: Sequence[int]
) -> None:
    """bf16 words widened exactly and summed in fp32, rounded once: F.linear's own accuracy, at
    every (N, K) of `shapes` and row count of `tokens`, with and without bias; the rows a tied
    embedding looks up are the weight's own; no rows give an empty output."""
    gen = torch.Generator().manual_seed(4)
    for n, k in shapes:
        w = (torch.randn(n, k, generator=gen) * 0.02).to(BF16)
        kernel = cls((n, k), BF16)
        kernel.load(w)
        for t in tokens:
            x = torch.randn(t, k, generator=gen).to(BF16)
            b = torch.randn(n, generator=gen).to(BF16) if t % 2 else None
            truth = x.double() @ w.double().T + (b.double() if b is not None else 0)
            err = rel_err(kernel(x, b), truth)
            assert err <= 1.5 * rel_err(torch.nn.functional.linear(x, w, b), truth) + 1e-4, (n, k, t, err)
        ids = torch.tensor([0, n - 1, 17, 16, 17])
        assert torch.equal(kernel.rows(ids), w[ids])
        assert kernel(torch.empty(0, k, dtype=BF16)).shape == (0, n)
