"""Guided decoding under tensor parallelism: masks apply on rank 0, where the full-vocabulary logits
are sampled, so TP 2 gives what TP 1 gives for a batch mixing guided and plain requests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from anyquant import LLM, SamplingParams
from anyquant.engine.sampling import GuidedDecodingParams
from anyquant.utils.tiny_model import write_tiny_model

pytest.importorskip("xgrammar")
pytestmark = pytest.mark.slow

REGEX = r"[a-e]{1,3}(-[0-9]{1,2}){2}"
CHOICES = ["north", "south", "south-east"]


def _outputs(llm: LLM) -> list[tuple[str, str]]:
    prompts = [[256, 30 + i, 90 - i] for i in range(6)]
    kinds = [GuidedDecodingParams(regex=REGEX), GuidedDecodingParams(choice=CHOICES), None]
    ids = [
        llm.engine.add_request(
            p, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, guided_decoding=kinds[i % 3])
        )
        for i, p in enumerate(prompts)
    ]
    texts = dict.fromkeys(ids, "")
    reasons = dict.fromkeys(ids, "")
    while llm.engine.has_unfinished():
        for delta in llm.engine.step():
            texts[delta.request_id] += delta.new_text
            reasons[delta.request_id] = delta.finish_reason or reasons[delta.request_id]
    return [(texts[rid], reasons[rid]) for rid in ids]


def test_tp2_guided_outputs_equal_tp1(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path, "llama", seed=3)
    expected = _outputs(LLM(model, dtype="float32"))
    with LLM(model, dtype="float32", tensor_parallel_size=2) as tp:
        assert _outputs(tp) == expected
    for i, (text, reason) in enumerate(expected):
        if i % 3 == 0:
            assert re.fullmatch(REGEX, text) and reason == "stop"
        elif i % 3 == 1:
            assert text in CHOICES and reason == "stop"
        else:
            assert reason == "length"
