"""The paged KV cache and the attention context that reads and writes it.

Owns the per-layer key/value slot tensors (allocated once: [Hkv, pages * page_size, D] per layer;
for latent attention the values are a view of the keys; an int8 cache, `kv_cache_dtype="int8"`,
holds rows of D codes and their scale, layers/kv_quant.py),
writing a step's keys/values to their slots, and the step's attention metadata (`PagedAttention`).
Which pages a request owns is the page allocator's business (engine/pages.py); this module only
sees slot indices. `SequenceCache` is the one-sequence convenience used by `LLM.logits` and tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from anyquant.errors import UnsupportedError
from anyquant.layers.attention import (
    AttentionContext,
    PagedPlan,
    paged_attention,
    plan_paged_attention,
    store_key_value,
)
from anyquant.layers.decode_kernel import check_decode_step, paged_decode_step, step_kernel_reason
from anyquant.layers.kv_quant import is_quantized_dtype, stored_width

if TYPE_CHECKING:
    from anyquant.models.base import InputEmbeds
    from anyquant.models.multimodal import CrossAttentionStep
    from anyquant.models.protocol import EngineModel


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
        value_in_key: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        """`dtype`: the cache's own, the compute dtype or torch.int8 (rows of `k_dim` / `v_dim`
        int8 codes and their scale, layers/kv_quant.py). `value_in_key`: the value is the key's
        first `v_dim` values (models.base.CacheShape), stored once: `v` is a strided view of `k`
        and `write` stores the key alone. `compute_dtype`: the queries' and the new rows' dtype,
        which the decode kernel's choice depends on (default `dtype`; an int8 cache needs it)."""
        if num_pages < 1 or page_size < 1:
            raise ValueError(
                f"KV cache needs at least one page of at least one slot, got {num_pages}x{page_size}"
            )
        if value_in_key and is_quantized_dtype(dtype):
            # The value view would be the key row's first codes, whose scale sits at the row's
            # end, past the view: the value rows alone could not be read back.
            raise UnsupportedError(
                "an int8 KV cache cannot hold a value inside the key (latent attention); "
                "use kv_cache_dtype='auto'"
            )
        if compute_dtype is None and is_quantized_dtype(dtype):
            raise ValueError("an int8 KV cache needs the compute dtype of its queries and new rows")
        # The queries' and new keys' / values' dtype: the cache's own unless it is int8.
        self.compute_dtype = dtype if compute_dtype is None else compute_dtype
        self.num_pages, self.page_size = num_pages, page_size
        self.k_dim, self.v_dim = k_dim, v_dim  # values per row (an int8 row stores its scale too)
        slots = num_pages * page_size
        # [layers, Hkv, slots, D]: one allocation each for keys and values. KV-head-major, so that
        # a page of one head is one contiguous block and the keys read for attention keep their
        # last two dims contiguous (matmuls take them without a copy).
        k_width, v_width = stored_width(k_dim, dtype), stored_width(v_dim, dtype)
        self.k = torch.zeros(num_layers, num_kv_heads, slots, k_width, dtype=dtype, device=device)
        self.value_in_key = value_in_key
        if value_in_key:
            if v_dim > k_dim:
                raise ValueError(f"a value inside the key needs v_dim {v_dim} <= k_dim {k_dim}")
            # Rows stay contiguous (stride 1 in the last dim, k_dim between slots): the C++ decode
            # kernel and the torch paths read it in place (layers/attention.py).
            self.v = self.k[..., :v_dim]
        else:
            self.v = torch.zeros(num_layers, num_kv_heads, slots, v_width, dtype=dtype, device=device)

    @classmethod
    def for_model(
        cls,
        model: EngineModel,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype | None = None,
    ) -> PagedKVCache:
        """A cache with the model family's geometry (layers, KV heads, key and value widths), in
        `dtype` (the compute dtype, or torch.int8 where the family's cache can hold it)."""
        model.cache_shape.check_cache_dtype(dtype, type(model).__name__)
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
            shape.value_in_key,
            compute_dtype,
        )

    @staticmethod
    def page_bytes_for_model(model: EngineModel, page_size: int, dtype: torch.dtype) -> int:
        """Bytes of one page of a cache of `dtype` (an int8 cache counts its codes and scales)."""
        return model.args.num_layers * page_size * model.cache_shape.token_bytes(dtype)

    @staticmethod
    def bytes_per_page(
        num_layers: int, page_size: int, num_kv_heads: int, k_dim: int, v_dim: int, dtype: torch.dtype
    ) -> int:
        """A cache with separate keys and values (see `page_bytes_for_model` for any family)."""
        width = stored_width(k_dim, dtype) + stored_width(v_dim, dtype)
        return num_layers * page_size * num_kv_heads * width * dtype.itemsize

    def write(self, layer: int, slot_mapping: Tensor, k: Tensor, v: Tensor) -> None:
        """Store this step's keys/values [T, Hkv, D*] of `layer` at their slots [T]."""
        # A value inside the key is the key's prefix, stored with it.
        store_key_value(self.k[layer], None if self.value_in_key else self.v[layer], slot_mapping, k, v)

    def step_kernel_reason(self) -> str | None:
        """Why a decode step on this cache cannot run each layer as one `decode_step` call (the
        C++ kernel cannot run for its dtype, widths or device, or is switched off), or None."""
        return step_kernel_reason(
            self.compute_dtype, self.k_dim, self.v_dim, self.k.device.type, cache_dtype=self.k.dtype
        )

    def check_decode_step(self, slot_mapping: Tensor, block_tables: Tensor, context_lens: Tensor) -> None:
        """Once per step, before its layers' `decode_step` calls store and read through these
        tensors: every slot and page id lies in this cache (a clear error naming the tensor)."""
        check_decode_step(slot_mapping, block_tables, context_lens, self.page_size, self.k.shape[2])

    def decode_step(
        self,
        layer: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        slot_mapping: Tensor,
        block_tables: Tensor,
        context_lens: Tensor,
        scale: float,
        window: int | None,
    ) -> Tensor:
        """One layer of a decode step in one C++ call (layers/decode_kernel.py's
        `paged_decode_step`): store k [B, Hkv, Dk] / v [B, Hkv, Dv] at `slot_mapping` [B] (-1: a
        padding row), then q [B, H, Dk] -> [B, H * Dv] through `block_tables` [B, P] and
        `context_lens` [B], which passed `check_decode_step`. The eager and the captured step's
        layers both attend through here."""
        value_cache = None if self.value_in_key else self.v[layer]
        return paged_decode_step(
            q,
            k,
            v,
            self.k[layer],
            value_cache,
            slot_mapping,
            block_tables,
            context_lens,
            self.page_size,
            scale,
            window,
        )


class PagedAttention(AttentionContext):
    """One step's attention metadata, as tensors built once per step (by the runner, in work
    proportional to the step's new tokens) and read by every layer:

    - `slot_mapping` [T]: the cache slot of each new token's key/value;
    - `block_tables` [B, P]: each sequence's page ids (padded with page 0);
    - `query_lens` / `context_lens` (host ints, length B): new tokens per sequence and the tokens
      it has in the cache once this step's are written; the new ones are the last ones.

    The step's tokens are the sequences' new tokens one sequence after the other. A step where
    every sequence decodes one token runs each layer as one C++ call (K/V store and attention,
    `PagedKVCache.decode_step`, as a captured step does) wherever the cache's
    `step_kernel_reason` is None, its tensors checked once here; any other step (prefill, chunked
    prefill, decode rows mixed with prefill rows, a cache the kernel cannot read) stores through
    `PagedKVCache.write` and attends through `paged_attention`, whose gathers and masks are
    planned once per step and window size (`plan_paged_attention`)."""

    def __init__(
        self,
        cache: PagedKVCache,
        slot_mapping: Tensor,
        block_tables: Tensor,
        query_lens: list[int],
        context_lens: list[int],
    ) -> None:
        if len(query_lens) != len(context_lens) or block_tables.shape[0] != len(query_lens):
            raise ValueError(
                f"{len(query_lens)} query lengths, {len(context_lens)} context lengths and "
                f"{block_tables.shape[0]} block-table rows: one of each per sequence expected"
            )
        self.cache = cache
        self.slot_mapping = slot_mapping
        self.block_tables = block_tables
        self.query_lens = query_lens
        self.context_lens = context_lens
        self.max_position = max(context_lens) - 1 if context_lens else None
        self._plans: dict[int | None, PagedPlan] = {}
        # The one-call decode step's tensors: the block tables as the kernel reads them (int64,
        # contiguous) and the context lengths; None where the step attends through the plans.
        self.step_tensors: tuple[Tensor, Tensor, Tensor] | None = None
        if query_lens and all(n == 1 for n in query_lens) and cache.step_kernel_reason() is None:
            slots = slot_mapping.to(torch.long).contiguous()
            tables = block_tables.to(torch.long).contiguous()
            lens = torch.tensor(context_lens, dtype=torch.long, device=slots.device)
            cache.check_decode_step(slots, tables, lens)
            self.step_tensors = (slots, tables, lens)

    @classmethod
    def for_sequences(
        cls, cache: PagedKVCache, sequences: list[tuple[list[int], int, int]]
    ) -> PagedAttention:
        """From (page ids, tokens already cached, new tokens) per sequence, in step order."""
        page = cache.page_size
        width = max(max(-(-(c + n) // page) for _, c, n in sequences), 1)
        table = torch.zeros(len(sequences), width, dtype=torch.long)
        slots: list[int] = []
        for row, (page_ids, cached, new) in enumerate(sequences):
            used = page_ids[: -(-(cached + new) // page)]
            table[row, : len(used)] = torch.tensor(used, dtype=torch.long)
            slots.extend(page_ids[p // page] * page + p % page for p in range(cached, cached + new))
        device = cache.k.device
        return cls(
            cache,
            torch.tensor(slots, dtype=torch.long, device=device),
            table.to(device),
            [n for _, _, n in sequences],
            [c + n for _, c, n in sequences],
        )

    def plan(self, window: int | None) -> PagedPlan:
        plan = self._plans.get(window)
        if plan is None:
            plan = plan_paged_attention(
                self.block_tables, self.query_lens, self.context_lens, self.cache.page_size, window
            )
            self._plans[window] = plan
        return plan

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None = None
    ) -> Tensor:
        if self.step_tensors is not None:
            slots, tables, lens = self.step_tensors
            return self.cache.decode_step(layer, q, k, v, slots, tables, lens, scale, window)
        self.cache.write(layer, self.slot_mapping, k, v)
        return paged_attention(
            q, self.cache.k[layer], self.cache.v[layer], self.plan(window), self.cache.page_size, scale
        )


class SequenceCache:
    """A private paged cache for one sequence of up to `max_len` tokens (pages 0, 1, 2, ...), in
    `dtype`: the compute dtype, or torch.int8 with `compute_dtype` naming the queries' dtype."""

    def __init__(
        self,
        model: EngineModel,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        page_size: int = 16,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        """`compute_dtype`: the queries' (needed with an int8 cache; default `dtype`)."""
        pages = max(1, -(-max_len // page_size))
        self.model = model
        self.cache = PagedKVCache.for_model(model, pages, page_size, dtype, device, compute_dtype)
        self.page_ids = list(range(pages))
        self.max_len = max_len

    def context(self, start: int, length: int) -> PagedAttention:
        if start + length > self.max_len:
            raise ValueError(f"sequence of {start + length} tokens exceeds this cache's {self.max_len}")
        return PagedAttention.for_sequences(self.cache, [(self.page_ids, start, length)])

    def forward(
        self,
        token_ids: list[int] | Tensor,
        start: int,
        logits_rows: Tensor | None = None,
        positions: Tensor | None = None,
        input_embeds: InputEmbeds | None = None,
        cross: CrossAttentionStep | None = None,
    ) -> Tensor:
        """fp32 logits for tokens at positions start..start+T-1 (rows `logits_rows`, default all);
        `positions` / `input_embeds` for prompts with images (see `EngineModel.__call__`), `cross`
        for cross-attention families (models/mllama.py)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.cache.k.device)
        if positions is None:
            positions = torch.arange(start, start + ids.shape[0], device=ids.device)
        extra: dict[str, Any] = {} if input_embeds is None else {"input_embeds": input_embeds}
        if cross is not None:
            extra["cross"] = cross
        with torch.inference_mode():
            return self.model(
                ids, positions.to(ids.device), self.context(start, ids.shape[0]), logits_rows, **extra
            )
