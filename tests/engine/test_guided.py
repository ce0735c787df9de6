"""Guided decoding in the engine: the token mask against an independent masked argmax, batches
mixing guided and unguided requests, stop strings, max_tokens, ignore_eos, the grammar cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from anyquant import LLM, SamplingParams
from anyquant.engine.engine import Engine
from anyquant.engine.sampling import GuidedDecodingParams
from anyquant.errors import AnyquantError
from anyquant.utils.tiny_model import write_tiny_model

pytest.importorskip("xgrammar")

# Shared prefixes make the model choose between ending ("yes" then EOS) and going on ("yesterday").
CHOICES = ["yes", "yesterday", "no", "maybe so"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    return LLM(write_tiny_model(tmp_path_factory.mktemp("guided"), "llama", seed=5), dtype="float32")


def _run(engine: Engine, items: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], str, str]]:
    """Submit every item before the first step (one batch), step to the end: (tokens, text, reason)."""
    ids = [engine.add_request(prompt, params) for prompt, params in items]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    texts = dict.fromkeys(ids, "")
    reasons = dict.fromkeys(ids, "")
    while engine.has_unfinished():
        for delta in engine.step():
            tokens[delta.request_id] += delta.new_token_ids
            texts[delta.request_id] += delta.new_text
            if delta.finished:
                reasons[delta.request_id] = delta.finish_reason or ""
    return [(tokens[rid], texts[rid], reasons[rid]) for rid in ids]


def _reference_choice(llm: LLM, prompt: list[int], choices: list[str]) -> list[int]:
    """Greedy decoding restricted by hand, from teacher-forced logits: a token is allowed when the
    text so far plus its text is still a prefix of some choice; EOS when the text is a choice."""
    assert llm.tokenizer is not None
    eos = min(llm.tokenizer.eos_token_ids)
    byte_text = {t: llm.tokenizer.decode([t]) for t in range(256)}  # the test tokenizer: one byte each
    out: list[int] = []
    while True:
        row = llm.logits(prompt + out)[-1]
        text = llm.tokenizer.decode(out)
        allowed = [t for t, s in byte_text.items() if any(c.startswith(text + s) for c in choices)]
        if text in choices:
            allowed.append(eos)
        token = max(allowed, key=lambda t: float(row[t]))
        if token == eos:
            return out
        out.append(token)


def test_masked_greedy_matches_a_hand_masked_argmax_in_a_mixed_batch(llm: LLM) -> None:
    guided = SamplingParams(
        max_tokens=20, temperature=0.0, guided_decoding=GuidedDecodingParams(choice=CHOICES)
    )
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[256, 10 + i, 40 + 3 * i] for i in range(6)]
    items = [(p, guided if i % 2 == 0 else plain) for i, p in enumerate(prompts)]
    results = _run(llm.engine, items)
    for (prompt, params), (tokens, text, reason) in zip(items, results):
        if params is guided:
            assert text in CHOICES and reason == "stop"
            assert tokens == _reference_choice(llm, prompt, CHOICES)
        else:  # the masks touched no other row: the same tokens as the request alone
            alone = llm.generate(prompt_token_ids=[prompt], sampling_params=plain)[0].token_ids
            assert tokens == alone and len(tokens) == 12
    assert len({text for _, text, _ in results[::2]}) > 1  # the prompts lead to different choices


def test_sampled_outputs_match_the_regex_and_overlap_changes_nothing(llm: LLM) -> None:
    pattern = r"[a-d]{2,4}-\d{1,3}(\.[xy])?"
    params = [
        SamplingParams(
            max_tokens=30, temperature=1.0, seed=s, guided_decoding=GuidedDecodingParams(regex=pattern)
        )
        for s in range(8)
    ]
    items = [([256, 7 + s], p) for s, p in enumerate(params)]
    assert llm.engine.guided.overlap  # the default: masks filled while the forward pass runs
    overlapped = _run(llm.engine, items)
    llm.engine.guided.overlap = False
    try:
        inline = _run(llm.engine, items)
    finally:
        llm.engine.guided.overlap = True
    assert overlapped == inline
    for _, text, reason in overlapped:
        assert re.fullmatch(pattern, text), text
        assert reason == "stop"


def test_max_tokens_and_stop_strings_cut_a_guided_output(llm: LLM) -> None:
    cut = SamplingParams(
        max_tokens=5, temperature=0.0, guided_decoding=GuidedDecodingParams(regex="[a-z]{12}")
    )
    stop = SamplingParams(
        max_tokens=40,
        temperature=0.0,
        stop=["beta"],
        guided_decoding=GuidedDecodingParams(choice=["alpha beta gamma"]),
    )
    (t1, text1, r1), (_, text2, r2) = _run(llm.engine, [([256, 3], cut), ([256, 4], stop)])
    assert len(t1) == 5 and re.fullmatch("[a-z]{5}", text1) and r1 == "length"
    assert text2 == "alpha " and r2 == "stop"
    assert len(llm.engine.guided) == 0  # finished requests dropped their matchers


def test_the_end_of_the_grammar_ends_the_request_even_with_ignore_eos(llm: LLM) -> None:
    params = SamplingParams(
        max_tokens=30, temperature=0.0, ignore_eos=True, guided_decoding=GuidedDecodingParams(choice=["ok"])
    )
    out = llm.generate(prompt_token_ids=[[256, 1]], sampling_params=params)[0]
    assert out.text == "ok" and out.finish_reason == "stop"


def test_grammars_compile_once_per_constraint(llm: LLM) -> None:
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}
    compiler = llm.engine.grammars
    before = compiler.num_compiled
    first = compiler.compile(GuidedDecodingParams(json=schema))
    assert compiler.compile(GuidedDecodingParams(json=dict(schema))) is first
    assert (
        compiler.compile(
            GuidedDecodingParams(
                json='{"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}'
            )
        )
        is first
    )
    compiler.compile(GuidedDecodingParams(json={"type": "object"}))
    assert compiler.num_compiled == before + 2
    out = llm.generate(
        prompt_token_ids=[[256, 9]],
        sampling_params=SamplingParams(
            max_tokens=20, temperature=0.0, guided_decoding=GuidedDecodingParams(json=schema)
        ),
    )[0]
    assert out.text in ('{"k": true}', '{"k": false}') and compiler.num_compiled == before + 2


@pytest.mark.parametrize(
    ("guided", "words"),
    [
        (GuidedDecodingParams(regex="(ab"), "regex: Regex parsing error"),
        (GuidedDecodingParams(json={"type": "strin"}), 'json schema: Unsupported type "strin"'),
        (
            GuidedDecodingParams(grammar="root ::= missing"),
            'grammar: EBNF parser error at line 1, column 10: Rule "missing"',
        ),
        (GuidedDecodingParams(grammar="root ::= root"), "grammar: matches no output"),
        (GuidedDecodingParams(json="{not json"), "json schema: Failed to parse JSON"),
    ],
)
def test_invalid_constraints_are_refused_before_anything_runs(
    llm: LLM, guided: GuidedDecodingParams, words: str
) -> None:
    with pytest.raises(AnyquantError, match=re.escape(words)):
        llm.generate(prompt_token_ids=[[256, 2]], sampling_params=SamplingParams(guided_decoding=guided))
    assert not llm.engine.has_unfinished() and len(llm.engine.guided) == 0


@pytest.mark.needs_shared
def test_a_trained_sentencepiece_model_writes_what_the_grammar_says(stories: Path) -> None:
    """stories260K: a byte-fallback vocabulary with "▁" word starts, where a grammar must see the
    text the detokenizer prints (the leading space of a first word included)."""
    llm = LLM(stories / "hf", dtype="float32")
    sentence = r"[A-Z][a-z]+ (went|saw) [a-z ]{3,20}\."
    regex = SamplingParams(
        max_tokens=60, temperature=0.0, guided_decoding=GuidedDecodingParams(regex=sentence)
    )
    for out in llm.generate(["Once upon a time, there was a", "One day,"], regex):
        assert re.fullmatch(sentence, out.text) and out.finish_reason == "stop", out.text
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    sampled = [
        SamplingParams(
            max_tokens=80, temperature=1.0, seed=s, guided_decoding=GuidedDecodingParams(json=schema)
        )
        for s in range(4)
    ]
    for params in sampled:
        out = llm.generate(["Once upon a time"], params)[0]
        value = json.loads(out.text)
        assert set(value) == {"name", "age"} and isinstance(value["name"], str) and 0 <= value["age"] <= 99


def test_packed_rows_use_the_grammar_engines_bit_layout() -> None:
    import torch
    import xgrammar

    from anyquant.engine.grammar import pack_bits

    allowed = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.5
    allowed[31] = allowed[32] = True  # the sign bit of a word, and the next word's first
    logits = torch.zeros(1, 1000)
    xgrammar.apply_token_bitmask_inplace(logits, pack_bits(allowed)[None])
    assert torch.equal(logits[0] == 0, allowed)


def test_greedy_rows_whose_argmax_is_allowed_are_not_masked(llm: LLM) -> None:
    import torch

    from anyquant.engine.guided import GuidedDecoder
    from anyquant.engine.request import Request
    from anyquant.engine.scheduler import StepPlan

    assert llm.tokenizer is not None
    a, z = (llm.tokenizer.encode(c, add_special_tokens=False)[0] for c in "az")
    guided = GuidedDecoder(llm.engine.grammars)
    params = SamplingParams(guided_decoding=GuidedDecodingParams(choice=["ab"]))  # first token: "a" only
    requests = [Request(f"r{i}", [1, 2], params) for i in range(3)]
    for r in requests:
        r.num_computed_tokens = 1
        guided.add(r.request_id, GuidedDecodingParams(choice=["ab"]))
    logits = torch.zeros(3, 259)
    logits[0, a] = logits[1, z] = logits[2, z] = 5.0
    ids = [r.request_id for r in requests]
    masks = guided.begin_step(StepPlan(scheduled=[(r, 1) for r in requests]))
    chosen = guided.apply(masks, ids, logits, logits.argmax(dim=-1).tolist(), {"r0", "r1"})
    assert chosen == [a, a, z]  # row 2 samples: its argmax is not redone, its row is masked instead
    assert torch.isfinite(logits[0]).all()  # allowed argmax: row left alone
    assert (torch.isfinite(logits[1:]).sum(dim=-1) == 1).all() and logits[2, a] == 0
