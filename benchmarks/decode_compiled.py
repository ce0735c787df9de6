"""Eager vs compiled decode steps (`torch.compile`, Inductor on CPU) in one process, alternating.

Loads the Qwen2.5-0.5B-shaped W4A16 checkpoint (`benchmarks/decode_cpu.py` builds it) once with
its decode step compiled (the load's "compiling" phase is the compile time), brings `batch`
requests to their decode steps (`decode_step._ready`: no prefill), then in rounds runs engine
steps eagerly (the runner's captured step switched off) and compiled, in turn, timing this
thread's CPU time (OMP_NUM_THREADS=1). The heavy kernels (LM head, the other linear kernels,
paged attention) are the same calls in both modes; their time is measured in the eager step
(`decode_profile._breakdown`), and each mode's "other" (Python, dispatch, small ops: what
compiling can remove) is its step time minus those kernels.

`--attention auto torch` also alternates the decode attention's implementations (the C++ kernel
and the pure-torch path, layers/decode_kernel.py) inside each round; the rows then name both.
The compiled step's attention is chosen when it is captured (`ANYQUANT_DECODE_ATTENTION` at load,
layers/decode_kernel.py `step_kernel_reason`), so there the switch changes the eager steps only.

    python benchmarks/decode_compiled.py [--batches 1 32] [--contexts 128] [--rounds 5] [--attention auto torch]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
from decode_profile import _breakdown, _steps_cpu_ms  # type: ignore[import-not-found]
from decode_step import _drain, _ready  # type: ignore[import-not-found]

from anyquant import LLM
from anyquant.layers.decode_kernel import set_decode_kernel


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="out/bench/dense-w4a16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode per round")
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--attention", nargs="+", default=["auto"], choices=["auto", "torch"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    budget = 2 * len(args.attention) * (args.steps + 1) + len(args.attention) * args.profile_steps + 8
    t0, cpu0 = time.perf_counter(), os.times()
    llm = LLM(
        args.model,
        dtype="bfloat16",
        max_model_len=max(args.contexts) + budget + 16,
        max_num_seqs=max(args.batches),
        enforce_eager=False,
    )
    load_s, cpu1 = time.perf_counter() - t0, os.times()
    # CPU seconds of the load, Inductor's compiler subprocesses included (the wall time of a
    # shared machine is mostly waiting).
    load_cpu_s = sum(cpu1[:4]) - sum(cpu0[:4])
    runner = llm.engine.runner
    captured = runner.captured
    if captured is None:
        raise SystemExit(f"no compiled step: {llm.eager_reason}")
    print(
        json.dumps(
            {
                "load_s": load_s,
                "load_cpu_s": load_cpu_s,
                **llm.loaded.timings,
                "buckets": list(captured.buckets),
            }
        ),
        flush=True,
    )
    vocab = int(llm.loaded.config["vocab_size"])
    modes = [(m, a) for a in args.attention for m in ("eager", "compiled")]
    cases = [(c, b) for c in args.contexts for b in args.batches]
    times: dict[tuple[int, int, str, str], list[float]] = {
        (*case, *mode): [] for case in cases for mode in modes
    }
    profiles: dict[tuple[int, int, str], dict[str, float]] = {}
    # Rounds over every context and batch (requests admitted again each round, no prefill), so
    # the 4096-vs-128 ratios compare steps timed minutes apart on a machine whose load changes.
    for round_ in range(args.rounds):
        for context, batch in cases:
            _ready(llm, batch, context, vocab, max_tokens=budget)
            if round_ == 0:
                for mode, attention in modes:  # one untimed step each
                    set_decode_kernel(attention)
                    runner.captured = captured if mode == "compiled" else None
                    llm.engine.step()
            gc.collect()
            for mode, attention in modes:
                set_decode_kernel(attention)
                runner.captured = captured if mode == "compiled" else None
                times[(context, batch, mode, attention)] += _steps_cpu_ms(llm, args.steps)
            if round_ == 0:
                for attention in args.attention:
                    set_decode_kernel(attention)
                    runner.captured = None
                    profiles[(context, batch, attention)] = _breakdown(llm, args.profile_steps)
            set_decode_kernel("auto")
            runner.captured = captured
            _drain(llm)
    rows = []
    for context, batch in cases:
        for attention in args.attention:
            prof = profiles[(context, batch, attention)]
            kernels = prof["lm_head_ms"] + prof["linear_ms"] + prof["attention_ms"]
            row: dict[str, float | str] = {
                "context": context,
                "batch": batch,
                "attention": attention,
                **prof,
                "kernels_ms": kernels,
            }
            for mode in ("eager", "compiled"):
                step = statistics.median(times[(context, batch, mode, attention)])
                row[f"{mode}_ms"] = step
                row[f"{mode}_other_ms"] = max(step - kernels, 0.0)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| context | batch | attention | eager ms | compiled ms | speed-up | eager tok/s | compiled tok/s "
        "| kernels ms (LM head / linear / attention) | other ms eager (share) | other ms compiled (share) |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        e, c = r["eager_ms"], r["compiled_ms"]
        print(
            f"| {r['context']} | {r['batch']} | {r['attention']} | {e:.1f} | {c:.1f} | {e / c:.3f}x | "
            f"{r['batch'] / e * 1e3:.1f} | {r['batch'] / c * 1e3:.1f} | "
            f"{r['kernels_ms']:.1f} ({r['lm_head_ms']:.1f} / {r['linear_ms']:.1f} / {r['attention_ms']:.1f}) | "
            f"{r['eager_other_ms']:.1f} ({r['eager_other_ms'] / e:.0%}) | "
            f"{r['compiled_other_ms']:.1f} ({r['compiled_other_ms'] / c:.0%}) |"
        )
    lo, hi = min(args.contexts), max(args.contexts)
    if lo != hi:
        by = {(r["context"], r["batch"], r["attention"]): r for r in rows}
        print(f"\n| batch | attention | tok/s at {hi} / at {lo}, eager | compiled |")
        print("|---:|---|---:|---:|")
        for batch in args.batches:
            for attention in args.attention:
                a, b = by[(hi, batch, attention)], by[(lo, batch, attention)]
                eager = float(b["eager_ms"]) / float(a["eager_ms"])
                compiled = float(b["compiled_ms"]) / float(a["compiled_ms"])
                print(f"| {batch} | {attention} | {eager:.0%} | {compiled:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
