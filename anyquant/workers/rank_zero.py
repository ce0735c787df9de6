"""Tensor-parallel rank 0: start the ranks, mirror its forward passes on them, and fail loudly.

Owns the process model of architecture.md §7 on rank 0's side. Rank 0 (the caller's process) runs
the engine; its model is wrapped in `TensorParallelModel`, which before each forward publishes a
compact step message (`parallel/wire.py`: token ids, positions, the step's attention metadata,
logits rows) so that every worker (`worker.py`) runs the same forward on its shard and joins the
same collectives. Workers are started by `parallel/launch.py` (the package's own entry point, gloo
on CPU) or by torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, one machine or several). A
rank that dies, hangs or fails makes rank 0 raise `ParallelError` naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
from anyquant.errors import AnyquantError, UnsupportedError
from anyquant.layers.attention import AttentionContext
from anyquant.models.base import InputEmbeds
from anyquant.models.multimodal import CrossAttentionStep, ImageEncoder
from anyquant.parallel import wire
from anyquant.parallel.comm import (
    joined,
    post_status,
    posted_errors,
    publish,
    statuses_posted,
    wait_statuses,
)
from anyquant.parallel.launch import LocalWorkers, start_workers, wait_for_abandoned_starts
from anyquant.parallel.state import (
    ParallelError,
    ParallelState,
    anyquant_keys,
    connect_store,
    destroy_groups,
    form_groups,
    host_store,
    torchrun_environment,
)
from anyquant.workers.worker import LOAD_TIMEOUT_S, LoadRequest, device_for, load_shard, run_worker

if TYPE_CHECKING:
    from anyquant.loading.loader import LoadedModel
    from anyquant.models.multimodal import ImageInput
    from anyquant.models.protocol import CausalLM

log = logging.getLogger(__name__)

# Workers started here have all reached the store before the group forms, so the rendezvous that
# follows takes well under a second. When a worker dies inside it, rank 0 fails at once but cannot
# interrupt the rendezvous: it ends on this timeout, and a later start in this process waits for it.
# (torchrun's nodes may start minutes apart: they get the store's own timeout.)
_LOCAL_RENDEZVOUS_S = 30.0
# A worker process needs this long at most to start Python, import torch and reach the store.
_START_TIMEOUT_S = 300.0


def encode_forward(
    cache_id: int,
    token_ids: Tensor,
    positions: Tensor,
    ctx: PagedAttention,
    rows: Tensor | None,
    input_embeds: InputEmbeds | None = None,
    cross: CrossAttentionStep | None = None,
) -> Tensor:
    """One forward as a FORWARD command (`wire.encode_step`)."""
    return wire.encode_step(
        wire.ForwardStep(
            cache_id,
            token_ids,
            positions,
            ctx.slot_mapping,
            ctx.query_lens,
            ctx.context_lens,
            ctx.block_tables,
            rows,
            None if input_embeds is None else input_embeds.rows,
            None if input_embeds is None else input_embeds.values,
            None if cross is None else cross.to_message(),
        )
    )


# -- rank 0 -------------------------------------------------------------------------------------


class TensorParallelModel(nn.Module):
    """Rank 0's model under tensor parallelism: an `EngineModel` (models/protocol.py) whose every
    call the workers mirror.

    `local` is rank 0's shard; `args` and `cache_shape` (this rank's KV heads) are the engine's
    contract. After any failure the group is unusable and every call raises the same error.
    """

    def __init__(self, local: CausalLM, state: ParallelState, workers: LocalWorkers) -> None:
        super().__init__()
        self.local = local
        self.args = local.args
        self.cache_shape = local.cache_shape
        self.prompt_vocab_size = getattr(local, "prompt_vocab_size", local.args.vocab_size)
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
        if not isinstance(self.local, ImageEncoder):
            raise UnsupportedError("this model takes no images")
        return self.local.embed_images(images)

    def forward(
        self,
        token_ids: Tensor,
        positions: Tensor,
        ctx: AttentionContext,
        logits_rows: Tensor | None = None,
        input_embeds: InputEmbeds | None = None,
        cross: CrossAttentionStep | None = None,
    ) -> Tensor:
        """`cross`: a cross-attention family's step (models/multimodal.py); every rank builds and
        keeps its own share of the requests' cross-attention keys and values."""
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
            commands = [wire.drop_cache(cid) for cid in self._dropped]
            self._dropped.clear()
            cache_id = self._cache_id(ctx.cache, commands)
            commands.append(
                encode_forward(cache_id, token_ids, positions, ctx, logits_rows, input_embeds, cross)
            )
            self._publish(commands)
            extra = {} if cross is None else {"cross": cross}
            return self.local(token_ids, positions, ctx, logits_rows, input_embeds, **extra)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                self._mark_failed("interrupted in the middle of a step")
                raise
            raise self._fail(exc) from exc

    def _publish(self, commands: list[Tensor]) -> None:
        publish(self.state, self._seq, wire.pack(commands))
        self._seq += 1

    def _cache_id(self, cache: PagedKVCache, commands: list[Tensor]) -> int:
        """Workers keep a twin of every KV cache rank 0 uses; a new cache is announced once."""
        known = self._cache_ids.get(cache)
        if known is not None:
            return known
        cid = self._next_cache
        self._next_cache += 1
        commands.append(
            wire.new_cache(cid, cache.num_pages, cache.page_size, cache.k.dtype, cache.compute_dtype)
        )
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
                self._publish([wire.shutdown()])
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


def _rank_zero(
    request: LoadRequest, world: int, store: Any, workers: LocalWorkers
) -> tuple[LoadedModel, TensorParallelModel]:
    """Rank 0's start. Every wait on the workers watches them (`LocalWorkers`): a worker that exits
    while starting, forming the group or loading fails this call at once, naming it."""
    ranks = list(range(1, world))
    torch.set_num_threads(request.threads)
    device = torch.device(device_for(request, 0))
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
                lambda: load_shard(request, 0, group), "while loading the model", lambda _: None
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
