"""Tool calling, LLM.chat, /tokenize and /detokenize, and cached-token usage on a live server, with
the real `openai` client.

The model is the tiny random Llama with five added tokens, each a piece of a Hermes-style answer
that calls two tools. No stub replaces anything: the request itself makes the real engine write
that answer token by token, with logit_bias (piece i gets 100 - 10 i, eos 50) and
repetition_penalty 100, which divides a piece's logit once it has been written, so the next piece
wins; the model's own logits are too small to compete."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from anyquant import LLM, SamplingParams
from anyquant.engine.sampling import SamplingParams as EngineParams
from anyquant.server import ServerConfig, create_app
from anyquant.utils.tiny_model import byte_tokenizer_json, write_tiny_model
from tests.server.conftest import MODEL, LiveServer
from tests.unit.test_chat_templates import TOOL_TEMPLATE

pytestmark = pytest.mark.slow

PIECES = [
    "Let me check.\n",
    '<tool_call>\n{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}\n</tool_call>\n',
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}',
    "\n</tool_call>",
]
FIRST_PIECE = 259  # ids after the byte tokenizer's 256 bytes + <s>, </s>, <pad>
EOS = 257
FORCE = {
    "logit_bias": {**{str(FIRST_PIECE + i): 100.0 - 10 * i for i in range(len(PIECES))}, str(EOS): 50.0},
    "repetition_penalty": 100.0,
    "temperature": 0.0,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string"}},
                "required": ["zone"],
            },
        },
    },
]
ASK: list[Any] = [{"role": "user", "content": "Weather and time in Paris?"}]


@dataclass
class Live:
    url: str
    llm: LLM
    ref: LLM
    added: list[EngineParams]  # the sampling parameters of every request the server's engine got

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _model(root: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer

    path = write_tiny_model(
        root, "llama", seed=3, vocab_size=FIRST_PIECE + len(PIECES), max_position_embeddings=1024
    )
    tok = Tokenizer.from_str(byte_tokenizer_json())
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in PIECES])
    (path / "tokenizer.json").write_text(tok.to_str())
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOL_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    path = _model(tmp_path_factory.mktemp("tools-model"))
    llm = LLM(path, dtype="float32", max_model_len=1024)
    assert llm.tokenizer is not None
    added: list[EngineParams] = []
    original = llm.engine.add_request

    def record(ids: list[int], params: EngineParams, *rest: Any, **kwargs: Any) -> str:
        added.append(params)
        return original(ids, params, *rest, **kwargs)

    llm.engine.add_request = record  # type: ignore[method-assign]
    app = create_app(llm.engine, llm.tokenizer, ServerConfig(MODEL, tool_call_parser="hermes"))
    ref = LLM(path, dtype="float32", max_model_len=1024)
    with LiveServer(app) as server:
        yield Live(server.url, llm, ref, added)
    app.state.server.engine.close()


def _ask(live: Live, **extra: Any) -> Any:
    return live.client().chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=20, extra_body=FORCE, **extra
    )


def test_tool_calls_in_the_response(live: Live) -> None:
    response = _ask(live)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "UTC"}),
    ]
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls)
    assert len({c.id for c in calls}) == 2
    assert response.usage is not None and response.usage.completion_tokens == len(PIECES)


def test_streamed_tool_call_deltas_reassemble_into_the_response(live: Live) -> None:
    whole = _ask(live).choices[0]
    chunks = list(_ask(live, stream=True))
    content = ""
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                if call.index not in calls:
                    # A call opens with its index, id, type and name.
                    assert call.id and call.type == "function" and call.function and call.function.name
                    calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
                else:
                    assert call.id is None and (call.function is None or not call.function.name)
                calls[call.index]["arguments"] += (call.function.arguments if call.function else None) or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" == whole.finish_reason
    assert content == whole.message.content
    assert whole.message.tool_calls is not None
    assert sorted(calls) == list(range(len(whole.message.tool_calls)))
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    # The content came before the calls were complete: it was streamed, not held to the end.
    first_content = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content)
    first_call = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.tool_calls)
    assert first_content < first_call


def test_tool_choice_none_leaves_the_text_alone(live: Live) -> None:
    choice = _ask(live, tool_choice="none").choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content == "".join(PIECES)


def test_required_and_named_choices_send_the_call_grammar(live: Live) -> None:
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        live.added.clear()
        response = _ask(live, tool_choice=choice)
        assert response.choices[0].message.tool_calls  # the forced output parses as calls
        # OpenAI's finish_reason: "tool_calls" when the model chose to call, "stop" when forced.
        assert response.choices[0].finish_reason == ("tool_calls" if choice == "required" else "stop")
        (params,) = live.added
        assert params.guided_decoding is not None and params.guided_decoding.grammar
        grammar = xgrammar.Grammar.from_ebnf(params.guided_decoding.grammar)
        call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
        assert _is_grammar_accept_string(grammar, call)
        assert not _is_grammar_accept_string(grammar, "".join(PIECES))  # content is not allowed


def test_history_with_calls_and_results_and_llm_chat_equals_the_server(live: Live) -> None:
    history: list[Any] = [
        *ASK,
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    request = {"temperature": 0.0, "max_tokens": 12, "seed": 0, "logit_bias": {"65": 4.0}}
    served = live.client().chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", **request
    )
    offline = live.ref.chat(
        history,
        SamplingParams(max_tokens=12, temperature=0.0, seed=0, logit_bias={65: 4.0}),
        tools=TOOLS,
    )[0]
    assert served.choices[0].message.content == offline.text
    assert served.usage is not None and served.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert offline.prompt is not None
    assert "<tool_response>\n" + '{"temp_c": 21}' in offline.prompt
    assert '"arguments": {"city": "Paris"}' in offline.prompt
    tokens = httpx.post(f"{live.url}/tokenize", json={"messages": history, "tools": TOOLS}).json()
    assert tokens["tokens"] == offline.prompt_token_ids


def test_tokenize_detokenize_and_models(live: Live) -> None:
    assert live.ref.tokenizer is not None
    r = httpx.post(f"{live.url}/tokenize", json={"prompt": "Hi there", "return_token_strs": True}).json()
    assert r["tokens"] == live.ref.tokenizer.encode("Hi there")
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 1024
    assert "".join(r["token_strs"][1:]) == "Hi there" and r["token_strs"][0] == "<s>"
    back = httpx.post(f"{live.url}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": "Hi there"}
    bad = httpx.post(f"{live.url}/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    models = live.client().models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].model_extra["max_model_len"] == 1024


def test_usage_reports_prompt_tokens_served_by_the_prefix_cache(live: Live) -> None:
    messages = [{"role": "user", "content": "A long question about caching prompts " * 3}]
    first = live.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    again = live.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    assert first.usage is not None and again.usage is not None
    assert first.usage.prompt_tokens_details is not None and again.usage.prompt_tokens_details is not None
    prompt = again.usage.prompt_tokens
    # Whole 16-token pages, never the last prompt token (it is recomputed to sample from).
    assert again.usage.prompt_tokens_details.cached_tokens == (prompt - 1) // 16 * 16 > 0
    stream = live.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert usage[-1].prompt_tokens_details is not None
    assert usage[-1].prompt_tokens_details.cached_tokens == (prompt - 1) // 16 * 16
