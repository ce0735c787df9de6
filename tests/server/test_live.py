"""A live server on loopback driven by the real `openai` client and by raw HTTP: completions, chat,
streaming, stop strings, seeds, 64 concurrent streams, and client disconnects freeing KV pages."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from anyquant import LLM, SamplingParams
from anyquant.engine.runner import StepLogits
from anyquant.engine.scheduler import StepPlan
from anyquant.server import ServerConfig, create_app
from tests.server.conftest import MAX_MODEL_LEN, MODEL, LiveServer, wait_until

pytestmark = pytest.mark.slow
IGNORE_EOS = {"ignore_eos": True}


@dataclass
class Live:
    url: str
    llm: LLM
    ref: LLM
    app: object
    delay: list[float]  # seconds each engine step sleeps (tests that need a request to last)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def metric(self, line_prefix: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        for line in text.splitlines():
            if line.startswith(line_prefix):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    @property
    def pages_used(self) -> int:
        return int(self.app.state.server.engine.stats.kv_pages_used)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def live(tiny_model: Path) -> Iterator[Live]:
    llm = LLM(tiny_model, dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=64)
    assert llm.tokenizer is not None
    delay = [0.0]
    original = llm.engine.runner.execute

    def execute(plan: StepPlan) -> StepLogits:
        if delay[0]:
            time.sleep(delay[0])
        return original(plan)

    llm.engine.runner.execute = execute  # type: ignore[method-assign]
    app = create_app(llm.engine, llm.tokenizer, ServerConfig(MODEL))
    ref = LLM(tiny_model, dtype="float32", max_model_len=MAX_MODEL_LEN)
    with LiveServer(app) as server:
        yield Live(server.url, llm, ref, app, delay)


def _ref_greedy(live: Live, ids: list[int], n: int) -> str:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return live.ref.generate(prompt_token_ids=[ids], sampling_params=params)[0].text


def _encode(live: Live, text: str, special: bool = True) -> list[int]:
    assert live.ref.tokenizer is not None
    return live.ref.tokenizer.encode(text, add_special_tokens=special)


def test_openai_client_completions_and_chat(live: Live) -> None:
    client = live.client()
    out = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=8, temperature=0, extra_body=IGNORE_EOS
    )
    assert out.choices[0].text == _ref_greedy(live, _encode(live, "Hello"), 8)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 8
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        extra_body=IGNORE_EOS,
    )
    prompt = _encode(live, "<s><|user|>hi\n<|assistant|>", special=False)
    assert chat.choices[0].message.content == _ref_greedy(live, prompt, 6)
    assert chat.choices[0].message.role == "assistant"
    assert [m.id for m in client.models.list()] == [MODEL]


def test_openai_client_streaming(live: Live) -> None:
    client = live.client()
    whole = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=10, temperature=0, extra_body=IGNORE_EOS
    )
    stream = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=10, temperature=0, stream=True, extra_body=IGNORE_EOS
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == whole.choices[0].text
    messages = [{"role": "user", "content": "story"}]
    chat_whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body=IGNORE_EOS
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == chat_whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_stop_strings_cut_the_text_and_finish_with_stop(live: Live) -> None:
    client = live.client()
    full = client.completions.create(
        model=MODEL, prompt="Once", max_tokens=60, temperature=0, extra_body=IGNORE_EOS
    )
    text = full.choices[0].text
    # A two-character stop string from the middle of the greedy text; not one holding U+FFFD,
    # which stands for bytes of a character that is still incomplete.
    spots = [
        m.start()
        for m in re.finditer("(?=[^\ufffd]{2})", text)
        if m.start() >= 2 and text.find(text[m.start() : m.start() + 2]) == m.start()
    ]
    assert spots, f"no complete pair of characters in {text!r}"
    stop = text[spots[0] : spots[0] + 2]
    cut = text[: spots[0]]
    out = client.completions.create(
        model=MODEL, prompt="Once", max_tokens=60, temperature=0, stop=[stop], extra_body=IGNORE_EOS
    )
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    stream = client.completions.create(
        model=MODEL,
        prompt="Once",
        max_tokens=60,
        temperature=0,
        stop=stop,
        stream=True,
        extra_body=IGNORE_EOS,
    )
    pieces, reasons = [], []
    for chunk in stream:
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == cut
    assert [r for r in reasons if r] == ["stop"]


def test_seeds_make_sampling_reproducible(live: Live) -> None:
    client = live.client()

    def sample(seed: int, n: int = 1) -> list[str]:
        out = client.completions.create(
            model=MODEL, prompt="seed", max_tokens=16, temperature=1.0, seed=seed, n=n, extra_body=IGNORE_EOS
        )
        return [c.text for c in out.choices]

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first
    pair = sample(99, n=2)
    assert pair[0] != pair[1]  # each choice has its own seed (seed + index)
    assert sample(99, n=2) == pair
    assert sample(99) == pair[:1]


def test_64_concurrent_streams_complete_with_the_right_token_counts(live: Live) -> None:
    client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=120)
    lengths = [4 + i % 13 for i in range(64)]

    async def one(i: int) -> tuple[int, int, str | None]:
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"request {i}",
            max_tokens=lengths[i],
            temperature=0.7,
            seed=i,
            logprobs=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
        tokens, usage, reason = 0, -1, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                tokens += len(choice.logprobs.tokens) if choice.logprobs and choice.logprobs.tokens else 0
                reason = choice.finish_reason or reason
        return tokens, usage, reason

    async def everyone() -> list[tuple[int, int, str | None]]:
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), timeout=90))
        finally:
            await client.close()

    start = time.monotonic()
    results = asyncio.run(everyone())
    assert [r[0] for r in results] == lengths  # one logprob entry per streamed token
    assert [r[1] for r in results] == lengths
    assert {r[2] for r in results} == {"length"}
    assert time.monotonic() - start < 90
    assert wait_until(lambda: live.pages_used == 0)


def test_disconnect_mid_stream_aborts_and_frees_pages(live: Live) -> None:
    aborted = 'anyquant_requests_total{finish_reason="abort",model_name="tiny"}'
    before = live.metric(aborted)
    live.delay[0] = 0.02  # 100 tokens now take ~2 s: the client leaves long before the end
    try:
        body = {"model": MODEL, "prompt": "bye", "max_tokens": 100, "stream": True, **IGNORE_EOS}
        with (
            httpx.Client(timeout=30) as http,
            http.stream("POST", f"{live.url}/v1/completions", json=body) as r,
        ):
            assert r.status_code == 200
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break
            assert live.pages_used > 0
        # The connection is closed here, mid-stream.
        assert wait_until(lambda: live.pages_used == 0, timeout=5)
        assert wait_until(lambda: live.metric(aborted) == before + 1, timeout=5)
        # The same for a non-streaming request whose client times out.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
        assert wait_until(lambda: live.metric(aborted) == before + 2, timeout=5)
        assert wait_until(lambda: live.pages_used == 0, timeout=5)
    finally:
        live.delay[0] = 0.0
    assert live.llm.engine.allocator.num_used == 0
