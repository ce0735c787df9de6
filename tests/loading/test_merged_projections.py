"""Merged q/k/v and gate/up projections: the same logits as the unmerged layers, bit for bit, on
every kernel that holds a merged weight; groups that cannot merge are kept apart with a reason.

The logits of the merged model against transformers are checked by the family and format tests
(merging is on by default); here the unmerged model (`merge_projections=False`) is the baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant.convert.quantize import quantize_checkpoint
from anyquant.engine.kv_cache import SequenceCache
from anyquant.layers.linear import MergedLinear
from anyquant.loading.describe import describe_checkpoint
from anyquant.loading.loader import LoadedModel, load_model
from anyquant.quant.formats.base import WriteOptions
from anyquant.quant.merge import concat_out_features, spec_refusal
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight
from anyquant.utils.tiny_model import write_tiny_model
from tests.helpers.quant_weights import random_weight

IDS = [3, 17, 99, 4, 250, 7, 7, 31, 64, 2, 128, 5]

# (writer, options, kernels to force besides the default choice)
FORMATS: dict[str, tuple[str, WriteOptions, tuple[str, ...]]] = {
    "awq-g32": ("awq", WriteOptions(bits=4, group_size=32), ("cpu_int4", "reference")),
    "gptq-3bit-actorder": ("gptq", WriteOptions(bits=3, group_size=32, act_order=True), ("reference",)),
    "gptq-v2-8bit-channel": ("gptq-v2", WriteOptions(bits=8, group_size=-1, sym=True), ("cpu_int8_weight",)),
    "ct-w8a8": ("compressed-tensors", WriteOptions(scheme="W8A8"), ("reference",)),
    "ct-fp8-dynamic": ("compressed-tensors", WriteOptions(scheme="FP8_DYNAMIC"), ("cpu_fp8_dequant",)),
    "fp8-tensor": ("fp8", WriteOptions(), ("reference",)),
    "fp8-block": ("fp8-block", WriteOptions(block_size=(32, 32)), ()),
    "lmdeploy-int8": ("lmdeploy-int8", WriteOptions(), ()),
}


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # qwen2: q/k/v carry biases; GQA (4 query heads on 2 KV heads) gives q/k/v different sizes.
    return write_tiny_model(
        tmp_path_factory.mktemp("qwen2"),
        "qwen2",
        seed=3,
        hidden_size=128,
        head_dim=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
    )


def _logits(loaded: LoadedModel) -> torch.Tensor:
    return SequenceCache(loaded.model, len(IDS), loaded.compute_dtype, loaded.device).forward(IDS, 0)


def _assert_same_logits(path: Path, dtype: str, kernel: str | None = None) -> LoadedModel:
    merged = load_model(path, dtype=dtype, kernel=kernel)
    apart = load_model(path, dtype=dtype, kernel=kernel, merge_projections=False)
    assert not any(isinstance(m, MergedLinear) for m in apart.model.modules())
    assert set(apart.merges.values()) == {"merging is off"}
    assert torch.equal(_logits(merged), _logits(apart)), (dtype, kernel)
    return merged


def _merged_count(loaded: LoadedModel) -> int:
    return sum(isinstance(m, MergedLinear) for m in loaded.model.modules())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_model_merges_every_group_with_the_same_logits(dense_model: Path, dtype: str) -> None:
    loaded = _assert_same_logits(dense_model, dtype)
    layers = loaded.model.model.layers
    assert _merged_count(loaded) == 2 * len(layers)
    assert all(reason is None for reason in loaded.merges.values())
    qkv = layers[0].self_attn.qkv_proj
    assert qkv.parts == (128, 64, 64) and qkv.bias is not None  # the biases travel with the rows
    assert layers[0].self_attn.q_proj.kernel is None  # members hold nothing once merged


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_quantized_merged_logits_equal_unmerged_on_every_kernel(
    dense_model: Path, tmp_path: Path, fmt: str
) -> None:
    writer, options, kernels = FORMATS[fmt]
    q = tmp_path / fmt
    quantize_checkpoint(dense_model, q, writer, options)
    for kernel in (None, *kernels):
        for dtype in ("float32", "bfloat16"):
            loaded = _assert_same_logits(q, dtype, kernel)
            reasons = {r for r in loaded.merges.values() if r is not None}
            if fmt == "gptq-3bit-actorder":
                # Each projection's columns are ordered by its own activation statistics: the group
                # indices differ, so the input cannot be permuted once for all rows.
                assert all("act-order group indices differ" in r for r in reasons) or not reasons
            else:
                assert not reasons, reasons
                assert _merged_count(loaded) == len(loaded.merges)


def test_inspect_shows_merges_and_reasons(dense_model: Path) -> None:
    doc = describe_checkpoint(dense_model)
    merges = {m["pattern"]: m for m in doc["merged_projections"]}
    assert merges["model.layers.*.self_attn.qkv_proj"]["merged"] is True
    assert merges["model.layers.*.self_attn.qkv_proj"]["members"] == ["q_proj", "k_proj", "v_proj"]
    assert merges["model.layers.*.mlp.gate_up_proj"]["kernel"] == "dense"


def test_refusals_name_the_reason() -> None:
    g32 = QuantSpec("uint4", "group", group_size=32)
    g64 = QuantSpec("uint4", "group", group_size=64)
    block = QuantSpec("fp8_e4m3", "block", block_shape=(32, 32))
    names = ("q_proj", "k_proj")
    assert "schemes differ" in (spec_refusal(names, [g32, g64], [64, 64]) or "")
    assert "quantized and some are not" in (spec_refusal(names, [g32, None], [64, 64]) or "")
    assert "not a multiple of the 32-row" in (spec_refusal(names, [block, block], [48, 64]) or "")
    assert spec_refusal(names, [block, block], [64, 48]) is None  # only the last may end a block early
    act = QuantSpec("uint4", "group", group_size=32, act_order=True)
    a, b = random_weight(act, 32, 64), random_weight(act, 32, 64, seed=1)
    a.group_index = torch.arange(64, dtype=torch.int32) // 32
    b.group_index = a.group_index.flip(0).contiguous()
    merged, reason = concat_out_features(names, [a, b])
    assert merged is None and reason is not None and "act-order group indices differ" in reason
    b.group_index = a.group_index.clone()  # one Hessian for q/k/v: GPTQ gives them one order
    merged, reason = concat_out_features(names, [a, b])
    assert reason is None and isinstance(merged, QuantWeight) and merged.shape == (64, 64)
    assert torch.equal(merged.group_index, a.group_index)


def test_per_tensor_scales_become_per_channel_values_unchanged() -> None:
    from anyquant.quant.reference import dequantize

    spec = QuantSpec("int8", "tensor")
    parts = [random_weight(spec, n, 64, seed=i) for i, n in enumerate((32, 16, 16))]
    merged, reason = concat_out_features(("q_proj", "k_proj", "v_proj"), parts)
    assert reason is None and isinstance(merged, QuantWeight)
    assert merged.spec.granularity == "channel" and merged.shape == (64, 64)
    expected = torch.cat([dequantize(p, torch.float64) for p in parts])
    assert torch.equal(dequantize(merged, torch.float64), expected)
