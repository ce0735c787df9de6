"""The fp16 policy on the GPU (the T4 case, on whatever card is lent): the models of
tests/engine/test_fp16_policy.py, whose known layers overflow fp16, run in float16 on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM
from anyquant.errors import NumericsError
from tests.cuda import DEVICE
from tests.engine.test_fp16_policy import IDS, MLP_OVERFLOW, _float64_logits, _scaled_model
from tests.helpers.errors import rel_err


def test_guard_keeps_the_mlp_overflow_finite_on_the_device(tmp_path: Path) -> None:
    path = _scaled_model(tmp_path / "mlp", MLP_OVERFLOW)
    llm = LLM(str(path), device=str(DEVICE), dtype="float16", max_num_seqs=2)
    assert llm.fp16_report is not None
    assert set(llm.fp16_report.shifts) == {"model.layers.0.mlp.down_proj"}
    logits = llm.logits(IDS)
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())
    assert rel_err(logits, _float64_logits(path)) < 1e-2


def test_guard_names_the_layer_it_cannot_rescale_on_the_device(tmp_path: Path) -> None:
    path = _scaled_model(
        tmp_path / "kv",
        {"model.layers.1.input_layernorm.weight": 600.0, "model.layers.1.self_attn.v_proj.weight": 100.0},
    )
    with pytest.raises(NumericsError, match=r"model\.layers\.1\.self_attn\.qkv_proj overflowed float16"):
        LLM(str(path), device=str(DEVICE), dtype="float16", max_num_seqs=2)
