"""Every family the registry builds is a `models.protocol.CausalLM`, the engine's model an
`EngineModel`; a family missing a member fails at build time naming it; the loader sets the
compute dtype the layers cast into."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.loading.loader import build_on_meta, load_model
from anyquant.models.base import DecoderLayer
from anyquant.models.protocol import CausalLM, EngineModel, check_causal_lm
from anyquant.utils.tiny_model import tiny_config, write_tiny_model
from tests.models._internlm2 import internlm2_config


@pytest.mark.parametrize(
    "config",
    [tiny_config("llama"), tiny_config("qwen2"), tiny_config("qwen3"), internlm2_config()],
    ids=["llama", "qwen2", "qwen3", "internlm2"],
)
def test_families_build_into_the_protocol(config: dict) -> None:
    model = build_on_meta(config)
    assert isinstance(model, CausalLM) and isinstance(model, EngineModel)
    assert model.ignorable_prefixes == ()


def test_a_family_missing_members_is_named() -> None:
    with pytest.raises(AnyquantError) as info:
        check_causal_lm(nn.Linear(2, 2), "ToyForCausalLM")
    message = str(info.value)
    assert "ToyForCausalLM (Linear) lacks" in message
    for member in ("args", "cache_shape", "ignorable_suffixes", "set_compute_dtype", "tied_weights"):
        assert member in message
    assert "named_modules" not in message  # what an nn.Module has is not reported


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_loader_sets_the_compute_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    path = write_tiny_model(tmp_path / "m", "llama")
    model = load_model(path, dtype=str(dtype).removeprefix("torch.")).model
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    assert len(layers) == 2 and {layer.compute_dtype for layer in layers} == {dtype}
