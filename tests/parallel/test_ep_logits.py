"""Expert parallelism (`enable_expert_parallel`) at 2 and 4 real gloo ranks gives one process's logits.

Each rank holds whole routed experts (a contiguous range; expert counts 5, 7 and 9 that neither 2
nor 4 divides) and the attention, dense and shared-expert layers stay tensor-parallel. Covered:
Mixtral (per-expert path, fp32 dense experts), Qwen3-MoE GPTQ (the fused C++ call on AVX-512),
Qwen2-MoE (sigmoid-gated shared expert) and DeepSeek-V2 (latent attention, grouped routing,
shared expert).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from anyquant import LLM
from anyquant.errors import UnsupportedError
from anyquant.loading.describe import describe_checkpoint
from anyquant.parallel.partition import place_experts
from anyquant.quant.kernels.avx512 import Avx512WeightOnlyKernel
from anyquant.quant.spec import QuantSpec
from tests.parallel._spmd import held_experts, tp_logits
from tests.parallel.conftest import IDS

MODELS = {"mixtral-e5": 5, "qwen3-moe-e7-gptq": 7, "qwen2-moe-e5": 5, "deepseek-v2-e9": 9}
FUSED_AVAILABLE = (
    Avx512WeightOnlyKernel.cannot_run(
        QuantSpec("uint4", "group", group_size=32), "experts", torch.device("cpu"), (64, 64), torch.float32
    )
    is None
)


@pytest.fixture(scope="module")
def reference(tp_model: Callable[[str], Path]) -> dict[str, torch.Tensor]:
    return {name: LLM(tp_model(name), dtype="float32").logits(IDS) for name in MODELS}


@pytest.fixture(scope="module", params=[2, 4])
def parallel(
    request: pytest.FixtureRequest, tp_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, Path, dict[str, torch.Tensor]]:
    world = int(request.param)
    out = tmp_path_factory.mktemp(f"ep{world}")
    models = {name: tp_model(name) for name in MODELS}
    return world, out, tp_logits(world, models, IDS, out, expert_parallel=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_ep_logits_equal_single_process(
    parallel: tuple[int, Path, dict[str, torch.Tensor]], reference: dict[str, torch.Tensor], name: str
) -> None:
    world, out, logits = parallel
    got, want = logits[name], reference[name]
    assert got.shape == want.shape
    # Same weights, same math; only the order of the fp32 sum over ranks differs.
    err = float((got - want).norm() / want.norm())
    assert err < 1e-5, (name, world, err)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # Every rank held exactly its placed experts, and together they hold each expert once.
    placement = place_experts(MODELS[name], world, name)
    blocks: dict[str, list[int]] = {}
    for rank in range(world):
        for prefix, start, stop, count, fused in held_experts(out, name, rank):
            held = placement.experts(rank)
            assert (start, stop, count) == (held.start, held.stop, len(held)), (name, rank, prefix)
            blocks.setdefault(prefix, []).extend(range(start, stop))
            if name.endswith("gptq") and FUSED_AVAILABLE:
                assert fused, (name, rank, prefix)
    assert blocks and all(sorted(ids) == list(range(MODELS[name])) for ids in blocks.values())


def test_placement_is_even_and_whole() -> None:
    assert [len(place_experts(60, 4, "m").experts(r)) for r in range(4)] == [15] * 4
    eleven = place_experts(11, 4, "m")
    assert [list(eleven.experts(r)) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    assert [eleven.owner(e) for e in (0, 2, 3, 8, 9, 10)] == [0, 0, 1, 2, 3, 3]
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.mlp: .* 4 ranks .* has 3"):
        place_experts(3, 4, "model.layers.0.mlp")


def test_expert_parallel_refuses_a_dense_model(tp_model: Callable[[str], Path]) -> None:
    dense = tp_model("llama")
    with pytest.raises(UnsupportedError, match="no mixture-of-experts layers"):
        LLM(dense, dtype="float32", enable_expert_parallel=True)
    # Refused from the headers, before any rank starts.
    with pytest.raises(UnsupportedError, match="no mixture-of-experts layers"):
        LLM(dense, dtype="float32", tensor_parallel_size=2, enable_expert_parallel=True)
    doc = describe_checkpoint(dense, tp=2, expert_parallel=True)["tensor_parallel"]
    assert not doc["ok"] and "no mixture-of-experts layers" in doc["reason"]


def test_inspect_shows_the_placement(tp_model: Callable[[str], Path]) -> None:
    path = tp_model("qwen3-moe-e7")
    plain = describe_checkpoint(path, tp=4)["tensor_parallel"]
    doc = describe_checkpoint(path, tp=4, expert_parallel=True)["tensor_parallel"]
    assert doc["ok"] and not plain["expert_parallel"]["placement"]
    (row,) = doc["expert_parallel"]["placement"]
    assert row["pattern"] == "model.layers.*.mlp" and row["count"] == 2  # layer 2 is dense
    assert row["per_rank"] == [[0, 2], [2, 4], [4, 6], [6, 7]]
    full = describe_checkpoint(path, tp=4, expert_parallel=True)
    splits = {g["pattern"]: g["split"] for g in full["groups"]}
    assert splits["model.layers.*.mlp.experts.*.down_proj"] == "whole expert on one rank"
    assert splits["model.layers.*.self_attn.o_proj"] == "row"
    # Rank 0 holds 2 of 7 whole experts instead of a quarter of every one: less expert memory
    # than a split only where the split pads, never more than its share plus one expert.
    assert doc["memory_per_rank"]["linear_weights"] <= plain["memory_per_rank"]["linear_weights"] * 1.2


@pytest.mark.slow
def test_llm_workers_take_expert_parallel(
    tp_model: Callable[[str], Path], reference: dict[str, torch.Tensor]
) -> None:
    """The option reaches ranks that LLM starts itself (the worker processes' load request)."""
    from anyquant.layers.moe import SparseMoE

    with LLM(
        tp_model("qwen2-moe-e5"), dtype="float32", tensor_parallel_size=2, enable_expert_parallel=True
    ) as llm:
        got = llm.logits(IDS)
        held = [m.local_experts for m in llm.loaded.model.modules() if isinstance(m, SparseMoE)]
    assert held and all(r == range(0, 3) for r in held)  # rank 0 of 5 experts over 2 ranks
    want = reference["qwen2-moe-e5"]
    assert float((got - want).norm() / want.norm()) < 1e-5


@pytest.mark.slow
def test_ep_gguf_k_quant_experts(tmp_path: Path) -> None:
    """A GGUF Qwen3-MoE with Q5_K experts (float offsets: the fused call adds them) at 2 ranks with
    expert parallelism: stacked [experts, out, in] tensors, each rank reading only its experts."""
    pytest.importorskip("gguf")
    from tests.gguf.fixtures import write_pair

    path = write_pair(tmp_path, "qwen3moe", "Q5_K")[0]
    ids = [5, 77, 256, 3, 190, 41, 258, 12]
    got = tp_logits(2, {"gguf": path}, ids, tmp_path, expert_parallel=True)["gguf"]
    want = LLM(str(path), dtype="float32").logits(ids)
    assert float((got - want).norm() / want.norm()) < 1e-5
    ranks = [held_experts(tmp_path, "gguf", r) for r in range(2)]
    assert all(fused for held in ranks for *_, fused in held) or not FUSED_AVAILABLE
    placement = place_experts(ranks[-1][0][2], 2, "gguf")  # the last rank holds up to E
    assert [held[0][1:3] for held in ranks] == [(r.start, r.stop) for r in map(placement.experts, range(2))]
