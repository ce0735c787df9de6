"""Decode steps through the engine: tok/s at batch 1 and 8, context 128 vs 4096, and a per-step profile.

Drives `Engine.step()` (scheduler + runner + sampling + detokenizer: everything a served decode
step does) on the Qwen2.5-0.5B-shaped W4A16 checkpoint that `benchmarks/decode_cpu.py` builds.
Prompts are recorded as computed without running their prefill (see `_ready`). The profile splits a step's wall time
into the heavy kernels (matmuls, quantized matmuls, attention) and everything else (Python,
dispatch, small ops): the engine's own overhead.

`--attention auto torch` times the decode attention's two implementations (the C++ kernel and
the pure-torch path, layers/decode_kernel.py) in the same process, alternating in rounds, and
prints each one's 4096-vs-128 ratio.

Long context (issue 11's target: decode at 4,096 tokens >= 80 % of the speed at 128, "with the KV
bytes counted in the roofline"): each step reads the weights (the checkpoint's tensors but the
embedding table, LM head in full: `decode_cpu.bytes_per_token`) plus every cached key and value of
every sequence (batch x context x the cache's bytes per token). The ratio table prints the raw
speed ratio (tok/s at the long context / tok/s at the short one) and the roofline-normalised one:
the raw ratio times bytes(long) / bytes(short), i.e. how much of the short step's bytes per second
the long step keeps (100 %: the long step is slower only by the bytes it must read more). The
machine's read bandwidth (a plain sum of a 512 MiB buffer on the same threads) is measured in each
round, and the C++ decode attention of a step is replayed alone (every layer, the engine's cache and
block tables) for its time and the GB/s at which it reads the K/V.
Times are wall clock when torch runs more than one thread (the CPU time of the calling thread
misses the others' work), else the calling thread's CPU time.

    python benchmarks/decode_step.py [--model out/bench/dense-w4a16] [--contexts 128 4096] [--batches 1 8]
        [--attention auto torch] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from decode_cpu import bytes_per_token

from anyquant import LLM, SamplingParams
from anyquant.engine.kv_cache import PagedKVCache
from anyquant.layers.decode_kernel import decode_kernel_reason, paged_decode, set_decode_kernel

# Ops that do the arithmetic of a step; the rest of a step's time is the engine's overhead.
HEAVY_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::mv",
    "aten::baddbmm",
    "aten::_weight_int4pack_mm_for_cpu",
    "aten::_weight_int8pack_mm",
    "aten::_int_mm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
    "anyquant_cpu::gemv",
    "anyquant_cpu::tiled_mm",
    "anyquant_cpu::avx2_gemv",
    "anyquant_cpu::avx2_few_rows_mm",
    "anyquant_cpu::avx2_rows_mm",
    "anyquant_cpu::vnni_linear",
    "anyquant_cpu::moe_experts",
    "anyquant_cpu::paged_decode_attention",
    "anyquant_cpu::paged_decode_step",  # the captured step's attention, its K/V store included
    "anyquant_cpu::avx2_tiled_mm",
)


def _ready(llm: LLM, batch: int, context: int, vocab: int, max_tokens: int) -> None:
    """Admit `batch` requests of `context` random tokens and bring them to their first decode step
    without running the prefill: the scheduler records each prompt as computed and a first token as
    sampled. The pages then hold zeros instead of real keys and values, which costs a decode step
    exactly the same (on a 2-core machine a real 4k prefill takes minutes)."""
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine = llm.engine
    for i in range(batch):
        prompt = torch.randint(100, vocab, (context,), generator=g).tolist()
        engine.add_request(prompt, params, request_id=f"b{batch}-c{context}-{i}")
    scheduler = engine.scheduler
    while scheduler.waiting or any(r.num_uncomputed > 1 for r in scheduler.running):
        plan = scheduler.schedule()
        scheduler.update(plan, {r.request_id: 100 for r, n in plan.scheduled if r.reaches_end(n)})


def _drain(llm: LLM) -> None:
    for rid in list(llm.engine._states):
        llm.engine.abort(rid)


def time_steps(llm: LLM, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) per engine step, medians of `steps`. With
    OMP_NUM_THREADS=1 all the work runs on this thread, and its CPU time is the step's cost even
    when a shared machine makes the wall time mostly waiting."""
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        llm.engine.step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def _clock(basis: str) -> Callable[[], float]:
    return time.perf_counter if basis == "wall" else time.thread_time


def read_bandwidth_gbs(basis: str, nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """A plain read of a buffer far larger than the caches (a sum, on torch's threads): GB/s, best
    of `repeats`, timed like the steps (`basis`)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    clock = _clock(basis)
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        buf.sum()
        best = min(best, clock() - t0)
    return nbytes / best / 1e9


def attention_replay_s(llm: LLM, basis: str, repeats: int) -> float:
    """Seconds per step of the decode attention alone (median of `repeats`): the step's kernel
    call, every layer, on the engine's cache through the running requests' block tables (what a
    step's attention reads; random queries), timed like the steps. The profiler's op times are
    wall clock, which a loaded machine inflates."""
    runner = llm.engine.runner
    model, cache = runner.model, runner.cache
    requests = list(llm.engine.scheduler.running)
    rows = torch.tensor([runner.tables.row_of(r) for r in requests])
    # The keys already cached (a step's own new key may need a page the table does not hold yet).
    lens = torch.tensor([r.num_computed_tokens for r in requests])
    page = cache.page_size
    tables = runner.tables.table[rows, : -(-int(lens.max()) // page)]
    args = model.args
    q = torch.randn(len(requests), args.num_heads, args.head_dim, dtype=cache.k.dtype)
    clock = _clock(basis)
    times = []
    for _ in range(repeats):
        t0 = clock()
        for layer in range(args.num_layers):
            paged_decode(q, cache.k[layer], cache.v[layer], tables, lens, page, args.head_dim**-0.5, None)
        times.append(clock() - t0)
    return sorted(times)[len(times) // 2]


def profile_steps(llm: LLM, steps: int) -> dict[str, float]:
    """Per step: wall ms, ms inside heavy kernels, number of aten ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.engine.step()
        wall = (time.perf_counter() - t0) / steps
    heavy = 0.0
    ops = 0
    counts: Counter[str] = Counter()
    for evt in prof.key_averages():
        if evt.key.startswith("aten::"):
            ops += evt.count
            counts[evt.key] = evt.count
        if evt.key in HEAVY_OPS:
            heavy += evt.self_cpu_time_total / 1e6
    return {
        "wall_ms": wall * 1e3,
        "heavy_ms": heavy / steps * 1e3,
        "overhead_share": 1 - heavy / steps / wall,
        "aten_ops_per_step": ops / steps,
        "to_copy_per_step": counts["aten::_to_copy"] / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("out/bench/dense-w4a16"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--attention", nargs="+", default=["auto"], choices=["auto", "torch"])
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds over every context, batch and --attention mode"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    budget = len(args.attention) * args.steps + args.profile_steps + 4
    llm = LLM(
        str(args.model),
        dtype="bfloat16",
        max_model_len=max(args.contexts) + budget + 16,
        max_num_seqs=max(args.batches),
    )
    vocab = int(llm.loaded.config["vocab_size"])
    runner = llm.engine.runner
    weight_bytes = bytes_per_token(args.model)
    kv_token_bytes = PagedKVCache.page_bytes_for_model(runner.model, 1, runner.cache.k.dtype)
    threads = torch.get_num_threads()
    basis = "wall" if threads > 1 else "cpu"
    cache = runner.cache
    probe = torch.zeros(1, runner.model.args.num_heads, cache.k.shape[-1], dtype=cache.k.dtype)
    kernel = decode_kernel_reason(probe, cache.k[0], cache.v[0]) is None  # the C++ decode attention runs
    cases = [(c, b, m) for c in args.contexts for b in args.batches for m in args.attention]
    walls: dict[tuple[int, int, str], list[float]] = {case: [] for case in cases}
    cpus: dict[tuple[int, int, str], list[float]] = {case: [] for case in cases}
    profiles: dict[tuple[int, int], dict[str, float]] = {}
    bandwidths: list[float] = []
    attention_s: dict[tuple[int, int], list[float]] = {}
    # Rounds over every (context, batch, attention): the ratios compare steps timed minutes, not
    # tens of minutes, apart on a machine whose load changes.
    for round_ in range(args.rounds):
        bandwidths.append(read_bandwidth_gbs(basis))
        for context in args.contexts:
            for batch in args.batches:
                _ready(llm, batch, context, vocab, max_tokens=budget)
                for mode in args.attention:
                    set_decode_kernel(mode)
                    wall_s, cpu_s = time_steps(llm, args.steps)
                    walls[(context, batch, mode)].append(wall_s)
                    cpus[(context, batch, mode)].append(cpu_s)
                if round_ == 0:
                    set_decode_kernel(args.attention[0])
                    profiles[(context, batch)] = profile_steps(llm, args.profile_steps)
                if kernel:
                    attention_s.setdefault((context, batch), []).append(
                        attention_replay_s(llm, basis, args.steps)
                    )
                _drain(llm)
    bandwidth = sorted(bandwidths)[len(bandwidths) // 2]
    rows = []
    for context, batch, mode in cases:
        wall_s = sorted(walls[(context, batch, mode)])[args.rounds // 2]
        cpu_s = sorted(cpus[(context, batch, mode)])[args.rounds // 2]
        step_s = wall_s if basis == "wall" else cpu_s
        kv_bytes = batch * context * kv_token_bytes
        row = {
            "context": context,
            "batch": batch,
            "attention": mode,
            "threads": threads,
            "basis": basis,
            "step_ms": wall_s * 1e3,
            "cpu_step_ms": cpu_s * 1e3,
            "tok_s": batch / step_s,
            "tok_s_cpu": batch / cpu_s,
            "cpu_step_ms_rounds": [c * 1e3 for c in cpus[(context, batch, mode)]],
            "wall_step_ms_rounds": [w * 1e3 for w in walls[(context, batch, mode)]],
            "weight_bytes": weight_bytes,
            "kv_bytes": kv_bytes,
            "step_gbs": (weight_bytes + kv_bytes) / step_s / 1e9,
            "read_bandwidth_gbs": bandwidth,
            **(profiles[(context, batch)] if mode == args.attention[0] else {}),
        }
        if (context, batch) in attention_s and mode == "auto":
            attn = sorted(attention_s[(context, batch)])[args.rounds // 2]
            row["attention_ms"] = attn * 1e3
            row["attention_kv_gbs"] = kv_bytes / attn / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)
    set_decode_kernel("auto")
    print(
        f"\n{threads} thread(s); step times: {basis} (medians of {args.rounds} round(s) of {args.steps}-step "
        f"medians); read bandwidth {bandwidth:.1f} GB/s (rounds: "
        + ", ".join(f"{b:.1f}" for b in bandwidths)
        + ")"
    )
    print(
        "\n| context | batch | attention | step ms | tok/s | step ms (wall) | step ms (CPU, this thread) "
        "| MiB read / step (weights + KV) | GB/s | % of read bw | C++ attention ms | its K/V GB/s "
        "| overhead share | aten ops/step |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        step_ms = r["step_ms"] if basis == "wall" else r["cpu_step_ms"]
        profiled = "wall_ms" in r
        print(
            f"| {r['context']} | {r['batch']} | {r['attention']} | {step_ms:.1f} | {r['tok_s']:.1f} | "
            f"{r['step_ms']:.1f} | {r['cpu_step_ms']:.1f} | "
            f"{r['weight_bytes'] / 2**20:.0f} + {r['kv_bytes'] / 2**20:.0f} | {r['step_gbs']:.1f} | "
            f"{r['step_gbs'] / bandwidth:.0%} | "
            + (f"{r['attention_ms']:.1f} | {r['attention_kv_gbs']:.1f} | " if "attention_ms" in r else "| | ")
            + (f"{r['overhead_share']:.0%} | {r['aten_ops_per_step']:.0f} |" if profiled else "| |")
        )
    lo, hi = min(args.contexts), max(args.contexts)
    if lo != hi:
        print(
            f"\n| batch | attention | tok/s at {hi} / at {lo} (raw) | bytes per step {hi} / {lo} "
            "| roofline-normalised ratio (raw x bytes ratio) |"
        )
        print("|---:|---|---:|---:|---:|")
        by = {(r["context"], r["batch"], r["attention"]): r for r in rows}
        for batch in args.batches:
            for mode in args.attention:
                long, short = by[(hi, batch, mode)], by[(lo, batch, mode)]
                raw = long["tok_s"] / short["tok_s"]
                more = (long["weight_bytes"] + long["kv_bytes"]) / (short["weight_bytes"] + short["kv_bytes"])
                print(f"| {batch} | {mode} | {raw:.0%} | {more:.2f} | {raw * more:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
