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
