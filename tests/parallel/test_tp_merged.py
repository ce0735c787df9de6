"""Under tensor parallelism each rank merges its own shards of q/k/v and gate/up (zero-padded
gate/up rows included), and the logits equal one process running the projections unmerged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from anyquant.engine.kv_cache import SequenceCache
from anyquant.layers.linear import MergedLinear
from anyquant.loading.loader import load_model
from anyquant.parallel.state import destroy_groups, free_port, init_groups
from tests.parallel.conftest import IDS

pytestmark = pytest.mark.slow

# llama: an intermediate of 3 groups of 32, padded at TP 2; ct-w4a16-lm-head: Qwen2 q/k/v biases;
# qwen2-moe: the gated shared expert merges, routed experts do not.
MODELS = ["llama", "ct-w4a16-lm-head", "qwen2-moe"]


def _rank(rank: int, world: int, port: int, models: dict[str, Path], out: Path) -> None:
    torch.set_num_threads(1)
    state = init_groups(rank, world, "127.0.0.1", port, torch.device("cpu"), timeout_s=60)
    try:
        for name, path in models.items():
            loaded = load_model(path, dtype="float32", parallel=state)
            logits = SequenceCache(loaded.model, len(IDS), torch.float32).forward(IDS, 0)
            merged = {m.prefix: list(m.parts) for m in loaded.model.modules() if isinstance(m, MergedLinear)}
            (out / f"{name}.{rank}.json").write_text(json.dumps({"merged": merged, "why": loaded.merges}))
            if rank == 0:
                torch.save(logits, out / f"{name}.pt")
    finally:
        destroy_groups()


def test_each_rank_merges_its_shards_and_logits_equal_unmerged(
    tp_model: Callable[[str], Path], tmp_path: Path
) -> None:
    models = {name: tp_model(name) for name in MODELS}
    world = 2
    mp.start_processes(_rank, args=(world, free_port(), models, tmp_path), nprocs=world, start_method="spawn")
    for name, path in models.items():
        single = load_model(path, dtype="float32", merge_projections=False)
        want = SequenceCache(single.model, len(IDS), torch.float32).forward(IDS, 0)
        got = torch.load(tmp_path / f"{name}.pt")
        err = float((got - want).norm() / want.norm())
        assert err < 1e-5, (name, err)  # row-parallel partial sums: fp32 summation order only
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        for rank in range(world):
            doc = json.loads((tmp_path / f"{name}.{rank}.json").read_text())
            assert all(why is None for why in doc["why"].values()), (name, doc["why"])
            assert doc["merged"] and len(doc["merged"]) == len(doc["why"])
            for prefix, parts in doc["merged"].items():
                # Each part is this rank's shard: half of the heads or padded intermediate.
                layer = prefix.rsplit(".", 1)[-1]
                full = single.model.get_submodule(prefix.rsplit(".", 1)[0])
                whole = (
                    [m.out_features for m in (full.q_proj, full.k_proj, full.v_proj)]
                    if layer == "qkv_proj"
                    else [full.gate_proj.out_features] * 2
                )
                assert all(p * world >= w for p, w in zip(parts, whole)), (prefix, parts, whole)
