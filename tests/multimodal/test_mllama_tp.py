"""Llama-3.2-Vision at tensor parallel 2 over real gloo ranks: a GPTQ language model whose MLP (3
groups of 32) does not split into whole groups (zero-padded exactly), the float cross-attention
layer split by heads like self-attention, the vision tower replicated and run on rank 0 with its
states shipped in the request's first step (each rank builds and keeps its own heads' keys and
values); logits and greedy tokens with images equal one process; finished requests are released."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM, SamplingParams
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.loading.describe import describe_checkpoint
from anyquant.quant.formats.base import WriteOptions
from anyquant.utils.tiny_mllama import write_tiny_mllama

pytestmark = pytest.mark.slow
Image = pytest.importorskip("PIL.Image")
pytest.importorskip("transformers")


def random_image(width: int, height: int, seed: int) -> object:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).byte().numpy())


def test_tp2_with_padding_equals_one_process(tmp_path: Path) -> None:
    source = write_tiny_mllama(tmp_path / "src", seed=41)  # intermediate 96 = 3 groups of 32
    path = tmp_path / "gptq"
    options = WriteOptions(bits=4, group_size=32, sym=True)
    quantize_checkpoint(
        source, path, "gptq", options, skip=["vision_model", "multi_modal_projector", "cross_attn"]
    )
    padding = describe_checkpoint(path, tp=2)["tensor_parallel"]["padding"]
    assert any(
        p["pattern"] == "language_model.model.layers.*.mlp" and sum(p["padding_per_rank"]) for p in padding
    )

    images = [random_image(110, 40, 0), random_image(30, 60, 1)]
    text = "a <|image|> b <|image|> c"
    prompt = {"prompt": text, "multi_modal_data": {"image": images}}
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    one = LLM(path, dtype="float32")
    assert one.tokenizer is not None
    ids = one.tokenizer.encode(text)
    want_logits = one.logits(ids, {"image": images})
    want_tokens = one.generate([prompt, "text only"], params)
    with LLM(path, dtype="float32", tensor_parallel_size=2) as two:
        got_logits = two.logits(ids, {"image": images})
        got_tokens = two.generate([prompt, "text only"], params)
        two.generate("more", SamplingParams(max_tokens=1))  # the step that releases the states
        assert len(two.engine.runner.cross_requests) == 0
    assert float((got_logits - want_logits).norm() / want_logits.norm()) < 1e-5
    assert [o.token_ids for o in got_tokens] == [o.token_ids for o in want_tokens]
