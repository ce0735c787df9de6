"""Decode steps with the int8 KV cache (`kv_cache_dtype="int8"`) vs the bf16 cache, at long context.

Loads the Qwen2.5-0.5B-shaped W4A16 checkpoint that `benchmarks/decode_cpu.py` builds twice, bf16
compute, with the same `--kv-cache-gb`: one engine keeps the cache in bf16, the other as int8 rows
(layers/kv_quant.py). Prints the pages each budget holds, then times eager engine decode steps at
every context and batch for both caches through the C++ decode attention ("auto"; the int8 cache
on its AVX2 path, codes read in place) and through the pure-torch attention ("torch"; int8 rows
dequantized after the gather). The cases alternate within each round, so a shared machine's
changing load hits them alike. Prompts are
recorded as computed without a prefill (decode_step.py's `_ready`: the pages hold zeros, which
cost a step the same).

    python benchmarks/kv_cache_decode.py [--model out/bench/dense-w4a16] [--contexts 128 4096]
        [--batches 1 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from decode_step import _drain, _ready, time_steps

from anyquant import LLM
from anyquant.engine.kv_cache import PagedKVCache
from anyquant.layers.decode_kernel import set_decode_kernel

# (KV cache option, decode attention mode)
CASES = (("auto", "auto"), ("int8", "auto"), ("auto", "torch"), ("int8", "torch"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("out/bench/dense-w4a16"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-cache-gb", type=float, default=0.5)
    args = parser.parse_args()
    budget = args.rounds * args.steps * 2 + 4
    llms = {
        kv: LLM(
            str(args.model),
            dtype="bfloat16",
            max_model_len=max(args.contexts) + budget + 16,
            max_num_seqs=max(args.batches),
            kv_cache_gb=args.kv_cache_gb,
            kv_cache_dtype=kv,
            enforce_eager=True,
        )
        for kv in ("auto", "int8")
    }
    vocab = int(llms["auto"].loaded.config["vocab_size"])
    threads = torch.get_num_threads()
    basis = "wall" if threads > 1 else "cpu"
    for kv, llm in llms.items():
        per_token = PagedKVCache.page_bytes_for_model(llm.model, 1, llm.cache_dtype)
        print(
            f"kv_cache_dtype={kv}: {llm.engine.num_kv_pages} pages of {llm.engine.page_size} tokens in "
            f"{args.kv_cache_gb} GiB ({per_token} bytes per token)"
        )
    times: dict[tuple[int, int, str, str], list[float]] = {}
    for context in args.contexts:
        for batch in args.batches:
            for llm in llms.values():
                _ready(llm, batch, context, vocab, max_tokens=budget)
            for _ in range(args.rounds):
                for kv, mode in CASES:
                    set_decode_kernel(mode)
                    wall_s, cpu_s = time_steps(llms[kv], args.steps)
                    times.setdefault((context, batch, kv, mode), []).append(
                        wall_s if basis == "wall" else cpu_s
                    )
            for llm in llms.values():
                _drain(llm)
    set_decode_kernel("auto")
    print(
        f"\n{threads} thread(s); step times: {basis}, median of {args.rounds} rounds of {args.steps}-step medians"
    )
    print("\n| context | batch | KV cache | attention | step ms | vs bf16 cache, same attention path |")
    print("|---:|---:|---|---|---:|---:|")
    rows = []
    for (context, batch, kv, mode), values in times.items():
        ms = sorted(values)[len(values) // 2] * 1e3
        rows.append(
            {"context": context, "batch": batch, "kv_cache_dtype": kv, "attention": mode, "step_ms": ms}
        )
    by = {(r["context"], r["batch"], r["kv_cache_dtype"], r["attention"]): r["step_ms"] for r in rows}
    for r in rows:
        base = by[(r["context"], r["batch"], "auto", r["attention"])]
        ratio = "" if r["kv_cache_dtype"] == "auto" else f"{r['step_ms'] / base:.2f}x"
        cache = "bf16" if r["kv_cache_dtype"] == "auto" else "int8"
        print(
            f"| {r['context']} | {r['batch']} | {cache} | {r['attention']} | {r['step_ms']:.1f} | {ratio} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
