"""Streams send a chunk for every step that produced tokens, even when the tokens decode to no text.

Random-weight benchmark models (and half UTF-8 characters) produce tokens whose text is empty; a
stream that waited for text would send its first chunk at the end, and time-to-first-token could
not be measured.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from anyquant.llm import LLM
from anyquant.server import ServerConfig, create_app
from anyquant.tokenizer import Tokenizer
from tests.server.conftest import MAX_MODEL_LEN, MODEL, call, sse_events

MAX_TOKENS = 7


class SilentTokenizer(Tokenizer):
    """The model's tokenizer, except that every token decodes to the empty string."""

    def __init__(self, inner: Tokenizer) -> None:  # no super().__init__: wraps a loaded tokenizer
        self.__dict__.update(inner.__dict__)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


@pytest.fixture
def silent_app(tiny_model: Path) -> Iterator[FastAPI]:
    llm = LLM(tiny_model, dtype="float32", max_model_len=MAX_MODEL_LEN)
    assert llm.tokenizer is not None
    silent = SilentTokenizer(llm.tokenizer)
    llm.engine.tokenizer = silent  # the engine's detokenizers see no text either
    app = create_app(llm.engine, silent, ServerConfig(MODEL))
    yield app
    app.state.server.engine.close()


def _completion_chunks(app: FastAPI, body: dict[str, object]) -> list[dict[str, object]]:
    r = call(app, "POST", "/v1/completions", json={**body, "stream": True})
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    return [choice for e in events[:-1] for choice in e["choices"]]


def test_every_token_gets_a_chunk_when_tokens_decode_to_nothing(silent_app: FastAPI) -> None:
    body = {"prompt": [256, 97, 98, 99], "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    choices = _completion_chunks(silent_app, body)
    # One chunk per decode step (one token each), the last one carrying the finish reason.
    assert len(choices) == MAX_TOKENS
    assert all(c["text"] == "" for c in choices)
    assert [c["finish_reason"] for c in choices] == [None] * (MAX_TOKENS - 1) + ["length"]


def test_chat_stream_sends_empty_content_deltas_per_token(silent_app: FastAPI) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    r = call(silent_app, "POST", "/v1/chat/completions", json=body)  # the fixture model has a template
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    deltas = [e["choices"][0] for e in events[:-1]]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    tokens = deltas[1:]
    assert len(tokens) == MAX_TOKENS
    assert all(d["delta"] == {"content": ""} for d in tokens)
    assert tokens[-1]["finish_reason"] == "length"
