"""Offline throughput of one model: prompt (prefill) tokens/s and batch-1 decode tokens/s.

Owns the measurement protocol: a warm-up pass, then timed prefill of a random prompt and timed
greedy decode of new tokens, repeated; reports medians, load time and resident memory. Used by
`anyquant bench offline` and the scripts under benchmarks/.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from anyquant.engine.kv_cache import SequenceCache
from anyquant.llm import LLM


@dataclass(frozen=True)
class OfflineResult:
    model: str
    format: str
    dtype: str
    threads: int
    prompt_len: int
    decode_len: int
    load_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_rss_mib: float
    linear_weight_mib: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_decode(step: Any, prompt: list[int], decode_len: int) -> float:
    """tokens/s of `step(token, position)` calls after a prefill done by the caller."""
    t0 = time.perf_counter()
    token = prompt[-1]
    for i in range(decode_len):
        token = step(token, len(prompt) + i)
    return decode_len / (time.perf_counter() - t0)


def bench_offline(
    model: str,
    dtype: str = "auto",
    prompt_len: int = 128,
    decode_len: int = 32,
    repeats: int = 3,
    kernel: str | None = None,
    seed: int = 0,
    lm_head_dtype: str = "auto",
    activation_dtype: str = "auto",
    tensor_parallel_size: int = 1,
    enable_expert_parallel: bool = False,
    device: str = "cpu",
    kv_cache_dtype: str = "auto",
) -> OfflineResult:
    t0 = time.perf_counter()
    # Eager: this benchmark runs the model's forward itself (SequenceCache), not the engine's
    # steps, so a compiled decode step would only add its compile time to the load.
    llm = LLM(
        model,
        device=device,
        dtype=dtype,
        kernel=kernel,
        lm_head_dtype=lm_head_dtype,
        activation_dtype=activation_dtype,
        enforce_eager=True,
        tensor_parallel_size=tensor_parallel_size,
        enable_expert_parallel=enable_expert_parallel,
        kv_cache_dtype=kv_cache_dtype,
    )
    load_s = time.perf_counter() - t0
    vocab = int(llm.loaded.config["vocab_size"])
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    net = llm.model

    def prefill() -> Any:
        seq = SequenceCache(
            net, prompt_len + decode_len + 1, llm.cache_dtype, llm.device, compute_dtype=llm.dtype
        )
        logits = seq.forward(prompt, 0, torch.tensor([prompt_len - 1], device=llm.device))
        _sync(llm.device)  # GPU work is asynchronous: the prefill ends when its kernels do
        return seq, logits

    def run_decode(seq: SequenceCache) -> float:
        def step(token: int, pos: int) -> int:
            return int(seq.forward([token], pos)[-1].argmax())

        return measure_decode(step, prompt, decode_len)

    cache, _ = prefill()  # warm-up (allocators, kernel repack caches)
    run_decode(cache)
    prefill_rates, decode_rates = [], []
    for _ in range(repeats):
        t1 = time.perf_counter()
        cache, _ = prefill()
        prefill_rates.append(prompt_len / (time.perf_counter() - t1))
        decode_rates.append(run_decode(cache))
    from anyquant.loading.describe import describe_checkpoint

    weights = (
        describe_checkpoint(model, dtype=dtype, lm_head_dtype=lm_head_dtype)["totals"]["linear_weight_bytes"]
        / 2**20
    )
    fmt = llm.loaded.format.describe() if llm.loaded.format else "unquantized"
    return OfflineResult(
        model=model,
        format=fmt,
        dtype=str(llm.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        prompt_len=prompt_len,
        decode_len=decode_len,
        load_s=load_s,
        prefill_tok_s=statistics.median(prefill_rates),
        decode_tok_s=statistics.median(decode_rates),
        peak_rss_mib=peak_rss_mib(),
        linear_weight_mib=weights,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth_gbs(nbytes: int = 512 << 20, repeats: int = 5, device: str = "cpu") -> float:
    """Achievable memory bandwidth: read + write of a large buffer (GB/s, 1e9 bytes), in host
    memory or, for a CUDA device, in device memory."""
    dev = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9
