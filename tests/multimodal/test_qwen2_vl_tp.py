"""Qwen2-VL at tensor parallel 2 over real gloo ranks: a GPTQ language model whose MLP (3 groups of
32) does not split into whole groups (zero-padded exactly), the vision tower replicated and run on
rank 0, its rows and the M-RoPE positions shipped with each step; logits and greedy tokens with an
image equal one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from anyquant import LLM, SamplingParams
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.loading.describe import describe_checkpoint
from anyquant.quant.formats.base import WriteOptions
from anyquant.utils.tiny_vlm import write_tiny_vlm
from tests.helpers.images import QWEN2_VL_PLACEHOLDER, random_image

pytestmark = pytest.mark.slow
Image = pytest.importorskip("PIL.Image")
pytest.importorskip("transformers")


def test_tp2_with_padding_equals_one_process(tmp_path: Path) -> None:
    source = write_tiny_vlm(tmp_path / "src", seed=41)  # intermediate 96 = 3 groups of 32
    path = tmp_path / "gptq"
    quantize_checkpoint(source, path, "gptq", WriteOptions(bits=4, group_size=32, sym=True), skip=["visual"])
    padding = describe_checkpoint(path, tp=2)["tensor_parallel"]["padding"]
    assert any(p["pattern"] == "model.layers.*.mlp" and sum(p["padding_per_rank"]) for p in padding)

    image = random_image(110, 70, seed=0)
    prompt = {"prompt": f"a {QWEN2_VL_PLACEHOLDER} b", "multi_modal_data": {"image": image}}
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    one = LLM(path, dtype="float32")
    assert one.tokenizer is not None
    ids = one.tokenizer.encode(f"a {QWEN2_VL_PLACEHOLDER} b")
    want_logits = one.logits(ids, {"image": image})
    want_tokens = one.generate([prompt, "text only"], params)
    with LLM(path, dtype="float32", tensor_parallel_size=2) as two:
        got_logits = two.logits(ids, {"image": image})
        got_tokens = two.generate([prompt, "text only"], params)
    assert float((got_logits - want_logits).norm() / want_logits.norm()) < 1e-5
    assert [o.token_ids for o in got_tokens] == [o.token_ids for o in want_tokens]
