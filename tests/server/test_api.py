"""The HTTP contract, in process: response shapes, SSE streams, logprobs, errors, auth, limits."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI

from anyquant import LLM, SamplingParams
from tests.server.conftest import MAX_MODEL_LEN, MODEL, AppFactory, call, sse_events

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def ref(tiny_model: Path) -> LLM:
    """A second engine on the same weights: the expected outputs, independent of the server."""
    return LLM(tiny_model, dtype="float32", max_model_len=MAX_MODEL_LEN)


@pytest.fixture
def app(make_app: AppFactory) -> Iterator[FastAPI]:
    yield make_app()


def _greedy(ref: LLM, ids: list[int], n: int) -> tuple[str, list[int]]:
    out = ref.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=n, **GREEDY))[0]
    return out.text, out.token_ids


def _post(app: FastAPI, path: str, body: Any, **kwargs: Any) -> Any:
    return call(app, "POST", path, json=body, **kwargs)


# -- completions ---------------------------------------------------------------------------------
def test_completion_matches_offline_generation(app: FastAPI, ref: LLM) -> None:
    r = _post(app, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 8, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["id"].startswith("cmpl-")
    assert ref.tokenizer is not None
    ids = ref.tokenizer.encode("Hello")
    assert len(ids) == 6 and ids[0] == 256  # the byte tokenizer adds <s> (256)
    text, _ = _greedy(ref, ids, 8)
    assert body["choices"] == [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 8,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_several_prompts_and_n_use_openai_index_order(app: FastAPI, ref: LLM) -> None:
    r = _post(
        app, "/v1/completions", {"prompt": [[256, 97, 98], [256, 120]], "n": 2, "max_tokens": 5, **GREEDY}
    )
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    first, second = _greedy(ref, [256, 97, 98], 5)[0], _greedy(ref, [256, 120], 5)[0]
    assert [c["text"] for c in choices] == [first, first, second, second]
    assert r.json()["usage"]["prompt_tokens"] == 5  # each prompt once, whatever n is


def test_completion_logprobs_are_the_models_log_softmax(app: FastAPI, ref: LLM) -> None:
    prompt = [256, 10, 20, 30]
    r = _post(app, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "logprobs": 3, **GREEDY})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    _, tokens = _greedy(ref, prompt, 6)
    # Independent: teacher-forced logits of the whole sequence, log-softmax in float64.
    logits = ref.logits(prompt + tokens[:-1]).double()
    expected = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 :]
    want = [float(expected[i, t]) for i, t in enumerate(tokens)]
    assert lp["token_logprobs"] == pytest.approx(want, abs=1e-4)
    assert len(lp["tokens"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    for row, top in zip(expected, lp["top_logprobs"]):
        # Keys are token texts; byte tokens of partial UTF-8 all read "\ufffd" and may collide.
        assert 1 <= len(top) <= 3
        best = row.topk(3).values.tolist()
        assert all(min(abs(v - b) for b in best) < 1e-4 for v in top.values())
    assert lp["text_offset"][0] == 0


# -- chat ----------------------------------------------------------------------------------------
def test_chat_renders_the_template_then_generates(app: FastAPI, ref: LLM) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    r = _post(app, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 7, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    # The fixture's template, written out by hand: <s> then role markers, bytes for the rest.
    rendered = "<s><|system|>be brief\n<|user|>hi\n<|assistant|>"
    assert ref.tokenizer is not None
    ids = ref.tokenizer.encode(rendered, add_special_tokens=False)
    assert ids[0] == 256 and ids.count(256) == 1
    text, _ = _greedy(ref, ids, 7)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_chat_logprobs_layout(app: FastAPI) -> None:
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 4,
        "logprobs": True,
        "top_logprobs": 2,
    }
    r = _post(app, "/v1/chat/completions", {**body, **GREEDY})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 2 and tops == sorted(tops, reverse=True)
        assert entry["logprob"] == pytest.approx(tops[0])  # greedy picks the top token
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]


# -- streaming -----------------------------------------------------------------------------------
def test_streamed_completion_equals_the_whole_one(app: FastAPI) -> None:
    body = {"prompt": "Once", "max_tokens": 12, "n": 2, **GREEDY}
    whole = _post(app, "/v1/completions", body).json()
    r = _post(app, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    texts, finishes = ["", ""], [[], []]
    for event in events[:-2]:
        assert event["object"] == "text_completion" and event["usage"] is None
        (choice,) = event["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finishes[choice["index"]].append(choice["finish_reason"])
    assert texts == [c["text"] for c in whole["choices"]]
    assert finishes == [["length"], ["length"]]


def test_streamed_chat_starts_with_the_role_and_ends_with_done(app: FastAPI) -> None:
    body = {"messages": [{"role": "user", "content": "tell me"}], "max_tokens": 9, **GREEDY}
    whole = _post(app, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    events = sse_events(_post(app, "/v1/chat/completions", {**body, "stream": True}).text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:])
    assert content == whole
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == [
        "length"
    ]


# -- errors --------------------------------------------------------------------------------------
BAD_COMPLETIONS = [
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "logprobs": 1000}, "logprobs"),
    ({"prompt": "a", "seed": 2**70}, "seed"),
    ({"prompt": "a", "stop": ["x"] * 17}, "stop"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": [1, 2, 999]}, "vocabulary"),
    ({"prompt": "a", "echo": True}, "echo"),
    ({}, "prompt"),
    ({"prompt": "a", "stream_options": "yes"}, "stream_options"),
    ({"prompt": "a", "stop": 5}, "stop"),
]


@pytest.mark.parametrize(("body", "mentions"), BAD_COMPLETIONS)
def test_bad_completion_requests_get_400_naming_the_problem(app: FastAPI, body: Any, mentions: str) -> None:
    r = _post(app, "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    assert mentions in error["message"] or mentions == error["param"], error


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}], "n": "two"}, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "a"}], "tool_choice": "required"}, "tool_choice needs tools"),
    (
        {
            "messages": [{"role": "user", "content": "a"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        "--tool-call-parser",
    ),
    (
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]},
        "arguments is not valid JSON",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}], "chat_template_kwargs": {"messages": []}},
        "must not set",
    ),
    ({"messages": [{"role": "user", "content": "a"}], "logit_bias": {"abc": 1}}, "not a token id"),
    ({"messages": [{"role": "user", "content": "a"}], "logit_bias": {"5000": 1}}, "outside the vocabulary"),
    ({"messages": [{"role": "user", "content": "a"}], "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"messages": [{"content": "a"}]}, "role"),
    ({"messages": "hello"}, "messages"),
]


@pytest.mark.parametrize(("body", "mentions"), BAD_CHATS)
def test_bad_chat_requests_get_400_naming_the_problem(app: FastAPI, body: Any, mentions: str) -> None:
    r = _post(app, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert mentions in error["message"] or mentions == error["param"], error


def test_malformed_json_and_non_object_bodies_are_400(app: FastAPI) -> None:
    for content in (b"{not json", b"[1, 2]", b'"text"', b""):
        r = call(
            app, "POST", "/v1/completions", content=content, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, (content, r.text)
        assert r.json()["error"]["message"]
    r = call(
        app, "POST", "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert "malformed JSON" in r.json()["error"]["message"]


def test_text_that_cannot_be_tokenized_is_400(app: FastAPI) -> None:
    # A lone surrogate is valid JSON but has no UTF-8 form; it must not become a 500.
    for body in (b'{"prompt": "a\\ud800"}', b'{"messages": [{"role": "user", "content": "\\udfff"}]}'):
        path = "/v1/completions" if b"prompt" in body else "/v1/chat/completions"
        r = call(app, "POST", path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text


def test_unknown_fields_are_ignored(app: FastAPI) -> None:
    body = {
        "prompt": "a",
        "max_tokens": 2,
        "frobnicate": {"x": [1]},
        "logit_bias": {"5": 1},
        "metadata": None,
    }
    assert _post(app, "/v1/completions", body).status_code == 200
    chat = {
        "messages": [{"role": "user", "content": "a", "weird": 1}],
        "max_tokens": 2,
        "a_future_field": 3,
    }
    assert _post(app, "/v1/chat/completions", chat).status_code == 200


def test_prompt_longer_than_the_context_names_the_limits(app: FastAPI) -> None:
    r = _post(app, "/v1/completions", {"prompt": "x" * 200})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert f"{MAX_MODEL_LEN} tokens" in message and "201 tokens" in message
    r = _post(app, "/v1/completions", {"prompt": "x" * 100, "max_tokens": 50})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "101 tokens" in message and "max_tokens is 50" in message and "at most 27" in message
    # Chat without max_tokens gets the room the context leaves.
    r = _post(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 90}], **GREEDY})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["total_tokens"] == MAX_MODEL_LEN


def test_unknown_model_is_404_and_unknown_route_is_404(app: FastAPI) -> None:
    r = _post(app, "/v1/completions", {"model": "gpt-9", "prompt": "a"})
    assert r.status_code == 404 and "gpt-9" in r.json()["error"]["message"]
    r = call(app, "GET", "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_api_key_is_required_on_v1_only(make_app: AppFactory) -> None:
    app = make_app(config={"api_key": "s3cret"})
    body = {"prompt": "a", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = _post(app, "/v1/completions", body, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
    assert call(app, "GET", "/v1/models").status_code == 401
    assert _post(app, "/v1/completions", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert call(app, "GET", "/health").status_code == 200


def test_request_body_size_is_limited(make_app: AppFactory) -> None:
    app = make_app(config={"max_body_bytes": 2048})
    payload = json.dumps({"prompt": "x" * 4000}).encode()
    r = call(app, "POST", "/v1/completions", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "2048" in r.json()["error"]["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit counts bytes received
        for i in range(0, len(payload), 500):
            yield payload[i : i + 500]

    r = call(app, "POST", "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    small = {"prompt": "x" * 100, "max_tokens": 1}
    assert _post(app, "/v1/completions", small).status_code == 200


# -- models, health, metrics ---------------------------------------------------------------------
def test_models_and_health(app: FastAPI) -> None:
    r = call(app, "GET", "/v1/models")
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == MAX_MODEL_LEN
    assert call(app, "GET", "/health").json() == {"status": "ok"}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_count_requests_tokens_and_latencies(app: FastAPI) -> None:
    for _ in range(2):
        r = _post(app, "/v1/completions", {"prompt": "abc", "max_tokens": 5, **GREEDY})
        assert r.status_code == 200
    assert _post(app, "/v1/completions", {"prompt": "a", "n": 0}).status_code == 400
    r = call(app, "GET", "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert _metric(text, "anyquant_generation_tokens_total") == 10
    assert _metric(text, "anyquant_prompt_tokens_total") == 8
    assert _metric(text, "anyquant_time_to_first_token_seconds_count") == 2
    assert _metric(text, "anyquant_inter_token_latency_seconds_count") == 8
    assert 'anyquant_requests_total{finish_reason="length",model_name="tiny"} 2.0' in text
    assert 'anyquant_http_requests_total{path="/v1/completions",status="400"} 1.0' in text
    assert _metric(text, "anyquant_kv_pages_used") == 0
    assert _metric(text, "anyquant_kv_pages_total") > 0
    assert _metric(text, "anyquant_requests_waiting") == 0
    assert _metric(text, "anyquant_nonfinite_logits_total") == 0


def test_openapi_schema_documents_the_endpoints(app: FastAPI) -> None:
    schema = call(app, "GET", "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"):
        assert path in schema["paths"]
    responses = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "413", "429"} <= set(responses)


def test_a_request_chat_template_needs_the_servers_trust(make_app: AppFactory) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": "<{{ messages[0].content }}>"}
    refused = _post(make_app(), "/tokenize", body)
    assert (
        refused.status_code == 400 and "--trust-request-chat-template" in refused.json()["error"]["message"]
    )
    trusted = make_app(config={"trust_request_chat_template": True})
    tokens = _post(trusted, "/tokenize", body).json()["tokens"]
    assert tokens == trusted.state.llm.tokenizer.encode("<hi>", add_special_tokens=False)
    assert _post(trusted, "/v1/chat/completions", {**body, "max_tokens": 2}).status_code == 200


def test_tokenize_and_detokenize_refuse_bad_input(app: FastAPI) -> None:
    for path, body, mentions in (
        ("/tokenize", {"prompt": "x", "model": "other"}, "does not exist"),
        ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
    ):
        r = _post(app, path, body)
        assert r.status_code in (400, 404), r.text
        assert mentions in r.json()["error"]["message"] or mentions == r.json()["error"]["param"]


def test_prompt_logprobs_on_both_endpoints(app: FastAPI, ref: LLM) -> None:
    assert ref.tokenizer is not None
    body = {"prompt": "Hello", "max_tokens": 1, "prompt_logprobs": 2, "n": 2}
    choices = _post(app, "/v1/completions", body).json()["choices"]
    ids = ref.tokenizer.encode("Hello")
    lp = torch.log_softmax(ref.logits(ids).double(), dim=-1)
    for choice in choices:
        got = choice["prompt_logprobs"]
        assert got[0] is None and len(got) == len(ids)
        for pos in range(1, len(ids)):
            entry = got[pos][str(ids[pos])]
            assert entry["logprob"] == pytest.approx(float(lp[pos - 1, ids[pos]]), abs=1e-4)
            assert entry["rank"] == int((lp[pos - 1] > lp[pos - 1, ids[pos]]).sum()) + 1
            assert entry["decoded_token"] == ref.tokenizer.decode([ids[pos]], skip_special_tokens=False)
            best = int(torch.argmax(lp[pos - 1]))
            assert got[pos][str(best)]["rank"] == 1
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 0}
    reply = _post(app, "/v1/chat/completions", chat).json()
    assert reply["prompt_logprobs"][0] is None and reply["usage"]["prompt_tokens"] == len(
        reply["prompt_logprobs"]
    )
    streamed = _post(app, "/v1/completions", {**body, "stream": True})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"
