"""A model that overflows fp16 must fail loudly, naming the dtype (and the layer in debug mode).

The fp16 policy's warm-up (engine/fp16_guard.py, tests/engine/test_fp16_policy.py) rescales what it
can and fails the load on what it cannot, for what its calibration prompt reaches. Here the
overflow is one the warm-up cannot see: token 10 alone overflows layer 0's values (its embedding
is one-hot, so after the norm its channel 0 is sqrt(64) = 8 where other tokens' are ~1, and
v_proj's column 0 is x12000), so only a prompt holding it fails, at run time.
"""

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

TRIGGER = 10


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bf16-'trained' tiny Llama whose layer-0 values exceed fp16's 65504 for one token only
    (fine in bf16/fp32)."""
    path = write_tiny_model(tmp_path_factory.mktemp("overflow"), "llama", seed=5, torch_dtype="bfloat16")
    tensors = load_file(str(path / "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"].float()
    embed[TRIGGER] = 0.0
    embed[TRIGGER, 0] = 1.0
    tensors["model.embed_tokens.weight"] = embed.to(torch.bfloat16)
    v = tensors["model.layers.0.self_attn.v_proj.weight"].float()
    v[:, 0] *= 12000 / v[:, 0].abs().max()  # the largest weight of column 0 becomes 12000
    tensors["model.layers.0.self_attn.v_proj.weight"] = v.to(torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


IDS = [256, 10, 20, 30, 40, 50]


def test_float32_and_bfloat16_are_finite(overflowing: Path) -> None:
    for dtype in ("float32", "bfloat16"):
        assert torch.isfinite(LLM(overflowing, dtype=dtype).logits(IDS)).all()
    # float16 too, without the trigger token (and it passed the warm-up to get here).
    assert torch.isfinite(LLM(overflowing, dtype="float16").logits([t for t in IDS if t != TRIGGER])).all()


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
        NumericsError, match=r"first non-finite output: model\.layers\.0\.self_attn\.qkv_proj"
    ):
        llm.logits(IDS)


def test_float16_on_bf16_model_warns(overflowing: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        LLM(overflowing, dtype="float16")
    assert "bfloat16-trained model in float16" in caplog.text


def test_auto_uses_checkpoint_dtype(overflowing: Path) -> None:
    assert json.loads((overflowing / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert LLM(overflowing).dtype == torch.bfloat16
