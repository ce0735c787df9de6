"""Structured outputs through a live server and the real `openai` client: response_format (json_object,
json_schema) and vLLM's guided_json / guided_regex / guided_choice / guided_grammar, on a random-weight
model whose answers must still always match; invalid constraints are 400s naming the problem."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from anyquant import LLM, SamplingParams
from anyquant.server import ServerConfig, create_app
from tests.server.conftest import MODEL, LiveServer

pytest.importorskip("xgrammar")
jsonschema_rs = pytest.importorskip("jsonschema_rs")
pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
# Every field is bounded, so even a random model ends the object well within max_tokens (one token
# per byte here: at most ~130 tokens with 4-byte characters in every string; numbers are integers,
# as a float can have any number of digits).
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "rank": {"type": ["integer", "null"], "minimum": -1, "maximum": 1},
    },
    "required": ["name", "age", "member", "color", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[str]:
    llm = LLM(tiny_model, dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=32)
    assert llm.tokenizer is not None
    app = create_app(llm.engine, llm.tokenizer, ServerConfig(MODEL))
    with LiveServer(app) as live:
        yield live.url
    app.state.server.engine.close()


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def test_json_schema_answers_always_validate(client: openai.OpenAI) -> None:
    validator = jsonschema_rs.validator_for(SCHEMA)
    texts = []
    for seed in (1, 100):  # 2 x n=8: 16 differently seeded samples from chat
        chat = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Describe a person as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
            temperature=1.0,
            n=8,
            seed=seed,
            max_tokens=200,
        )
        texts += [(c.message.content, c.finish_reason) for c in chat.choices]
    completion = client.completions.create(  # and 8 from completions' guided_json
        model=MODEL, prompt="JSON:", n=8, seed=7, max_tokens=200, extra_body={"guided_json": SCHEMA}
    )
    texts += [(c.text, c.finish_reason) for c in completion.choices]
    for text, reason in texts:
        assert reason == "stop", text
        validator.validate(json.loads(text or ""))
    assert len({t for t, _ in texts}) > 8  # seeds gave different answers, all valid


def test_json_object_answers_are_objects(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "{}"}],
        response_format={"type": "json_object"},
        temperature=1.0,
        n=6,
        seed=3,
        max_tokens=200,
    )
    for choice in chat.choices:
        text = choice.message.content or ""
        assert text.startswith("{")
        if choice.finish_reason == "stop":  # an unbounded object may run to max_tokens
            assert isinstance(json.loads(text), dict)


def test_regex_choice_and_grammar_are_honoured(client: openai.OpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"guided_regex": r"\d{3}-[A-Z]{2,4}"}, r"\d{3}-[A-Z]{2,4}"),
        ({"guided_choice": ["sunny", "rainy", "snow storm"]}, r"sunny|rainy|snow storm"),
        (
            {"guided_grammar": 'root ::= "(" num ("," num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'},
            r"\((\d|[1-9]\d)(,(\d|[1-9]\d))*\)",
        ),
        ({"guided_grammar": 'start: "x" DIGIT+\nDIGIT: /[0-3]/'}, r"x[0-3]+"),  # Lark, as vLLM also takes
    ]
    for extra, pattern in cases:
        completion = client.completions.create(
            model=MODEL, prompt="Answer:", n=4, seed=11, temperature=1.0, max_tokens=60, extra_body=extra
        )
        chat = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Answer:"}],
            temperature=0.0,
            max_tokens=60,
            extra_body=extra,
        )
        texts = [(c.text, c.finish_reason) for c in completion.choices]
        texts.append((chat.choices[0].message.content or "", chat.choices[0].finish_reason))
        for text, reason in texts:
            assert reason == "stop" and re.fullmatch(pattern, text), (extra, text)


def test_streamed_guided_output_reassembles_into_a_valid_answer(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
        temperature=1.0,
        seed=5,
        max_tokens=200,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema_rs.validate(SCHEMA, json.loads(text))


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"guided_json": {"type": "strin"}}, 'guided_json: json schema: Unsupported type "strin"'),
        ({"guided_json": "{oops"}, "guided_json: json schema: Failed to parse JSON"),
        (
            {"guided_regex": "([a-z]"},
            "guided_regex: regex: Regex parsing error at position 7: The parenthesis is not closed",
        ),
        (
            {"guided_grammar": "root ::= nothing"},
            'guided_grammar: grammar: EBNF parser error at line 1, column 10: Rule "nothing"',
        ),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "give at most one of guided_regex, guided_choice"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "needs json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
                }
            },
            "response_format: json schema: Invalid range: minimum greater than maximum",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_invalid_constraints_are_400_naming_the_problem(
    client: openai.OpenAI, extra: dict[str, Any], words: str
) -> None:
    for call in (
        lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body=extra),
        lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4, extra_body=extra
        ),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.status_code == 400
        assert words in str(info.value), str(info.value)


def test_a_batch_mixing_guided_and_plain_requests(server: str, tiny_model: Path) -> None:
    """Concurrent requests share the engine's steps: the guided ones match, and the plain greedy ones
    give exactly what the same request gives alone."""
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    prompts = [f"Story {i}:" for i in range(12)]

    async def one(i: int) -> tuple[str, str | None]:
        extra: dict[str, Any] = {"ignore_eos": True} if i % 2 else {"guided_json": SCHEMA}
        out = await client.completions.create(
            model=MODEL, prompt=prompts[i], temperature=0.0, max_tokens=24 if i % 2 else 200, extra_body=extra
        )
        return out.choices[0].text, out.choices[0].finish_reason

    async def all_at_once() -> list[tuple[str, str | None]]:
        try:
            return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))
        finally:
            await client.close()

    results = asyncio.run(all_at_once())
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = LLM(tiny_model, dtype="float32", max_model_len=MAX_MODEL_LEN)  # the server's engine is its own
    for i, (text, reason) in enumerate(results):
        if i % 2:
            assert text == ref.generate([prompts[i]], plain)[0].text
        else:
            assert reason == "stop"
            jsonschema_rs.validate(SCHEMA, json.loads(text))
