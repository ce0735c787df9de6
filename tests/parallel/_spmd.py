"""Run a function on N gloo ranks (spawned processes), torchrun-style: every rank runs the same code.

Used by the tensor-parallel logits tests: each rank loads its shard of several checkpoints and
runs the same teacher-forced forward; rank 0 saves the logits. One spawn serves many models.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp

from anyquant.engine.kv_cache import SequenceCache
from anyquant.loading.loader import load_model
from anyquant.parallel.state import destroy_groups, free_port, init_groups


def tp_logits(world: int, models: dict[str, Path], ids: list[int], out: Path) -> dict[str, torch.Tensor]:
    """name -> fp32 logits [T, vocab] of `ids` computed by `world` ranks."""
    mp.start_processes(_rank, args=(world, free_port(), models, ids, out), nprocs=world, start_method="spawn")
    return {name: torch.load(out / f"{name}.pt") for name in models}


def _rank(rank: int, world: int, port: int, models: dict[str, Path], ids: list[int], out: Path) -> None:
    torch.set_num_threads(1)
    state = init_groups(rank, world, "127.0.0.1", port, torch.device("cpu"), timeout_s=60)
    try:
        for name, path in models.items():
            model = load_model(path, dtype="float32", parallel=state).model
            logits = SequenceCache(model, len(ids), torch.float32).forward(ids, 0)
            if rank == 0:
                torch.save(logits, out / f"{name}.pt")
    finally:
        destroy_groups()
