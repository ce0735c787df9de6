"""The paged KV cache and the attention context that reads and writes it.

Owns the per-layer key/value slot tensors (allocated once: [pages * page_size, Hkv, D] per layer),
writing a step's keys/values to their slots and gathering each sequence's slots to attend.
Which pages a request owns is the page allocator's business (engine/pages.py); this module only
sees slot indices. `SequenceCache` is the one-sequence convenience used by `LLM.logits` and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from anyquant.layers.attention import AttentionContext, attend

if TYPE_CHECKING:
    from anyquant.models.base import DecoderLM


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        k_dim: int,
        v_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(
                f"KV cache needs at least one page of at least one slot, got {num_pages}x{page_size}"
            )
        self.num_pages, self.page_size = num_pages, page_size
        slots = num_pages * page_size
        # [layers, slots, Hkv, D]: one allocation each for keys and values.
        self.k = torch.zeros(num_layers, slots, num_kv_heads, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(num_layers, slots, num_kv_heads, v_dim, dtype=dtype, device=device)

    @classmethod
    def for_model(
        cls,
        model: DecoderLM,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """A cache with the model family's geometry (layers, KV heads, key and value widths)."""
        shape = model.cache_shape
        return cls(
            model.args.num_layers,
            num_pages,
            page_size,
            shape.num_kv_heads,
            shape.k_dim,
            shape.v_dim,
            dtype,
            device,
        )

    @staticmethod
    def page_bytes_for_model(model: DecoderLM, page_size: int, dtype: torch.dtype) -> int:
        shape = model.cache_shape
        return PagedKVCache.bytes_per_page(
            model.args.num_layers, page_size, shape.num_kv_heads, shape.k_dim, shape.v_dim, dtype
        )

    @staticmethod
    def bytes_per_page(
        num_layers: int, page_size: int, num_kv_heads: int, k_dim: int, v_dim: int, dtype: torch.dtype
    ) -> int:
        return num_layers * page_size * num_kv_heads * (k_dim + v_dim) * dtype.itemsize

    def slots(self, page_ids: list[int], begin: int, end: int) -> Tensor:
        """Slot index of every position in [begin, end) of a sequence whose pages are `page_ids`."""
        pos = torch.arange(begin, end)
        pages = torch.tensor(page_ids, dtype=torch.long)[pos // self.page_size]
        return (pages * self.page_size + pos % self.page_size).to(self.k.device)


@dataclass(frozen=True)
class SequenceSlice:
    """One sequence's part of a step: tokens [offset, offset + length) of the step's flat batch sit
    at positions [context, context + length); `slots` covers positions [0, context + length)."""

    offset: int
    length: int
    context: int
    slots: Tensor


class PagedAttention(AttentionContext):
    def __init__(self, cache: PagedKVCache, sequences: list[SequenceSlice]) -> None:
        self.cache = cache
        self.sequences = sequences
        # Slots receiving this step's keys/values, in the order of the step's tokens.
        self.write_slots = torch.cat([s.slots[s.context :] for s in sequences])

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys.index_copy_(0, self.write_slots, k.to(keys.dtype))
        values.index_copy_(0, self.write_slots, v.to(values.dtype))
        outputs = []
        for s in self.sequences:
            outputs.append(
                attend(
                    q[s.offset : s.offset + s.length],
                    keys.index_select(0, s.slots),
                    values.index_select(0, s.slots),
                    s.context,
                    scale,
                )
            )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class SequenceCache:
    """A private paged cache for one sequence of up to `max_len` tokens (pages 0, 1, 2, ...)."""

    def __init__(
        self,
        model: DecoderLM,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        page_size: int = 16,
    ) -> None:
        pages = max(1, -(-max_len // page_size))
        self.model = model
        self.cache = PagedKVCache.for_model(model, pages, page_size, dtype, device)
        self.page_ids = list(range(pages))
        self.max_len = max_len

    def context(self, start: int, length: int) -> PagedAttention:
        if start + length > self.max_len:
            raise ValueError(f"sequence of {start + length} tokens exceeds this cache's {self.max_len}")
        return PagedAttention(
            self.cache, [SequenceSlice(0, length, start, self.cache.slots(self.page_ids, 0, start + length))]
        )

    def forward(self, token_ids: list[int] | Tensor, start: int, logits_rows: Tensor | None = None) -> Tensor:
        """fp32 logits for tokens at positions start..start+T-1 (rows `logits_rows`, default all)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.cache.k.device)
        positions = torch.arange(start, start + ids.shape[0], device=ids.device)
        with torch.inference_mode():
            return self.model(ids, positions, self.context(start, ids.shape[0]), logits_rows)
