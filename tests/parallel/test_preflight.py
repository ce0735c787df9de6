"""The tensor-parallel plan from headers: what it splits, pads and refuses, and that `inspect --tp`
says exactly what loading each rank then does (every rank loaded here, in-process: loading needs
no collectives)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from anyquant.cli.main import main
from anyquant.errors import UnsupportedError
from anyquant.layers.linear import MergedLinear, QuantLinear
from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.describe import describe_checkpoint, layer_pattern
from anyquant.loading.loader import build_on_meta, load_model
from anyquant.loading.preflight import plan_tensor_parallel
from anyquant.parallel.state import ParallelState
from anyquant.quant.weight import QuantWeight
from anyquant.utils.tiny_model import tiny_config
from tests.parallel.test_sharding import oracle


def no_spec(_layer: QuantLinear) -> None:
    return None


def test_plan_splits_heads_replicates_kv_and_pads_vocab() -> None:
    model = build_on_meta(tiny_config("llama", intermediate_size=96))
    plan = plan_tensor_parallel(model, no_spec, 4)
    shards = plan.shards
    assert shards["model.layers.0.self_attn.q_proj"].local_shape == (16, 64)  # one head of 16
    assert shards["model.layers.0.self_attn.k_proj"].local_shape == (16, 64)  # 2 KV heads replicated
    assert [shards["model.layers.0.self_attn.k_proj"].partition.index(r)[0].item() for r in range(4)] == [
        0,
        0,
        16,
        16,
    ]
    assert shards["model.layers.0.self_attn.o_proj"].local_shape == (64, 16)
    assert shards["model.layers.0.mlp.down_proj"].local_shape == (64, 24)  # dense: no group to keep whole
    assert shards["lm_head"].local_shape == (65, 64)  # 259 -> 4 x 65, one padded row
    assert plan.cache_heads == 1
    assert "model.layers.0.input_layernorm" not in shards


def test_plan_refuses_heads_that_do_not_divide() -> None:
    model = build_on_meta(tiny_config("llama"))
    with pytest.raises(UnsupportedError, match=r"4 attention heads cannot be split over 3 ranks.*1, 2, 4"):
        plan_tensor_parallel(model, no_spec, 3)


def test_world_size_one_keeps_the_single_process_model(tp_model: Callable[[str], Path]) -> None:
    loaded = load_model(tp_model("awq"), dtype="float32")
    assert loaded.tp_plan is None
    assert isinstance(loaded.model.model.embed_tokens, nn.Embedding)
    assert all(m.parallel is None for m in loaded.model.modules() if isinstance(m, QuantLinear))


def _rank_layers(
    path: Path, rank: int, world: int, merge: bool = False
) -> tuple[dict[str, QuantLinear], Any]:
    """Each linear layer as this rank loads it (merge=False: every projection on its own)."""
    loaded = load_model(
        path,
        dtype="float32",
        kernel="reference",
        parallel=ParallelState(rank, world),
        merge_projections=merge,
    )
    layers = {
        m.prefix: m for m in loaded.model.modules() if isinstance(m, QuantLinear) and m.kernel is not None
    }
    return layers, loaded.model


def _zero_rows(layer: QuantLinear, dim: int) -> int:
    """Trailing all-zero rows (dim 0) or columns (dim 1) of the layer's dequantized weight."""
    assert layer.kernel is not None
    held = layer.kernel.weight
    dense = oracle(held) if isinstance(held, QuantWeight) else held.double()
    zero = (dense == 0).all(dim=1 - dim)
    count = 0
    for z in reversed(zero.tolist()):
        if not z:
            break
        count += 1
    return count


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["awq", "gptq-act-order", "ct-w4a16-lm-head", "qwen3-moe-gptq"])
def test_inspect_predicts_what_each_rank_loads(
    tp_model: Callable[[str], Path], name: str, world: int
) -> None:
    path = tp_model(name)
    doc = describe_checkpoint(path, dtype="float32", kernel="reference", tp=world)
    tp = doc["tensor_parallel"]
    assert tp["ok"] and tp["sizes"][str(world)] is None
    predicted = {layer: g for g in doc["groups"] for layer in g["layers"]}
    pads = {layer: p for p in tp["padding"] for layer in p["layers"]}
    for rank in range(world):
        layers, model = _rank_layers(path, rank, world)
        assert set(layers) == set(predicted)
        for prefix, layer in layers.items():
            group = predicted[prefix]
            assert list(layer.shape) == group["local_shape"], prefix
            assert layer.kernel is not None and layer.kernel.name == group["kernel"], prefix
            if prefix in pads:
                dim = 1 if layer.style == "row" else 0
                assert _zero_rows(layer, dim) >= pads[prefix]["padding_per_rank"][rank], prefix
        cache = model.cache_shape
        per_token = model.args.num_layers * cache.num_kv_heads * cache.stored_width * 4
        assert per_token == tp["memory_per_rank"]["kv_cache_per_token"]
    # The merged projections each rank holds are the ones inspect predicts, with their shape and kernel.
    merges = {
        (m["pattern"], tuple(m["local_shape"]), m["kernel"]) for m in doc["merged_projections"] if m["merged"]
    }
    act_order = any(m["reason"] for m in doc["merged_projections"] if m["merged"])
    for rank in range(world):
        layers, _ = _rank_layers(path, rank, world, merge=True)
        merged = {p: m for p, m in layers.items() if isinstance(m, MergedLinear)}
        for prefix, layer in merged.items():
            assert (layer_pattern(prefix), layer.shape, layer.kernel.name) in merges, prefix  # type: ignore[union-attr]
        if not act_order:  # act-order groups merge only when their group indices agree
            assert {layer_pattern(p) for p in merged} == {m[0] for m in merges}


def test_padding_is_reported_for_a_3_group_intermediate(tp_model: Callable[[str], Path]) -> None:
    """96 = 3 groups of 32: 2 groups per rank at tp 2 (one zero group on rank 1), 1 at tp 4."""
    for world, local, pads in ((2, 64, [0, 32]), (4, 32, [0, 0, 0, 32])):
        doc = describe_checkpoint(tp_model("awq"), dtype="float32", tp=world)
        mlp = [p for p in doc["tensor_parallel"]["padding"] if p["pattern"] == "model.layers.*.mlp"]
        assert mlp and mlp[0]["local_size"] == local and mlp[0]["padding_per_rank"] == pads
        assert mlp[0]["unit"] == 32


def test_inspect_tp_reads_headers_only(
    tp_model: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tp_model("qwen3-moe-gptq")

    def refuse(self: Checkpoint, name: str, *args: object) -> None:
        raise AssertionError(f"inspect read tensor data ({name})")

    monkeypatch.setattr(Checkpoint, "read", refuse)
    monkeypatch.setattr(Checkpoint, "read_slice", refuse)
    doc = describe_checkpoint(path, tp=2, max_model_len=100)
    mem = doc["tensor_parallel"]["memory_per_rank"]
    # 3 layers x 1 KV head per rank x (32 + 32) x 4 bytes (fp32 model) per token.
    assert mem["kv_cache_per_token"] == 3 * 1 * 64 * 4
    assert mem["kv_cache_at_max_model_len"] == 100 * mem["kv_cache_per_token"]
    whole = describe_checkpoint(path, tp=1, max_model_len=100)["tensor_parallel"]["memory_per_rank"]
    assert mem["linear_weights"] < 0.7 * whole["linear_weights"]


def test_inspect_cli_exits_nonzero_with_the_reason_first(
    tp_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tp_model("awq"))
    assert main(["inspect", path, "--tp", "3"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("cannot run with tensor-parallel size 3: ")
    assert "4 attention heads cannot be split over 3 ranks" in out.splitlines()[0]
    assert main(["inspect", path, "--tp", "3", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["tensor_parallel"]["ok"] is False and "3 ranks" in doc["tensor_parallel"]["reason"]
    assert main(["inspect", path, "--tp", "2"]) == 0
    text = capsys.readouterr().out
    assert "tensor-parallel sizes that work: 1, 2, 4" in text
    assert "per rank: row [64x32]" in text  # down_proj at tp 2


def test_inspect_names_the_fp16_risk_of_a_bf16_model(tmp_path: Path) -> None:
    from anyquant.utils.tiny_model import write_tiny_model

    path = write_tiny_model(tmp_path / "bf16", "llama", torch_dtype="bfloat16")
    doc = describe_checkpoint(path, dtype="float16", tp=2)
    assert any("bfloat16-trained model asked to run in float16" in r for r in doc["risks"])


def test_llm_refuses_an_impossible_split_before_starting_ranks(tp_model: Callable[[str], Path]) -> None:
    from anyquant import LLM

    with pytest.raises(UnsupportedError, match="cannot be split over 3 ranks"):
        LLM(tp_model("awq"), tensor_parallel_size=3)


def test_read_slice_reads_rows_and_columns(tp_model: Callable[[str], Path]) -> None:
    ckpt = Checkpoint(tp_model("llama"))
    full = ckpt.read("lm_head.weight")
    assert torch.equal(ckpt.read_slice("lm_head.weight", 0, 3, 9), full[3:9])
    assert torch.equal(ckpt.read_slice("lm_head.weight", 1, 10, 20), full[:, 10:20])
