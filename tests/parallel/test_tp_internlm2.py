"""InternLM2's fused grouped `wqkv` at tensor parallel 2: each rank holds whole KV-head groups (its
query heads with their key and value head), so TP 2 gives the logits of one process; sizes that
would need KV heads replicated inside the fused projection are refused by the planner."""

from __future__ import annotations

from pathlib import Path

import pytest

from anyquant import LLM
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.errors import UnsupportedError
from anyquant.loading.loader import build_on_meta
from anyquant.loading.preflight import plan_tensor_parallel, spec_lookup
from anyquant.quant.formats.base import WriteOptions
from tests.models._internlm2 import internlm2_config, write_internlm2
from tests.models._internvl import write_internvl
from tests.parallel._spmd import tp_logits

pytestmark = pytest.mark.slow

IDS = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66]


def test_tp2_equals_one_process(tmp_path: Path) -> None:
    # 8 query heads over 2 KV heads: a row split of wqkv would hand rank 0 rows of both groups.
    src = write_internlm2(
        tmp_path / "dense", seed=6, hidden_size=128, num_attention_heads=8, intermediate_size=96, bias=True
    )
    models = {"dense": src}
    for name, writer, options in (
        ("awq", "awq", WriteOptions(bits=4, group_size=32)),
        ("fp8", "lmdeploy-fp8", WriteOptions()),
    ):
        quantize_checkpoint(src, tmp_path / name, writer, options)
        models[name] = tmp_path / name
    # InternVL around an InternLM2 (vision replicated, the language model split), lmdeploy fp8.
    vlm, _ = write_internvl(tmp_path / "internvl", "internlm2", seed=2)
    skip = [r"^vision_model\.", r"^mlp1\."]
    quantize_checkpoint(vlm, tmp_path / "internvl-fp8", "lmdeploy-fp8", WriteOptions(), skip=skip)
    models["internvl-fp8"] = tmp_path / "internvl-fp8"
    got = tp_logits(2, models, IDS, tmp_path)
    for name, path in models.items():
        want = LLM(path, dtype="float32").logits(IDS)
        err = float((got[name] - want).norm() / want.norm())
        assert err < 1e-5, (name, err)


def test_sizes_that_would_replicate_kv_heads_are_refused() -> None:
    model = build_on_meta(internlm2_config(num_attention_heads=4, num_key_value_heads=2))
    plan_tensor_parallel(model, spec_lookup(None), 2)
    with pytest.raises(
        UnsupportedError,
        match=r"wqkv in groups of 2 query .*: 2 attention heads cannot be split over 4 ranks",
    ):
        plan_tensor_parallel(model, spec_lookup(None), 4)
