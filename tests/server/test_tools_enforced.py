"""`tool_choice` "required" and named functions, enforced by the structured-output engine: with
random weights and random sampling, every answer is a call that parses into the declared
arguments (the real `openai` client against a live server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import openai
import pytest

from anyquant import LLM
from anyquant.server import ServerConfig, create_app
from anyquant.utils.tiny_model import write_tiny_model
from tests.server.conftest import MODEL, LiveServer
from tests.unit.test_chat_templates import TOOL_TEMPLATE

pytest.importorskip("xgrammar")

# Bounded arguments (enums, short strings), so that random weights finish a call in few tokens.
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "Rome"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: jsonschema_rs.validator_for(t["function"]["parameters"]) for t in TOOLS}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path: Path = write_tiny_model(
        tmp_path_factory.mktemp("tools-enforced"), "llama", seed=9, max_position_embeddings=1024
    )
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOL_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    llm = LLM(path, dtype="float32", max_model_len=1024)
    app = create_app(llm.engine, llm.tokenizer, ServerConfig(MODEL, tool_call_parser="hermes"))
    with LiveServer(app) as server:
        yield server.url
    app.state.server.engine.close()


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_time"}}], ids=["required", "named"]
)
def test_forced_tool_calls_always_parse_into_the_declared_arguments(url: str, choice: Any) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    for seed in range(6):
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather or time?"}],
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        calls = response.choices[0].message.tool_calls
        assert calls, (seed, response.choices[0].message.content)
        for call in calls:
            if isinstance(choice, dict):
                assert call.function.name == "get_time"
            arguments = json.loads(call.function.arguments)
            assert SCHEMAS[call.function.name].is_valid(arguments), (seed, call)
