"""Penalties kept per request and updated by the new tokens only, against a direct computation
from the whole context (vLLM's definitions), step by step and through the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM, SamplingParams
from anyquant.engine.penalties import PenaltyTracker
from anyquant.utils.tiny_model import write_tiny_model

VOCAB = 50


def direct(
    logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]
) -> torch.Tensor:
    """The penalties from scratch, one token id at a time."""
    out = logits.clone()
    for token in set(prompt) | set(output):
        v, r = out[token], params.repetition_penalty  # fp32 arithmetic, like the engine
        out[token] = v / r if v > 0 else v * r
    for token in set(output):
        out[token] -= params.presence_penalty + params.frequency_penalty * output.count(token)
    return out


class _CountingList(list):  # type: ignore[type-arg]
    """A list that records how many elements slicing hands out."""

    handed_out = 0

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        items = super().__getitem__(index)
        if isinstance(index, slice):
            _CountingList.handed_out += len(items)
        return items

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the whole output was read")


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-0.4, frequency_penalty=1.5),
    ],
)
def test_incremental_penalties_equal_the_direct_computation_every_step(params: SamplingParams) -> None:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB, (30,), generator=g).tolist()
    output, plain = _CountingList(), []
    tracker = PenaltyTracker(params, prompt)
    _CountingList.handed_out = 0
    for step in range(60):
        # Sometimes several tokens arrive between two samplings (a request that was not sampled).
        for _ in range(1 + step % 3):
            token = int(torch.randint(0, VOCAB, (1,), generator=g))
            list.append(output, token)
            plain.append(token)
        logits = torch.randn(VOCAB, generator=g) * 3
        tracker.update(output)
        got = tracker.apply(logits.clone())
        assert torch.equal(got, direct(logits, params, prompt, plain)), step
    assert _CountingList.handed_out == len(plain)  # each output token was read once


def test_engine_samples_with_penalties_as_the_direct_computation(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "m", "llama", seed=5)
    llm = LLM(model, dtype="float32", max_model_len=128)
    prompt = [5, 6, 7, 5, 9, 11, 5]
    params = SamplingParams(
        max_tokens=12,
        temperature=0.0,
        repetition_penalty=1.5,
        presence_penalty=0.7,
        frequency_penalty=0.9,
        ignore_eos=True,
    )
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0].token_ids
    assert len(out) == 12
    for i, token in enumerate(out):
        logits = llm.logits(prompt + out[:i])[-1]
        assert int(direct(logits, params, prompt, out[:i]).argmax()) == token, i
    # The penalties change what greedy decoding picks on this model (the test would notice them missing).
    plain = llm.generate(
        prompt_token_ids=[prompt],
        sampling_params=SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    )
    assert plain[0].token_ids != out
