"""Run a function on N gloo ranks (spawned processes), torchrun-style: every rank runs the same code.

Used by the tensor-parallel logits tests: each rank loads its shard of several checkpoints and
runs the same teacher-forced forward; rank 0 saves the logits. One spawn serves many models.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp

from anyquant.engine.kv_cache import SequenceCache
from anyquant.layers.moe import SparseMoE
from anyquant.loading.loader import load_model
from anyquant.parallel.state import destroy_groups, free_port, init_groups


def tp_logits(
    world: int, models: dict[str, Path], ids: list[int], out: Path, expert_parallel: bool = False
) -> dict[str, torch.Tensor]:
    """name -> fp32 logits [T, vocab] of `ids` computed by `world` ranks. Every rank also saves,
    per MoE block, the routed experts it holds and whether they run fused (`held_experts`)."""
    args = (world, free_port(), models, ids, out, expert_parallel)
    mp.start_processes(_rank, args=args, nprocs=world, start_method="spawn")
    return {name: torch.load(out / f"{name}.pt") for name in models}


def held_experts(out: Path, name: str, rank: int) -> list[tuple[str, int, int, int, bool]]:
    """(block prefix, first held expert, stop, experts in the module, fused) per MoE block."""
    return list(torch.load(out / f"{name}.experts.{rank}.pt"))


def _rank(
    rank: int,
    world: int,
    port: int,
    models: dict[str, Path],
    ids: list[int],
    out: Path,
    expert_parallel: bool,
) -> None:
    torch.set_num_threads(1)
    state = init_groups(rank, world, "127.0.0.1", port, torch.device("cpu"), timeout_s=60)
    try:
        for name, path in models.items():
            model = load_model(path, dtype="float32", parallel=state, expert_parallel=expert_parallel).model
            logits = SequenceCache(model, len(ids), torch.float32).forward(ids, 0)
            held = [
                (m.prefix, m.local_experts.start, m.local_experts.stop, len(m.experts), m.fused is not None)
                for m in model.modules()
                if isinstance(m, SparseMoE)
            ]
            torch.save(held, out / f"{name}.experts.{rank}.pt")
            if rank == 0:
                torch.save(logits, out / f"{name}.pt")
    finally:
        destroy_groups()
