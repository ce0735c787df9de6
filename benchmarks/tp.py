"""CPU tensor parallelism: the same int4 checkpoint on one process vs two gloo ranks.

Uses the Qwen2.5-0.5B-shaped W4A16 checkpoint of `decode_cpu.py` (built under out/bench/ on first
use). For tensor-parallel sizes 1 and 2 it measures, in one run: load time, prompt (prefill)
tokens/s, batch-1 greedy decode tokens/s, batch-8 decode tokens/s, resident memory of every rank
after the runs, and the per-rank weight + KV estimate of `inspect --tp`. Each rank gets
cores / N torch threads, so both sizes use the same cores.

    python benchmarks/tp.py [--sizes 1 2] [--prompt-len 128] [--decode-len 32] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from decode_cpu import DENSE, build  # same model as the decode benchmark (run from benchmarks/)

from anyquant import LLM, SamplingParams
from anyquant.loading.describe import describe_checkpoint


def rss_mib(pid: int) -> float:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rank_pids(llm: LLM) -> list[int]:
    workers = getattr(llm.model, "workers", None)
    return [os.getpid(), *(p.pid for p in workers.processes.values())] if workers else [os.getpid()]


def run(
    path: Path, size: int, dtype: str, prompt_len: int, decode_len: int, repeats: int
) -> dict[str, object]:
    t0 = time.perf_counter()
    llm = LLM(path, dtype=dtype, tensor_parallel_size=size, max_model_len=1024, max_num_seqs=8)
    load = time.perf_counter() - t0
    vocab = int(llm.loaded.config["vocab_size"])
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    batch = [torch.randint(0, vocab, (16,), generator=g).tolist() for _ in range(8)]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    many = SamplingParams(max_tokens=1 + decode_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=[prompt], sampling_params=many)  # warm-up
    prefill, decode, batched = [], [], []
    for _ in range(repeats):
        t1 = time.perf_counter()
        llm.generate(prompt_token_ids=[prompt], sampling_params=one)
        t_prefill = time.perf_counter() - t1
        prefill.append(prompt_len / t_prefill)
        t2 = time.perf_counter()
        llm.generate(prompt_token_ids=[prompt], sampling_params=many)
        decode.append(decode_len / (time.perf_counter() - t2 - t_prefill))
        t3 = time.perf_counter()
        outs = llm.generate(prompt_token_ids=batch, sampling_params=many)
        batched.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t3))
    rss = [rss_mib(pid) for pid in rank_pids(llm)]
    llm.close()
    mem = describe_checkpoint(path, dtype=dtype, tp=size, max_model_len=1024)["tensor_parallel"][
        "memory_per_rank"
    ]
    return {
        "size": size,
        "threads": max(1, torch.get_num_threads() // size),
        "load_s": load,
        "prefill": statistics.median(prefill),
        "decode": statistics.median(decode),
        "batch8": statistics.median(batched),
        "rss": rss,
        "estimate_mib": mem["total"] / 2**20,
        "weights_mib": (mem["linear_weights"] + mem["other_weights"]) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    path = build("dense", DENSE)
    threads = torch.get_num_threads()
    rows = []
    for size in args.sizes:
        torch.set_num_threads(threads)  # a tensor-parallel LLM lowers rank 0's threads to cores / N
        rows.append(run(path, size, args.dtype, args.prompt_len, args.decode_len, args.repeats))
    print(f"model {path} ({args.dtype}), {threads} cores, prompt {args.prompt_len}, decode {args.decode_len}")
    print(
        "| TP | threads/rank | load s | prefill tok/s | decode tok/s (batch 1) | decode tok/s (batch 8) "
        "| RSS per rank MiB | weights per rank MiB (est.) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        rss = ", ".join(f"{x:.0f}" for x in r["rss"])  # type: ignore[union-attr]
        print(
            f"| {r['size']} | {r['threads']} | {r['load_s']:.1f} | {r['prefill']:.1f} | {r['decode']:.1f} "
            f"| {r['batch8']:.1f} | {rss} | {r['weights_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
