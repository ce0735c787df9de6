"""A model that overflows fp16 must fail loudly, naming the dtype (and the layer in debug mode)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyquant import LLM, SamplingParams
from anyquant.errors import NumericsError
from anyquant.utils.tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bf16-'trained' tiny Llama whose layer-1 MLP products exceed fp16's 65504 (fine in bf16/fp32)."""
    path = write_tiny_model(tmp_path_factory.mktemp("overflow"), "llama", seed=5, torch_dtype="bfloat16")
    tensors = load_file(str(path / "model.safetensors"))
    for name in ("gate_proj", "up_proj"):
        key = f"model.layers.1.mlp.{name}.weight"
        tensors[key] = (tensors[key].float() * 400).to(torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


IDS = [256, 10, 20, 30, 40, 50]


def test_float32_and_bfloat16_are_finite(overflowing: Path) -> None:
    for dtype in ("float32", "bfloat16"):
        assert torch.isfinite(LLM(overflowing, dtype=dtype).logits(IDS)).all()


def test_float16_overflow_fails_naming_the_dtype(overflowing: Path) -> None:
    llm = LLM(overflowing, dtype="float16")
    with pytest.raises(NumericsError, match=r"non-finite logits .* compute dtype float16"):
        llm.logits(IDS)
    # Generation fails too instead of answering token 0 ("!!!!!!") forever.
    with pytest.raises(NumericsError, match="float16"):
        llm.generate(prompt_token_ids=[IDS], sampling_params=SamplingParams(max_tokens=4, temperature=0))


def test_debug_mode_names_the_first_overflowing_layer(overflowing: Path) -> None:
    llm = LLM(overflowing, dtype="float16", debug_numerics=True)
    with pytest.raises(
        NumericsError, match=r"first non-finite output: model\.layers\.1\.mlp\.(down_proj|up_proj|gate_proj)"
    ):
        llm.logits(IDS)


def test_float16_on_bf16_model_warns(overflowing: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        LLM(overflowing, dtype="float16")
    assert "bfloat16-trained model in float16" in caplog.text


def test_auto_uses_checkpoint_dtype(overflowing: Path) -> None:
    assert json.loads((overflowing / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert LLM(overflowing).dtype == torch.bfloat16
