"""Act-order (GPTQ g_idx) tables of a fused MoE call, shared by the bf16 and the int8 fused calls.

Each expert's kernels were packed with their inputs sorted by group; the fused call needs, per
expert, the input order of gate and up (packed column c reads x column perm13[e, 0 or 1, c]) and
where the down projection's packed columns put each intermediate feature (pos2[e, i])."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def act_order_tables(
    kernels: Sequence[Sequence[Any]], hidden: int, inter: int
) -> tuple[Tensor | None, Tensor | None]:
    """(perm13 [E, 2, hidden], pos2 [E, inter]) int64, each None when no expert needs it.
    `kernels` are (gate, up, down) kernels with a `perm` attribute (None: natural order)."""
    perm13 = pos2 = None
    if any(g.perm is not None or u.perm is not None for g, u, _ in kernels):
        perm13 = torch.stack(
            [torch.stack([_order(g.perm, hidden), _order(u.perm, hidden)]) for g, u, _ in kernels]
        )
    if any(d.perm is not None for _, _, d in kernels):
        pos2 = torch.stack([torch.argsort(_order(d.perm, inter)) for _, _, d in kernels])
    return perm13, pos2


def _order(perm: Tensor | None, k: int) -> Tensor:
    return torch.arange(k) if perm is None else perm.to(torch.int64)
