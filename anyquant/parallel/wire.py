"""The messages rank 0 publishes to tensor-parallel workers: integer tensors, nothing else.

Owns the wire format. One message per step (`pack`): cache announcements ride along with the
forward that needs them. Every command starts with its kind. A forward is carried as plain
tensors and lists (`ForwardStep`), so this module knows no engine or model type: the worker
processes (the `workers` package) convert between it and the engine's attention context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Command kinds (first entry of every command).
FORWARD, NEW_CACHE, DROP_CACHE, SHUTDOWN = 1, 2, 3, 4
# KV cache dtypes a worker can mirror, by their index in NEW_CACHE (int8: `kv_cache_dtype="int8"`).
CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


def pack(commands: list[Tensor]) -> Tensor:
    """Several commands as one message: [n, len_1 .. len_n, command_1 .. command_n]; one message
    per step (cache announcements ride along with the forward that needs them)."""
    lengths = torch.tensor([len(commands), *(c.numel() for c in commands)], dtype=torch.long)
    return torch.cat([lengths, *(c.long() for c in commands)])


def unpack(message: Tensor) -> list[Tensor]:
    n = int(message[0])
    lengths = message[1 : 1 + n].tolist()
    out, at = [], 1 + n
    for length in lengths:
        out.append(message[at : at + length])
        at += length
    return out


def new_cache(
    cache_id: int, num_pages: int, page_size: int, dtype: torch.dtype, compute_dtype: torch.dtype
) -> Tensor:
    """[kind, cache, pages, page size, dtype index, compute dtype index]: workers allocate a twin
    of a rank-0 cache (an int8 cache needs its queries' compute dtype)."""
    dtypes = (CACHE_DTYPES.index(dtype), CACHE_DTYPES.index(compute_dtype))
    return torch.tensor([NEW_CACHE, cache_id, num_pages, page_size, *dtypes])


def decode_new_cache(msg: Tensor) -> tuple[int, int, int, torch.dtype, torch.dtype]:
    cache_id, pages, page_size, dtype, compute_dtype = (int(v) for v in msg[1:6])
    return cache_id, pages, page_size, CACHE_DTYPES[dtype], CACHE_DTYPES[compute_dtype]


def drop_cache(cache_id: int) -> Tensor:
    return torch.tensor([DROP_CACHE, cache_id])


def shutdown() -> Tensor:
    return torch.tensor([SHUTDOWN])


@dataclass(frozen=True)
class ForwardStep:
    """One forward pass as it travels: the model's inputs and the paged-attention metadata."""

    cache_id: int
    token_ids: Tensor
    positions: Tensor  # [T], or [K, T] (M-RoPE's 3 rows)
    slot_mapping: Tensor
    query_lens: list[int]
    context_lens: list[int]
    block_tables: Tensor  # [B, P]
    logits_rows: Tensor | None = None  # None: every row wants logits
    embed_rows: Tensor | None = None  # encoder rows (image embeddings) replacing token embeddings
    embed_values: Tensor | None = None  # [E, H]
    # Opaque int64 tail a model family adds to its steps (mllama's cross-attention step, built
    # and read by models/multimodal.py): it runs to the end of the command.
    extra: Tensor | None = None


def encode_step(step: ForwardStep) -> Tensor:
    """[kind, cache, T, B, R, P, K, E, H] + ids[T] + positions[K * T] + slot_mapping[T] +
    query_lens[B] + context_lens[B] + block_tables[B * P] + rows[R] + embed rows[E] + embed
    values[E * H] (+ `extra`, to the end); R = -1 when all rows want logits, K = 0 for 1-D
    positions (else their rows: M-RoPE's 3), E = 0 without encoder rows. Embedding values travel
    as their fp32 bit patterns (exact: the message is integers)."""
    b, p = step.block_tables.shape
    positions, rows = step.positions, step.logits_rows
    k = 0 if positions.dim() == 1 else positions.shape[0]
    values = step.embed_values
    e, h = (0, 0) if values is None else tuple(values.shape)
    head = torch.tensor(
        [FORWARD, step.cache_id, step.token_ids.numel(), b, -1 if rows is None else rows.numel(), p, k, e, h]
    )
    parts = [
        head,
        step.token_ids.cpu().long(),
        positions.cpu().long().reshape(-1),
        step.slot_mapping.cpu().long(),
        torch.tensor(step.query_lens, dtype=torch.long),
        torch.tensor(step.context_lens, dtype=torch.long),
        step.block_tables.cpu().long().reshape(-1),
    ]
    if rows is not None:
        parts.append(rows.cpu().long())
    if values is not None:
        assert step.embed_rows is not None, "embedding values travel with their rows"
        parts.append(step.embed_rows.cpu().long())
        parts.append(values.detach().cpu().float().contiguous().view(torch.int32).long().reshape(-1))
    if step.extra is not None:
        parts.append(step.extra.cpu().long())
    return torch.cat(parts)


def decode_step(msg: Tensor, device: torch.device) -> ForwardStep:
    """The inverse of `encode_step`, with every tensor on `device`."""
    t, b, r, p, k, e, h = (int(v) for v in msg[2:9])
    at = 9
    token_ids = msg[at : at + t]
    at += t
    positions = msg[at : at + max(k, 1) * t]
    if k:
        positions = positions.view(k, t)
    at += max(k, 1) * t
    slots = msg[at : at + t]
    at += t
    query_lens, context_lens = msg[at : at + b].tolist(), msg[at + b : at + 2 * b].tolist()
    at += 2 * b
    tables = msg[at : at + b * p].view(b, p)
    at += b * p
    rows = None
    if r >= 0:
        rows = msg[at : at + r].to(device)
        at += r
    embed_rows = embed_values = None
    if e:
        embed_rows = msg[at : at + e].to(device)
        at += e
        embed_values = msg[at : at + e * h].to(torch.int32).view(torch.float32).view(e, h).to(device)
        at += e * h
    extra = msg[at:] if at < msg.numel() else None
    return ForwardStep(
        int(msg[1]),
        token_ids.to(device),
        positions.to(device),
        slots.to(device),
        query_lens,
        context_lens,
        tables.to(device),
        rows,
        embed_rows,
        embed_values,
        extra,
    )
