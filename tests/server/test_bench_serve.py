"""`anyquant bench serve`: the same closed-loop load on our server (a subprocess), on a baseline
server given by URL, and served sequentially in-process; figures that add up; clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import FastAPI

from anyquant.bench.serve import BenchError, LoadResult, make_prompts
from anyquant.bench.serve_session import ServeBenchPlan, run_serve_bench
from anyquant.cli.main import main
from anyquant.utils.tiny_model import write_tiny_model
from tests.server.conftest import AppFactory, LiveServer

MAX_TOKENS = 5


def _by_system(results: list[LoadResult]) -> dict[str, dict[int, LoadResult]]:
    table: dict[str, dict[int, LoadResult]] = {}
    for r in results:
        table.setdefault(r.system, {})[r.concurrency] = r
    return table


def test_every_system_serves_the_same_load_and_the_figures_add_up(
    tiny_model: Path, make_app: AppFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app: FastAPI = make_app()
    out = tmp_path / "bench.json"
    with LiveServer(app) as baseline:
        code = main(
            [
                "bench",
                "serve",
                str(tiny_model),
                "--concurrency",
                "1",
                "3",
                "--prompt-len",
                "6",
                "--max-tokens",
                str(MAX_TOKENS),
                "--dtype",
                "float32",
                "--baseline",
                f"in-process={baseline.url}",
                "--json",
                str(out),
                "--log-dir",
                str(tmp_path),
            ]
        )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| anyquant serve | 3 |" in printed and "| in-process | 1 |" in printed
    doc = json.loads(out.read_text())
    systems = {(r["system"], r["concurrency"]) for r in doc["results"]}
    assert systems == {
        (s, c) for s in ("anyquant serve", "in-process", "sequential LLM.generate") for c in (1, 3)
    }
    for r in doc["results"]:
        assert r["requests"] == 4  # max(clients, 4)
        # ignore_eos: every request streams exactly max_tokens tokens, counted from the stream.
        assert [t["output_tokens"] for t in r["per_request"]] == [MAX_TOKENS] * 4
        assert r["output_tokens"] == 4 * MAX_TOKENS
        assert all(0 < t["ttft_s"] <= t["latency_s"] for t in r["per_request"])
        assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["wall_s"])
        # Of 4 requests the 99th percentile is the slowest first token.
        assert r["ttft_p50_s"] <= r["ttft_p99_s"] == max(t["ttft_s"] for t in r["per_request"])
    sequential = [r for r in doc["results"] if r["system"] == "sequential LLM.generate"]
    three = next(r for r in sequential if r["concurrency"] == 3)["per_request"]
    # Three clients arrive together at a one-at-a-time engine: the second waits for the first.
    assert three[1]["ttft_s"] >= three[0]["latency_s"]
    assert any("prompts: 6 random token ids" in n for n in doc["notes"])


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "m", "llama", seed=3)
    (model / "tokenizer.json").unlink()  # `anyquant serve` refuses a model without a tokenizer
    plan = ServeBenchPlan(
        model, [1], prompt_len=4, max_tokens=2, token_range=(3, 200), log_dir=tmp_path / "logs"
    )
    with pytest.raises(BenchError, match=r"exited with status 2 while starting(.|\n)*no tokenizer\.json"):
        run_serve_bench(plan)


def test_bad_arguments_are_refused_with_a_message(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "serve", str(tiny_model), "--baseline", "llama.cpp"]) == 2
    assert "expected NAME=http://host:port" in capsys.readouterr().err
    assert main(["bench", "serve", str(tiny_model), "--concurrency", "0"]) == 2
    assert "concurrency levels must be >= 1" in capsys.readouterr().err
    with pytest.raises(BenchError, match="empty"):
        make_prompts(2, 3, (10, 10))


def test_streams_without_usage_are_counted_one_token_per_chunk_without_the_closing_one() -> None:
    """llama.cpp-style stream: one chunk per token, then an empty chunk with finish_reason."""
    import asyncio

    import httpx

    from anyquant.bench.serve import run_load

    def chunk(text: str, finish: str | None) -> str:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        return "data: " + json.dumps({"choices": [choice]}) + "\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        body = json.loads(request.content)
        sse = [chunk(f"t{i}", None) for i in range(body["max_tokens"])] + [chunk("", "length")]
        return httpx.Response(200, text="".join(sse) + "data: [DONE]\n\n")

    original = httpx.AsyncClient.__init__

    def with_mock(self: httpx.AsyncClient, *args: object, **kwargs: object) -> None:
        original(self, *args, transport=httpx.MockTransport(handler), **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(httpx.AsyncClient, "__init__", with_mock)
        result = asyncio.run(run_load("http://mock", "mock", [[1, 2], [3, 4], [5, 6]], 2, 7))
    assert [r.output_tokens for r in result.requests] == [7, 7, 7]
