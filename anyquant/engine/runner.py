"""ModelRunner: a scheduler's StepPlan -> one batched forward -> fp32 logits per sampling request.

Owns building the step's flat token batch (ids, positions, per-sequence slices and slots) and the
paged KV cache tensors. Knows nothing about sampling policy or request lifecycles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from anyquant.engine.kv_cache import PagedAttention, PagedKVCache, SequenceSlice
from anyquant.engine.scheduler import StepPlan

if TYPE_CHECKING:
    from anyquant.models.base import DecoderLM


class ModelRunner:
    def __init__(
        self, model: DecoderLM, num_pages: int, page_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.model = model
        self.device = device
        self.cache = PagedKVCache.for_model(model, num_pages, page_size, dtype, device)

    def execute(self, plan: StepPlan) -> dict[str, Tensor]:
        """Run the plan's tokens; return fp32 logits [vocab] for every request that samples this step."""
        ids: list[int] = []
        positions: list[int] = []
        sequences: list[SequenceSlice] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        for request, n in plan.scheduled:
            c = request.num_computed_tokens
            sequences.append(SequenceSlice(len(ids), n, c, self.cache.slots(request.page_ids, 0, c + n)))
            ids.extend(request.all_token_ids[c : c + n])
            positions.extend(range(c, c + n))
            if request.reaches_end(n):
                sample_rows.append(len(ids) - 1)
                sample_ids.append(request.request_id)
        if not ids:
            return {}
        ctx = PagedAttention(self.cache, sequences)
        token_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits = self.model(token_ids, pos, ctx, rows) if sample_rows else None
            if logits is None:
                self.model(token_ids, pos, ctx, torch.tensor([len(ids) - 1], device=self.device))
                return {}
        logits = logits.cpu()
        return {rid: logits[i] for i, rid in enumerate(sample_ids)}
