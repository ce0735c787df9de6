"""Causal attention by its definition in float64: the reference the paged-attention tests compare
against (never the code under test)."""

from __future__ import annotations

import torch


def causal_attention_float64(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, context: int, window: int | None
) -> torch.Tensor:
    """float64 attention of one sequence's T new queries q [T, H, D] (positions context-T ..
    context-1) over its `context` keys [S, Hkv, D] and values [S, Hkv, Dv] -> [T, H * Dv]; GQA by
    repeating each KV head for its query heads; `window`: a key older than the window is masked."""
    t, h, _ = q.shape
    group = h // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)  # [S, H, D]
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), k) * q.shape[-1] ** -0.5
    q_pos = torch.arange(context - t, context)[:, None]
    k_pos = torch.arange(context)[None, :]
    allowed = k_pos <= q_pos
    if window:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(t, -1)
