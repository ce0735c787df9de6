"""Serving throughput and latency: closed-loop clients against any OpenAI-compatible server, and
the same load served one request at a time by the engine in-process (sequential `LLM.generate`).

Owns the load protocol, identical for every system measured: `concurrency` clients each stream a
`/v1/completions` request (a prompt of token ids, greedy, `ignore_eos`, a fixed `max_tokens`) and
send their next one when it ends, until `num_requests` are done. Time to first token (TTFT) is
from sending a request to the first streamed token; throughput is output tokens over wall time.
Starting and stopping our own server lives here too, so `anyquant bench serve` is one command.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anyquant.errors import AnyquantError

if TYPE_CHECKING:
    import httpx

    from anyquant.llm import LLM


class BenchError(AnyquantError):
    """A server under test misbehaved (refused a request, died, never became healthy)."""


@dataclass(frozen=True)
class RequestTiming:
    ttft_s: float
    latency_s: float
    output_tokens: int


@dataclass
class LoadResult:
    system: str
    concurrency: int
    prompt_len: int
    max_tokens: int
    wall_s: float
    requests: list[RequestTiming] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ttft = sorted(r.ttft_s for r in self.requests)
        tokens = sum(r.output_tokens for r in self.requests)
        # Inter-token latency per request: the decode part of its life over its decoded tokens.
        itl = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in self.requests if r.output_tokens > 1]
        return {
            "system": self.system,
            "concurrency": self.concurrency,
            "requests": len(self.requests),
            "prompt_len": self.prompt_len,
            "max_tokens": self.max_tokens,
            "output_tokens": tokens,
            "wall_s": self.wall_s,
            "output_tok_s": tokens / self.wall_s if self.wall_s > 0 else 0.0,
            "requests_per_s": len(self.requests) / self.wall_s if self.wall_s > 0 else 0.0,
            "ttft_p50_s": _quantile(ttft, 0.5),
            "ttft_p90_s": _quantile(ttft, 0.9),
            "ttft_p99_s": _quantile(ttft, 0.99),
            "itl_mean_ms": 1000 * statistics.fmean(itl) if itl else 0.0,
            "latency_p50_s": _quantile(sorted(r.latency_s for r in self.requests), 0.5),
        }


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def make_prompts(num: int, length: int, token_range: tuple[int, int], seed: int = 0) -> list[list[int]]:
    """Random token-id prompts: every system sees exactly the same tokens, no tokenizer involved."""
    low, high = token_range
    if high <= low:
        raise BenchError(f"token range [{low}, {high}) is empty")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (num, length), generator=g).tolist()


# -- a live server -----------------------------------------------------------------------------
async def _stream_one(
    client: httpx.AsyncClient,
    model: str,
    prompt: list[int],
    max_tokens: int,
    extra_body: dict[str, Any] | None = None,
) -> RequestTiming:
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra_body or {}),
    }
    start = time.perf_counter()
    first: float | None = None
    chunks = 0
    usage: dict[str, Any] | None = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:300]
            raise BenchError(f"{client.base_url}: /v1/completions answered {response.status_code}: {text}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            payload = json.loads(data)
            if payload.get("error"):
                raise BenchError(f"{client.base_url}: error inside the stream: {payload['error']}")
            choices = payload.get("choices") or []
            # A chunk carries a token unless it is a closing one with no text (llama.cpp sends
            # one with finish_reason after the last token).
            if choices and (choices[0].get("text") or choices[0].get("finish_reason") is None):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
            if payload.get("usage"):
                usage = payload["usage"]
    end = time.perf_counter()
    # Servers that do not report usage in streams send one chunk per token.
    tokens = int(usage["completion_tokens"]) if usage else chunks
    return RequestTiming((first or end) - start, end - start, tokens)


async def _served_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    if response.status_code != 200:
        raise BenchError(f"{client.base_url}: /v1/models answered {response.status_code}")
    models = response.json().get("data") or []
    if not models:
        raise BenchError(f"{client.base_url}: /v1/models lists no model")
    return str(models[0]["id"])


async def run_load(
    base_url: str,
    system: str,
    prompts: list[list[int]],
    concurrency: int,
    max_tokens: int,
    api_key: str | None = None,
    timeout_s: float = 1800.0,
    extra_body: dict[str, Any] | None = None,
) -> LoadResult:
    """`concurrency` closed-loop clients stream `prompts` (in order) from the server at `base_url`.
    `extra_body` is merged into every request (e.g. a logit_bias for servers without ignore_eos)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout_s, limits=limits
    ) as client:
        model = await _served_model(client)
        pending = iter(prompts)
        timings: list[RequestTiming] = []

        async def client_loop() -> None:
            for prompt in pending:  # shared iterator: each prompt is taken by one client
                timings.append(await _stream_one(client, model, prompt, max_tokens, extra_body))

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return LoadResult(system, concurrency, len(prompts[0]), max_tokens, wall, timings)


# -- sequential, in-process --------------------------------------------------------------------
def run_sequential(
    llm: LLM, system: str, prompts: list[list[int]], concurrency: int, max_tokens: int
) -> LoadResult:
    """The same closed-loop load on an engine that serves one request at a time, which is what
    calling `LLM.generate` per request amounts to: a client's next request arrives when its
    previous one ends and then waits for the requests ahead of it. Every time is measured on the
    clock; only the arrival instants follow from the protocol."""
    from anyquant.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    arrivals = [start] * concurrency  # a heap: when each client sends its next request
    timings: list[RequestTiming] = []
    for prompt in prompts:
        arrival = heapq.heappop(arrivals)
        first, end, tokens = _generate_alone(llm, prompt, params)
        timings.append(RequestTiming(first - arrival, end - arrival, tokens))
        heapq.heappush(arrivals, end)
    wall = time.perf_counter() - start
    return LoadResult(system, concurrency, len(prompts[0]), max_tokens, wall, timings)


def _generate_alone(llm: LLM, prompt: list[int], params: Any) -> tuple[float, float, int]:
    """`LLM.generate` for one prompt, stepping the engine here to see when the first token comes."""
    engine = llm.engine
    if engine.has_unfinished():
        raise BenchError("the engine is busy; the sequential baseline needs it to itself")
    rid = engine.add_request(prompt, params)
    first: float | None = None
    tokens = 0
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.request_id != rid:
                continue
            if delta.error:
                raise BenchError(f"sequential generation failed: {delta.error}")
            tokens += len(delta.new_token_ids)
            if delta.new_token_ids and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return first or end, end, tokens


# -- our own server as a subprocess ------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server started with `command`, ready once `GET /health` (or `health_path`) answers 200.
    Used as a context manager; stops with SIGTERM, then SIGKILL."""

    def __init__(
        self,
        command: list[str],
        base_url: str,
        name: str,
        log_path: Path,
        health_path: str = "/health",
        startup_timeout_s: float = 600.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = command
        self.base_url = base_url
        self.name = name
        self.log_path = log_path
        self.health_path = health_path
        self.startup_timeout_s = startup_timeout_s
        self.env = env
        self.startup_s = 0.0
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        start = time.perf_counter()
        self._process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})}
        )
        log.close()
        deadline = start + self.startup_timeout_s
        while time.perf_counter() < deadline:
            if self._process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with status {self._process.returncode} while starting; "
                    f"its log ({self.log_path}) ends with:\n{self._log_tail()}"
                )
            try:
                if httpx.get(self.base_url + self.health_path, timeout=2.0).status_code == 200:
                    self.startup_s = time.perf_counter() - start
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise BenchError(
            f"{self.name} was not healthy after {self.startup_timeout_s:.0f}s; see {self.log_path}"
        )

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The server's process id once started (for memory sampling), else None."""
        return self._process.pid if self._process is not None else None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the server drains), SIGKILL after `timeout_s`; the exit status."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def anyquant_server_command(model: str | Path, port: int, max_num_seqs: int, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "anyquant.cli.main",
        "-v",
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-num-seqs",
        str(max_num_seqs),
        "--served-model-name",
        "anyquant-bench",
        *extra,
    ]


def results_table(results: list[LoadResult]) -> str:
    """A markdown table, one row per (system, concurrency)."""
    rows = [
        "| system | clients | requests | output tok/s | req/s | TTFT p50 (s) | TTFT p90 (s) | TTFT p99 (s) "
        "| ITL mean (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        s = result.summary()
        rows.append(
            f"| {s['system']} | {s['concurrency']} | {s['requests']} | {s['output_tok_s']:.1f} | "
            f"{s['requests_per_s']:.2f} | {s['ttft_p50_s']:.2f} | {s['ttft_p90_s']:.2f} | "
            f"{s['ttft_p99_s']:.2f} | {s['itl_mean_ms']:.0f} |"
        )
    return "\n".join(rows)


def results_json(results: list[LoadResult]) -> list[dict[str, Any]]:
    return [{**r.summary(), "per_request": [asdict(t) for t in r.requests]} for r in results]
