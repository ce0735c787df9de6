"""Prompt log-probabilities (vLLM's `prompt_logprobs`): one teacher-forced pass over a prompt.

Owns running a prompt through the model in a private cache (never the engine's paged cache, so a
prefix-cache hit cannot skip the positions being scored) and turning its logits into, for each
prompt token after the first, the token's logprob and rank plus the top-k alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from anyquant.engine.kv_cache import SequenceCache

if TYPE_CHECKING:
    from anyquant.models.protocol import EngineModel


@dataclass
class PromptLogprobs:
    """entries[i]: {prompt token i: logprob, then the top-k}; ranks[i]: that token's rank (1 = the
    most likely). Both None at position 0, which nothing predicts."""

    entries: list[dict[int, float] | None]
    ranks: list[int | None]


def prompt_logits(
    model: EngineModel,
    ids: list[int],
    cache_dtype: torch.dtype,
    device: torch.device,
    compute_dtype: torch.dtype,
) -> Tensor:
    """fp32 logits [len(ids), vocab] of a teacher-forced pass through a cache of `cache_dtype` (the
    engine's: the compute dtype, or int8) in `compute_dtype`."""
    cache = SequenceCache(model, len(ids), cache_dtype, device, compute_dtype=compute_dtype)
    return cache.forward(ids, 0).cpu()


def prompt_logprobs(logits: Tensor, ids: list[int], k: int) -> PromptLogprobs:
    """From the logits of a pass over `ids`; raises ValueError when they are not finite."""
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("non-finite logits while scoring the prompt: the activations overflowed")
    lp = torch.log_softmax(logits[:-1].double(), dim=-1)
    targets = torch.tensor(ids[1:], dtype=torch.long)
    chosen = lp.gather(1, targets[:, None])[:, 0]
    ranks = (lp > chosen[:, None]).sum(dim=1) + 1
    top = torch.topk(lp, min(k, lp.shape[1])).indices.tolist() if k else [[] for _ in ids[1:]]
    entries: list[dict[int, float] | None] = [None]
    for pos, (token, row_top) in enumerate(zip(ids[1:], top)):
        entries.append({t: float(lp[pos, t]) for t in [token, *row_top]})
    return PromptLogprobs(entries, [None, *(int(r) for r in ranks.tolist())])
