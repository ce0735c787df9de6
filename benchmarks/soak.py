"""Soak: `anyquant serve` under minutes of mixed load with random client disconnects, then leak checks.

Not part of CI. Starts the server on loopback, warms it up with the same load, waits until it is
idle and records its resident memory (the post-warm-up level). Then `--clients` closed-loop clients
send a random mix for `--minutes`: streamed and non-streamed /v1/completions and
/v1/chat/completions, text and token-id prompts (some sharing a prefix, for the prefix cache), n of
1 or 2, stop strings, logprobs, greedy and sampled, the odd invalid request (must get 400/422), and
with probability `--disconnect` the client hangs up part-way (streams after a few chunks,
non-streamed requests after a random delay). Afterwards it checks, from the server's own reports:

- /metrics `anyquant_kv_pages_used` back to 0 and no request waiting or running,
- resident memory (VmRSS from /proc) within `--rss-tolerance` (5 %) of the post-warm-up level,
- the server still answers a request correctly and never failed a step.

    python benchmarks/soak.py [--model DIR] [--minutes 10] [--clients 8] [--disconnect 0.3]

The default model is stories260K (`../shared/models/stories260K/hf`), else a tiny random Llama.
Models without a chat template are served from a copy (weights linked) that has a minimal one, so
the chat path is exercised too. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from anyquant.bench.serve import ServerProcess, anyquant_server_command, free_port
from anyquant.utils.tiny_model import write_tiny_model

OUT = Path("out/bench")
STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K" / "hf"
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
_WORDS = [
    "once",
    "upon",
    "a",
    "time",
    "there",
    "was",
    "a",
    "little",
    "girl",
    "who",
    "liked",
    "to",
    "play",
    "in",
    "the",
    "park",
    "with",
    "her",
    "dog",
]


def rss_mib(pid: int) -> float:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def serve_copy_with_chat_template(model: Path, workdir: Path) -> Path:
    """The model itself if it has a chat template, else a copy (weights symlinked) with one."""
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if config.get("chat_template"):
        return model
    copy = workdir / "model"
    copy.mkdir()
    for item in model.iterdir():
        if item.name != "tokenizer_config.json":
            (copy / item.name).symlink_to(item.resolve())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": _CHAT_TEMPLATE}))
    return copy


# -- metrics -----------------------------------------------------------------------------------
def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name (labels dropped, summed): value}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if match:
            values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(3))
    return values


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics")
    response.raise_for_status()
    return parse_metrics(response.text)


async def wait_idle(client: httpx.AsyncClient, timeout_s: float) -> tuple[dict[str, float], float]:
    """Poll /metrics until no page is used and nothing waits or runs; (last metrics, seconds)."""
    start = time.perf_counter()
    while True:
        m = await scrape(client)
        idle = (
            m.get("anyquant_kv_pages_used", -1) == 0
            and m.get("anyquant_requests_running", -1) == 0
            and m.get("anyquant_requests_waiting", -1) == 0
        )
        elapsed = time.perf_counter() - start
        if idle or elapsed > timeout_s:
            return m, elapsed
        await asyncio.sleep(0.25)


# -- the load ----------------------------------------------------------------------------------
@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    tokens: int = 0

    def problem(self, text: str) -> None:
        self.outcomes["unexpected"] += 1
        if len(self.problems) < 20:
            self.problems.append(text)


def random_request(rng: random.Random, vocab: int, max_len: int) -> tuple[str, dict[str, Any], bool]:
    """(path, body, expect_ok): one request of the mix."""
    chat = rng.random() < 0.3
    stream = rng.random() < 0.6
    body: dict[str, Any] = {
        "model": "soak",
        "max_tokens": rng.randint(1, min(64, max_len // 4)),
        "temperature": rng.choice([0.0, 0.0, 0.7, 1.0]),
        "stream": stream,
    }
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(_WORDS)]
    if rng.random() < 0.2:
        body["n"] = 2
    if rng.random() < 0.5:
        body["ignore_eos"] = True
    text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 60)))
    if rng.random() < 0.3:  # a shared prefix: the prefix cache hands out the same pages
        text = " ".join(_WORDS * 3) + " " + text
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.2:
            body["logprobs"], body["top_logprobs"] = True, 2
    elif rng.random() < 0.4:
        body["prompt"] = [rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len // 4))]
    else:
        body["prompt"] = text
        if rng.random() < 0.2:
            body["logprobs"] = 2
    expect_ok = True
    if rng.random() < 0.05:  # invalid: the server must refuse it and carry on
        body["max_tokens"], expect_ok = max_len * 10, False
    elif rng.random() < 0.02:
        body["temperature"], expect_ok = -1.0, False
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, expect_ok


async def one_request(
    client: httpx.AsyncClient, rng: random.Random, tally: Tally, vocab: int, max_len: int, disconnect: float
) -> None:
    path, body, expect_ok = random_request(rng, vocab, max_len)
    leave = rng.random() < disconnect
    kind = f"{'stream' if body['stream'] else 'plain'}-{'chat' if 'messages' in body else 'completion'}"
    if not body["stream"]:
        task = asyncio.ensure_future(client.post(path, json=body))
        if leave:
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            if not task.done():
                task.cancel()  # closes the connection: the server sees the client go
                tally.outcomes[f"{kind}-disconnected"] += 1
                return
        response = await task
        if response.status_code == 200:
            tally.tokens += int(response.json()["usage"]["completion_tokens"])
            tally.outcomes[f"{kind}-ok" if expect_ok else f"{kind}-invalid-accepted"] += 1
            if not expect_ok:
                tally.problem(f"invalid request accepted: {body}")
        elif response.status_code in (400, 422) and not expect_ok:
            tally.outcomes["invalid-refused"] += 1
        elif response.status_code == 429:
            tally.outcomes["busy-429"] += 1
        else:
            tally.problem(f"{path} answered {response.status_code}: {response.text[:200]}")
        return
    leave_after = rng.randint(0, 4)
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            if response.status_code in (400, 422) and not expect_ok:
                tally.outcomes["invalid-refused"] += 1
            elif response.status_code == 429:
                tally.outcomes["busy-429"] += 1
            else:
                tally.problem(f"{path} answered {response.status_code}: {response.text[:200]}")
            return
        if not expect_ok:
            tally.problem(f"invalid streamed request accepted: {body}")
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                tally.outcomes[f"{kind}-ok"] += 1
                return
            payload = json.loads(data)
            if payload.get("error"):
                tally.problem(f"error inside the stream: {payload['error']}")
                return
            if payload.get("usage"):
                tally.tokens += int(payload["usage"]["completion_tokens"])
            chunks += 1
            if leave and chunks > leave_after:
                tally.outcomes[f"{kind}-disconnected"] += 1
                return  # leaving the `async with` closes the connection mid-stream
        tally.problem(f"{path}: stream ended without [DONE]")


async def run_load(
    base_url: str, seconds: float, clients: int, vocab: int, max_len: int, disconnect: float, seed: int
) -> Tally:
    tally = Tally()
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=120.0, limits=limits) as client:

        async def client_loop(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.perf_counter() < deadline:
                try:
                    await one_request(client, rng, tally, vocab, max_len, disconnect)
                except httpx.HTTPError as exc:
                    tally.problem(f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(client_loop(i) for i in range(clients)))
    return tally


# -- the run -----------------------------------------------------------------------------------
async def soak(args: argparse.Namespace, server: ServerProcess, pid: int, vocab: int) -> dict[str, Any]:
    max_len = args.max_model_len
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60.0) as client:
        warm = await run_load(
            server.base_url, args.warmup_s, args.clients, vocab, max_len, args.disconnect, args.seed + 1
        )
        _, settle = await wait_idle(client, 60.0)
        await asyncio.sleep(2.0)
        rss_warm = rss_mib(pid)
        print(
            f"warm-up: {sum(warm.outcomes.values())} requests, idle after {settle:.1f}s, RSS {rss_warm:.1f} MiB"
        )

        trace: list[tuple[float, float, float]] = []  # (seconds, RSS MiB, KV pages used)
        start = time.perf_counter()

        async def sample() -> None:
            while True:
                m = await scrape(client)
                trace.append((time.perf_counter() - start, rss_mib(pid), m.get("anyquant_kv_pages_used", -1)))
                await asyncio.sleep(args.sample_s)

        sampler = asyncio.ensure_future(sample())
        tally = await run_load(
            server.base_url, args.minutes * 60, args.clients, vocab, max_len, args.disconnect, args.seed
        )
        load_s = time.perf_counter() - start
        sampler.cancel()
        metrics, settle = await wait_idle(client, 60.0)
        await asyncio.sleep(2.0)
        rss_end = rss_mib(pid)
        check = await client.post(
            "/v1/completions", json={"model": "soak", "prompt": "Once upon a time", "max_tokens": 8}
        )
        metrics = await scrape(client)
    growth = (rss_end - rss_warm) / rss_warm
    results = {
        "pages_used_after": metrics.get("anyquant_kv_pages_used"),
        "pages_total": metrics.get("anyquant_kv_pages_total"),
        "running_after": metrics.get("anyquant_requests_running"),
        "waiting_after": metrics.get("anyquant_requests_waiting"),
        "idle_after_s": settle,
        "rss_warm_mib": rss_warm,
        "rss_end_mib": rss_end,
        "rss_peak_mib": max((r for _, r, _ in trace), default=rss_end),
        "rss_growth": growth,
        "max_pages_used_seen": max((p for _, _, p in trace), default=0),
        "step_failures": metrics.get("anyquant_step_failures_total", metrics.get("anyquant_step_failures")),
        "preemptions": metrics.get("anyquant_preemptions_total", metrics.get("anyquant_preemptions")),
        "load_s": load_s,
        "requests": sum(tally.outcomes.values()),
        "tokens_received": tally.tokens,
        "outcomes": dict(sorted(tally.outcomes.items())),
        "problems": tally.problems,
        "final_request_status": check.status_code,
        "trace": trace,
    }
    results["checks"] = {
        "kv_pages_back_to_0": results["pages_used_after"] == 0,
        "no_request_left": results["running_after"] == 0 and results["waiting_after"] == 0,
        f"rss_within_{args.rss_tolerance:.0%}": abs(growth) <= args.rss_tolerance,
        "no_unexpected_outcome": not tally.problems,
        "no_step_failure": not results["step_failures"],
        "serves_after": check.status_code == 200,
    }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="default: stories260K, else a tiny Llama")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    parser.add_argument("--disconnect", type=float, default=0.3, help="chance a client hangs up mid-way")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument(
        "--kv-cache-gb", type=float, default=0.0012, help="small, so pages run out (preemption) sometimes"
    )
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT / "soak.json")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="anyquant-soak-"))
    try:
        model = args.model
        if model is None:
            model = STORIES if (STORIES / "config.json").exists() else write_tiny_model(workdir / "tiny")
        vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
        served = serve_copy_with_chat_template(model, workdir)
        port = free_port()
        extra = ["--max-model-len", str(args.max_model_len), "--kv-cache-gb", str(args.kv_cache_gb)]
        command = anyquant_server_command(served, port, args.max_num_seqs, extra)
        command[command.index("anyquant-bench")] = "soak"
        log = OUT / "logs" / "soak-server.log"
        with ServerProcess(command, f"http://127.0.0.1:{port}", "anyquant serve", log) as server:
            pid = server._process.pid if server._process else 0  # the server's own process
            results = asyncio.run(soak(args, server, pid, vocab))
            results["exit_status"] = server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results.update(model=str(model), minutes=args.minutes, clients=args.clients, disconnect=args.disconnect)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    summary = {k: v for k, v in results.items() if k != "trace"}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    ok = all(results["checks"].values())
    print(
        "SOAK PASSED" if ok else "SOAK FAILED: " + ", ".join(k for k, v in results["checks"].items() if not v)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
