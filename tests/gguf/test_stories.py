"""The real stories260K model as llama.cpp's GGUF: same logits as its transformers copy, the
reference greedy tokens, and it runs from the lone .gguf file (tokenizer and all)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anyquant import LLM
from tests.conftest import STORIES, shared_or_skip

pytestmark = pytest.mark.needs_shared


@pytest.fixture(scope="module")
def gguf_llm() -> LLM:
    return LLM(str(shared_or_skip(STORIES) / "stories260K.gguf"))


@pytest.fixture
def expected(stories: Path) -> dict:
    return json.loads((stories / "expected_outputs.json").read_text())


def test_logits_equal_the_safetensors_copy(gguf_llm: LLM, stories: Path, expected: dict) -> None:
    ids = expected["ids"][:96]
    hf = LLM(str(stories / "hf"))
    assert gguf_llm.dtype == torch.float32
    # The same float32 weights (q/k rows restored to transformers' order) give the same bits.
    assert torch.equal(gguf_llm.logits(ids), hf.logits(ids))


def test_greedy_tokens_equal_the_reference(gguf_llm: LLM, expected: dict) -> None:
    from anyquant import SamplingParams

    assert gguf_llm.tokenizer is not None  # from the file's own metadata: no tokenizer.json exists
    assert gguf_llm.tokenizer.encode(expected["prompt"]) == expected["prompt_ids"]
    n = len(expected["ids"]) - len(expected["prompt_ids"])
    out = gguf_llm.generate([expected["prompt"]], SamplingParams(max_tokens=n, temperature=0.0))[0]
    assert expected["prompt_ids"] + list(out.token_ids) == expected["ids"]
    assert expected["text"].startswith(expected["prompt"] + out.text[: len(out.text) // 2])


def test_tokenizer_equals_the_transformers_one_on_real_text(gguf_llm: LLM, stories: Path) -> None:
    from anyquant.tokenizer import Tokenizer

    hf = Tokenizer(stories / "hf", json.loads((stories / "hf" / "config.json").read_text()))
    text = (stories / "tinystories_train_excerpt.txt").read_text()[:20000]
    assert gguf_llm.tokenizer is not None
    ids = gguf_llm.tokenizer.encode(text)
    assert ids == hf.encode(text)
    assert gguf_llm.tokenizer.decode(ids) == hf.decode(ids)
