"""lmdeploy `lite smooth_quant` InternLM2 checkpoints (int8 and fp8 W8A8): the fused grouped `wqkv`
stored as one per-row-scaled layer (`weight` + `scale` [N, 1]), norms plain with the smoothing
folded in. Reference: transformers' Llama on the dequantized weights (moved by the test's mapping)
with each decoder linear's input quantized per token by the test's own fake-quantizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anyquant import LLM
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.loading.checkpoint import Checkpoint
from anyquant.quant.formats.base import WriteOptions
from tests.helpers.errors import rel_err
from tests.loading.test_formats_end_to_end import fake_quant
from tests.loading.test_third_party import dequantized_state_dict
from tests.models._internlm2 import llama_reference, to_llama, write_internlm2

pytest.importorskip("transformers")

IDS = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66]


@pytest.mark.parametrize(("writer", "act"), [("lmdeploy-int8", "int8"), ("lmdeploy-fp8", "fp8")])
def test_smooth_quant_internlm2_matches_fake_quantized_llama(tmp_path: Path, writer: str, act: str) -> None:
    src = write_internlm2(tmp_path / "src", seed=4, hidden_size=128, intermediate_size=256)
    q = tmp_path / writer
    quantize_checkpoint(src, q, writer, WriteOptions())
    # The names lmdeploy writes for InternLM2: the fused projection keeps its name, scale beside it.
    names = set(Checkpoint(q).index.names())
    assert {"model.layers.0.attention.wqkv.weight", "model.layers.0.attention.wqkv.scale"} <= names
    config = json.loads((q / "config.json").read_text())
    ours = LLM(q, dtype="float32").logits(IDS)
    model = llama_reference(config, to_llama(dequantized_state_dict(q), config), torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            module.register_forward_pre_hook(lambda _m, args: (fake_quant(args[0], (act, "token")),))
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0]
    # Same budget as the other activation-quantized formats (tests/loading/test_formats_end_to_end.py):
    # a last-bit difference can move one activation to the neighbouring code.
    assert rel_err(ours, ref) < (2e-2 if act == "fp8" else 5e-3)
