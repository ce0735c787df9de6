"""Collectives the parallel layers and the worker loop use; no-ops at world size 1.

Owns the sum of row-parallel outputs, the max of their activation amaxes, gathering
vocab-parallel logits on rank 0, publishing rank 0's step messages and exchanging load statuses.
Collectives run on a group created with a timeout (`state.py`), so a dead or hung rank turns into
an exception, never a wait forever.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from anyquant.parallel.state import ParallelState

_IDLE_POLL = datetime.timedelta(seconds=5)


def all_reduce(x: Tensor, state: ParallelState) -> Tensor:
    """Sum of `x` over ranks, in x's dtype. Summed in fp32: rank partial sums of a bf16/fp16 layer
    would otherwise round twice where one device rounds once."""
    if state.world_size == 1:
        return x
    buf = x.float() if x.dtype != torch.float32 else x.contiguous()
    state.entered_collective()
    dist.all_reduce(buf, group=state.device_group)
    return buf if x.dtype == torch.float32 else buf.to(x.dtype)


def all_reduce_max(x: Tensor, state: ParallelState) -> Tensor:
    """Elementwise max of `x` over ranks, in fp32 (exact: a max never rounds). In place when `x`
    is a contiguous fp32 tensor. Row-parallel layers use it to make dynamic activation scales span
    every rank's slice of the input features."""
    if state.world_size == 1:
        return x
    buf = x.float().contiguous()
    state.entered_collective()
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=state.device_group)
    return buf


def gather_last_dim(x: Tensor, state: ParallelState, full_size: int) -> Tensor:
    """Rank 0: the ranks' [..., n] pieces concatenated and cut to `full_size`; other ranks: `x`."""
    if state.world_size == 1:
        return x
    buf = x.float().contiguous()
    pieces = [torch.empty_like(buf) for _ in range(state.world_size)] if state.rank == 0 else None
    state.entered_collective()
    dist.gather(buf, pieces, dst=0, group=state.device_group)
    if pieces is None:
        return x
    return torch.cat(pieces, dim=-1)[..., :full_size].to(x.dtype)


def publish(state: ParallelState, seq: int, message: Tensor) -> None:
    """Rank 0: make 1-D int64 `message` number `seq` available to the workers.

    Through the store: a gloo send waits once the peer has stopped posting receives, so a stopped
    worker could block rank 0 outside any collective timeout. Message seq - 2 is dropped: every
    message carries a forward pass, and rank 0 finished message seq - 1's collectives, so every
    worker has read seq - 2."""
    state.store.set(f"step/{seq}", message.contiguous().numpy().tobytes())
    if seq >= 2:
        state.store.delete_key(f"step/{seq - 2}")


def receive(state: ParallelState, seq: int) -> Tensor:
    """Workers: wait (as long as it takes: a server may idle for days) for message `seq`.

    A rank 0 that died closes the store's connection, which raises instead of waiting on."""
    key = f"step/{seq}"
    while True:
        try:
            state.store.wait([key], _IDLE_POLL)
            break
        except dist.DistStoreError:  # a timeout; network errors are DistNetworkError
            continue
    return torch.frombuffer(bytearray(state.store.get(key)), dtype=torch.long)


def post_status(state: ParallelState, status: str | None) -> None:
    """This rank's load status (None = fine, else an error message). Rank 0 posts last: its
    status is the verdict the workers wait for."""
    state.store.set(f"status/{state.rank}", "" if status is None else status)


def wait_statuses(state: ParallelState, ranks: list[int], timeout_s: float) -> list[str | None]:
    """The statuses of `ranks`, waiting up to `timeout_s` (loading may take far longer than a step)."""
    keys = [f"status/{r}" for r in ranks]
    state.store.wait(keys, datetime.timedelta(seconds=timeout_s))
    return [state.store.get(k).decode() or None for k in keys]


def statuses_posted(state: ParallelState, ranks: list[int]) -> bool:
    """Whether every rank of `ranks` has posted its load status (never waits)."""
    return bool(state.store.check([f"status/{r}" for r in ranks]))


# Spawned workers announce themselves in the store before the group forms, so that rank 0 can wait
# for them while watching their processes (the rendezvous itself cannot be interrupted).
def announce_joined(keys: Any, rank: int) -> None:
    keys.set(f"joined/{rank}", "")


def joined(keys: Any, ranks: list[int]) -> bool:
    return bool(keys.check([f"joined/{r}" for r in ranks]))


def post_error(state: ParallelState, message: str) -> None:
    """A worker's failure after the group formed, for rank 0's diagnosis (best effort: the store
    is gone when rank 0 is)."""
    with contextlib.suppress(Exception):  # nobody is left to tell
        state.store.set(f"error/{state.rank}", message)


def posted_errors(state: ParallelState, ranks: list[int]) -> dict[int, str]:
    """rank -> the error it posted, for the ranks that did (never waits)."""
    out = {}
    for r in ranks:
        key = f"error/{r}"
        if state.store.check([key]):
            out[r] = state.store.get(key).decode()
    return out
