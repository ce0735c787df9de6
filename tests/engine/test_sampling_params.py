"""vLLM's SamplingParams fields end to end through LLM.generate, each against an independent
reference: transformers' logits for the same tokens with the field's rule applied in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM, SamplingParams
from anyquant.errors import AnyquantError
from anyquant.utils.tiny_model import write_tiny_model

transformers = pytest.importorskip("transformers")

EOS = 257
PROMPT = [256, 72, 101, 108, 108, 111, 32, 72, 101]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("sampling"), "llama", seed=5)


@pytest.fixture(scope="module")
def llm(tiny: Path) -> LLM:
    return LLM(tiny, dtype="float32", max_model_len=128)


@pytest.fixture(scope="module")
def reference(tiny: Path) -> object:
    return transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


def _ref_logits(reference: object, ids: list[int]) -> torch.Tensor:
    """float64 logits of every position from transformers."""
    with torch.no_grad():
        out = reference(torch.tensor([ids]))  # type: ignore[operator]
    return out.logits[0].double()


def _penalised(row: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    """vLLM's rules, written out: bias, then repetition (prompt and output tokens), presence and
    frequency (output tokens)."""
    row = row.clone()
    for token, bias in (p.logit_bias or {}).items():
        row[token] += bias
    for token in set(prompt) | set(output):
        row[token] = (
            row[token] / p.repetition_penalty if row[token] > 0 else row[token] * p.repetition_penalty
        )
    for token in set(output):
        row[token] -= p.presence_penalty + p.frequency_penalty * output.count(token)
    return row


@pytest.mark.parametrize(
    "fields",
    [
        {"repetition_penalty": 1.8},
        {"presence_penalty": 1.5},
        {"frequency_penalty": 0.7},
        {"repetition_penalty": 0.6, "presence_penalty": -0.5, "frequency_penalty": 0.3},
        {"logit_bias": {65: 3.0, 66: -5.0, 101: 2.5}},
    ],
)
def test_penalties_and_bias_follow_the_reference_greedy_path(
    llm: LLM, reference: object, fields: dict
) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **fields)
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=params)[0].token_ids
    plain = llm.generate(
        prompt_token_ids=[PROMPT], sampling_params=SamplingParams(max_tokens=12, temperature=0.0)
    )
    generated: list[int] = []
    for token in out:
        row = _ref_logits(reference, PROMPT + generated)[-1]
        assert token == int(torch.argmax(_penalised(row, PROMPT, generated, params)))
        generated.append(token)
    assert out != plain[0].token_ids  # the field changed what was generated


def test_logprobs_are_the_models_own_distribution_before_penalties(llm: LLM, reference: object) -> None:
    params = SamplingParams(
        max_tokens=4, temperature=0.0, logprobs=3, repetition_penalty=2.0, ignore_eos=True
    )
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=params)[0]
    assert out.logprobs is not None and len(out.logprobs) == 4
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        lp = torch.log_softmax(_ref_logits(reference, PROMPT + out.token_ids[:i])[-1], dim=-1)
        assert entry[token] == pytest.approx(float(lp[token]), abs=1e-4)
        top = sorted(range(lp.numel()), key=lambda t: -float(lp[t]))[:3]
        assert set(top) <= set(entry)


def test_min_tokens_holds_back_eos_and_stop_tokens(llm: LLM) -> None:
    # eos made overwhelmingly likely: without min_tokens it ends at once.
    eager = SamplingParams(max_tokens=20, temperature=0.0, logit_bias={EOS: 50.0})
    assert llm.generate(prompt_token_ids=[PROMPT], sampling_params=eager)[0].token_ids == []
    held = SamplingParams(max_tokens=20, temperature=0.0, logit_bias={EOS: 50.0}, min_tokens=5)
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=held)[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "stop"
    stop = SamplingParams(
        max_tokens=20,
        temperature=0.0,
        logit_bias={65: 50.0},
        stop_token_ids=[65],
        min_tokens=3,
        ignore_eos=True,
    )
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=stop)[0]
    assert len(out.token_ids) == 3 and 65 not in out.token_ids and out.finish_reason == "stop"


def test_n_samples_each_reproduce_their_own_seed(llm: LLM) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=123, n=3, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[PROMPT, PROMPT[:4]], sampling_params=params)
    assert [len(o.outputs) for o in out] == [3, 3]
    for prompt, result in zip([PROMPT, PROMPT[:4]], out):
        assert [o.index for o in result.outputs] == [0, 1, 2]
        assert result.token_ids == result.outputs[0].token_ids
        for k, sample in enumerate(result.outputs):
            alone = SamplingParams(max_tokens=8, temperature=1.0, seed=123 + k, ignore_eos=True)
            assert (
                sample.token_ids
                == llm.generate(prompt_token_ids=[prompt], sampling_params=alone)[0].token_ids
            )
        assert len({tuple(o.token_ids) for o in result.outputs}) > 1


def test_prompt_logprobs_match_the_reference(llm: LLM, reference: object) -> None:
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=params)[0]
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    lp = torch.log_softmax(_ref_logits(reference, PROMPT), dim=-1)
    for pos in range(1, len(PROMPT)):
        entry = out.prompt_logprobs[pos]
        assert entry is not None and PROMPT[pos] in entry
        assert entry[PROMPT[pos]] == pytest.approx(float(lp[pos - 1, PROMPT[pos]]), abs=1e-4)
        assert len(entry) in (2, 3)  # the prompt token plus the top 2 (it may be one of them)


def test_prefix_cache_hits_are_reported(llm: LLM) -> None:
    long = list(range(40))
    params = SamplingParams(max_tokens=2, temperature=0.0)
    first = llm.generate(prompt_token_ids=[long], sampling_params=params)[0]
    again = llm.generate(prompt_token_ids=[long], sampling_params=params)[0]
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == 32  # whole 16-token pages, the last prompt token recomputed


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n": 0}, "n must be at least 1"),
        ({"min_tokens": 20, "max_tokens": 4}, "min_tokens"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"logit_bias": {-3: 1.0}}, "negative"),
    ],
)
def test_invalid_fields_are_named(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_bias_outside_the_vocabulary_is_refused(llm: LLM) -> None:
    with pytest.raises(AnyquantError, match="outside the vocabulary"):
        llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(logit_bias={9999: 1.0}))
    assert not llm.engine.has_unfinished()
