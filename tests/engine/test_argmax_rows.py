"""`argmax_rows` (the greedy token of every row, engine/sampling.py) gives torch.argmax's indices:
the first maximum of each row, a NaN counting as the maximum, for widths that are and are not
multiples of its chunk, many ties, infinities, and rows shorter than its chunked path."""

from __future__ import annotations

import pytest
import torch

from anyquant.engine.sampling import argmax_rows

WIDTHS = [100, 4095, 4096, 4097, 32000, 151936, 152064]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_argmax_rows_matches_torch_argmax(width: int, rows: int) -> None:
    gen = torch.Generator().manual_seed(width * 31 + rows)
    cases = {
        "normal": torch.randn(rows, width, generator=gen),
        "ties": torch.randint(-3, 3, (rows, width), generator=gen).float(),
        "bf16": torch.randn(rows, width, generator=gen).bfloat16(),
        "all -inf": torch.full((rows, width), float("-inf")),
    }
    special = torch.randn(rows, width, generator=gen)
    special[0, width // 2] = float("nan")
    special[-1, -1] = float("inf")  # the last column of the last, possibly short, chunk
    cases["nan / inf"] = special
    late = torch.randn(rows, width, generator=gen)
    late[:, -1] = 10.0  # every row's maximum in its last column
    cases["last column"] = late
    for name, logits in cases.items():
        assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1)), name


def test_a_view_of_rows_gives_the_same_indices() -> None:
    logits = torch.randn(8, 151936, generator=torch.Generator().manual_seed(1))
    rows = logits[[1, 5, 6]]
    assert torch.equal(argmax_rows(rows), logits.argmax(dim=-1)[[1, 5, 6]])
    assert torch.equal(argmax_rows(logits[2:5]), logits[2:5].argmax(dim=-1))
