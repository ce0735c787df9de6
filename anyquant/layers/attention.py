"""Grouped-query self-attention with rotary embeddings, and the attention-context interface.

Owns q/k/v/o projections (QuantLinear), optional q/k RMSNorm (Qwen3), rotary application, the
sliding window of the layer, and paged attention over a KV cache as tensors: planning one step's
page reads and masks (`plan_paged_attention`) and attending through them (`paged_attention`).
Which pages hold which sequence (the step's metadata) is the `AttentionContext`'s business.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anyquant.errors import CheckpointError
from anyquant.layers.decode_kernel import decode_kernel_reason, paged_decode
from anyquant.layers.kv_quant import dequantize_rows, is_quantized, quantize_rows, row_width
from anyquant.layers.linear import (
    MergeableProjections,
    MergedLinear,
    ProjectionGroup,
    QuantLinear,
    SplitGroup,
    TensorParallelLayer,
)
from anyquant.layers.norm import RMSNorm
from anyquant.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from anyquant.parallel.partition import Partition
    from anyquant.parallel.state import ParallelState


class AttentionContext(ABC):
    """What one forward step's attention layers need: where to store this step's keys and values
    and which cached tokens each query attends to. Built once per step by the caller (the engine's
    runner, or `engine.kv_cache.SequenceCache` for a single sequence)."""

    # The largest position of the step's tokens when the caller knows it (saves a host sync).
    max_position: int | None = None

    @abstractmethod
    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None = None
    ) -> Tensor:
        """Store k/v of this step's tokens for `layer`, then attend causally (only to the last
        `window` positions, the query's own included, when a sliding window is given).

        q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv] for the step's T tokens -> [T, H * Dv].
        """


# Decode attention over more keys than this per sequence goes through two matmuls and a softmax
# instead of SDPA's fused CPU kernel: measured on the 2-core CPU (one layer, Qwen2.5-0.5B heads,
# bf16, CPU time), SDPA wins at 128-1024 keys (0.04 vs 0.12 ms at 128) and loses from about 2048
# (0.77 vs 0.52 ms at 4096); see benchmarks/paged_attention.py.
MATMUL_DECODE_MIN_KEYS = 2048

# A prefill chunk on a cached prefix (a prefix-cache hit with a short new part, a chunked
# prefill's remainder) of n new tokens per sequence can run as n decode rows through the C++
# kernel, row i attending to the keys up to its own position, K/V read in place (re-read per row,
# from the caches after the first), instead of SDPA over the gathered pages. Measured on one
# core, bf16 (benchmarks/paged_attention.py --prefill; RESULTS.md, "Prefill chunks on a cached
# prefix"): the rows win while n <= 4 x the query heads per KV head (GQA-7 at n = 2..512: 0.12-
# 0.62x of SDPA's time; GQA-4 at n = 8..32: 0.44-0.73x; MHA at n = 4: 0.5-0.75x, at n = 16:
# 1.35x; DeepSeek's latent heads, 128 on one, at n = 4..256: 0.01-0.23x), as each K/V block
# serves n x group query rows. The plan builds the per-row metadata for chunks up to
# KERNEL_PREFILL_MAX_ROWS; the attention picks by its group size.
KERNEL_PREFILL_MAX_ROWS = 512
KERNEL_PREFILL_ROWS_PER_GROUP = 4


@dataclass(frozen=True)
class PagedGroup:
    """Sequences of one step that attend alike (all decoding, or all with several query rows):
    which pages to read, the mask over their keys and where their query rows are."""

    pages: Tensor  # [B, P] page ids to read, in key order (padding pages are masked out)
    run: tuple[int, int] | None  # one sequence whose pages are consecutive: its slot range
    # (mask, bias), built on first use (`mask`, `bias` below): a decode step that the C++ kernel
    # runs reads neither, and both grow with the context (B x S per step).
    masks: Callable[[], tuple[Tensor, Tensor | None]]
    rows: Tensor  # decode: [B] token rows; prefill: [B, Tq] token rows (padding -> 0)
    valid: Tensor | None  # prefill: [B * Tq] bool, the padded rows that are real tokens
    covers_step: bool  # the group holds every token of the step, in step order
    # for the C++ kernel (layers/decode_kernel.py), one entry per query row: its sequence's whole
    # block table [R, pages] and the keys it attends to [R] (int64), and the window (None: all
    # keys). Decode: R = B. Prefill (chunks of at most KERNEL_PREFILL_MAX_ROWS): each real query
    # row of `rows`, in order, attends to the keys up to its position.
    tables: Tensor | None = None
    lens: Tensor | None = None
    window: int | None = None
    # prefill of one sequence without a window: the keys cached before its queries (0: none), all
    # of which every query sees; the rest is causal. See `_attend_causally`. None: use the mask.
    causal_prefix: int | None = None

    @functools.cached_property
    def _built(self) -> tuple[Tensor, Tensor | None]:
        return self.masks()

    @property
    def mask(self) -> Tensor:
        """decode: [1, B, 1, S]; prefill: [B, 1, Tq, S] (True = attend), S = P * page."""
        return self._built[0]

    @property
    def bias(self) -> Tensor | None:
        """Decode through matmuls: the mask as 0 / -inf, fp32 [1, B, 1, S]; else None."""
        return self._built[1]


@dataclass(frozen=True)
class PagedPlan:
    decode: PagedGroup | None
    prefill: PagedGroup | None


def _built_masks(built: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor | None]:
    return built


def plan_paged_attention(
    block_tables: Tensor,
    query_lens: list[int],
    context_lens: list[int],
    page_size: int,
    window: int | None = None,
    matmul_min_keys: int | None = None,
    kernel_prefill_max_rows: int | None = None,
) -> PagedPlan:
    """The page reads and masks of one step, built once per step (per window size) and shared by
    every layer. Sequence b has `query_lens[b]` new tokens, the last ones of its `context_lens[b]`
    tokens, whose pages are `block_tables[b]`. With a window only the pages it can reach are
    read, so decode cost stays bounded by the window at any context length."""
    device = block_tables.device
    if matmul_min_keys is None:
        matmul_min_keys = MATMUL_DECODE_MIN_KEYS
    if kernel_prefill_max_rows is None:
        kernel_prefill_max_rows = KERNEL_PREFILL_MAX_ROWS
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    decode = [b for b, n in enumerate(query_lens) if n == 1]
    prefill = [b for b, n in enumerate(query_lens) if n > 1]
    groups: list[PagedGroup | None] = []
    for members in (decode, prefill):
        if not members:
            groups.append(None)
            continue
        ctx = [context_lens[b] for b in members]
        qlen = [query_lens[b] for b in members]
        first_query = [c - n for c, n in zip(ctx, qlen)]
        # First page any query of the sequence can see (0 without a window).
        first_page = [max(f - window + 1, 0) // page_size if window else 0 for f in first_query]
        num_pages = max(-(-c // page_size) - p for c, p in zip(ctx, first_page))
        idx = torch.tensor(members, device=device)
        first = torch.tensor(first_page, device=device)
        cols = (first[:, None] + torch.arange(num_pages, device=device)).clamp_(max=block_tables.shape[1] - 1)
        pages = block_tables.index_select(0, idx).gather(1, cols)
        run = None
        if len(members) == 1 and (num_pages == 1 or bool((pages.diff(dim=1) == 1).all())):
            start = int(pages[0, 0]) * page_size  # consecutive pages: read them in place
            run = (start, start + num_pages * page_size)
        ctx_t = torch.tensor(ctx, device=device)
        t_max = max(qlen)
        step_order = members == list(range(len(query_lens)))

        # (the loop's values bound as defaults: the decode group's masks are built after the loop)
        def causal_mask(
            first: Tensor = first,
            ctx_t: Tensor = ctx_t,
            qlen: list[int] = qlen,
            t_max: int = t_max,
            num_pages: int = num_pages,
        ) -> Tensor:
            """[B, Tq, S]: query row i of b sees the keys up to its position (within the window)."""
            key_pos = first[:, None] * page_size + torch.arange(num_pages * page_size, device=device)
            q_pos = (ctx_t - torch.tensor(qlen, device=device))[:, None] + torch.arange(t_max, device=device)
            mask = key_pos[:, None, :] <= q_pos[:, :, None]  # causal; also keeps keys < context
            if window:
                mask &= key_pos[:, None, :] > q_pos[:, :, None] - window
            return mask

        if t_max == 1:
            rows = torch.tensor([starts[b] for b in members], device=device)

            def decode_masks(
                causal_mask: Callable[[], Tensor] = causal_mask, keys: int = num_pages * page_size
            ) -> tuple[Tensor, Tensor | None]:
                decode_mask = causal_mask().transpose(0, 1)[:, :, None, :]  # [1, B, 1, S]
                bias = None
                if keys >= matmul_min_keys:
                    bias = torch.zeros(decode_mask.shape, device=device).masked_fill_(
                        ~decode_mask, float("-inf")
                    )
                return decode_mask, bias

            tables = block_tables if step_order else block_tables.index_select(0, idx)
            groups.append(PagedGroup(pages, run, decode_masks, rows, None, step_order, tables, ctx_t, window))
            continue
        mask = causal_mask()
        real = torch.arange(t_max, device=device)[None, :] < torch.tensor(qlen, device=device)[:, None]
        # A padding row must still see a key, or its softmax is 0/0; its output is dropped.
        mask[:, :, 0] |= ~real
        rows = (
            torch.tensor([starts[b] for b in members], device=device)[:, None]
            + torch.arange(t_max, device=device)
        ) * real
        row_tables: Tensor | None = None
        row_lens: Tensor | None = None
        if t_max <= kernel_prefill_max_rows:  # query row i of b: keys up to context - n + i
            per_row = [b for b, n in zip(members, qlen) for _ in range(n)]
            row_tables = block_tables.index_select(0, torch.tensor(per_row, device=device))
            row_lens = torch.tensor(
                [c - n + i + 1 for c, n in zip(ctx, qlen) for i in range(n)], device=device
            )
        groups.append(
            PagedGroup(
                pages,
                run,
                functools.partial(_built_masks, (mask[:, None], None)),
                rows,
                real.reshape(-1),
                step_order,
                row_tables,
                row_lens,
                window,
                causal_prefix=first_query[0] if len(members) == 1 and not window else None,
            )
        )
    return PagedPlan(groups[0], groups[1])


def store_key_value(
    key_cache: Tensor, value_cache: Tensor | None, slot_mapping: Tensor, k: Tensor, v: Tensor
) -> None:
    """Write one layer's new keys/values [T, Hkv, D*] into its caches [Hkv, slots, D*] at their
    slots [T]. `value_cache` None: the value is the key's prefix (a latent cache), stored with the
    key. Every step the C++ `paged_decode_step` does not store (prefill, mixed steps, the
    pure-torch attention, eager or captured) stores through here, once per layer, so it does no
    more than the two copies (no cast when the dtypes already agree). An int8 cache stores each
    row quantized (layers/kv_quant.py): its codes and scale in one copy."""
    key_cache.index_copy_(1, slot_mapping, _cache_rows(k, key_cache).transpose(0, 1))
    if value_cache is not None:
        value_cache.index_copy_(1, slot_mapping, _cache_rows(v, value_cache).transpose(0, 1))


def _cache_rows(x: Tensor, cache: Tensor) -> Tensor:
    """New rows x [T, Hkv, D] as `cache` stores them."""
    if is_quantized(cache):
        return quantize_rows(x)
    return x if x.dtype == cache.dtype else x.to(cache.dtype)


def read_pages(cache: Tensor, group: PagedGroup, page_size: int) -> Tensor:
    """cache [Hkv, slots, D] -> [Hkv, B, S, D]: a view when the group is one run of consecutive
    pages, else one gather of the listed pages (each page of each KV head is one contiguous block,
    and the result's last two dims stay contiguous for the matmuls)."""
    hkv, slots, d = cache.shape
    if group.run is not None:
        return cache[:, group.run[0] : group.run[1]].unsqueeze(1)
    b, p = group.pages.shape
    if cache.stride(1) != d:  # a strided view (a value inside the key): pages of [page, d] rows
        paged = cache.unflatten(1, (slots // page_size, page_size)).index_select(1, group.pages.reshape(-1))
        return paged.view(hkv, b, p * page_size, d)
    flat = cache.view(hkv, slots // page_size, page_size * d).index_select(1, group.pages.reshape(-1))
    return flat.view(hkv, b, p * page_size, d)


def value_in_key(key_cache: Tensor, value_cache: Tensor) -> bool:
    """Whether the value cache is a view of the key cache's first values (the latent cache of
    engine/kv_cache.py): then the pages read for the keys hold the values too."""
    return (
        value_cache.data_ptr() == key_cache.data_ptr()
        and value_cache.stride() == key_cache.stride()
        and value_cache.shape[:-1] == key_cache.shape[:-1]
    )


def read_key_value_pages(
    key_cache: Tensor, value_cache: Tensor, group: PagedGroup, page_size: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """`read_pages` of both caches ([Hkv, B, S, Dk], [Hkv, B, S, Dv]) in `dtype` (the queries'); a
    value inside the key is sliced from the keys read, never gathered a second time. An int8
    cache's rows are gathered as stored (codes and scale) and dequantized once, after the gather,
    so only the pages read are converted."""
    keys = _rows_in(read_pages(key_cache, group, page_size), dtype)
    if value_in_key(key_cache, value_cache):
        return keys, keys[..., : value_cache.shape[-1]]
    return keys, _rows_in(read_pages(value_cache, group, page_size), dtype)


def _rows_in(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """Cache rows as values: an int8 cache's dequantized to `dtype`, a float cache's as stored."""
    return dequantize_rows(rows, dtype) if is_quantized(rows) else rows


def _decode_torch(
    q: Tensor, key_cache: Tensor, value_cache: Tensor, g: PagedGroup, page_size: int, scale: float
) -> Tensor:
    """The pure-torch decode: q [B, H, D] -> [B, H * Dv] through SDPA or two matmuls."""
    b, h, d = q.shape
    hkv, dv = key_cache.shape[0], row_width(value_cache)
    keys, values = read_key_value_pages(key_cache, value_cache, g, page_size, q.dtype)  # [Hkv, B, S, D*]
    qh = q.view(b, hkv, h // hkv, d).transpose(0, 1)  # [Hkv, B, group, D]
    # fp16 scores could overflow before the softmax: fp16 always takes the fused kernel.
    if g.bias is None or q.dtype == torch.float16:
        o = F.scaled_dot_product_attention(qh, keys, values, attn_mask=g.mask, scale=scale)
    else:
        scores = torch.add(g.bias, torch.matmul(qh, keys.transpose(-1, -2)), alpha=scale)  # fp32
        o = torch.matmul(scores.softmax(-1).to(values.dtype), values)
    return o.transpose(0, 1).reshape(b, h * dv)


def _attend_causally(q: Tensor, keys: Tensor, values: Tensor, prefix: int, scale: float) -> Tensor:
    """SDPA of one sequence's queries q [1, H, Tq, D] at positions prefix.. over keys [1, Hkv, S, D*]
    (S >= prefix + Tq; keys past that are the last page's padding) without a mask: with one, the
    fused kernel computes every query-key block and reads the mask. Query row i sees the `prefix`
    keys in full and the new keys up to its own, so: the new keys through SDPA's is_causal (top-left
    aligned: row i sees new keys 0..i, never the padding), and with a prefix, the prefix keys
    unmasked through the same CPU kernel, the two halves merged by their log-sum-exps. Measured
    (bf16, one core, 14 query / 2 KV heads of 64; benchmarks/RESULTS.md, "Long prompts"): 2048
    new tokens 1.75x faster without a prefix, 1.66x after a 2048-token prefix."""
    group = q.shape[1] // keys.shape[1]
    if prefix == 0:
        return F.scaled_dot_product_attention(
            q, keys, values, is_causal=True, scale=scale, enable_gqa=group > 1
        )
    attend = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # also returns the log-sum-exp
    o_prefix, lse_prefix = attend(q, keys[:, :, :prefix], values[:, :, :prefix], 0.0, False, scale=scale)
    o_new, lse_new = attend(q, keys[:, :, prefix:], values[:, :, prefix:], 0.0, True, scale=scale)
    lse = torch.logaddexp(lse_prefix, lse_new)  # fp32 [1, H, Tq]
    o = o_prefix.float() * (lse_prefix - lse).exp_()[..., None]
    return o.add_(o_new.float() * (lse_new - lse).exp_()[..., None]).to(q.dtype)


def paged_attention(
    q: Tensor, key_cache: Tensor, value_cache: Tensor, plan: PagedPlan, page_size: int, scale: float
) -> Tensor:
    """q [T, H, D] against the cache [Hkv, slots, D*] through `plan` -> [T, H * Dv]. An int8
    cache (layers/kv_quant.py) is read as the values its rows dequantize to, in q's dtype.

    Decode rows run the C++ kernel where it can (layers/decode_kernel.py: K/V read in place through
    the block tables, whatever the pages' order), and so do short prefill chunks (see
    KERNEL_PREFILL_ROWS_PER_GROUP), one decode row per token. Otherwise, and for longer prefill
    chunks, only the pages the
    step's sequences reach are read, in place for one run of consecutive pages, else gathered into
    one padded batch per group. GQA never repeats K/V: a decode step's
    H queries are [Hkv, B, H / Hkv] rows against [Hkv, B, S] keys; prefill uses SDPA's
    grouped-query mode. Decode runs SDPA's fused kernel or, for long contexts, two matmuls and a
    softmax in fp32 (see MATMUL_DECODE_MIN_KEYS); prefill runs SDPA, which never materialises the
    scores."""
    t, h, _ = q.shape
    hkv, dv = key_cache.shape[0], row_width(value_cache)  # (an int8 cache's rows carry their scale)
    group = h // hkv
    out: Tensor | None = None
    if plan.decode is not None:
        g = plan.decode
        qd = q if g.covers_step else q.index_select(0, g.rows)
        b = qd.shape[0]
        if (
            g.tables is not None
            and g.lens is not None
            and decode_kernel_reason(q, key_cache, value_cache) is None
        ):
            o = paged_decode(qd, key_cache, value_cache, g.tables, g.lens, page_size, scale, g.window)
        else:
            o = _decode_torch(qd, key_cache, value_cache, g, page_size, scale)
        if g.covers_step:
            return o
        out = q.new_empty(t, h * dv)
        out.index_copy_(0, g.rows, o)
    if plan.prefill is not None:
        g = plan.prefill
        assert g.valid is not None
        b, tq = g.rows.shape
        if (
            g.tables is not None
            and g.lens is not None
            and tq <= KERNEL_PREFILL_ROWS_PER_GROUP * group
            and decode_kernel_reason(q, key_cache, value_cache) is None
        ):
            flat = g.rows.reshape(-1)[g.valid]  # the real query rows, sequence by sequence
            o = paged_decode(
                q.index_select(0, flat), key_cache, value_cache, g.tables, g.lens, page_size, scale, g.window
            )
            if g.covers_step and out is None:
                return o
            if out is None:
                out = q.new_empty(t, h * dv)
            out.index_copy_(0, flat, o)
            return out
        qp = q[g.rows].transpose(1, 2)  # [B, H, Tq, D]
        keys, values = read_key_value_pages(key_cache, value_cache, g, page_size, q.dtype)
        keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [B, Hkv, S, D*]
        # (the prefix split needs the CPU flash kernel, which takes equal key and value widths)
        split = q.device.type == "cpu" and keys.shape[-1] == values.shape[-1]
        if g.causal_prefix is not None and (g.causal_prefix == 0 or split):
            o = _attend_causally(qp, keys, values, g.causal_prefix, scale)
        else:
            o = F.scaled_dot_product_attention(
                qp, keys, values, attn_mask=g.mask, scale=scale, enable_gqa=group > 1
            )  # [B, H, Tq, Dv]
        o = o.transpose(1, 2).reshape(b * tq, h * dv)
        if g.covers_step and b == 1:
            return o
        o = o[g.valid]
        if out is None:
            out = q.new_empty(t, h * dv)
        out.index_copy_(0, g.rows.reshape(-1)[g.valid], o)
    assert out is not None
    return out


class Attention(nn.Module, TensorParallelLayer, MergeableProjections):
    def __init__(
        self,
        prefix: str,
        layer_index: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        qkv_bias: bool = False,
        qk_norm_eps: float | None = None,
        o_bias: bool = False,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise CheckpointError(
                f"config.json ({prefix}): num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}"
            )
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.prefix = prefix
        self.q_proj = QuantLinear(
            f"{prefix}.q_proj", hidden_size, num_heads * head_dim, qkv_bias, style="column"
        )
        self.k_proj = QuantLinear(
            f"{prefix}.k_proj", hidden_size, num_kv_heads * head_dim, qkv_bias, style="column"
        )
        self.v_proj = QuantLinear(
            f"{prefix}.v_proj", hidden_size, num_kv_heads * head_dim, qkv_bias, style="column"
        )
        self.o_proj = QuantLinear(f"{prefix}.o_proj", num_heads * head_dim, hidden_size, o_bias, style="row")
        # q/k/v in one kernel call, when the loader could merge them (then the three hold nothing).
        self.qkv_proj: MergedLinear | None = None
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.rotary = rotary
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window  # attend to the last N positions only (None: all)

    # -- tensor parallelism: query heads split, KV heads split or replicated -----------------------
    def split_groups(self) -> list[SplitGroup]:
        d = self.head_dim
        return [
            SplitGroup("heads", self.prefix, self.num_heads, ((self.q_proj, d),), ((self.o_proj, d),)),
            SplitGroup(
                "kv_heads",
                self.prefix,
                self.num_kv_heads,
                ((self.k_proj, d), (self.v_proj, d)),
                query_heads=self.num_heads,
                cached=True,
            ),
        ]

    def set_parallel(self, partitions: Mapping[str, Partition], state: ParallelState) -> None:
        self.num_heads = partitions["heads"].local_size
        self.num_kv_heads = partitions["kv_heads"].local_size

    def projection_groups(self) -> list[ProjectionGroup]:
        return [ProjectionGroup(self, "qkv_proj", (self.q_proj, self.k_proj, self.v_proj))]

    def forward(
        self, x: Tensor, positions: Tensor, cos_sin: tuple[Tensor, Tensor], ctx: AttentionContext
    ) -> Tensor:
        t = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj.forward_parts(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        return self.o_proj(ctx.attend(self.layer_index, q, k, v, self.scale, self.sliding_window))
