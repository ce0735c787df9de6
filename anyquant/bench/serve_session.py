"""One `anyquant bench serve` session: every system under the same load, one after another.

Owns the order (our server first, then the baselines, then sequential generation in-process once
no server competes for the cores), the prompts (fresh ones per level, so no system gets prefix
cache hits from an earlier level) and the notes that go with the figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from anyquant.bench.serve import (
    BenchError,
    LoadResult,
    ServerProcess,
    anyquant_server_command,
    free_port,
    make_prompts,
    run_load,
    run_sequential,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeBenchPlan:
    model: Path
    concurrency: list[int]
    prompt_len: int = 128
    max_tokens: int = 32
    requests: int | None = None  # per level; None: max(clients, 4)
    token_range: tuple[int, ...] | None = None
    baselines: list[tuple[str, str]] = field(default_factory=list)  # (name, base url)
    sequential: bool = True
    dtype: str = "auto"
    lm_head_dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    server_args: list[str] = field(default_factory=list)
    enforce_eager: bool = False  # the server and the sequential run skip compiling the decode step
    log_dir: Path = Path("out/bench/logs")

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise BenchError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.prompt_len < 1 or self.max_tokens < 1:
            raise BenchError("prompt_len and max_tokens must be >= 1")

    def num_requests(self, clients: int) -> int:
        return self.requests if self.requests is not None else max(clients, 4)


def prompts_for_levels(plan: ServeBenchPlan, token_range: tuple[int, int]) -> dict[int, list[list[int]]]:
    return {
        c: make_prompts(plan.num_requests(c), plan.prompt_len, token_range, seed=1000 + c)
        for c in plan.concurrency
    }


def default_token_range(model: Path) -> tuple[int, int]:
    """Ordinary tokens only: ids below both the model's and the tokenizer's base vocabulary, and
    above the first 100 (where tokenizers keep control tokens)."""
    config = json.loads((model / "config.json").read_text())
    text = config.get("text_config") or config
    high = int(text.get("vocab_size") or 0)
    tokenizer_file = model / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        high = min(high, Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=False))
    if high <= 101:
        raise BenchError(f"{model}: a vocabulary of {high} tokens is too small for random prompts")
    return 100, high


def run_serve_bench(
    plan: ServeBenchPlan, on_result: Callable[[LoadResult], None] | None = None
) -> tuple[list[LoadResult], list[str]]:
    """Measure every system; returns the results (system by system, level by level) and notes."""
    token_range = (
        (int(plan.token_range[0]), int(plan.token_range[1]))
        if plan.token_range
        else default_token_range(plan.model)
    )
    levels = prompts_for_levels(plan, token_range)
    results: list[LoadResult] = []
    notes = [
        f"prompts: {plan.prompt_len} random token ids from [{token_range[0]}, {token_range[1]}), "
        f"{plan.max_tokens} greedy output tokens with ignore_eos; closed-loop clients",
        f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}",
    ]

    def record(result: LoadResult) -> None:
        results.append(result)
        log.info("%s", result.summary())
        if on_result is not None:
            on_result(result)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = [
        *("--dtype", plan.dtype, "--lm-head-dtype", plan.lm_head_dtype),
        *("--kv-cache-dtype", plan.kv_cache_dtype, *plan.server_args),
    ]
    if plan.enforce_eager:
        extra.append("--enforce-eager")
    if not any(arg.startswith("--max-model-len") for arg in plan.server_args):
        # The model's full context would size the KV cache for nothing this load uses.
        extra += ["--max-model-len", str(plan.prompt_len + plan.max_tokens)]
    command = anyquant_server_command(plan.model, port, max(plan.concurrency), extra)
    with ServerProcess(command, url, "anyquant serve", plan.log_dir / "anyquant-serve.log") as server:
        notes.append(f"anyquant serve ready after {server.startup_s:.1f}s (load + warm-up)")
        for clients, prompts in levels.items():
            record(asyncio.run(run_load(url, "anyquant serve", prompts, clients, plan.max_tokens)))
    for name, base_url in plan.baselines:
        for clients, prompts in levels.items():
            record(asyncio.run(run_load(base_url, name, prompts, clients, plan.max_tokens)))
    if plan.sequential:
        from anyquant.engine.sampling import SamplingParams
        from anyquant.llm import LLM

        llm = LLM(
            plan.model,
            dtype=plan.dtype,
            max_model_len=plan.prompt_len + plan.max_tokens,
            lm_head_dtype=plan.lm_head_dtype,
            kv_cache_dtype=plan.kv_cache_dtype,
            enforce_eager=True if plan.enforce_eager else None,
        )
        # The same warm-up `anyquant serve` does before it reports ready.
        llm.generate(prompt_token_ids=[[token_range[0]]], sampling_params=SamplingParams(max_tokens=2))
        for clients, prompts in levels.items():
            record(run_sequential(llm, "sequential LLM.generate", prompts, clients, plan.max_tokens))
    return results, notes
