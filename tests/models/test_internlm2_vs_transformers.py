"""InternLM2 (fused grouped wqkv, its own names and config keys) against transformers' Llama in fp32,
unquantized and in every quantized format the loader reads, with the weights moved by the test's
own mapping (tests/models/_internlm2.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from anyquant import LLM
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.engine.kv_cache import SequenceCache
from anyquant.quant.formats.base import WriteOptions
from tests.helpers.errors import rel_err
from tests.loading.test_third_party import dequantized_state_dict
from tests.models._internlm2 import llama_reference, llama_weights, to_llama, write_internlm2

pytest.importorskip("transformers")

IDS = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66, 67, 68, 69]
CASES: dict[str, dict[str, Any]] = {
    "gqa": {},
    "mha-bias": {"num_key_value_heads": 4, "bias": True},
    "tied": {"tie_word_embeddings": True, "num_key_value_heads": 1},
    # InternLM2.5's configs: dynamic NTK rope; within max_position_embeddings it is the plain rotation.
    "dynamic-rope": {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 50000.0},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_internlm2(tmp_path_factory.mktemp(request.param), seed=5, **CASES[request.param])


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def test_logits_match_llama_with_split_wqkv(tiny: Path) -> None:
    config = _config(tiny)
    ours = LLM(tiny, dtype="float32").logits(IDS)
    model = llama_reference(config, llama_weights(config, seed=5), torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0]
    assert rel_err(ours, ref) < 1e-5


def test_prefill_equals_token_by_token_decode(tiny: Path) -> None:
    llm = LLM(tiny, dtype="float32")
    full = llm.logits(IDS)
    seq = SequenceCache(llm.model, len(IDS), torch.float32)
    stepwise = torch.stack([seq.forward([tok], pos)[0] for pos, tok in enumerate(IDS)])
    assert torch.allclose(full, stepwise, atol=1e-5, rtol=1e-5)


FORMATS = {
    "awq": ("awq", WriteOptions(bits=4, group_size=32)),
    "gptq": ("gptq", WriteOptions(bits=4, group_size=32, sym=True)),
    "ct-w4a16": ("compressed-tensors", WriteOptions(scheme="W4A16", group_size=32)),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_weight_only_formats_match_dequantized_llama(tmp_path: Path, fmt: str) -> None:
    src = write_internlm2(tmp_path / "src", seed=2, hidden_size=128, intermediate_size=256)
    writer, options = FORMATS[fmt]
    q = tmp_path / fmt
    quantize_checkpoint(src, q, writer, options)
    config = _config(q)
    ours = LLM(q, dtype="float32").logits(IDS)
    model = llama_reference(config, to_llama(dequantized_state_dict(q), config), torch.float64)
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0]
    assert rel_err(ours, ref) < 1e-5
