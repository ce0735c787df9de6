"""`quantize` streams: the error it reports, computed a block of rows at a time, equals the
whole-tensor float64 formula; dropping the input's memory maps as it goes changes no output byte."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import anyquant.convert.quantize as quantize_module
import anyquant.quant.quant_error as quant_error_module
from anyquant.loading.checkpoint import Checkpoint
from anyquant.quant.algorithms.rtn import act_order_group_index, quantize_rtn
from anyquant.quant.formats.base import WriteOptions
from anyquant.quant.reference import dequantize
from anyquant.quant.spec import QuantSpec
from anyquant.utils.tiny_model import write_tiny_model

SPECS = {
    "uint4-group-asym": QuantSpec("uint4", "group", group_size=32, has_zero=True),
    "uint4-group-actorder": QuantSpec("uint4", "group", group_size=32, has_zero=True, act_order=True),
    "int8-channel": QuantSpec("int8", "channel"),
    "fp8-block": QuantSpec("fp8_e4m3", "block", block_shape=(32, 32)),
    "fp8-tensor": QuantSpec("fp8_e4m3", "tensor"),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_blockwise_error_equals_whole_tensor_float64(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SPECS[name]
    dense = torch.randn(200, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    gidx = act_order_group_index(dense, 32) if spec.act_order else None
    weight = quantize_rtn(dense, spec, torch.float32, gidx)
    whole = float((dequantize(weight, torch.float64) - dense.double()).norm() / dense.double().norm())
    monkeypatch.setattr(quant_error_module, "_ERROR_BLOCK", 96 * 40)  # 40 rows (32 for blocks): 5-7 blocks
    assert quant_error_module.relative_error(dense, weight) == pytest.approx(whole, rel=1e-12)


def test_dropping_input_maps_changes_no_output_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_tiny_model(tmp_path / "src", "llama", seed=2)
    options = WriteOptions(bits=4, group_size=32)
    quantize_module.quantize_checkpoint(src, tmp_path / "a", "gptq", options)
    closes = []
    original = Checkpoint.close
    monkeypatch.setattr(Checkpoint, "close", lambda self: (closes.append(1), original(self)))
    monkeypatch.setattr(quantize_module, "_MAPPED_BYTES", 1)  # drop the maps after every tensor
    quantize_module.quantize_checkpoint(src, tmp_path / "b", "gptq", options)
    assert len(closes) >= len(Checkpoint(src).index)
    a, b = (tmp_path / d / "model.safetensors" for d in "ab")
    assert a.read_bytes() == b.read_bytes()
