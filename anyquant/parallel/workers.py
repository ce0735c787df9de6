"""Tensor-parallel ranks: start them, mirror rank 0's forward passes on them, and fail loudly.

Owns the process model of architecture.md §7. Rank 0 (the caller's process) runs the engine; its
model is wrapped in `TensorParallelModel`, which before each forward publishes a compact step
message (token ids, positions, the step's attention metadata, logits rows) so that every
worker runs the same forward on its shard and joins the same collectives. Workers are started by
`launch.py` (the package's own entry point, gloo on CPU) or by torchrun (RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT, one machine or several). A rank that dies, hangs or fails makes rank 0
raise `ParallelError` naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
from anyquant.errors import AnyquantError, UnsupportedError
from anyquant.layers.attention import AttentionContext
from anyquant.models.base import InputEmbeds
from anyquant.parallel.comm import (
    announce_joined,
    joined,
    post_error,
    post_status,
    posted_errors,
    publish,
    receive,
    statuses_posted,
    wait_statuses,
)
from anyquant.parallel.launch import LocalWorkers, start_workers, wait_for_abandoned_starts
from anyquant.parallel.state import (
    DEFAULT_TIMEOUT_S,
    ParallelError,
    ParallelState,
    anyquant_keys,
    connect_store,
    destroy_groups,
    form_groups,
    host_store,
    torchrun_environment,
)

if TYPE_CHECKING:
    from anyquant.loading.loader import LoadedModel
    from anyquant.models.base import DecoderLM
    from anyquant.models.multimodal import ImageInput

log = logging.getLogger(__name__)

# Command kinds (first entry of every command).
_FORWARD, _NEW_CACHE, _DROP_CACHE, _SHUTDOWN = 1, 2, 3, 4
_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOAD_TIMEOUT_S = 3600.0
# Workers started here have all reached the store before the group forms, so the rendezvous that
# follows takes well under a second. When a worker dies inside it, rank 0 fails at once but cannot
# interrupt the rendezvous: it ends on this timeout, and a later start in this process waits for it.
# (torchrun's nodes may start minutes apart: they get the store's own timeout.)
_LOCAL_RENDEZVOUS_S = 30.0
# A worker process needs this long at most to start Python, import torch and reach the store.
_START_TIMEOUT_S = 300.0


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
    expert_parallel: bool = False


# -- step messages -------------------------------------------------------------------------------


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


def encode_forward(
    cache_id: int,
    token_ids: Tensor,
    positions: Tensor,
    ctx: PagedAttention,
    rows: Tensor | None,
    input_embeds: InputEmbeds | None = None,
) -> Tensor:
    """[kind, cache, T, B, R, P, K, E, H] + ids[T] + positions[K * T] + slot_mapping[T] +
    query_lens[B] + context_lens[B] + block_tables[B * P] + rows[R] + embed rows[E] + embed
    values[E * H]; R = -1 when all rows want logits, K = 0 for 1-D positions (else their rows:
    M-RoPE's 3), E = 0 without encoder rows. Embedding values travel as their fp32 bit patterns
    (exact: the message is integers)."""
    b, p = ctx.block_tables.shape
    k = 0 if positions.dim() == 1 else positions.shape[0]
    e, h = (0, 0) if input_embeds is None else tuple(input_embeds.values.shape)
    head = torch.tensor(
        [_FORWARD, cache_id, token_ids.numel(), b, -1 if rows is None else rows.numel(), p, k, e, h]
    )
    parts = [
        head,
        token_ids.cpu().long(),
        positions.cpu().long().reshape(-1),
        ctx.slot_mapping.cpu().long(),
        torch.tensor(ctx.query_lens, dtype=torch.long),
        torch.tensor(ctx.context_lens, dtype=torch.long),
        ctx.block_tables.cpu().long().reshape(-1),
    ]
    if rows is not None:
        parts.append(rows.cpu().long())
    if input_embeds is not None:
        parts.append(input_embeds.rows.cpu().long())
        parts.append(
            input_embeds.values.detach().cpu().float().contiguous().view(torch.int32).long().reshape(-1)
        )
    return torch.cat(parts)


def decode_forward(
    msg: Tensor, device: torch.device, cache: PagedKVCache
) -> tuple[Tensor, Tensor, PagedAttention, Tensor | None, InputEmbeds | None]:
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
    embeds = None
    if e:
        embed_rows = msg[at : at + e].to(device)
        at += e
        values = msg[at : at + e * h].to(torch.int32).view(torch.float32).view(e, h).to(device)
        embeds = InputEmbeds(embed_rows, values)
    ctx = PagedAttention(cache, slots.to(device), tables.to(device), query_lens, context_lens)
    return token_ids.to(device), positions.to(device), ctx, rows, embeds


# -- rank 0 -------------------------------------------------------------------------------------


class TensorParallelModel(nn.Module):
    """Rank 0's model under tensor parallelism: same call as `DecoderLM`, workers mirror each call.

    `local` is rank 0's shard; `args` and `cache_shape` (this rank's KV heads) are the engine's
    contract. After any failure the group is unusable and every call raises the same error.
    """

    def __init__(self, local: DecoderLM, state: ParallelState, workers: LocalWorkers) -> None:
        super().__init__()
        self.local = local
        self.args = local.args
        self.cache_shape = local.cache_shape
        self.state = state
        self.workers = workers
        self.failure: str | None = None
        self.closed = False
        self._seq = 0
        self._cache_ids: weakref.WeakKeyDictionary[PagedKVCache, int] = weakref.WeakKeyDictionary()
        self._next_cache = 0
        self._dropped: list[int] = []

    def embed_images(self, images: list[ImageInput]) -> list[Tensor]:
        """Vision encoders are replicated: rank 0 runs its own; the rows travel with the step."""
        embed = getattr(self.local, "embed_images", None)
        if embed is None:
            raise UnsupportedError("this model takes no images")
        return embed(images)

    def forward(
        self,
        token_ids: Tensor,
        positions: Tensor,
        ctx: AttentionContext,
        logits_rows: Tensor | None = None,
        input_embeds: InputEmbeds | None = None,
    ) -> Tensor:
        if self.failure is not None or self.closed:
            raise ParallelError(self.failure or "the tensor-parallel group was closed")
        if not isinstance(ctx, PagedAttention):
            raise UnsupportedError(
                f"tensor parallelism runs paged attention contexts, not {type(ctx).__name__}"
            )
        dead = self.workers.dead()
        if dead:  # exited while the engine was idle: say so before any collective
            self._mark_failed("; ".join(w.describe_exit("between steps") for w in dead))
            raise ParallelError(self.failure)
        try:
            commands = [torch.tensor([_DROP_CACHE, cid]) for cid in self._dropped]
            self._dropped.clear()
            cache_id = self._cache_id(ctx.cache, commands)
            commands.append(encode_forward(cache_id, token_ids, positions, ctx, logits_rows, input_embeds))
            self._publish(commands)
            return self.local(token_ids, positions, ctx, logits_rows, input_embeds)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                self._mark_failed("interrupted in the middle of a step")
                raise
            raise self._fail(exc) from exc

    def _publish(self, commands: list[Tensor]) -> None:
        publish(self.state, self._seq, pack(commands))
        self._seq += 1

    def _cache_id(self, cache: PagedKVCache, commands: list[Tensor]) -> int:
        """Workers keep a twin of every KV cache rank 0 uses; a new cache is announced once."""
        known = self._cache_ids.get(cache)
        if known is not None:
            return known
        cid = self._next_cache
        self._next_cache += 1
        dtype = _CACHE_DTYPES.index(cache.k.dtype)
        commands.append(torch.tensor([_NEW_CACHE, cid, cache.num_pages, cache.page_size, dtype]))
        self._cache_ids[cache] = cid
        # Dropped with the next message (never from inside a step: finalizers run anywhere).
        weakref.finalize(cache, self._dropped.append, cid)
        return cid

    # -- failures and shutdown ---------------------------------------------------------------
    def _mark_failed(self, reason: str) -> None:
        self.failure = reason
        self.workers.stop(kill=True)

    def _fail(self, exc: BaseException) -> ParallelError:
        reason = diagnose(self.workers, self.state, exc)
        log.error("tensor-parallel group failed: %s", reason)
        self._mark_failed(reason)
        return ParallelError(reason)

    def close(self) -> None:
        """Stop the workers (gracefully when the group is healthy) and leave the process group."""
        if self.closed:
            return
        if self.failure is None:
            try:
                self._publish([torch.tensor([_SHUTDOWN])])
            except Exception as exc:  # rank 0's own store: only fails when torn down already
                log.warning("tensor-parallel shutdown message failed: %s", exc)
        self.workers.stop(kill=self.failure is not None)
        self.closed = True
        destroy_groups()


def _is_transport(message: str) -> bool:
    """A peer's error that only says *another* rank went away (gloo's transport messages)."""
    return any(k in message for k in ("gloo/transport", "Connection", "pair closure", "Timed out"))


def _rank_failed(workers: LocalWorkers, rank: int, message: str) -> str:
    text = f"tensor-parallel rank {rank} failed: {message}"
    worker = workers.processes.get(rank)
    return text if worker is None or worker.is_alive() else f"{text}; {worker.describe_exit()}"


def diagnose(workers: LocalWorkers, state: ParallelState, exc: BaseException) -> str:
    """Name the rank behind a failed collective: one that died, failed, or stopped answering."""
    ranks = list(range(1, state.world_size))
    deadline = time.monotonic() + 1.0
    # A worker that failed is exiting; give it a moment so its exit status and error are visible.
    while workers.processes and not workers.dead() and time.monotonic() < deadline:
        if posted_errors(state, ranks):
            break
        time.sleep(0.05)
    errors = posted_errors(state, ranks)
    crashed = [w for w in workers.dead() if w.rank not in errors]  # killed, or died without a word
    if crashed:
        return "; ".join(w.describe_exit("during a step") for w in crashed)
    failed = {r: msg for r, msg in errors.items() if not _is_transport(msg)}
    if failed:
        return "; ".join(_rank_failed(workers, r, msg) for r, msg in sorted(failed.items()))
    if workers.progress is not None:
        mine = workers.progress[0]
        behind = [r for r in ranks if workers.progress[r] < mine]
        if behind:
            procs = workers.processes
            return "; ".join(
                f"tensor-parallel rank {r} (pid {procs[r].pid if r in procs else '?'}) stopped responding: "
                f"it did not reach collective #{mine} within {state.timeout_s:g} s"
                for r in behind
            )
    if errors:
        return "; ".join(_rank_failed(workers, r, msg) for r, msg in sorted(errors.items()))
    return f"tensor-parallel step failed on rank 0: {type(exc).__name__}: {exc}"


# -- starting ranks ------------------------------------------------------------------------------


def start_tensor_parallel(request: LoadRequest, world: int) -> tuple[LoadedModel, TensorParallelModel]:
    """Start `world` ranks for `request`; return (rank 0's LoadedModel, the rank-0 model wrapper).

    Under torchrun a process of rank > 0 serves rank 0 until it shuts the group down, then raises
    SystemExit(0): the rest of the user's script only runs on rank 0."""
    env = torchrun_environment()
    if env is not None:
        rank, env_world, address, port = env
        if env_world != world:
            raise AnyquantError(
                f"tensor_parallel_size={world} but torchrun started WORLD_SIZE={env_world} processes"
            )
        if rank != 0:
            raise SystemExit(run_worker(request, rank, world, address, port, None))
        return _rank_zero(request, world, connect_store(0, world, address, port), LocalWorkers())
    wait_for_abandoned_starts()
    store = host_store(world)
    spec = {**dataclasses.asdict(request), "address": "127.0.0.1", "port": store.port}
    workers = start_workers(spec, world)
    try:
        return _rank_zero(request, world, store, workers)
    except BaseException:
        workers.stop(kill=True)
        raise


def _device_for(request: LoadRequest, rank: int) -> str:
    dev = torch.device(request.device)
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    return str(dev)


def _load(request: LoadRequest, rank: int, state: ParallelState) -> LoadedModel:
    from anyquant.loading.loader import load_model

    return load_model(
        request.path,
        device=_device_for(request, rank),
        dtype=request.dtype,
        kernel=request.kernel,
        parallel=state,
        merge_projections=request.merge_projections,
        lm_head_dtype=request.lm_head_dtype,
        expert_parallel=request.expert_parallel,
    )


def _rank_zero(
    request: LoadRequest, world: int, store: Any, workers: LocalWorkers
) -> tuple[LoadedModel, TensorParallelModel]:
    """Rank 0's start. Every wait on the workers watches them (`LocalWorkers`): a worker that exits
    while starting, forming the group or loading fails this call at once, naming it."""
    ranks = list(range(1, world))
    torch.set_num_threads(request.threads)
    device = torch.device(_device_for(request, 0))
    state: ParallelState | None = None
    try:
        if workers.processes:
            keys = anyquant_keys(store)
            workers.wait_until(lambda: joined(keys, ranks), "while starting", _START_TIMEOUT_S)
            state = workers.run_watched(
                lambda: _form_groups(store, world, device, request.timeout_s, _LOCAL_RENDEZVOUS_S),
                "while the process group was forming",
                on_abandon=lambda _: destroy_groups(),
            )
        else:
            state = _form_groups(store, world, device, request.timeout_s, None)
        state.progress = workers.progress
        group = state
        try:
            loaded = workers.run_watched(
                lambda: _load(request, 0, group), "while loading the model", lambda _: None
            )
        except ParallelError:  # a worker exited: nobody to tell
            raise
        except Exception as exc:
            post_status(state, f"rank 0 failed to load the model: {type(exc).__name__}: {exc}")
            raise
        workers.wait_until(lambda: statuses_posted(group, ranks), "while loading the model", LOAD_TIMEOUT_S)
        statuses = wait_statuses(state, ranks, LOAD_TIMEOUT_S)
        failed = [
            f"tensor-parallel rank {r} failed to load the model: {s}" for r, s in zip(ranks, statuses) if s
        ]
        if failed:
            post_status(state, "; ".join(failed))
            raise ParallelError("; ".join(failed))
        post_status(state, None)
    except BaseException:
        workers.stop(kill=True)
        if state is not None:
            destroy_groups()
        raise
    return loaded, TensorParallelModel(loaded.model, state, workers)


def _form_groups(
    store: Any, world: int, device: torch.device, timeout_s: float, rendezvous_s: float | None
) -> ParallelState:
    """Rank 0's side of the rendezvous; its failure is the group's, not a library's."""
    try:
        return form_groups(store, 0, world, device, timeout_s, rendezvous_s)
    except AnyquantError:
        raise
    except Exception as exc:
        raise ParallelError(f"the tensor-parallel process group did not form: {exc}") from exc


def run_worker(request: LoadRequest, rank: int, world: int, address: str, port: int, progress: Any) -> int:
    """A worker rank from start to shutdown; returns its exit code. A failure after the group
    formed is posted for rank 0 (which names this rank with it) and raised."""
    # The loader's imports take seconds; done before joining, they overlap rank 0's own start.
    import anyquant.loading.loader  # noqa: F401

    store = connect_store(rank, world, address, port)
    announce_joined(anyquant_keys(store), rank)
    torch.set_num_threads(request.threads)
    device = torch.device(_device_for(request, rank))
    state = form_groups(store, rank, world, device, request.timeout_s)
    state.progress = progress
    try:
        try:
            loaded = _load(request, rank, state)
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


# -- workers ------------------------------------------------------------------------------------


def serve(model: DecoderLM, state: ParallelState, device: torch.device) -> None:
    """The worker loop: receive rank 0's messages and mirror its forward passes until shutdown."""
    caches: dict[int, PagedKVCache] = {}
    seq = 0
    while True:
        for command in unpack(receive(state, seq)):
            if not _run_command(model, state, device, caches, command):
                return
        seq += 1


def _run_command(
    model: DecoderLM, state: ParallelState, device: torch.device, caches: dict[int, PagedKVCache], msg: Tensor
) -> bool:
    """Carry out one command from rank 0; False on shutdown."""
    kind = int(msg[0])
    if kind == _SHUTDOWN:
        return False
    if kind == _NEW_CACHE:
        cid, pages, page_size, dtype = (int(v) for v in msg[1:5])
        caches[cid] = PagedKVCache.for_model(model, pages, page_size, _CACHE_DTYPES[dtype], device)
    elif kind == _DROP_CACHE:
        caches.pop(int(msg[1]), None)
    elif kind == _FORWARD:
        token_ids, positions, ctx, rows, embeds = decode_forward(msg, device, caches[int(msg[1])])
        with torch.inference_mode():
            model(token_ids, positions, ctx, rows, embeds)
    else:
        raise ParallelError(f"rank {state.rank}: unknown message kind {kind} from rank 0")
    return True
