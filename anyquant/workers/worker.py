"""A tensor-parallel worker rank: load its shard, then mirror rank 0's forward passes.

Owns what every rank loads (`LoadRequest`) and the worker loop: receive rank 0's step messages
(`parallel/wire.py`), keep a twin of each KV cache rank 0 announces, and run the same forward on
this rank's shard so that it joins the same collectives. Started by `main.py` (the package's own
entry point) or, under torchrun, from `start_tensor_parallel` in every process of rank > 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
from anyquant.models.base import InputEmbeds
from anyquant.models.multimodal import CrossAttentionStep
from anyquant.parallel import wire
from anyquant.parallel.comm import announce_joined, post_error, post_status, receive, wait_statuses
from anyquant.parallel.state import (
    DEFAULT_TIMEOUT_S,
    ParallelError,
    ParallelState,
    anyquant_keys,
    connect_store,
    destroy_groups,
    form_groups,
)

if TYPE_CHECKING:
    from anyquant.loading.loader import LoadedModel
    from anyquant.models.protocol import CausalLM

LOAD_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class LoadRequest:
    """What every rank loads (picklable: it travels to spawned ranks)."""

    path: str
    device: str
    dtype: str
    kernel: str | None
    timeout_s: float = DEFAULT_TIMEOUT_S
    threads: int = 1
    merge_projections: bool = True
    lm_head_dtype: str = "auto"
    activation_dtype: str = "auto"
    mmproj: str | None = None  # a GGUF language model's vision projector
    expert_parallel: bool = False


def device_for(request: LoadRequest, rank: int) -> str:
    dev = torch.device(request.device)
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    return str(dev)


def load_shard(request: LoadRequest, rank: int, state: ParallelState) -> LoadedModel:
    from anyquant.loading.loader import load_model

    return load_model(
        request.path,
        device=device_for(request, rank),
        dtype=request.dtype,
        kernel=request.kernel,
        parallel=state,
        merge_projections=request.merge_projections,
        lm_head_dtype=request.lm_head_dtype,
        activation_dtype=request.activation_dtype,
        mmproj=request.mmproj,
        expert_parallel=request.expert_parallel,
    )


def forward_arguments(
    step: wire.ForwardStep, cache: PagedKVCache
) -> tuple[Tensor, Tensor, PagedAttention, Tensor | None, InputEmbeds | None]:
    """A FORWARD command as the model's arguments, its attention context over `cache`."""
    ctx = PagedAttention(cache, step.slot_mapping, step.block_tables, step.query_lens, step.context_lens)
    embeds = None
    if step.embed_rows is not None and step.embed_values is not None:
        embeds = InputEmbeds(step.embed_rows, step.embed_values)
    return step.token_ids, step.positions, ctx, step.logits_rows, embeds


def decode_forward(
    msg: Tensor, device: torch.device, cache: PagedKVCache
) -> tuple[Tensor, Tensor, PagedAttention, Tensor | None, InputEmbeds | None]:
    return forward_arguments(wire.decode_step(msg, device), cache)


def run_worker(request: LoadRequest, rank: int, world: int, address: str, port: int, progress: Any) -> int:
    """A worker rank from start to shutdown; returns its exit code. A failure after the group
    formed is posted for rank 0 (which names this rank with it) and raised."""
    # The loader's imports take seconds; done before joining, they overlap rank 0's own start.
    import anyquant.loading.loader  # noqa: F401

    store = connect_store(rank, world, address, port)
    announce_joined(anyquant_keys(store), rank)
    torch.set_num_threads(request.threads)
    device = torch.device(device_for(request, rank))
    state = form_groups(store, rank, world, device, request.timeout_s)
    state.progress = progress
    try:
        try:
            loaded = load_shard(request, rank, state)
            problem = None
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        post_status(state, problem)
        (verdict,) = wait_statuses(state, [0], LOAD_TIMEOUT_S)
        if problem is not None or verdict is not None:
            return 1
        serve(loaded.model, state, device)
    except BaseException as exc:
        post_error(state, f"{type(exc).__name__}: {exc}")
        raise
    destroy_groups()
    return 0


def serve(model: CausalLM, state: ParallelState, device: torch.device) -> None:
    """The worker loop: receive rank 0's messages and mirror its forward passes until shutdown."""
    caches: dict[int, PagedKVCache] = {}
    seq = 0
    while True:
        for command in wire.unpack(receive(state, seq)):
            if not _run_command(model, state, device, caches, command):
                return
        seq += 1


def _run_command(
    model: CausalLM, state: ParallelState, device: torch.device, caches: dict[int, PagedKVCache], msg: Tensor
) -> bool:
    """Carry out one command from rank 0; False on shutdown."""
    kind = int(msg[0])
    if kind == wire.SHUTDOWN:
        return False
    if kind == wire.NEW_CACHE:
        cid, pages, page_size, dtype, compute_dtype = wire.decode_new_cache(msg)
        caches[cid] = PagedKVCache.for_model(model, pages, page_size, dtype, device, compute_dtype)
    elif kind == wire.DROP_CACHE:
        caches.pop(int(msg[1]), None)
    elif kind == wire.FORWARD:
        step = wire.decode_step(msg, device)
        token_ids, positions, ctx, rows, embeds = forward_arguments(step, caches[step.cache_id])
        # A cross-attention family's step rides at the end (`wire.ForwardStep.extra`).
        extra = {} if step.extra is None else {"cross": CrossAttentionStep.from_message(step.extra, device)}
        with torch.inference_mode():
            model(token_ids, positions, ctx, rows, embeds, **extra)
    else:
        raise ParallelError(f"rank {state.rank}: unknown message kind {kind} from rank 0")
    return True
