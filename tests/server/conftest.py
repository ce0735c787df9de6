"""Fixtures for the server tests: a tiny random Llama with a chat template, apps and live servers.

Every app owns an engine thread; the fixtures close it at teardown so no thread outlives a test.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from anyquant.llm import LLM
from anyquant.server import ServerConfig, create_app
from anyquant.utils.tiny_model import write_tiny_model

MODEL = "tiny"
MAX_MODEL_LEN = 128
# Role markers around each message, then the assistant marker: enough to tell rendering happened.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_tiny_model(tmp_path_factory.mktemp("server-model"), "llama", seed=7)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config))
    return path


AppFactory = Callable[..., FastAPI]


@pytest.fixture
def make_app(tiny_model: Path) -> Iterator[AppFactory]:
    """make_app(llm_kwargs..., config=ServerConfig kwargs) -> app; engines closed at teardown."""
    apps: list[FastAPI] = []

    def make(config: dict[str, Any] | None = None, **llm_kwargs: Any) -> FastAPI:
        llm_kwargs.setdefault("dtype", "float32")
        llm_kwargs.setdefault("max_model_len", MAX_MODEL_LEN)
        llm = LLM(tiny_model, **llm_kwargs)
        assert llm.tokenizer is not None
        app = create_app(llm.engine, llm.tokenizer, ServerConfig(MODEL, **(config or {})))
        app.state.llm = llm
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.state.server.engine.close()


class LiveServer:
    """uvicorn serving `app` on a free loopback port, in a thread of this process."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def call(app: FastAPI, method: str, path: str, **kwargs: Any) -> Any:
    """One request to `app` in process (httpx's ASGI transport); returns the httpx.Response."""
    import asyncio

    import httpx

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def sse_events(body: str) -> list[Any]:
    """The data of each server-sent event: parsed JSON, or the literal string for [DONE]."""
    events: list[Any] = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
