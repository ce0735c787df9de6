"""Failures stay with their request: step errors, non-finite logits, a full queue, shutdown; and
the AsyncEngine keeps continuous batching and preemption exact under concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

from anyquant import LLM, SamplingParams
from anyquant.engine.async_engine import AsyncEngine, EngineUnavailableError, GenerationItem
from anyquant.engine.engine import Engine
from anyquant.engine.kv_cache import PagedKVCache
from anyquant.engine.runner import StepLogits
from anyquant.engine.scheduler import StepPlan
from tests.server.conftest import MAX_MODEL_LEN, AppFactory, call, sse_events

POISON = [256, 3, 3, 3]  # a prompt the patched runner fails on
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _patch_runner(
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    delay: float = 0.0,
    fail: Callable[[StepPlan], Any] | None = None,
) -> None:
    """Slow every step by `delay` seconds, and let `fail(plan)` act on each plan (raise, or return
    the ids whose logits to replace with NaN)."""
    original = engine.runner.execute

    def execute(plan: StepPlan) -> StepLogits:
        if delay:
            time.sleep(delay)
        poisoned = fail(plan) if fail is not None else None
        out = original(plan)
        rows = [out.request_ids.index(rid) for rid in poisoned or () if rid in out.request_ids]
        if rows:
            out.logits = out.logits.clone()  # inference tensors are read-only outside inference mode
            out.logits[rows] = float("nan")
        return out

    monkeypatch.setattr(engine.runner, "execute", execute)


def _poisoned(plan: StepPlan) -> list[str]:
    return [r.request_id for r, _ in plan.scheduled if r.prompt_token_ids == POISON]


async def _post_many(app: FastAPI, bodies: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
        return list(await asyncio.gather(*(client.post(path, json=body) for path, body in bodies)))


def _engine(app: FastAPI) -> Engine:
    return app.state.llm.engine  # type: ignore[no-any-return]


def test_a_step_that_raises_fails_only_the_request_at_fault(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app()  # room for many requests per step: the poisoned one shares its step
    shared_a_failing_step = []

    def explode(plan: StepPlan) -> None:
        if _poisoned(plan):
            shared_a_failing_step.append(len(plan.scheduled) > 1)
            raise RuntimeError("kernel exploded")

    _patch_runner(_engine(app), monkeypatch, delay=0.005, fail=explode)
    normal = {"prompt": [256, 5, 6], "max_tokens": 6, **GREEDY}
    expected = call(app, "POST", "/v1/completions", json=normal).json()["choices"][0]["text"]
    poisoned = {**normal, "prompt": POISON}
    good, bad, good_too = asyncio.run(
        _post_many(app, [("/v1/completions", body) for body in (normal, poisoned, normal)])
    )
    assert shared_a_failing_step[0]
    assert good_too.status_code == 200 and good_too.json()["choices"][0]["text"] == expected
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["type"] == "server_error" and "kernel exploded" in error["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == expected
    # Streaming: the failure arrives as an error event, then [DONE].
    r = call(app, "POST", "/v1/completions", json={**normal, "prompt": POISON, "stream": True})
    events = sse_events(r.text)
    assert "kernel exploded" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
    assert call(app, "POST", "/v1/completions", json=normal).status_code == 200
    assert _engine(app).allocator.num_used == 0
    assert call(app, "GET", "/health").status_code == 200
    assert 'anyquant_step_failures_total{model_name="tiny"} 2.0' in call(app, "GET", "/metrics").text


def test_a_step_that_breaks_after_the_forward_pass_fails_its_plan_and_the_server_carries_on(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(max_num_seqs=1)
    engine = _engine(app)
    original = engine._sample_step

    def sample(out: StepLogits, *rest: Any) -> dict[str, int | None]:
        if any(engine._states[rid].request.prompt_token_ids == POISON for rid in out.request_ids):
            raise RuntimeError("sampler broke")
        return original(out, *rest)

    monkeypatch.setattr(engine, "_sample_step", sample)
    normal = {"prompt": [256, 5, 6], "max_tokens": 4, **GREEDY}
    bad, good = asyncio.run(
        _post_many(app, [("/v1/completions", {**normal, "prompt": POISON}), ("/v1/completions", normal)])
    )
    assert bad.status_code == 500 and "sampler broke" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4
    assert engine.scheduler.open_plan is None and engine.allocator.num_used == 0
    assert 'anyquant_step_failures_total{model_name="tiny"} 1.0' in call(app, "GET", "/metrics").text


def test_non_finite_logits_fail_only_that_request(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app()
    _patch_runner(_engine(app), monkeypatch, delay=0.005, fail=_poisoned)
    normal = {"prompt": [256, 9, 8, 7], "max_tokens": 8, **GREEDY}
    expected = call(app, "POST", "/v1/completions", json=normal).json()["choices"][0]["text"]
    responses = asyncio.run(
        _post_many(app, [("/v1/completions", normal), ("/v1/completions", {**normal, "prompt": POISON})] * 2)
    )
    assert [r.status_code for r in responses] == [200, 500, 200, 500]
    for ok in responses[0::2]:
        assert ok.json()["choices"][0]["text"] == expected
    for failed in responses[1::2]:
        assert "non-finite logits" in failed.json()["error"]["message"]
    assert 'anyquant_nonfinite_logits_total{model_name="tiny"} 2.0' in call(app, "GET", "/metrics").text


def test_a_full_queue_answers_429_with_retry_after(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(max_num_seqs=1, config={"max_waiting": 1})  # two requests in flight at most
    _patch_runner(_engine(app), monkeypatch, delay=0.02)  # each request lasts > 0.4 s
    body = {"prompt": "a", "max_tokens": 20, **GREEDY}
    server = app.state.server

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            running = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(2)]
            while server.engine.num_in_flight < 2:
                await asyncio.sleep(0.005)
            rejected = await client.post("/v1/completions", json=body)
            done = await asyncio.gather(*running)
            after = await client.post("/v1/completions", json=body)
            return done, rejected, after

    done, rejected, after = asyncio.run(scenario())
    assert [r.status_code for r in done] == [200, 200]
    assert rejected.status_code == 429
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert after.status_code == 200
    # More sequences than the server can ever hold is a bad request, not a retry.
    r = call(app, "POST", "/v1/completions", json={**body, "n": 3})
    assert r.status_code == 400 and "at most 2" in r.json()["error"]["message"]


def _page_bytes(llm: LLM) -> int:
    shape = llm.model.cache_shape
    return PagedKVCache.bytes_per_page(
        llm.model.args.num_layers, 16, shape.num_kv_heads, shape.k_dim, shape.v_dim, torch.float32
    )


def test_concurrent_requests_under_a_tiny_kv_budget_match_greedy_alone(tiny_model: Path) -> None:
    roomy = LLM(tiny_model, dtype="float32", max_model_len=MAX_MODEL_LEN)
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, 256, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 40, (10,), generator=g)
    ]
    params = SamplingParams(max_tokens=20, **GREEDY)
    alone = [roomy.generate(prompt_token_ids=[p], sampling_params=params)[0].token_ids for p in prompts]
    # 6 pages of 16 tokens for 10 requests of up to 59 tokens: preemption is certain.
    tight = LLM(
        tiny_model, dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_gb=6 * _page_bytes(roomy) / 2**30
    )
    engine = AsyncEngine(tight.engine)
    engine.start()

    async def one(i: int) -> list[int]:
        tokens: list[int] = []
        async for event in await engine.generate([f"r{i}"], [GenerationItem(prompts[i], params)]):
            tokens += event.delta.new_token_ids
            assert event.delta.finish_reason in (None, "length")
        return tokens

    async def all_of_them() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))

    async def run() -> tuple[list[list[int]], int, int]:
        together = await all_of_them()
        # Read the engine's counters on its own thread, between steps.
        preemptions = await engine.call(lambda e: e.scheduler.num_preemptions)
        return together, preemptions, await engine.call(lambda e: e.allocator.num_used)

    try:
        together, preemptions, pages_used = asyncio.run(run())
    finally:
        engine.close()
    assert together == alone
    assert preemptions > 0
    assert pages_used == 0


def test_shutdown_finishes_or_aborts_in_flight_requests(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LLM(tiny_model, dtype="float32", max_model_len=MAX_MODEL_LEN)
    _patch_runner(llm.engine, monkeypatch, delay=0.02)  # the long request lasts > 2.4 s
    params = SamplingParams(max_tokens=120, **GREEDY)
    short = SamplingParams(max_tokens=3, **GREEDY)

    async def scenario() -> tuple[list[str | None], bool]:
        engine = AsyncEngine(llm.engine)
        engine.start()
        long_stream = await engine.generate(["long"], [GenerationItem([256, 1], params)])
        short_stream = await engine.generate(["short"], [GenerationItem([256, 2], short)])
        # A grace period long enough for the short request only.
        shutdown = asyncio.create_task(engine.shutdown(timeout=1.0))
        reasons = []
        for stream in (short_stream, long_stream):
            async for event in stream:
                if event.delta.finished:
                    reasons.append(event.delta.finish_reason)
        await shutdown
        try:
            await engine.generate(["late"], [GenerationItem([256], short)])
        except EngineUnavailableError:
            refused = True
        else:
            refused = False
        return reasons, refused

    reasons, refused = asyncio.run(scenario())
    assert reasons == ["length", "abort"]
    assert refused
    assert llm.engine.allocator.num_used == 0 and not llm.engine.has_unfinished()


def test_if_the_engine_thread_dies_requests_fail_cleanly_and_health_says_so(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app()
    engine = _engine(app)
    _patch_runner(engine, monkeypatch, delay=0.01)
    broken = [False]
    original = engine.has_unfinished

    def has_unfinished() -> bool:
        if broken[0]:
            raise RuntimeError("scheduler state corrupted")
        return original()

    monkeypatch.setattr(engine, "has_unfinished", has_unfinished)

    async def scenario() -> tuple[list[Any], httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            body = {"prompt": "a", "max_tokens": 100, "stream": True, **GREEDY}
            pending = asyncio.create_task(client.post("/v1/completions", json=body))
            while app.state.server.engine.num_in_flight < 1:
                await asyncio.sleep(0.005)
            broken[0] = True
            streamed = sse_events((await pending).text)
            return streamed, await client.post("/v1/completions", json={"prompt": "a"})

    streamed, later = asyncio.run(scenario())
    assert "engine thread died" in streamed[-2]["error"]["message"] and streamed[-1] == "[DONE]"
    assert later.status_code == 503 and "scheduler state corrupted" in later.json()["error"]["message"]
    health = call(app, "GET", "/health")
    assert health.status_code == 503 and "scheduler state corrupted" in health.json()["reason"]


def test_after_shutdown_the_app_answers_503(make_app: AppFactory) -> None:
    app = make_app()
    asyncio.run(app.state.server.engine.shutdown(timeout=0))
    r = call(app, "POST", "/v1/completions", json={"prompt": "a"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    assert call(app, "GET", "/health").status_code == 503
