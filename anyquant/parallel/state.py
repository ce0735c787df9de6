"""`ParallelState`: who this process is in a tensor-parallel group, and the groups it talks on.

Owns rank, world size, the device process group, the TCP store that carries rank 0's step
messages, and their set-up from an explicit address (workers rank 0 starts) or torchrun's
environment variables. At world size 1 there is no group and every collective in `comm.py` is
a no-op. Layers receive this object; nothing reads the rank from globals.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from anyquant.errors import AnyquantError, EngineDeadError

DEFAULT_TIMEOUT_S = 30.0
# Connecting to the store, and its own operations; never the idle wait (comm.receive loops).
_STORE_TIMEOUT = datetime.timedelta(seconds=300)


class ParallelError(EngineDeadError):
    """A tensor-parallel rank died, hung or failed; the message names the rank."""


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    device_group: Any = None  # collectives on activations (gloo on CPU, NCCL on CUDA)
    # Rank 0's step messages and the ranks' load statuses. A store, not a collective: rank 0
    # never blocks writing to it, however long a worker has stopped reading.
    store: Any = None
    timeout_s: float = DEFAULT_TIMEOUT_S  # how long a collective waits for a silent rank
    # Spawned ranks only: a shared per-rank count of collectives entered, so that rank 0 can name a
    # rank that stopped answering (the one that never reached the collective the others wait in).
    progress: Any = None

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def entered_collective(self) -> None:
        if self.progress is not None:
            self.progress[self.rank] += 1


def free_port() -> int:
    """A TCP port free right now on this host (the rendezvous of spawned ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_environment() -> tuple[int, int, str, int] | None:
    """(rank, world size, master address, master port) when launched by torchrun, else None."""
    names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if not all(os.environ.get(n) for n in names):
        return None
    try:
        rank, world, port = (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ["MASTER_PORT"]),
        )
    except ValueError as exc:
        raise AnyquantError(
            f"torchrun environment: RANK, WORLD_SIZE and MASTER_PORT must be integers ({exc})"
        ) from exc
    return rank, world, os.environ["MASTER_ADDR"], port


def connect_store(rank: int, world_size: int, address: str, port: int) -> Any:
    """The rendezvous store at address:port: rank 0 hosts it (port 0: any free port, read back from
    `store.port`), the other ranks connect as clients."""
    import torch.distributed as dist

    # torchrun's agent already serves a store at MASTER_ADDR:MASTER_PORT (it says so in this
    # variable); then every rank is a client, as torch's own env:// rendezvous does.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(
        address,
        port,
        world_size,
        is_master=rank == 0 and not agent_store,
        timeout=_STORE_TIMEOUT,
        wait_for_workers=False,
    )


def host_store(world_size: int) -> Any:
    """Rank 0's store for workers it starts itself, on a port the OS picks (read `store.port`):
    no window between choosing a free port and binding it."""
    import torch.distributed as dist

    return dist.TCPStore(
        "127.0.0.1", 0, world_size, is_master=True, timeout=_STORE_TIMEOUT, wait_for_workers=False
    )


def anyquant_keys(store: Any) -> Any:
    """The project's keys in a rendezvous store (step messages, statuses, errors), apart from
    torch's own."""
    import torch.distributed as dist

    return dist.PrefixStore("anyquant/", store)


def collective_backend(device: torch.device) -> str:
    """NCCL for CUDA ranks (each bound to its own GPU first: NCCL takes the current device as the
    rank's, and two ranks on one GPU fail), gloo on CPU."""
    if device.type != "cuda":
        return "gloo"
    if device.index is not None:
        torch.cuda.set_device(device)
    return "nccl"


def form_groups(
    store: Any,
    rank: int,
    world_size: int,
    device: torch.device,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    rendezvous_timeout_s: float | None = None,
) -> ParallelState:
    """Build the process group over `store` (every rank calls this, in any order; it returns when
    all have). `rendezvous_timeout_s` bounds that wait (default: the store's timeout); steps get
    the short `timeout_s`."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise AnyquantError(
            "a tensor-parallel group already exists in this process; close the other LLM first "
            "(one tensor-parallel model per process)"
        )
    backend = collective_backend(device)
    rendezvous = (
        _STORE_TIMEOUT if rendezvous_timeout_s is None else datetime.timedelta(seconds=rendezvous_timeout_s)
    )
    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=rendezvous)
        group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    except BaseException:
        _forget_failed_rendezvous()
        raise
    return ParallelState(rank, world_size, group, anyquant_keys(store), timeout_s)


def _forget_failed_rendezvous() -> None:
    """Undo what a failed rendezvous left behind, so that a later group in this process can form.
    torch names groups by a per-process counter that it advances before the rendezvous and resets
    only when a formed world group is destroyed: after a failure the next group here would wait
    for keys its peers never write."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    if dist.is_initialized():
        dist.destroy_process_group()
    elif hasattr(distributed_c10d, "_world"):
        distributed_c10d._world.group_count = 0


def init_groups(
    rank: int,
    world_size: int,
    address: str,
    port: int,
    device: torch.device,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ParallelState:
    """Join the rendezvous at address:port (rank 0 hosts the store there) and build the group.
    The rendezvous waits for every rank to start (imports, spawn): the store's timeout."""
    return form_groups(connect_store(rank, world_size, address, port), rank, world_size, device, timeout_s)


def destroy_groups() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
