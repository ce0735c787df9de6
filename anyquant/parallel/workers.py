"""Tensor-parallel ranks: start them, mirror rank 0's forward passes on them, and fail loudly.

Owns the process model of architecture.md §7. Rank 0 (the caller's process) runs the engine; its
model is wrapped in `TensorParallelModel`, which before each forward publishes a compact step
message (token ids, positions, the step's attention metadata, logits rows) so that every
worker runs the same forward on its shard and joins the same collectives. Workers are spawned
(`torch.multiprocessing`, gloo on CPU) or started by torchrun (RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT). A rank that dies, hangs or fails makes rank 0 raise `ParallelError` naming it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
from anyquant.errors import AnyquantError, UnsupportedError
from anyquant.layers.attention import AttentionContext
from anyquant.parallel.comm import post_status, publish, receive, wait_statuses
from anyquant.parallel.state import (
    DEFAULT_TIMEOUT_S,
    ParallelError,
    ParallelState,
    destroy_groups,
    free_port,
    init_groups,
    torchrun_environment,
)

if TYPE_CHECKING:
    from anyquant.loading.loader import LoadedModel
    from anyquant.models.base import DecoderLM

log = logging.getLogger(__name__)

# Command kinds (first entry of every command).
_FORWARD, _NEW_CACHE, _DROP_CACHE, _SHUTDOWN = 1, 2, 3, 4
_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
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
    cache_id: int, token_ids: Tensor, positions: Tensor, ctx: PagedAttention, rows: Tensor | None
) -> Tensor:
    """[kind, cache, T, B, R, P] + ids[T] + positions[T] + slot_mapping[T] + query_lens[B] +
    context_lens[B] + block_tables[B * P] + rows[R]; R = -1 when all rows want logits."""
    b, p = ctx.block_tables.shape
    head = torch.tensor([_FORWARD, cache_id, token_ids.numel(), b, -1 if rows is None else rows.numel(), p])
    parts = [
        head,
        token_ids.cpu().long(),
        positions.cpu().long(),
        ctx.slot_mapping.cpu().long(),
        torch.tensor(ctx.query_lens, dtype=torch.long),
        torch.tensor(ctx.context_lens, dtype=torch.long),
        ctx.block_tables.cpu().long().reshape(-1),
    ]
    if rows is not None:
        parts.append(rows.cpu().long())
    return torch.cat(parts)


def decode_forward(
    msg: Tensor, device: torch.device, cache: PagedKVCache
) -> tuple[Tensor, Tensor, PagedAttention, Tensor | None]:
    t, b, r, p = (int(v) for v in msg[2:6])
    at = 6
    token_ids, positions, slots = msg[at : at + t], msg[at + t : at + 2 * t], msg[at + 2 * t : at + 3 * t]
    at += 3 * t
    query_lens, context_lens = msg[at : at + b].tolist(), msg[at + b : at + 2 * b].tolist()
    at += 2 * b
    tables = msg[at : at + b * p].view(b, p)
    at += b * p
    rows = None if r < 0 else msg[at : at + r].to(device)
    ctx = PagedAttention(cache, slots.to(device), tables.to(device), query_lens, context_lens)
    return token_ids.to(device), positions.to(device), ctx, rows


# -- rank 0 -------------------------------------------------------------------------------------


@dataclass
class _Workers:
    """Spawned ranks 1..N-1 and what they share with rank 0 (empty when torchrun started them)."""

    processes: dict[int, Any] = field(default_factory=dict)  # rank -> multiprocessing.Process
    reports: Any = None  # SimpleQueue of (rank, "ready" | "error", message) from the workers
    progress: Any = None  # shared per-rank collective counters


class TensorParallelModel(nn.Module):
    """Rank 0's model under tensor parallelism: same call as `DecoderLM`, workers mirror each call.

    `local` is rank 0's shard; `args` and `cache_shape` (this rank's KV heads) are the engine's
    contract. After any failure the group is unusable and every call raises the same error.
    """

    def __init__(self, local: DecoderLM, state: ParallelState, workers: _Workers) -> None:
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

    def forward(
        self, token_ids: Tensor, positions: Tensor, ctx: AttentionContext, logits_rows: Tensor | None = None
    ) -> Tensor:
        if self.failure is not None or self.closed:
            raise ParallelError(self.failure or "the tensor-parallel group was closed")
        if not isinstance(ctx, PagedAttention):
            raise UnsupportedError(
                f"tensor parallelism runs paged attention contexts, not {type(ctx).__name__}"
            )
        try:
            commands = [torch.tensor([_DROP_CACHE, cid]) for cid in self._dropped]
            self._dropped.clear()
            cache_id = self._cache_id(ctx.cache, commands)
            commands.append(encode_forward(cache_id, token_ids, positions, ctx, logits_rows))
            self._publish(commands)
            return self.local(token_ids, positions, ctx, logits_rows)
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
        _stop(self.workers, kill=True)

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
        _stop(self.workers, kill=self.failure is not None)
        self.closed = True
        destroy_groups()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _drain(reports: Any) -> list[tuple[int, str, str]]:
    out = []
    while reports is not None and not reports.empty():
        out.append(reports.get())
    return out


def _is_transport(message: str) -> bool:
    """A peer's error that only says *another* rank went away (gloo's transport messages)."""
    return any(k in message for k in ("gloo/transport", "Connection", "pair closure", "Timed out"))


def diagnose(workers: _Workers, state: ParallelState, exc: BaseException) -> str:
    """Name the rank behind a failed collective: one that died, failed, or stopped answering."""
    procs = workers.processes
    deadline = time.monotonic() + 1.0
    # A worker that failed is exiting; give it a moment so its exit code and report are visible.
    while procs and all(p.is_alive() for p in procs.values()) and time.monotonic() < deadline:
        if workers.reports is not None and not workers.reports.empty():
            break
        time.sleep(0.05)
    reports = {r: msg for r, kind, msg in _drain(workers.reports) if kind == "error"}
    crashed = [(r, p) for r, p in sorted(procs.items()) if not p.is_alive() and r not in reports]
    if crashed:
        return "; ".join(
            f"tensor-parallel rank {r} (pid {p.pid}) {_exit_text(p.exitcode)}" for r, p in crashed
        )
    failed = {r: msg for r, msg in reports.items() if not _is_transport(msg)}
    if failed:
        return "; ".join(f"tensor-parallel rank {r} failed: {msg}" for r, msg in sorted(failed.items()))
    if workers.progress is not None:
        mine = workers.progress[0]
        behind = [r for r in range(1, state.world_size) if workers.progress[r] < mine]
        if behind:
            return "; ".join(
                f"tensor-parallel rank {r} (pid {procs[r].pid if r in procs else '?'}) stopped responding: "
                f"it did not reach collective #{mine} within {state.timeout_s:g} s"
                for r in behind
            )
    if reports:
        return "; ".join(f"tensor-parallel rank {r} failed: {msg}" for r, msg in sorted(reports.items()))
    return f"tensor-parallel step failed on rank 0: {type(exc).__name__}: {exc}"


def _stop(workers: _Workers, kill: bool, grace_s: float = 5.0) -> None:
    deadline = time.monotonic() + (0.0 if kill else grace_s)
    for p in workers.processes.values():
        if not kill:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()  # SIGKILL also ends a stopped (SIGSTOP) process
            p.join(timeout=grace_s)


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
            code = _worker(request, rank, world, address, port, None, None)
            raise SystemExit(code)
        return _rank_zero(request, world, address, port, _Workers())
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    # Idle workers poll the store with a short timeout; c10d logs every expiry as a warning. Workers
    # inherit this at spawn (the variable is read when torch's C++ logging starts).
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    workers = _Workers(reports=ctx.SimpleQueue(), progress=ctx.Array("q", world, lock=False))
    port = free_port()
    for rank in range(1, world):
        proc = ctx.Process(
            target=_spawned_worker,
            args=(request, rank, world, port, workers.reports, workers.progress),
            name=f"anyquant-tp-rank{rank}",
            daemon=True,
        )
        proc.start()
        workers.processes[rank] = proc
    try:
        return _rank_zero(request, world, "127.0.0.1", port, workers)
    except BaseException:
        _stop(workers, kill=True)
        raise


def _device_for(request: LoadRequest, rank: int) -> str:
    dev = torch.device(request.device)
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    return str(dev)


def _join(
    request: LoadRequest, rank: int, world: int, address: str, port: int, progress: Any
) -> tuple[ParallelState, LoadedModel | None, Exception | None]:
    """Join the group and load this rank's shard; a load error is returned, to be shared first."""
    from anyquant.loading.loader import load_model

    device = _device_for(request, rank)
    torch.set_num_threads(request.threads)
    state = init_groups(rank, world, address, port, torch.device(device), request.timeout_s)
    state.progress = progress
    try:
        loaded = load_model(
            request.path, device=device, dtype=request.dtype, kernel=request.kernel, parallel=state
        )
    except Exception as exc:
        return state, None, exc
    return state, loaded, None


def _rank_zero(
    request: LoadRequest, world: int, address: str, port: int, workers: _Workers
) -> tuple[LoadedModel, TensorParallelModel]:
    state, loaded, error = _join(request, 0, world, address, port, workers.progress)
    try:
        if error is not None:
            post_status(state, f"rank 0 failed to load the model: {type(error).__name__}: {error}")
            raise error
        _wait_for_spawned(workers)
        statuses = wait_statuses(state, list(range(1, world)), LOAD_TIMEOUT_S)
        failed = [
            f"tensor-parallel rank {r} failed to load the model: {s}" for r, s in enumerate(statuses, 1) if s
        ]
        if failed:
            post_status(state, "; ".join(failed))
            raise ParallelError("; ".join(failed))
        post_status(state, None)
    except BaseException:
        _stop(workers, kill=True)
        destroy_groups()
        raise
    assert loaded is not None
    return loaded, TensorParallelModel(loaded.model, state, workers)


def _wait_for_spawned(workers: _Workers) -> None:
    """Rank 0 of spawned ranks: wait until every worker has loaded, failing at once when one
    reports an error or dies (the status exchange alone could only time out)."""
    ready: set[int] = set()
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while len(ready) < len(workers.processes):
        for rank, kind, msg in _drain(workers.reports):
            if kind == "error":
                raise ParallelError(f"tensor-parallel rank {rank} failed to load the model: {msg}")
            ready.add(rank)
        for rank, proc in workers.processes.items():
            if rank not in ready and not proc.is_alive():
                raise ParallelError(
                    f"tensor-parallel rank {rank} (pid {proc.pid}) {_exit_text(proc.exitcode)} while loading"
                )
        if time.monotonic() > deadline:
            pending = sorted(set(workers.processes) - ready)
            raise ParallelError(f"tensor-parallel ranks {pending} did not load within {LOAD_TIMEOUT_S:g} s")
        time.sleep(0.02)


def _worker(
    request: LoadRequest, rank: int, world: int, address: str, port: int, reports: Any, progress: Any
) -> int:
    """A worker rank from start to shutdown; returns its exit code."""
    state, loaded, error = _join(request, rank, world, address, port, progress)
    problem = None if error is None else f"{type(error).__name__}: {error}"
    if reports is not None:
        reports.put((rank, "error" if problem else "ready", problem or ""))
    post_status(state, problem)
    (verdict,) = wait_statuses(state, [0], LOAD_TIMEOUT_S)
    if loaded is None or verdict is not None:
        return 1
    serve(loaded.model, state, torch.device(_device_for(request, rank)))
    destroy_groups()
    return 0


def _spawned_worker(
    request: LoadRequest, rank: int, world: int, port: int, reports: Any, progress: Any
) -> None:
    """Entry point of a spawned worker: report any failure to rank 0, then exit without cleanup
    (a process group whose peer died may block in its destructor)."""
    try:
        code = _worker(request, rank, world, "127.0.0.1", port, reports, progress)
    except BaseException as exc:
        reports.put((rank, "error", f"{type(exc).__name__}: {exc}"))
        code = 1
    os._exit(code)


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
        token_ids, positions, ctx, rows = decode_forward(msg, device, caches[int(msg[1])])
        with torch.inference_mode():
            model(token_ids, positions, ctx, rows)
    else:
        raise ParallelError(f"rank {state.rank}: unknown message kind {kind} from rank 0")
    return True
