"""GGUF models split over 2 gloo ranks give the logits of one process (float offsets included:
column-parallel rows carry their offsets, row-parallel splits keep whole groups; DeepSeek's latent
attention split by heads with kv_b_proj joined from llama.cpp's halves; a Qwen2.5-VL language
model with its vision projector found beside it)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gguf")

from anyquant import LLM
from tests.gguf.fixtures import write_pair
from tests.parallel._spmd import tp_logits

pytestmark = pytest.mark.slow
IDS = [5, 77, 256, 3, 190, 41, 258, 12]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gguf"


def test_tp2_equals_one_process(tmp_path: Path) -> None:
    models = {
        f"{arch}-{kind}": write_pair(tmp_path, arch, kind)[0]
        for arch, kind in (("llama", "Q4_K"), ("qwen3moe", "Q5_K"))
    }
    models["deepseek3-Q4_K_M"] = FIXTURES / "tiny-deepseek3-Q4_K_M.gguf"
    models["qwen2.5vl-F16"] = FIXTURES / "tiny-qwen2.5vl-F16"
    got = tp_logits(2, models, IDS, tmp_path)
    for name, path in models.items():
        want = LLM(str(path), dtype="float32").logits(IDS)
        err = float((got[name] - want).norm() / want.norm())
        assert err < 1e-5, (name, err)
